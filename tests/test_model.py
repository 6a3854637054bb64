"""The model: GPT-2 shapes, sizes and sampling, then every architecture option of the one model class
(shapes, causality, sizes, KV cache, presets)."""

import pytest
import torch

from helpers import ROOT
from lm_pretrain.utils.errors import UserError
from lm_pretrain.model import GPT, GPTConfig, model_size
from lm_pretrain.model.gpt import sample_next
from lm_pretrain.commands.sizes import config_from_yaml

SMALL = dict(vocab_size=101, block_size=16, n_layer=2, n_head=2, n_embd=32)


def expected_params(c: GPTConfig) -> int:
    """GPT-2 parameter count by hand: embeddings, then per block two LayerNorms, qkv, proj, MLP."""
    d, b = c.n_embd, int(c.bias)
    per_block = 2 * (d + b * d) + (3 * d * d + b * 3 * d) + (d * d + b * d) + (4 * d * d + b * 4 * d) + (4 * d * d + b * d)
    head = 0 if c.tie_embeddings else c.vocab_size * d
    return c.vocab_size * d + c.block_size * d + c.n_layer * per_block + (d + b * d) + head


@pytest.mark.parametrize("bias,tied", [(True, True), (False, False)])
def test_parameter_count(bias, tied):
    config = GPTConfig(**SMALL, bias=bias, tie_embeddings=tied)
    model = GPT(config)
    assert model.num_params() == expected_params(config)
    assert model.num_params(non_embedding=True) == expected_params(config) - (101 + 16) * 32


def test_gpt2_124m_parameter_count():
    with torch.device("meta"):
        model = GPT(GPTConfig())  # GPT-2 small
    assert model.num_params() == 124_439_808  # the figure Hugging Face's gpt2 reports


def test_shapes_and_initial_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL))
    idx = torch.randint(0, 101, (3, 16))
    logits = model(idx)
    assert logits.shape == (3, 16, 101)
    # GPT-2 init: the untrained model is near uniform, loss ~ ln(vocab)
    targets = torch.randint(0, 101, (3 * 16,))
    loss = torch.nn.functional.cross_entropy(logits.view(-1, 101), targets)
    assert abs(loss.item() - torch.log(torch.tensor(101.0)).item()) < 0.2


def test_tied_embeddings_share_storage():
    model = GPT(GPTConfig(**SMALL, tie_embeddings=True))
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()


def test_causal():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL)).eval()
    idx = torch.randint(0, 101, (1, 16))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % 101
    a, b = model(idx), model(changed)
    assert torch.equal(a[:, :10], b[:, :10])  # the past cannot see the future
    assert not torch.allclose(a[:, 10:], b[:, 10:])  # but the present and future do see it


def test_too_long_sequence():
    model = GPT(GPTConfig(**SMALL))
    with pytest.raises(ValueError, match="longer than block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_bad_config():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)


def test_generate():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL)).eval()
    prompt = torch.randint(0, 101, (2, 5))
    out = model.generate(prompt, 20, temperature=0)  # longer than block_size: context is cropped
    assert out.shape == (2, 25) and torch.equal(out[:, :5], prompt)
    assert torch.equal(out, model.generate(prompt, 20, temperature=0))  # greedy is deterministic
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    assert torch.equal(model.generate(prompt, 10, top_k=5, generator=g1), model.generate(prompt, 10, top_k=5, generator=g2))
    # top_k=1 is greedy whatever the temperature
    assert torch.equal(model.generate(prompt, 10, temperature=2.0, top_k=1), out[:, :15])


def test_generate_respects_vocab_limit():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL)).eval()
    with torch.no_grad():
        model.lm_head.weight[95:] += 5.0  # make the padded ids the likeliest
    out = model.generate(torch.zeros(1, 1, dtype=torch.long), 30, temperature=1.0, vocab_limit=95)
    assert out.max() < 95


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_cached_prefill_then_several_tokens_equals_the_full_forward(position):
    """A KV cache continued by a chunk of tokens at once (not one by one) must still be causal."""
    from lm_pretrain.model.gpt import KVCache

    torch.manual_seed(0)
    config = GPTConfig(**{**SMALL, "block_size": 32}, n_kv_head=1, position=position)
    model = GPT(config).eval()
    idx = torch.randint(0, 101, (2, 20))
    cache = KVCache(config, 2)
    pieces = [model(idx[:, :12], cache), model(idx[:, 12:19], cache), model(idx[:, 19:], cache)]
    assert cache.length == 20
    assert (torch.cat(pieces, dim=1) - model(idx)).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------
