"""The recipe options (lm_pretrain.optim and the model's flags): each flag builds what it names, and a
short run learns with it."""

import copy
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lm_pretrain.errors import UserError
from lm_pretrain.export import family
from lm_pretrain.model import GPT, GPTConfig
from lm_pretrain.module import LanguageModel
from lm_pretrain.optim import MuonWithAdamW, lr_multiplier

TINY = dict(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32, warmup_steps=2, learning_rate=1e-2)


def with_optimizer(**args) -> tuple[LanguageModel, torch.optim.Optimizer]:
    module = LanguageModel(**{**TINY, **args})
    module.trainer = L.Trainer(max_steps=10, logger=False, enable_checkpointing=False)
    return module, module.configure_optimizers()["optimizer"]


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


def test_muon_is_refused_under_fsdp():
    module = LanguageModel(**{**TINY, "optimizer": "muon"})
    module.trainer = L.Trainer(max_steps=10, logger=False, enable_checkpointing=False)
    module._device_mesh = object()  # what ModelParallelStrategy sets
    with pytest.raises(UserError, match="FSDP"):
        module.configure_optimizers()


def test_bad_recipe_settings_are_one_line_errors():
    with pytest.raises(UserError, match="tie_embeddings false"):
        LanguageModel(**{**TINY, "head_lr": 1e-3})
    with pytest.raises(UserError, match="optimizer must be one of adamw, muon"):
        LanguageModel(**{**TINY, "optimizer": "sgd"})
    with pytest.raises(UserError, match="schedule must be one of cosine, wsd"):
        LanguageModel(**{**TINY, "schedule": "linear"})


def test_wsd_schedule_warms_up_holds_then_decays_linearly():
    lr = [lr_multiplier(s, 10, 110, 0.1, "wsd", decay_fraction=0.2) for s in range(120)]
    assert lr[0] < lr[9] < 1.0 and lr[10:88] == [1.0] * 78  # warmup, then stable until the last 22 steps
    assert lr[88] == 1.0 and lr[99] == pytest.approx(1 - 0.9 * 11 / 22)  # linear: half-way down at the middle
    assert all(a > b for a, b in zip(lr[88:110], lr[89:110]))
    assert lr[110] == lr[119] == pytest.approx(0.1)


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    def logits(qk_norm: bool, scale: float) -> torch.Tensor:
        torch.manual_seed(0)
        model = GPT(GPTConfig(**{k: v for k, v in TINY.items() if k in GPTConfig.__dataclass_fields__}, qk_norm=qk_norm))
        with torch.no_grad():
            for block in model.blocks:  # queries and keys are the first 2 * n_embd rows of qkv
                block.attn.qkv.weight[:64] *= scale
                block.attn.qkv.bias[:64] *= scale
        return model(torch.arange(16)[None])

    assert torch.allclose(logits(True, 1.0), logits(True, 7.0), atol=1e-5)
    assert not torch.allclose(logits(False, 1.0), logits(False, 7.0), atol=1e-3)


def test_relu2_mlp_and_logit_softcap():
    torch.manual_seed(0)
    config = GPTConfig(**{k: v for k, v in TINY.items() if k in GPTConfig.__dataclass_fields__}, mlp="relu2",
                       logit_softcap=3.0)
    model = GPT(config)
    assert config.mlp_hidden == 4 * 32
    mlp, x = model.blocks[0].mlp, torch.randn(2, 5, 32)
    assert torch.allclose(mlp(x), mlp.proj(torch.relu(mlp.fc(x)) ** 2))
    with torch.no_grad():
        model.lm_head.weight *= 1000  # raw logits in the hundreds
    logits = model(torch.arange(16)[None])
    assert logits.abs().max() <= 3.0 and logits.abs().max() > 2.9  # (tanh rounds to 1 in float32)
    with pytest.raises(UserError, match="soft-capping"):
        family(config)


def test_z_loss_adds_the_squared_log_normaliser_in_training_only():
    module = LanguageModel(**{**TINY, "z_loss": 0.1})
    tokens = torch.randint(0, 256, (2, 17))
    batch = (tokens[:, :-1], tokens[:, 1:])
    logits = module.model(batch[0]).flatten(0, 1)
    plain = torch.nn.functional.cross_entropy(logits, batch[1].flatten())
    expected = plain + 0.1 * torch.logsumexp(logits, dim=-1).square().mean()
    assert torch.allclose(module.train()._loss(batch), expected)
    assert torch.allclose(module.eval()._loss(batch), plain)  # val loss stays comparable across runs


@pytest.mark.parametrize("recipe", [
    dict(optimizer="muon", learning_rate=2e-2),
    dict(schedule="wsd"),
    dict(qk_norm=True),
    dict(mlp="relu2"),
    dict(logit_softcap=15.0),
    dict(z_loss=1e-4),
    dict(tie_embeddings=False, head_lr=5e-3),
], ids=lambda r: ",".join(r))
def test_a_short_run_learns_with_each_option(recipe):
    L.seed_everything(0)
    module = LanguageModel(**{**TINY, **recipe})
    tokens = torch.randint(0, 256, (4, 17))
    batch = (tokens[:, :-1], tokens[:, 1:])
    assert abs(module._loss(batch).item() - math.log(256)) < 0.5
    trainer = L.Trainer(max_steps=60, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, gradient_clip_val=1.0)
    trainer.fit(module, train_dataloaders=DataLoader([batch] * 60, batch_size=None))
    assert module.eval()._loss(batch).item() < 1.0  # memorised: from 5.5 nats to under 1
