import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from torchmetrics.text import Perplexity as LogitsPerplexity

from helpers import tiny_checkpoint
from lm_pretrain.training.callbacks import TextSamples
from lm_pretrain.training.debug import CompiledStepCheck
from lm_pretrain.utils.errors import UserError
from lm_pretrain.model.loss import IGNORE_INDEX, next_token_loss
from lm_pretrain.training.module import LanguageModel, MeanLoss

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


def test_mean_loss_is_exact_where_torchmetrics_mean_metric_would_sync_or_drop_the_weights():
    """Why MeanLoss and not MeanMetric(weights): the weighted mean of batch losses is the sum over
    tokens; MeanMetric reads each update back for its NaN check, and with the check off ignores the
    weights (when this fails, torchmetrics has changed: MeanMetric may then do)."""
    from torchmetrics import MeanMetric

    sums, counts = torch.tensor([12.0, 1.5, 30.0]), torch.tensor([4, 1, 10])
    ours, unchecked = MeanLoss(), MeanMetric(nan_strategy="disable")
    for loss_sum, count in zip(sums, counts):
        ours.update(loss_sum, count)
        unchecked.update(loss_sum / count, count)
    assert ours.compute().item() == (sums.sum() / counts.sum()).item() == pytest.approx(43.5 / 15)
    assert unchecked.compute().item() == pytest.approx((3.0 + 1.5 + 3.0) / 3)  # the weights dropped
    reads = []
    item = torch.Tensor.__bool__
    try:
        torch.Tensor.__bool__ = lambda t: reads.append(1) or item(t)
        MeanMetric().update(torch.tensor(1.0), torch.tensor(2.0))
        MeanLoss().update(torch.tensor(1.0), torch.tensor(2.0))
    finally:
        torch.Tensor.__bool__ = item
    assert len(reads) == 2  # MeanMetric's two NaN checks (values, weights); none of MeanLoss's


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


def test_the_logged_loss_is_the_steps_mean_over_its_micro_batches():
    """With 2 micro-batches per optimizer step, train/loss is their mean, not the last one's."""
    from lm_pretrain.training.steps import ends_optimizer_step

    micro, logged = [], []

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            micro.append(outputs["loss"].item())
            if ends_optimizer_step(trainer, batch_idx):
                logged.append(trainer.callback_metrics["train/loss"].item())

    L.seed_everything(0)
    tokens = torch.randint(0, 1000, (6, 4, 17))
    trainer = L.Trainer(max_steps=3, accumulate_grad_batches=2, log_every_n_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[Watch()])
    trainer.fit(LanguageModel(**TINY), train_dataloaders=DataLoader([(t[:, :-1], t[:, 1:]) for t in tokens], batch_size=None))
    assert len(micro) == 6 and micro[0] != micro[1]
    # (Lightning hands on_train_batch_end each micro-batch's loss divided by accumulate_grad_batches)
    assert logged == pytest.approx([micro[i] + micro[i + 1] for i in (0, 2, 4)], rel=1e-6)


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


def compiled_run(module: LanguageModel, tmp_path, *callbacks: L.Callback, steps: int = 8) -> L.Trainer:
    """`steps` training steps of a compiled module with samples (every 2 steps), validations (every 3,
    the last batch short) and checkpoints (every 2) between them, under debug.CompiledStepCheck."""
    torch._dynamo.reset()  # what other tests compiled in this process must not count here
    tokens = torch.randint(0, 1000, (4, 17))
    batch = (tokens[:, :-1], tokens[:, 1:])
    short = (batch[0][:3], batch[1][:3])
    checks = [CompiledStepCheck(early=1, late=steps - 1), TextSamples(prompts=["The"], max_new_tokens=3, every_n_steps=2),
              ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1), *callbacks]
    trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        val_check_interval=3, limit_val_batches=2, num_sanity_val_steps=0, callbacks=checks,
                        default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=DataLoader([batch] * steps, batch_size=None),
                val_dataloaders=DataLoader([batch, short], batch_size=None))
    return trainer


@pytest.mark.slow
@pytest.mark.parametrize("blocks", [{}, {"position": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False}])
def test_compiled_training_step_survives_samples_validation_and_checkpoints(blocks, tmp_path):
    L.seed_everything(0)
    module = LanguageModel(**{**TINY, **blocks, "compile": True})
    assert module.loss_path == "plain"  # auto: the plain path, which inductor fuses
    # CompiledStepCheck: no recompile in training steps 2-8, the same operators in steps 1 and 7
    # (samples, validations and checkpoints between them), no frame skipped, no graph break
    trainer = compiled_run(module, tmp_path)
    assert trainer.global_step == 8 and len(list(tmp_path.glob("*.ckpt"))) == 4
    tokens = torch.randint(0, 1000, (4, 17))
    batch = (tokens[:, :-1], tokens[:, 1:])
    eager = LanguageModel(**{**TINY, **blocks})
    eager.load_state_dict(module.state_dict())  # the compiled loss step leaves the weights' names alone
    assert torch.allclose(eager._loss(batch), module._loss(batch), rtol=1e-4)


class TurnEagerAfter(L.Callback):
    """From optimizer step `step` on, compute the loss eagerly: the regression CompiledStepCheck catches."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            module._loss_fn = next_token_loss


@pytest.mark.slow
def test_compiled_step_check_catches_a_step_gone_eager(tmp_path):
    module = LanguageModel(**{**TINY, "n_layer": 1, "compile": True})
    with pytest.raises(RuntimeError, match="step 5 ran other operators than step 1.*aten::"):
        compiled_run(module, tmp_path, TurnEagerAfter(3), steps=6)


def test_compiled_step_check_needs_a_compiled_run_and_two_steps_in_order():
    with pytest.raises(UserError, match="late .3. must come after early .3."):
        CompiledStepCheck(early=3, late=3)
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[CompiledStepCheck()])
    with pytest.raises(UserError, match="set model.compile true"):
        trainer.fit(LanguageModel(**TINY), train_dataloaders=DataLoader([(torch.zeros(1, 16, dtype=torch.long),) * 2],
                                                                         batch_size=None))


def test_compile_mode_reaches_torch_compile_and_chunked_loss_is_used(monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: seen.append(kwargs) or fn)
    module = LanguageModel(**{**TINY, "compile": True, "compile_mode": "max-autotune-no-cudagraphs"})
    module.configure_model()
    assert seen == [{"mode": "max-autotune-no-cudagraphs"}]
    chunked = LanguageModel(**{**TINY, "loss": "chunked"})
    assert chunked.loss_path == "chunked"
    tokens = torch.randint(0, 1000, (2, 17))
    plain = LanguageModel(**{**TINY, "loss": "plain"})
    plain.load_state_dict(chunked.state_dict())
    batch = (tokens[:, :-1], tokens[:, 1:])
    assert torch.allclose(chunked._loss(batch), plain._loss(batch), rtol=1e-5)
