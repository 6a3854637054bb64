"""The recipe options (the model's and the optimizer's flags): each flag builds what it names, and a
short run learns with it. The optimizers and schedules themselves: tests/test_optim.py."""

import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lm_pretrain.utils.errors import UserError
from lm_pretrain.commands.export import family
from lm_pretrain.model import GPT, GPTConfig
from lm_pretrain.training.module import LanguageModel

TINY = dict(vocab_size=256, block_size=16, n_layer=2, n_head=2, n_embd=32, warmup_steps=2, learning_rate=1e-2)


def test_muon_is_refused_under_fsdp():
    module = LanguageModel(**{**TINY, "optimizer": "muon"})
    module.trainer = L.Trainer(max_steps=10, logger=False, enable_checkpointing=False)
    module._device_mesh = object()  # what ModelParallelStrategy sets
    with pytest.raises(UserError, match="FSDP"):
        module.configure_optimizers()


def test_bad_recipe_settings_are_one_line_errors():
    with pytest.raises(UserError, match="tie_embeddings false"):
        LanguageModel(**{**TINY, "head_lr": 1e-3})
    with pytest.raises(UserError, match="--model.optimizer 'sgd' is not one of adamw, muon"):
        LanguageModel(**{**TINY, "optimizer": "sgd"})
    with pytest.raises(UserError, match="--model.schedule 'linear' is not one of cosine, wsd"):
        LanguageModel(**{**TINY, "schedule": "linear"})
    with pytest.raises(UserError, match="--model.loss 'liger' is not one of auto, plain, fused, chunked"):
        LanguageModel(**{**TINY, "loss": "liger"})
    with pytest.raises(UserError, match="--model.nonfinite_loss 'ignore' is not one of stop, skip"):
        LanguageModel(**{**TINY, "nonfinite_loss": "ignore"})
    with pytest.raises(UserError, match="model.loss fused .* cannot add the z-loss"):
        LanguageModel(**{**TINY, "loss": "fused", "z_loss": 1e-4})


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    def logits(qk_norm: bool, scale: float) -> torch.Tensor:
        torch.manual_seed(0)
        model = GPT(GPTConfig(**{k: v for k, v in TINY.items() if k in GPTConfig.__dataclass_fields__}, qk_norm=qk_norm))
        with torch.no_grad():
            for block in model.blocks:
                for layer in (block.attn.q, block.attn.k):
                    layer.weight *= scale
                    layer.bias *= scale
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
