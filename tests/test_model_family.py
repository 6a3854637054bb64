"""Every architecture option of the one model class: shapes, causality, sizes, KV cache, presets."""


import pytest
import torch

from conftest import ROOT
from lm_pretrain.model import GPT, GPTConfig, model_size, sample_next
from lm_pretrain.sizes import config_from_yaml

BASE = dict(vocab_size=211, block_size=24, n_layer=2, n_head=4, n_embd=32)
ARCHITECTURES = {
    "gpt2": dict(),
    "llama": dict(position="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False, tie_embeddings=False),
    "rope-layernorm-gelu-mqa": dict(position="rope", n_kv_head=1, rope_theta=500000.0),
    "learned-rmsnorm-swiglu-untied": dict(norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False, mlp_hidden=48),
}


def build(name: str, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**BASE, **ARCHITECTURES[name])).eval()
    with torch.no_grad():  # move norm weights off 1 so a mapping mistake cannot hide behind them
        for n, p in model.named_parameters():
            if "ln" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_shapes_and_causality(name):
    model = build(name)
    idx = torch.randint(0, 211, (2, 24))
    logits = model(idx)
    assert logits.shape == (2, 24, 211)
    changed = idx.clone()
    changed[:, 15] = (idx[:, 15] + 1) % 211
    other = model(changed)
    assert torch.allclose(logits[:, :15], other[:, :15], atol=1e-6)
    assert not torch.allclose(logits[:, 15:], other[:, 15:])


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_size_formula_matches_the_built_model(name):
    model = build(name)
    size = model_size(model.config)
    assert size["params"] == model.num_params()
    assert size["non_embedding_params"] == model.num_params(non_embedding=True)


def test_gpt2_124m_flops_per_token():
    # 6 N + 12 L H Q T with N = 123.65M (all parameters but the position table): nanoGPT's MFU count
    size = model_size(GPTConfig())
    assert size["flops_per_token"] == 6 * 123_653_376 + 12 * 12 * 12 * 64 * 1024


def test_grouped_query_attention_shrinks_kv():
    mha = model_size(GPTConfig(**BASE))["params"]
    gqa = model_size(GPTConfig(**BASE, n_kv_head=2))["params"]
    assert mha - gqa == BASE["n_layer"] * 2 * (32 * 16 + 16)  # k and v: 32 -> 16 outputs each, with bias


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_kv_cache_gives_the_same_logits(name):
    from lm_pretrain.model import KVCache

    model = build(name)
    idx = torch.randint(0, 211, (2, 20))
    full = model(idx)
    cache = KVCache(model.config, 2, idx.device, torch.float32)
    pieces = [model(idx[:, :8], cache)] + [model(idx[:, t:t + 1], cache) for t in range(8, 20)]
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)
    prompt = idx[:, :4]
    assert torch.equal(model.generate(prompt, 18, temperature=0), model.generate(prompt, 18, temperature=0, use_cache=False))


def test_generate_past_the_context_and_stop_token():
    model = build("llama")
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), 60, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 63)  # runs past block_size (24), restarting the cache from the last half
    first = out[0, 3].item()
    stopped = model.generate(torch.zeros(1, 3, dtype=torch.long), 60, temperature=1.0,
                             generator=torch.Generator().manual_seed(0), stop_token=first)
    assert stopped.shape == (1, 4) and stopped[0, -1] == first


def test_top_p_and_top_k():
    logits = torch.tensor([[3.0, 2.0, 1.0, -5.0]])
    g = torch.Generator().manual_seed(0)
    assert {sample_next(logits, top_p=0.1, generator=g).item() for _ in range(50)} == {0}  # only the likeliest
    assert {sample_next(logits, top_k=2, generator=g).item() for _ in range(200)} == {0, 1}
    probs = logits.softmax(-1)[0]
    p = (probs[0] + probs[1] / 2).item()  # reaches past token 0 but not past token 1
    assert {sample_next(logits, top_p=p, generator=g).item() for _ in range(300)} == {0, 1}


PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_builds_with_the_formula_size(path):
    config = config_from_yaml(path)
    with torch.device("meta"):
        model = GPT(config)
    assert model.num_params() == model_size(config)["params"]
    assert model(torch.zeros(1, 8, dtype=torch.long, device="meta")).shape == (1, 8, config.vocab_size)


def test_preset_family_is_complete():
    names = {p.stem for p in PRESETS}
    assert {"tiny", "tiny-llama", "gpt2-124m", "gpt2-350m", "gpt2-774m", "gpt2-1.5b", "llama-125m", "llama-350m",
            "llama-1b"} <= names
    sizes = {p.stem: model_size(config_from_yaml(p))["params"] for p in PRESETS}
    assert sizes["gpt2-124m"] < sizes["gpt2-350m"] < sizes["gpt2-774m"] < sizes["gpt2-1.5b"]
    assert sizes["llama-125m"] < sizes["llama-350m"] < sizes["llama-1b"]
    assert 1.4e9 < sizes["gpt2-1.5b"] < 1.6e9 and 1.0e9 < sizes["llama-1b"] < 1.2e9


def test_bad_architecture_options():
    with pytest.raises(ValueError, match="n_kv_head"):
        GPTConfig(**{**BASE, "n_kv_head": 3})
    with pytest.raises(ValueError, match="norm must be one of"):
        GPTConfig(**BASE, norm="batchnorm")
