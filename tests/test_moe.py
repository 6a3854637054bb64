"""Mixture of experts (model.mlp moe): the routed computation against references built by hand,
balancing, compile, logging, bad settings, export; resume and FSDP2 in end-to-end runs (slow)."""

import copy
import csv
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from helpers import TINY_MODEL, assert_same_run, callback, cli_error, one_line_error, run_args, run_cli, scalars, train_args
from lm_pretrain.model.config import GPTConfig, check_tensor_parallel, model_size
from lm_pretrain.model.gpt import GPT, MLP
from lm_pretrain.model.loss import next_token_loss
from lm_pretrain.model.moe import TORCH_VERSION, MoE, router_losses
from lm_pretrain.training.debug import read_records
from lm_pretrain.utils.errors import UserError

LLAMA = dict(vocab_size=256, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, position="rope", norm="rmsnorm",
             bias=False, mlp="moe", n_experts=4, top_k=2, mlp_hidden=16)
MOE_FLAGS = ["--model.mlp", "moe", "--model.n_experts", "4", "--model.top_k", "2", "--model.mlp_hidden", "16"]


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The layer's output token by token, expert by expert, straight from the definition."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.zeros_like(flat)
    for t, token in enumerate(flat):
        probs = moe.router(token).softmax(dim=-1)
        chosen = (probs + moe.expert_bias).topk(moe.top_k).indices
        weights = probs[chosen] / (probs[chosen].sum() if moe.renormalize else 1)
        for e, w in zip(chosen.tolist(), weights):
            out[t] += w * (moe.down[e] @ (F.silu(moe.gate[e] @ token) * (moe.up[e] @ token)))
        if moe.n_shared:
            out[t] += moe.shared_down(F.silu(moe.shared_gate(token)) * moe.shared_up(token))
    return out.view(x.shape)


def layer(**settings) -> MoE:
    torch.manual_seed(0)
    moe = MoE(GPTConfig(**{**LLAMA, **settings}))
    moe.to_empty(device="cpu")
    moe.init_weights(torch.nn.init.normal_, 0.5, 0.5)
    torch.nn.init.normal_(moe.router.weight, 0.0, 0.5)
    for name in ("shared_gate", "shared_up", "shared_down"):
        if hasattr(moe, name):
            torch.nn.init.normal_(getattr(moe, name).weight, 0.0, 0.5)
    return moe


GROUPED = [pytest.param(True, id="grouped matmul", marks=pytest.mark.skipif(
    TORCH_VERSION < (2, 9), reason="torch._grouped_mm runs on CPUs from torch 2.9")), pytest.param(False, id="loop")]


@pytest.mark.parametrize("grouped", GROUPED)
@pytest.mark.parametrize("settings", [{}, {"router_renormalize": False}, {"n_shared_experts": 1},
                                      {"top_k": 1, "router_renormalize": False}, {"top_k": 4}],
                         ids=["mixtral", "olmoe", "shared expert", "top-1", "all experts"])
def test_the_routed_computation_and_its_gradients_equal_a_per_token_loop(settings, grouped):
    moe, x = layer(**settings), torch.randn(3, 16, 32)
    moe.grouped_for = {torch.float32: grouped}  # forced either way
    with torch.no_grad():
        moe.expert_bias.copy_(torch.tensor([0.0, 0.3, -0.2, 0.1]))  # a trained bias changes the choice
    grad = torch.randn(3, 16, 32)
    grads = []
    for run in (lambda: moe(x)[0], lambda: naive_moe(moe, x)):
        moe.zero_grad()
        out = run()
        (out * grad).sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in moe.named_parameters()}))
    (ours, ours_grads), (naive, naive_grads) = grads
    assert torch.allclose(ours, naive, atol=1e-5)
    assert all(torch.allclose(ours_grads[n], naive_grads[n], atol=1e-4) for n in naive_grads)
    assert ours_grads["router.weight"].abs().sum() > 0 and ours_grads["down"].abs().sum() > 0


def test_the_expert_matmuls_backward_passes_gradcheck():
    from lm_pretrain.model.moe import expert_matmul

    x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    ends = torch.tensor([2, 2, 7])  # expert 1 gets no row
    assert torch.autograd.gradcheck(lambda x, w: expert_matmul(x, w, ends, grouped=False), (x, weight))


