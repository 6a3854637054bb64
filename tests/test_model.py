import pytest
import torch

from lm_pretrain.model import GPT, GPTConfig

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
    from lm_pretrain.model import KVCache

    torch.manual_seed(0)
    config = GPTConfig(**{**SMALL, "block_size": 32}, n_kv_head=1, position=position)
    model = GPT(config).eval()
    idx = torch.randint(0, 101, (2, 20))
    cache = KVCache(config, 2, "cpu", torch.float32)
    pieces = [model(idx[:, :12], cache), model(idx[:, 12:19], cache), model(idx[:, 19:], cache)]
    assert cache.length == 20
    assert (torch.cat(pieces, dim=1) - model(idx)).abs().max() <= 1e-5