# Every architecture option

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
    from lm_pretrain.model.gpt import KVCache

    model = build(name)
    idx = torch.randint(0, 211, (2, 20))
    full = model(idx)
    cache = KVCache(model.config, 2)
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
    with pytest.raises(UserError, match="--model.norm 'batchnorm' is not one of layernorm, rmsnorm"):
        GPTConfig(**BASE, norm="batchnorm")
    with pytest.raises(UserError, match="--model.mlp 'relu' is not one of gelu, swiglu, relu2"):
        GPTConfig(**BASE, mlp="relu")


@pytest.mark.parametrize("blocks", [{}, {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False, "n_kv_head": 2,
                                         "tie_embeddings": False}])
def test_flops_per_token_match_lightnings_flop_counter(blocks):
    """model_size's 6 N + attention against Lightning's measure_flops (torch's FlopCounterMode over
    forward and backward on the meta device): equal, once the 6 FLOPs per token that 6 N also
    gives each norm scale and bias (not matmul weights) are taken out."""
    from lightning.fabric.utilities.throughput import measure_flops

    from lm_pretrain.model.loss import next_token_loss

    config = GPTConfig(**{**BASE, "vocab_size": 512, "block_size": 64, **blocks})
    with torch.device("meta"):
        model = GPT(config)
        tokens = torch.zeros(2, config.block_size, dtype=torch.long)
    measured = measure_flops(model, lambda: next_token_loss(model, tokens, tokens), lambda loss: loss)
    vectors = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    assert measured / tokens.numel() == model_size(config)["flops_per_token"] - 6 * vectors


def test_grouped_query_attention_equals_multi_head_attention_with_the_kv_heads_copied():
    """SDPA shares each K/V head among its group of query heads (enable_gqa): the same outputs and
    gradients as a multi-head model whose K/V heads are those heads copied out, group by group."""
    torch.manual_seed(0)
    grouped = GPT(GPTConfig(**{**BASE, "position": "rope", "bias": False}, n_kv_head=2))
    full = GPT(GPTConfig(**{**BASE, "position": "rope", "bias": False}, n_kv_head=4))
    state, d, head = grouped.state_dict(), BASE["n_embd"], BASE["n_embd"] // BASE["n_head"]
    for name, weight in list(state.items()):
        if name.endswith(("attn.k.weight", "attn.v.weight")):  # each K/V head, twice in a row
            state[name] = weight.view(2, head, d).repeat_interleave(2, dim=0).reshape(4 * head, d)
    full.load_state_dict(state)
    idx = torch.randint(0, BASE["vocab_size"], (3, 24))
    copies, repeat = [], torch.Tensor.repeat_interleave
    try:  # no K/V head is copied out for training's attention
        torch.Tensor.repeat_interleave = lambda self, *args, **kwargs: copies.append(1) or repeat(self, *args, **kwargs)
        out_grouped = grouped(idx)
    finally:
        torch.Tensor.repeat_interleave = repeat
    out_full = full(idx)
    assert copies == [] and torch.allclose(out_grouped, out_full, atol=1e-6)
    out_grouped.square().sum().backward()
    out_full.square().sum().backward()
    assert torch.allclose(grouped.wte.weight.grad, full.wte.weight.grad, atol=1e-5)


