import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from torchmetrics.text import Perplexity as LogitsPerplexity

from lm_pretrain.module import LanguageModel, Perplexity, lr_multiplier

TINY = dict(vocab_size=50257, block_size=16, n_layer=2, n_head=2, n_embd=32, warmup_steps=2, learning_rate=1e-2)


def test_perplexity_matches_torchmetrics_on_logits():
    torch.manual_seed(0)
    ours, reference = Perplexity(), LogitsPerplexity()
    for _ in range(3):
        logits, target = torch.randn(2, 7, 11), torch.randint(0, 11, (2, 7))
        loss = torch.nn.functional.cross_entropy(logits.view(-1, 11), target.view(-1))
        ours.update(loss, weight=target.numel())
        reference.update(logits, target)
    assert torch.allclose(ours.compute(), reference.compute(), rtol=1e-5)


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
    decay, no_decay = config["optimizer"].param_groups
    names = {id(p): n for n, p in module.model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "lm_head.weight" in decayed and "blocks.0.attn.qkv.weight" in decayed
    assert not any(n.startswith(("wte", "wpe")) or "ln_" in n or n.endswith("bias") for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(module.model.parameters()))


def test_overfits_one_batch():
    L.seed_everything(0)
    module = LanguageModel(**TINY)
    tokens = torch.randint(0, 1000, (4, 17))
    batch = (tokens[:, :-1], tokens[:, 1:])
    first = module._loss(batch).item()
    assert abs(first - math.log(50257)) < 0.5  # starts near uniform
    trainer = L.Trainer(max_steps=80, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, gradient_clip_val=1.0)
    trainer.fit(module, train_dataloaders=DataLoader([batch] * 80, batch_size=None))
    assert module._loss(batch).item() < 0.5  # memorised
    assert trainer.callback_metrics["train/ppl"] < 2.0


def test_checkpoint_rebuilds_model(tmp_path):
    module = LanguageModel(**TINY)
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    tokens = torch.randint(0, 1000, (2, 17))
    trainer.fit(module, train_dataloaders=DataLoader([(tokens[:, :-1], tokens[:, 1:])], batch_size=None))
    trainer.save_checkpoint(tmp_path / "x.ckpt")
    loaded = LanguageModel.load_from_checkpoint(tmp_path / "x.ckpt")
    assert loaded.config == module.config
    assert torch.equal(loaded(tokens[:, :-1]), module(tokens[:, :-1]))


def test_peak_flops_and_mfu_inputs():
    from lm_pretrain.hardware import peak_flops

    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16-mixed") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "32-true") == 19.5e12
    assert peak_flops("cpu") is None and peak_flops("Some New GPU") is None
