"""lm_pretrain.training.callbacks, in-process: the NaN/inf guard, the RNG states of a resumed run, and the
private Lightning method that Preemption replaces (the end-to-end runs are in test_long_runs.py)."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lm_pretrain.training.callbacks import NonFiniteGuard, Preemption, RestoreRNG
from lm_pretrain.utils.errors import UserError
from lm_pretrain.training.module import LanguageModel

TINY = dict(vocab_size=300, block_size=16, n_layer=1, n_head=2, n_embd=16, learning_rate=1e-3, warmup_steps=0)


class NaNFromStep(L.Callback):
    """Make the final norm's weights NaN before optimizer step `step`: every loss from there is NaN."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.step:
            with torch.no_grad():
                module.model.ln_f.weight.fill_(float("nan"))


def fit(module, callbacks, steps=6, **trainer_args):
    tokens = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=callbacks, **{"enable_checkpointing": False, **trainer_args})
    trainer.fit(module, train_dataloaders=DataLoader([(tokens[:, :-1], tokens[:, 1:])] * steps, batch_size=None))
    return trainer


def test_every_run_of_the_module_gets_the_guard_and_the_rng_states():
    trainer = fit(LanguageModel(**TINY), [], steps=1)
    kinds = [type(c) for c in trainer.callbacks]
    assert NonFiniteGuard in kinds and RestoreRNG in kinds


def test_stop_is_noticed_on_the_next_check_step_not_before():
    module = LanguageModel(**{**TINY, "nonfinite_check_every": 3})
    with pytest.raises(UserError, match="NaN or infinite at or before step 3; .*last good checkpoint: none yet"):
        fit(module, [NaNFromStep(1)], log_every_n_steps=50)


def test_no_checkpoint_is_written_after_a_nonfinite_loss(tmp_path):
    module = LanguageModel(**{**TINY, "nonfinite_check_every": 100})
    trainer = fit(module, [NaNFromStep(1)], steps=2)  # never checked during the run
    with pytest.raises(UserError, match="NaN or infinite"):
        trainer.save_checkpoint(tmp_path / "after.ckpt")
    assert not (tmp_path / "after.ckpt").exists()


class InfiniteUpdateAt(L.Callback):
    """Make one gradient infinite before optimizer step `step`: that step's loss is finite, its update
    makes the weights NaN/inf."""

    def __init__(self, step: int):
        self.step = step

    def on_before_optimizer_step(self, trainer, module, optimizer):
        if trainer.global_step == self.step:
            module.model.ln_f.weight.grad.fill_(float("inf"))


@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_no_checkpoint_of_nonfinite_weights_and_the_error_names_a_finite_one(mode, tmp_path):
    module = LanguageModel(**{**TINY, "nonfinite_loss": mode, "optimizer": "adamw"})
    saves = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="step{step}",
                            auto_insert_metric_name=False)
    with pytest.raises(UserError, match=r"weights became NaN or infinite by step 3 \(the losses were finite\); "
                                        r"stopped without saving \(last good checkpoint: \S+step2.ckpt\)"):
        fit(module, [InfiniteUpdateAt(2), saves], steps=4, enable_checkpointing=True)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["step1.ckpt", "step2.ckpt"]  # not step 3, whose weights are not finite
    for name in written:
        state = torch.load(tmp_path / name, weights_only=True)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def test_skip_drops_only_the_bad_batches():
    module = LanguageModel(**{**TINY, "nonfinite_loss": "skip"})
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    fit(module, [NaNFromStep(0)], steps=3)
    assert module.nonfinite.skipped_batches == 3  # every batch, and no update was made:
    assert all(torch.equal(p, before[n]) for n, p in module.named_parameters() if n != "model.ln_f.weight")


def test_rng_states_are_saved_and_applied_at_the_first_batch_after_a_resume():
    rng = RestoreRNG()
    checkpoint = {}
    torch.manual_seed(7)
    rng.on_save_checkpoint(None, None, checkpoint)
    expected = torch.rand(4)
    torch.manual_seed(0)
    rng.on_load_checkpoint(None, None, checkpoint)
    torch.rand(1)  # Lightning draws between restoring and the first batch (the loader's iterator)
    rng.on_train_batch_start(None, None, None, 0)
    assert torch.equal(torch.rand(4), expected)
    rng.on_train_batch_start(None, None, None, 1)  # only once
    assert not torch.equal(torch.rand(4), expected)


def test_preemption_still_finds_the_lightning_method_it_replaces():
    """Preemption turns off Lightning's per-step SIGTERM broadcast (a host sync per step) by replacing
    a private method of the training epoch loop: fail here if Lightning renames it."""
    trainer = L.Trainer(logger=False, enable_checkpointing=False)
    loop = trainer.fit_loop.epoch_loop
    assert callable(getattr(loop, "_broadcast_sigterm_tensor", None))
    preemption = Preemption()
    preemption.on_train_start(trainer, None)
    try:
        assert loop._broadcast_sigterm_tensor() is None and "_broadcast_sigterm_tensor" in vars(loop)
    finally:
        preemption.on_fit_end(trainer, None)