def test_the_8b_preset_builds_on_the_meta_device_and_plans_its_memory_per_gpu(capsys):
    from lm_pretrain.commands.sizes import main
    from lm_pretrain.training.hardware import training_memory_bytes

    path = ROOT / "configs" / "llama-8b.yaml"
    config = config_from_yaml(path)
    with torch.device("meta"):  # no weights: the shapes of 7.4B parameters
        model = GPT(config)
    assert model.num_params() == model_size(config)["params"] and 7.3e9 < model.num_params() < 7.5e9
    assert (config.n_layer, config.n_embd, config.n_head, config.n_kv_head, config.mlp_hidden) == (32, 4096, 32, 8, 14336)
    from helpers import cli_error

    assert cli_error(main, [str(path), "--gpus", "[8,0]"], capsys) == \
        "error: --gpus 0 is out of range: it must be > 0 and <= 2147483647 (see lm-pretrain-sizes --help)"
    assert cli_error(main, [str(path), "--tensor_parallel", "[2]"], capsys) == \
        "error: --tensor_parallel plans memory per GPU: give --gpus too"
    main([str(path), "--gpus", "[8,16,64]", "--tensor_parallel", "[1,2,3,4,8]"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| llama-8b | ")]
    plans = {(int(row[1]), int(row[2])): (float(row[5]), float(row[-1])) for row in rows if len(row) == 8}
    assert sorted(plans) == [(g, t) for g in (8, 16, 64) for t in (1, 2, 4, 8)]  # 3 divides neither: left out
    assert plans[(8, 1)][1] > plans[(16, 1)][1] > plans[(64, 1)][1]
    # states: the blocks' matrices split over every GPU, the rest (embeddings, norms, head) over the groups
    split = sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2)
    for (gpus, tp), (states, _) in plans.items():
        assert states == round(16 * (split / gpus + (model.num_params() - split) / (gpus / tp)) / 2**30, 1)
    # without checkpointing tensor parallelism splits most of each block's activations
    activations = [training_memory_bytes(config, 1, 8, tensor_parallel=tp)["activations"] for tp in (1, 2, 8)]
    assert activations[0] > activations[1] > activations[2]


@pytest.mark.parametrize("tied", [True, False])
def test_a_model_built_on_meta_draws_nothing_and_materialises_to_the_model_built_whole(tied):
    """GPT draws its weights in init_weights alone: built on the meta device it takes no memory and
    no random draw, and strategies.materialize (what each process of a sharded run does with its
    shards) then gives the weights and buffers of the model built whole from the same seed."""
    from lm_pretrain.training.strategies import materialize

    config = GPTConfig(**{**BASE, "position": "learned" if tied else "rope", "tie_embeddings": tied})
    torch.manual_seed(0)
    whole = GPT(config)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    with torch.device("meta"):
        model = GPT(config)
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert torch.equal(torch.get_rng_state(), state)
    materialize(model, torch.device("cpu"))
    assert not torch.equal(torch.get_rng_state(), state)  # the draws happen here
    assert (model.lm_head.weight is model.wte.weight) == tied
    want = whole.state_dict() | dict(whole.named_buffers())
    got = model.state_dict() | dict(model.named_buffers())
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_the_llama_8b_preset_is_built_on_the_meta_device_by_train_py_in_seconds(tmp_path):
    """Under the FSDP overlay train.py builds the 7.4B model without memory: each process makes only
    its shards when the run starts."""
    from lm_pretrain.commands.train import build

    cli = build(["--config", str(ROOT / "configs" / "llama-8b.yaml"), "--config",
                 str(ROOT / "configs" / "overlays" / "fsdp.yaml"), "--trainer.accelerator", "cpu",
                 "--trainer.devices", "8", "--model.vocab_size", "128256", "--trainer.logger", "false",
                 "--data.data_dir", str(tmp_path)],
                subcommand=False)
    params = list(cli.model.model.parameters())
    assert all(p.is_meta for p in params) and sum(p.numel() for p in params) > 7e9


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_a_checkpoint_with_fused_qkv_and_gate_up_matrices_still_loads(mlp):
    """Earlier versions kept q, k, v in one attn.qkv matrix and SwiGLU's gate and up halves in one
    mlp.fc: such weights load into the separate matrices (tensor parallelism splits those by heads)."""
    torch.manual_seed(0)
    config = GPTConfig(**{**BASE, "n_kv_head": 2, "mlp": mlp, "position": "rope", "norm": "rmsnorm"})
    model = GPT(config)
    state, fused = model.state_dict(), {}
    for name, tensor in state.items():
        if ".attn.k." in name or ".attn.v." in name or ".mlp.gate." in name:
            continue  # folded into the fused matrices
        if ".attn.q." in name:
            fused[name.replace(".attn.q.", ".attn.qkv.")] = torch.cat([state[name.replace(".q.", f".{x}.")] for x in "qkv"])
        elif mlp == "swiglu" and ".mlp.fc." in name:
            fused[name] = torch.cat([state[name.replace(".fc.", ".gate.")], tensor])  # gate half first
        else:
            fused[name] = tensor
    assert any(".attn.qkv." in k for k in fused) and not any(".attn.q." in k for k in fused)
    loaded = GPT(config)
    loaded.load_state_dict(fused)
    idx = torch.randint(0, BASE["vocab_size"], (2, 12))
    assert torch.equal(loaded(idx), model(idx))
