"""lm_pretrain.model.loss: the fused and chunked output layer + cross-entropy give the plain path's loss and
gradients, and hold what they should in memory."""

import pytest
import torch
import torch.nn.functional as F

from lm_pretrain.utils.errors import UserError
from lm_pretrain.model.loss import IGNORE_INDEX, linear_cross_entropy, next_token_loss, pick_loss
from lm_pretrain.model import GPT, GPTConfig


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_same_loss_and_gradients_as_the_plain_path_padding_included(reduction):
    torch.manual_seed(0)
    x, weight = torch.randn(40, 16, requires_grad=True), torch.randn(300, 16, requires_grad=True)
    targets = torch.randint(0, 300, (40,))
    targets[[3, 17, 39]] = -100  # padding positions count nowhere
    plain = F.cross_entropy(x @ weight.t(), targets, ignore_index=-100, reduction=reduction)
    expected = torch.autograd.grad(plain, (x, weight))
    fused = linear_cross_entropy(x, weight, targets, -100, reduction)
    got = torch.autograd.grad(fused, (x, weight))
    assert torch.allclose(fused, plain, rtol=1e-6)
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    assert got[0][3].abs().sum() == 0  # a padding row gets no gradient


def test_model_loss_is_the_same_fused_or_not_with_tied_embeddings():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=500, block_size=16, n_layer=2, n_head=2, n_embd=32))
    tokens = torch.randint(0, 500, (3, 17))
    results = []
    for fused in (False, True):
        model.zero_grad()
        loss = next_token_loss(model, tokens[:, :-1], tokens[:, 1:], fused=fused)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain, plain_grads), (fused, fused_grads) = results
    assert torch.allclose(plain, fused, rtol=1e-6)
    for name, grad in plain_grads.items():  # wte.weight gets both the embedding's and the head's share
        assert torch.allclose(grad, fused_grads[name], atol=1e-6, rtol=1e-4), name


def test_without_gradients_it_only_scores():
    torch.manual_seed(0)
    x, weight, targets = torch.randn(8, 4), torch.randn(50, 4), torch.randint(0, 50, (8,))
    with torch.no_grad():
        fused = linear_cross_entropy(x, weight, targets, reduction="sum")
    assert torch.allclose(fused, F.cross_entropy(x @ weight.t(), targets, reduction="sum"), rtol=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(x, weight, targets, reduction="none")


def test_bf16_autocast_gives_float32_loss_and_gradients_of_the_inputs_dtypes():
    torch.manual_seed(0)
    x, weight = torch.randn(12, 8, requires_grad=True), torch.randn(64, 8, requires_grad=True)
    targets = torch.randint(0, 64, (12,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = linear_cross_entropy(x, weight, targets)
    fused.backward()
    plain = F.cross_entropy(x @ weight.t(), targets)
    assert fused.dtype == torch.float32 and x.grad.dtype == weight.grad.dtype == torch.float32
    assert abs(fused.item() - plain.item()) < 0.05  # bf16 logits


def test_plain_loss_is_the_cross_entropy_of_the_models_logits_padding_excluded():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=100, block_size=8, n_layer=1, n_head=2, n_embd=16))
    x, y = torch.randint(0, 100, (2, 8)), torch.randint(0, 100, (2, 8))
    y[1, 5:] = IGNORE_INDEX
    logits = model(x)
    expected = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    assert torch.allclose(next_token_loss(model, x, y, reduction="sum"), expected, rtol=1e-6)
    hidden = model(x, return_hidden=True)  # what the fused loss multiplies into the output layer itself
    assert hidden.shape == (2, 8, 16) and torch.allclose(model.lm_head(hidden), logits)


def test_the_loss_path_is_picked_once_and_a_refused_combination_is_an_error():
    assert pick_loss("auto") == "fused"  # eager: the fused path is faster and smaller
    assert pick_loss("auto", compile=True) == "plain"  # compiled: inductor fuses the plain path itself
    assert pick_loss("auto", z_loss=1e-4) == pick_loss("auto", logit_softcap=30.0) == "plain"
    assert pick_loss("plain") == "plain" and pick_loss("fused", compile=True) == "fused"  # as asked
    assert pick_loss("chunked") == pick_loss("chunked", compile=True) == "chunked"  # never picked by auto
    for refused in (dict(z_loss=1e-4), dict(logit_softcap=30.0)):
        for kind in ("fused", "chunked"):
            with pytest.raises(UserError, match=f"model.loss {kind} .* cannot"):
                pick_loss(kind, **refused)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk", [1, 7, 40, 1000])  # one row, uneven chunks, exactly all rows, more than all
def test_chunked_loss_equals_the_plain_path_padding_included(reduction, chunk):
    torch.manual_seed(0)
    x, weight = torch.randn(40, 16, requires_grad=True), torch.randn(300, 16, requires_grad=True)
    targets = torch.randint(0, 300, (40,))
    targets[[3, 17, 39]] = -100
    plain = F.cross_entropy(x @ weight.t(), targets, ignore_index=-100, reduction=reduction)
    expected = torch.autograd.grad(plain, (x, weight))
    chunked = linear_cross_entropy(x, weight, targets, -100, reduction, chunk=chunk)
    got = torch.autograd.grad(chunked, (x, weight))
    assert torch.allclose(chunked, plain, rtol=1e-6)
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # scoring
        assert torch.allclose(linear_cross_entropy(x, weight, targets, -100, reduction, chunk=chunk), plain, rtol=1e-6)


def test_chunked_model_loss_equals_plain_and_compiles_to_the_same():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=500, block_size=16, n_layer=1, n_head=2, n_embd=32))
    tokens = torch.randint(0, 500, (4, 17))
    results = {}
    for name, fn, fused, chunk in [("plain", next_token_loss, False, None), ("chunked", next_token_loss, True, 24),
                                   ("compiled", torch.compile(next_token_loss), True, 24)]:
        loss = fn(model, tokens[:, :-1], tokens[:, 1:], fused=fused, chunk=chunk)
        results[name] = (loss.detach(), torch.autograd.grad(loss, list(model.parameters())))
    for name in ("chunked", "compiled"):
        assert torch.allclose(results[name][0], results["plain"][0], rtol=1e-5), name
        for a, b in zip(results[name][1], results["plain"][1]):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-4), name


@pytest.mark.slow
def test_at_most_one_logits_buffer_compiled_and_a_fraction_of_one_chunked():
    from lm_pretrain.training.debug import peak_cpu_bytes

    torch._dynamo.reset()  # static shapes, as in a run (other tests compiled the loss with other shapes)
    torch.manual_seed(0)
    # many positions per weight, so that the logits dominate as in a real run (bench/loss_memory.py)
    model = GPT(GPTConfig(vocab_size=8192, block_size=256, n_layer=1, n_head=2, n_embd=32))
    x, y = torch.randint(0, 8192, (4, 256)), torch.randint(0, 8192, (4, 256))
    logits = 4 * 256 * 8192 * 4  # one float32 logits tensor
    compiled = torch.compile(next_token_loss)

    def peak(fn, bf16=False, **kwargs):
        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = fn(model, x, y, **kwargs)
            loss.backward()
            model.zero_grad(set_to_none=True)
        step()  # compile, first allocations
        return peak_cpu_bytes(step) / logits

    assert peak(next_token_loss) > 2.5  # plain eager: logits, log-softmax, gradients (the baseline)
    assert peak(compiled, bf16=True) < 1.0  # compiled plain, bf16 as on GPUs: one bf16 buffer
    assert peak(next_token_loss, fused=True, chunk=128) < 0.5  # 8 chunks: never the whole logits