@pytest.mark.parametrize("precision", ["32-true", "64-true", "bf16-mixed"])
def test_the_runs_choice_of_expert_matmul_follows_the_type_the_experts_run_in(precision):
    """Decided once per run for its precision (and float32, for samples outside autocast); a forward
    pass in another type (float64 here) checks for itself instead of taking a choice made for another."""
    from lm_pretrain.training.experts import choose_expert_matmul

    torch.manual_seed(0)
    model = GPT(GPTConfig(**LLAMA))
    choose_expert_matmul(model, torch.device("cpu"), precision)
    grouped = TORCH_VERSION >= (2, 9)
    want = {"32-true": {torch.float32: grouped}, "64-true": {torch.float64: False, torch.float32: grouped},
            "bf16-mixed": {torch.bfloat16: grouped, torch.float32: grouped}}[precision]
    assert all(layer.grouped_for == want for layer in model.experts)
    tokens = torch.randint(0, 256, (2, 16))
    reference = model(tokens)
    assert torch.allclose(model.double()(tokens).float(), reference, atol=1e-4)


@pytest.mark.skipif(TORCH_VERSION < (2, 9), reason="torch._grouped_mm runs on CPUs from torch 2.9")
def test_bf16_experts_take_the_native_grouped_matmul_and_stay_close_to_float32():
    moe, x = layer(), torch.randn(2, 16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = moe(x)[0]
    assert low.dtype == torch.float32 and torch.allclose(low, moe(x)[0], rtol=0.05, atol=0.05 * x.abs().max())


def test_one_expert_with_top_1_is_the_dense_swiglu_mlp():
    moe = layer(n_experts=1, top_k=1, router_renormalize=False)
    dense = MLP(GPTConfig(**{**LLAMA, "mlp": "swiglu"}))
    dense.to_empty(device="cpu")
    with torch.no_grad():
        dense.gate.weight.copy_(moe.gate[0])
        dense.fc.weight.copy_(moe.up[0])
        dense.proj.weight.copy_(moe.down[0])
    x = torch.randn(2, 16, 32)
    assert torch.allclose(moe(x)[0], dense(x), atol=1e-6)


def test_permuting_the_experts_and_the_routers_rows_changes_nothing():
    moe, x = layer(), torch.randn(2, 16, 32)
    permuted = copy.deepcopy(moe)
    order = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        for name in ("gate", "up", "down", "expert_bias"):
            getattr(permuted, name).copy_(getattr(moe, name)[order])
        permuted.router.weight.copy_(moe.router.weight[order])
        assert torch.allclose(moe(x)[0], permuted(x)[0], atol=1e-6)


def test_gradients_reach_the_router_and_exactly_the_chosen_experts():
    moe = layer(n_experts=8, top_k=2)
    moe.train()
    x = torch.randn(1, 3, 32)  # 3 tokens choose at most 6 of the 8 experts
    chosen = set((moe.router(x).softmax(-1)).topk(2).indices.flatten().tolist())
    moe(x)[0].square().sum().backward()  # (no router loss: it alone would reach the router anyway)
    used = {e for e in range(8) if moe.gate.grad[e].abs().sum() > 0}
    assert used == chosen and len(chosen) < 8
    assert all(moe.up.grad[e].abs().sum() > 0 and moe.down.grad[e].abs().sum() > 0 for e in chosen)
    assert moe.router.weight.grad.abs().sum() > 0  # through the chosen experts' weights


def test_the_router_losses_are_switch_transformers_averaged_over_blocks_and_recorded():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**LLAMA)).train()
    tokens = torch.randint(0, 256, (2, 16))
    model(tokens)
    hidden, want, aux, z = model.wte(tokens), [], [], []
    rope = (model.rope_cos[:16], model.rope_sin[:16])
    for block in model.blocks:  # each block's router on its own input, by hand
        x = hidden + block.attn(block.ln_1(hidden), rope)
        logits = block.mlp.router(block.ln_2(x).reshape(-1, 32))
        probs = logits.softmax(-1)
        counts = torch.bincount(probs.topk(2).indices.flatten(), minlength=4).float()
        aux.append(4 * (counts / counts.sum() * probs.mean(0)).sum())
        z.append(torch.logsumexp(logits, -1).square().mean())
        want.append(counts)
        hidden = block(hidden, rope)[0]
    loss = model.router_loss()
    assert torch.allclose(loss, (0.01 * torch.stack(aux) + 0.001 * torch.stack(z)).mean())
    assert model.router_stats is None and model.router_loss() == 0.0  # read once
    for layer, counts, a, zz in zip(model.experts, want, aux, z):
        assert torch.equal(layer.step_tokens, counts) and layer.step_tokens.sum() == 2 * 16 * 2
        assert torch.allclose(layer.loss_sums, torch.stack([a, zz, torch.tensor(1.0)]).detach())
    model.eval()
    model(tokens)  # evaluation gathers nothing
    assert model.router_stats is None and model.experts[0].step_tokens.sum() == 64


