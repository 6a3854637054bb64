import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from torchmetrics.text import Perplexity as LogitsPerplexity

from lm_pretrain.module import IGNORE_INDEX, LanguageModel, MeanLoss
from lm_pretrain.optim import lr_multiplier

TINY = dict(vocab_size=50257, block_size=16, n_layer=2, n_head=2, n_embd=32, warmup_steps=2, learning_rate=1e-2)


def test_mean_loss_matches_torchmetrics_perplexity_on_logits_and_skips_padding():
    torch.manual_seed(0)
    ours, reference = MeanLoss(), LogitsPerplexity(ignore_index=IGNORE_INDEX)
    for padded in (0, 3, 14):  # the last batch is all padding
        logits, target = torch.randn(2, 7, 11), torch.randint(0, 11, (2, 7))
        target.view(-1)[target.numel() - padded:] = IGNORE_INDEX
        loss_sum = torch.nn.functional.cross_entropy(logits.view(-1, 11), target.view(-1), reduction="sum",
                                                     ignore_index=IGNORE_INDEX)
        ours.update(loss_sum, (target != IGNORE_INDEX).sum())
        reference.update(logits, target)
    assert torch.allclose(ours.compute().exp(), reference.compute(), rtol=1e-5)


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
    assert "lm_head.weight" in decayed and "blocks.0.attn.qkv.weight" in decayed
    assert not any(n.startswith(("wte", "wpe")) or "ln_" in n or n.endswith("bias") for n in decayed)
    assert sum(len(g["params"]) for g in (decay, no_decay, head)) == len(list(module.model.parameters()))


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

    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16-mixed") == 989e12  # SXM
    assert peak_flops("NVIDIA H100 PCIe", "bf16-mixed") == 756e12
    assert peak_flops("NVIDIA H100 NVL", "bf16-mixed") == peak_flops("NVIDIA H200 NVL", "bf16-mixed") == 835e12
    assert peak_flops("NVIDIA H200", "bf16-mixed") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "32-true") == 19.5e12
    assert peak_flops("cpu") is None and peak_flops("Some New GPU") is None


@pytest.mark.parametrize("field,value", [("rope_theta", 500000.0), ("norm_eps", 1e-6), ("n_kv_head", 1)])
def test_a_checkpoint_of_another_architecture_is_refused(field, value):
    from lm_pretrain.errors import UserError
    from lm_pretrain.checkpoints import check_architecture

    saved = LanguageModel(**{**TINY, "position": "rope"}).hparams
    check_architecture(saved, LanguageModel(**{**TINY, "position": "rope", "dropout": 0.1}).config, "checkpoint")
    with pytest.raises(UserError, match=f"another architecture: {field}="):
        check_architecture(saved, LanguageModel(**{**TINY, "position": "rope", field: value}).config, "checkpoint")


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_bf16_mixed_clips_with_the_fused_optimizer(algorithm):
    """Lightning's mixed-precision plugin refuses to clip for a fused optimizer (an fp16 concern); the
    GPU presets train bf16-mixed with fused AdamW and clipping, so the module clips itself."""
    class AfterClipping(L.Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            self.grads = None

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.grads = [p.grad for p in module.parameters() if p.grad is not None]

    L.seed_everything(0)
    module, seen = LanguageModel(**TINY), AfterClipping()
    tokens = torch.randint(0, 1000, (2, 17))
    trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", max_steps=2, gradient_clip_val=0.01,
                        gradient_clip_algorithm=algorithm, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[seen])
    trainer.fit(module, train_dataloaders=DataLoader([(tokens[:, :-1], tokens[:, 1:])] * 2, batch_size=None))
    assert trainer.optimizers[0].defaults["fused"]
    if algorithm == "norm":
        assert float(torch.nn.utils.get_total_norm(seen.grads)) == pytest.approx(0.01, rel=1e-3)
    else:
        assert max(float(g.abs().max()) for g in seen.grads) <= 0.01
