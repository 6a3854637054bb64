"""lm_pretrain.training.optim: parameter roles, AdamW and Muon + AdamW, and the learning-rate schedules."""

import copy

import lightning as L
import pytest
import torch

from lm_pretrain.model import GPT, GPTConfig
from lm_pretrain.training.module import LanguageModel
from lm_pretrain.training.optim import MuonWithAdamW, lr_multiplier, parameter_roles

TINY = dict(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32, warmup_steps=2, learning_rate=1e-2)


def with_optimizer(**args) -> tuple[LanguageModel, torch.optim.Optimizer]:
    module = LanguageModel(**{**TINY, **args})
    module.trainer = L.Trainer(max_steps=10, logger=False, enable_checkpointing=False)
    return module, module.configure_optimizers()["optimizer"]


def test_roles_put_every_parameter_in_one_place_and_a_tied_head_with_the_embedding():
    for tied in (True, False):
        model = LanguageModel(**{**TINY, "tie_embeddings": tied}).model
        roles = parameter_roles(model)
        ids = [id(p) for params in roles.values() for p in params]
        assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(set(ids)) == len(ids)
        assert (roles["head"] == []) == tied and all(p.dim() >= 2 for p in roles["hidden"])
        assert all(p.dim() == 1 for p in roles["gains"])


def test_lr_schedule():
    steps = [lr_multiplier(s, warmup_steps=10, total_steps=110, min_ratio=0.1) for s in range(130)]
    assert steps[0] < steps[5] < steps[9] < 1.0  # linear warmup
    assert steps[10] == pytest.approx(1.0)  # peak
    assert steps[60] == pytest.approx(0.55)  # half-way down the cosine
    assert all(a >= b for a, b in zip(steps[10:], steps[11:]))  # never rises after the peak
    assert steps[110] == steps[129] == pytest.approx(0.1)  # floor


def test_weight_decay_only_on_matrices():
    module = LanguageModel(**{**TINY, "tie_embeddings": False})
    module.trainer = L.Trainer(max_steps=10, logger=False, enable_checkpointing=False)
    config = module.configure_optimizers()
    decay, no_decay, head = config["optimizer"].param_groups  # an untied head has a group of its own
    names = {id(p): n for n, p in module.model.named_parameters()}
    decayed = {names[id(p)] for group in (decay, head) for p in group["params"]}
    assert decay["weight_decay"] == head["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "lm_head.weight" in decayed and "blocks.0.attn.q.weight" in decayed
    assert not any(n.startswith(("wte", "wpe")) or "ln_" in n or n.endswith("bias") for n in decayed)
    assert sum(len(g["params"]) for g in (decay, no_decay, head)) == len(list(module.model.parameters()))


def test_muon_updates_the_blocks_matrices_and_adamw_the_rest():
    module, optimizer = with_optimizer(optimizer="muon", tie_embeddings=False, head_lr=0.005, muon_lr=0.02)
    names = {id(p): n for n, p in module.model.named_parameters()}
    muon = {names[id(p)] for g in optimizer.muon.param_groups for p in g["params"]}
    adamw = {names[id(p)] for g in optimizer.adamw.param_groups for p in g["params"]}
    assert isinstance(optimizer.muon, torch.optim.Muon) and isinstance(optimizer.adamw, torch.optim.AdamW)
    assert muon == {n for n, p in module.model.named_parameters() if p.dim() == 2 and n.startswith("blocks.")}
    assert adamw == set(names.values()) - muon  # embeddings, head, norms, biases
    groups = {g["name"]: g for g in optimizer.param_groups}
    peak = {name: g["initial_lr"] for name, g in groups.items()}  # (lr itself is already warming up)
    assert peak == {"decay": 0.02, "head": 0.005, "no_decay": 1e-2}
    assert [names[id(p)] for p in groups["head"]["params"]] == ["lm_head.weight"]
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.1


def test_muon_on_a_torch_without_it_is_one_line(monkeypatch):
    from lm_pretrain.training.optim import build_optimizer
    from lm_pretrain.utils.errors import UserError

    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(UserError, match=r"model.optimizer muon needs torch.optim.Muon, which torch 2.9 added"):
        build_optimizer(GPT(GPTConfig(vocab_size=256, block_size=16, n_layer=1, n_head=2, n_embd=32)), "muon", 1e-3, 0.1,
                        (0.9, 0.95))


def test_muon_with_adamw_resumes_both_states():
    def stepped(state: dict | None = None) -> tuple[GPT, MuonWithAdamW]:
        torch.manual_seed(0)
        module, optimizer = with_optimizer(optimizer="muon")
        if state is not None:  # (loading shares the saved tensors: a copy keeps `state` for the second resume)
            state = copy.deepcopy(state)
            module.model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        tokens = torch.randint(0, 256, (2, 17))
        for _ in range(2):
            optimizer.zero_grad()
            module._loss((tokens[:, :-1], tokens[:, 1:])).backward()
            optimizer.step()
        return module.model, optimizer

    model, optimizer = stepped()
    state = copy.deepcopy({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    assert {type(v.get("momentum_buffer", v.get("exp_avg"))) for v in state["optimizer"]["state"].values()} == {torch.Tensor}
    straight, _ = stepped(state)  # two more steps after the saved state, twice
    again, resumed = stepped(state)
    assert resumed.muon.state is resumed.state and resumed.muon.param_groups[0] is resumed.param_groups[0]
    for a, b in zip(straight.parameters(), again.parameters()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, state["model"][n]) for n, a in again.named_parameters())


def test_the_schedule_warms_up_from_near_zero_where_torchs_linear_lr_cannot_start():
    """Why one LambdaLR (optim.lr_multiplier) and not LinearLR + CosineAnnealingLR in a SequentialLR."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="[Ss]tarting multiplicative factor"):
        torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.0)
    assert lr_multiplier(0, warmup_steps=1000, total_steps=5000, min_ratio=0.1) == 1 / 1001


def test_wsd_schedule_warms_up_holds_then_decays_linearly():
    lr = [lr_multiplier(s, 10, 110, 0.1, "wsd", decay_fraction=0.2) for s in range(120)]
    assert lr[0] < lr[9] < 1.0 and lr[10:88] == [1.0] * 78  # warmup, then stable until the last 22 steps
    assert lr[88] == 1.0 and lr[99] == pytest.approx(1 - 0.9 * 11 / 22)  # linear: half-way down at the middle
    assert all(a > b for a, b in zip(lr[88:110], lr[89:110]))
    assert lr[110] == lr[119] == pytest.approx(0.1)