def test_router_losses_count_the_choices_of_every_process():
    """f_e of two halves of a batch, each counted across both (as an all-reduce gives), averages to the
    whole batch's auxiliary loss."""
    torch.manual_seed(0)
    moe = layer()
    x = torch.randn(4, 16, 32)
    (_, whole), (_, first), (_, second) = moe(x), moe(x[:2]), moe(x[2:])
    total = first.counts + second.counts
    halves = [router_losses([moe], [s._replace(counts=total)], 0.01, 0.001) for s in (first, second)]
    assert torch.allclose((halves[0] + halves[1]) / 2, router_losses([moe], [whole], 0.01, 0.001))


def test_the_balancing_bias_moves_towards_experts_that_got_fewer_tokens():
    moe = layer()
    moe.step_tokens.copy_(torch.tensor([10.0, 0.0, 4.0, 2.0]))  # mean 4
    moe.end_step(bias_rate=0.01)
    assert torch.allclose(moe.expert_bias, torch.tensor([-0.01, 0.01, 0.0, 0.01]))
    assert moe.idle_steps.tolist() == [0, 1, 0, 0] and moe.step_tokens.sum() == 0
    assert moe.window_tokens.tolist() == [10.0, 0.0, 4.0, 2.0]
    moe.end_step(bias_rate=0.0)  # no tokens at all this step: the bias stays, every expert idles
    assert moe.idle_steps.tolist() == [1, 2, 1, 1] and moe.expert_bias[0] == -0.01


def test_bias_balancing_evens_out_a_router_that_prefers_one_expert():
    moe = layer(router_aux_loss=0.0)
    x = torch.randn(4, 16, 32)
    moe.train()

    def cv(steps: int, bias_rate: float) -> float:  # of the tokens per expert over `steps` steps
        moe.window_tokens.zero_()
        for _ in range(steps):
            moe.record(moe(x)[1].counts, torch.tensor(0.0), torch.tensor(0.0))
            moe.end_step(bias_rate)
        return float(moe.window_tokens.std(correction=0) / moe.window_tokens.mean())

    with torch.no_grad():
        moe.expert_bias[0] = 1.0  # expert 0 chosen by every token
    before = cv(20, bias_rate=0.0)
    cv(200, bias_rate=0.01)
    after = cv(20, bias_rate=0.01)
    assert before > 0.3 and after < before / 3


def test_gpt_2_and_llama_blocks_with_experts_learn_a_batch_by_heart():
    """Both block styles, with GQA and RoPE or learned positions, fused or plain loss: the loss falls."""
    for settings, fused in (({}, True), ({"position": "learned", "norm": "layernorm", "bias": True, "n_kv_head": 4}, False)):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**{**LLAMA, **settings}))
        tokens = torch.randint(0, 256, (4, 17))
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(30):
            loss = next_token_loss(model, tokens[:, :-1], tokens[:, 1:], fused=fused)
            (loss + model.router_loss()).backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        assert losses[-1] < losses[0] - 1.5, settings


