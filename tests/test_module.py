import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader
from torchmetrics.text import Perplexity as LogitsPerplexity

from helpers import tiny_checkpoint
from lm_pretrain.callbacks import TextSamples
from lm_pretrain.loss import IGNORE_INDEX
from lm_pretrain.module import LanguageModel, MeanLoss

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
    module, path = tiny_checkpoint(tmp_path / "x.ckpt", steps=1, **TINY)
    loaded = LanguageModel.load_from_checkpoint(path)
    tokens = torch.randint(0, 1000, (2, 16))
    assert loaded.config == module.config
    assert torch.equal(loaded(tokens), module(tokens))


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


class FailOnRecompileAfterFirstStep(L.Callback):
    """Training steps after the first must reuse the compiled graph (torch.compiler's own check);
    validation may compile a graph of its own (no gradients)."""

    def __init__(self):
        self.strict_steps = 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        torch.compiler.set_stance("fail_on_recompile" if trainer.global_step > 0 else "default")
        self.strict_steps += trainer.global_step > 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        torch.compiler.set_stance("default")


@pytest.mark.slow
@pytest.mark.parametrize("blocks", [{}, {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False}])
def test_compiled_training_step_survives_samples_and_validation(blocks):
    L.seed_everything(0)
    module = LanguageModel(**{**TINY, **blocks, "compile": True})
    assert not module.fused_loss  # auto: the plain path, which inductor fuses
    tokens = torch.randint(0, 1000, (4, 17))
    batch = (tokens[:, :-1], tokens[:, 1:])
    check = FailOnRecompileAfterFirstStep()
    samples = TextSamples(prompts=["The"], max_new_tokens=3, every_n_steps=2)
    trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, val_check_interval=3, limit_val_batches=2,
                        num_sanity_val_steps=0, callbacks=[samples, check])
    try:
        trainer.fit(module, train_dataloaders=DataLoader([batch] * 6, batch_size=None),
                    val_dataloaders=DataLoader([batch] * 2, batch_size=None))
    finally:
        torch.compiler.set_stance("default")
    assert trainer.global_step == 6 and check.strict_steps == 5  # samples at steps 2 and 4, validation at 3
    eager = LanguageModel(**{**TINY, **blocks})
    eager.load_state_dict(module.state_dict())  # the compiled loss step leaves the weights' names alone
    assert torch.allclose(eager._loss(batch), module._loss(batch), rtol=1e-4)