@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "activation checkpointing"])
def test_the_compiled_training_step_has_one_graph_and_the_eager_steps_numbers(checkpointing):
    """Compiled whole (one device, DDP), with or without activation checkpointing: no graph break, the
    eager step's loss and gradients, and recomputed blocks count no choice twice."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**LLAMA)).train()
    model.checkpoint_blocks = checkpointing
    tokens = torch.randint(0, 256, (2, 17))

    def step(model, tokens):
        return next_token_loss(model, tokens[:, :-1], tokens[:, 1:])

    explained = torch._dynamo.explain(step)(model, tokens)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    model.router_stats = None
    eager = step(model, tokens) + model.router_loss()
    eager.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)(model, tokens) + model.router_loss()
    compiled.backward()
    assert torch.allclose(compiled, eager, atol=1e-5)
    assert all(torch.allclose(p.grad, want[n], atol=1e-5) for n, p in model.named_parameters())
    assert all(layer.step_tokens.sum() == 2 * (2 * 16 * 2) for layer in model.experts)  # two steps, k = 2


def test_sizes_count_every_parameter_and_flops_for_the_active_ones():
    config = GPTConfig(**{**LLAMA, "n_shared_experts": 1})
    model = GPT(config)
    size = model_size(config)
    assert size["params"] == model.num_params()
    expert = 3 * 32 * 16  # gate, up, down of one expert
    assert size["active_params"] == size["params"] - 2 * (4 - 2) * expert  # 2 blocks, 2 of 4 experts idle
    dense = model_size(GPTConfig(**{**LLAMA, "mlp": "swiglu", "mlp_hidden": 16 * 3}))  # top-2 + shared = 3 widths
    router = 2 * 32 * 4
    assert size["flops_per_token"] == dense["flops_per_token"] + 6 * router
    assert GPTConfig(**{**LLAMA, "mlp_hidden": None}).mlp_hidden == 128  # SwiGLU's 256, split between top_k 2


def test_the_memory_plan_keeps_all_experts_states_and_their_token_copies():
    from lm_pretrain.training.hardware import training_memory_bytes

    moe, dense = GPTConfig(**LLAMA), GPTConfig(**{**LLAMA, "mlp": "swiglu", "mlp_hidden": 32})  # same active width
    plan, dense_plan = training_memory_bytes(moe, batch_size=2), training_memory_bytes(dense, batch_size=2)
    assert plan["states"] == 16 * model_size(moe)["params"] > dense_plan["states"]
    tokens = 2 * 16
    assert plan["activations"] - dense_plan["activations"] == tokens * 2 * (4 * 2 + 4) * 32  # blocks x (4k + 4) d
    assert training_memory_bytes(moe, 2, activation_checkpointing=True)["activations"] == \
        training_memory_bytes(dense, 2, activation_checkpointing=True)["activations"]


def test_bad_settings_are_one_line(capsys):
    from lm_pretrain.commands.train import main

    with pytest.raises(ValueError, match=r"top_k \(5\) cannot exceed n_experts \(4\)"):
        GPTConfig(**{**LLAMA, "top_k": 5})
    with pytest.raises(ValueError, match="top_k 1 with router_renormalize true"):
        GPTConfig(**{**LLAMA, "top_k": 1})
    with pytest.raises(UserError, match="n_experts 0 is out of range"):
        GPTConfig(**{**LLAMA, "n_experts": 0})
    with pytest.raises(UserError, match="tensor parallelism does not split experts"):
        check_tensor_parallel(GPTConfig(**LLAMA), 2)
    for flags, message in ((["--model.top_k", "5"], "top_k (5) cannot exceed n_experts (4)"),
                           (["--model.n_experts", "0"], "n_experts 0 is out of range"),
                           (["--model.top_k", "1"], "top_k 1 with router_renormalize true"),
                           (["--config", "configs/overlays/tensor_parallel.yaml", "--trainer.accelerator", "cpu",
                             "--trainer.devices", "2"], "tensor parallelism does not split experts")):
        error = cli_error(main, ["fit", "--config", "configs/tiny.yaml", *MOE_FLAGS, *flags], capsys)
        assert message in error and "\n" not in error.strip()


def test_muon_takes_the_router_and_attention_and_adamw_the_stacked_experts():
    from lm_pretrain.training.optim import build_optimizer

    model = GPT(GPTConfig(**LLAMA))
    optimizer = build_optimizer(model, "muon", 1e-3, 0.1, (0.9, 0.95))
    experts = next(g for g in optimizer.adamw.param_groups if g["name"] == "experts")
    assert {id(p) for p in experts["params"]} == {id(getattr(m.mlp, n)) for m in model.blocks for n in ("gate", "up", "down")}
    assert all(p.dim() == 2 for g in optimizer.muon.param_groups for p in g["params"]) and experts["weight_decay"] == 0.1
    tokens = torch.randint(0, 256, (2, 17))
    (next_token_loss(model, tokens[:, :-1], tokens[:, 1:]) + model.router_loss()).backward()
    before = model.blocks[0].mlp.gate.detach().clone()
    optimizer.step()
    assert not torch.equal(model.blocks[0].mlp.gate, before)


def test_mixtral_export_refuses_what_mixtral_cannot_hold(tmp_path, capsys):
    from helpers import tiny_checkpoint
    from lm_pretrain.commands.export import family, main, mixtral_state

    _, ckpt = tiny_checkpoint(tmp_path / "shared.ckpt", steps=1, **{**LLAMA, "n_shared_experts": 1})
    error = cli_error(main, ["--ckpt_path", str(ckpt), "--output", str(tmp_path / "hf")], capsys)
    assert "no shared experts" in error and "cannot be exported" in error and not (tmp_path / "hf").exists()

    assert family(GPTConfig(**LLAMA)) == "mixtral"
    for settings in ({"n_shared_experts": 1}, {"router_renormalize": False}, {"position": "learned"}):
        with pytest.raises(UserError, match="cannot be exported"):
            family(GPTConfig(**{**LLAMA, **settings}))
    model = GPT(GPTConfig(**LLAMA))
    with torch.no_grad():
        model.blocks[1].mlp.expert_bias[2] = 0.1
    with pytest.raises(UserError, match="router_bias_rate"):
        mixtral_state(model.config, model.state_dict())


def test_exported_mixtral_generates_our_greedy_tokens(tmp_path):
    transformers = pytest.importorskip("transformers")
    from helpers import tiny_checkpoint
    from lm_pretrain.commands.export import main

    module, ckpt = tiny_checkpoint(tmp_path / "moe.ckpt", steps=3, **{**LLAMA, "vocab_size": 50257, "n_embd": 64,
                                                                      "tie_embeddings": False, "block_size": 32})
    main(["--ckpt_path", str(ckpt), "--output", str(tmp_path / "hf")])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    model = module.model.eval()
    tokens = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max() <= 1e-4
        for prompt in tokens[:, :4]:
            ours = model.generate(prompt[None], 24, temperature=0)
            theirs = hf.generate(prompt[None], max_new_tokens=24, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
            assert ours.tolist() == theirs.tolist()


def test_expert_load_is_logged_on_log_steps_and_an_idle_expert_warned_of_once(caplog, tmp_path):
    """ExpertLoad reads the counts back on log steps only; expert 7 of block 0, which a large negative
    bias keeps from every choice, is named in one warning line."""
    from torch.utils.data import DataLoader

    from lm_pretrain.training.experts import ExpertLoad
    from lm_pretrain.training.module import LanguageModel

    L.seed_everything(0)
    module = LanguageModel(**{**LLAMA, "n_experts": 8, "warmup_steps": 1})
    with torch.no_grad():
        module.model.blocks[0].mlp.expert_bias[7] = -10.0
    tokens = torch.randint(0, 256, (4, 17))
    trainer = L.Trainer(max_steps=8, logger=L.pytorch.loggers.CSVLogger(tmp_path), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=2,
                        callbacks=[ExpertLoad(idle_warning_steps=3)])
    with caplog.at_level("INFO"):
        trainer.fit(module, DataLoader([(tokens[:, :-1], tokens[:, 1:])] * 8, batch_size=None))
    assert [3] == [c.idle_warning_steps for c in trainer.callbacks if isinstance(c, ExpertLoad)]  # the one given
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    logged = [{k: float(v) for k, v in row.items() if k.startswith("moe/") and v} for row in rows]
    assert len([m for m in logged if m]) == 4  # steps 2, 4, 6, 8
    last = [m for m in logged if m][-1]
    assert last["moe/block0/expert7"] == 0.0 and last["moe/block1/expert7"] > 0
    assert math.isclose(sum(last[f"moe/block0/expert{e}"] for e in range(8)), 1.0, rel_tol=1e-6)
    assert last["moe/block0/cv"] > 0 and last["moe/aux_loss"] > 0
    assert last["moe/block0/max"] >= 1.0 and last["moe/z_loss"] > 0
    warnings = [r.getMessage() for r in caplog.records if "received no token" in r.getMessage()]
    assert warnings == ["warning: expert 7 of block 0 has received no token for 4 optimizer steps: raise "
                        "model.router_aux_loss or set model.router_bias_rate"]


# ---------------------------------------------------------------------------------------------
# End-to-end runs


@pytest.mark.slow
def test_a_preset_becomes_a_mixture_with_flags_trains_exports_and_generates(prepared, tmp_path):
    """configs/tiny.yaml with MoE flags trains through train.py: the size line counts active parameters;
    expert loads, their CV and the router losses reach TensorBoard on log steps; lm-pretrain-generate
    samples from its checkpoint, and the exported Mixtral generates the same greedy text."""
    done = run_cli([*train_args(prepared, max_steps=10, val_every=10), *MOE_FLAGS], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    logged = scalars(tmp_path / "runs" / "tiny" / "version_0")
    assert [step for step, _ in logged["moe/cv"]] == [4, 9]  # log steps only (every 5)
    assert {f"moe/block{b}/expert{e}" for b in range(2) for e in range(4)} <= logged.keys()
    assert math.isclose(sum(logged[f"moe/block0/expert{e}"][-1][1] for e in range(4)), 1.0, rel_tol=1e-5)
    assert "M active" in done.stdout and logged["val/loss"][-1][1] < math.log(50257)
    # and what a user does next: generate from the checkpoint, export it, generate with transformers
    ckpt = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    sample = run_cli(["-m", "lm_pretrain.commands.generate", "--ckpt_path", str(ckpt), "--prompt", "The king",
                      "--max_new_tokens", "8", "--temperature", "0", "--stop_at_eot", "false"], cwd=tmp_path)
    assert sample.returncode == 0 and sample.stdout.startswith("The king"), sample.stderr[-2000:]
    export = run_cli(["-m", "lm_pretrain.commands.export", "--ckpt_path", str(ckpt), "--output", str(tmp_path / "hf")],
                     cwd=tmp_path)
    assert export.returncode == 0, export.stderr[-2000:]
    transformers = pytest.importorskip("transformers")
    from lm_pretrain.training.module import LanguageModel

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    encoding = LanguageModel.from_checkpoint(ckpt).encoding
    prompt = torch.tensor([encoding.encode("The king")])
    with torch.no_grad():
        ids = hf.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[0]
    assert sample.stdout.startswith(encoding.decode(ids.tolist()))


@pytest.mark.slow
def test_a_mixture_with_bias_balancing_resumes_exactly(prepared, tmp_path):
    """Killed after step 6 and resumed from step 4: the same batches and losses, bit for bit, which
    needs the balancing bias back as it was (it changes which experts tokens go to); and the same
    final bias as a straight run."""
    flags = [*MOE_FLAGS, "--model.router_bias_rate", "0.01"]
    for folder in "ab":
        (tmp_path / folder).mkdir()
    straight = run_cli(run_args(prepared, 8, tmp_path / "a" / "rec", extra=[*flags, callback(
        "SaveFullWeights", path=str(tmp_path / "a.pt"))]), cwd=tmp_path / "a")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = run_cli(run_args(prepared, 8, tmp_path / "b" / "rec", extra=[*flags, callback("SignalAt", step=6)]),
                     cwd=tmp_path / "b")
    assert killed.returncode == -9
    resumed = run_cli([*run_args(prepared, 8, tmp_path / "b" / "rec", extra=[*flags, callback(
        "SaveFullWeights", path=str(tmp_path / "b.pt"))]), "--ckpt_path", "last"], cwd=tmp_path / "b")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(read_records(tmp_path / "b" / "rec"), read_records(tmp_path / "a" / "rec"))
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    bias = [k for k in a if k.endswith("expert_bias")]
    assert len(bias) == 2 and any(a[k].abs().sum() > 0 for k in bias)
    assert all(torch.equal(a[k], b[k]) for k in a)
