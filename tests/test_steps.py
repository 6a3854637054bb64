"""lm_pretrain.training.steps: every "every N steps" in the template means the same steps."""

from types import SimpleNamespace

from lm_pretrain.training.steps import due, ends_optimizer_step, every_or_log_steps, is_log_step


def trainer(global_step=0, log_every_n_steps=5, accumulate_grad_batches=1, num_training_batches=float("inf")):
    return SimpleNamespace(global_step=global_step, log_every_n_steps=log_every_n_steps,
                           accumulate_grad_batches=accumulate_grad_batches, num_training_batches=num_training_batches,
                           fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(
                               batch_progress=SimpleNamespace(is_last_batch=False))))


def test_only_the_last_accumulated_batch_ends_a_step():
    t = trainer(accumulate_grad_batches=3)
    assert [ends_optimizer_step(t, i) for i in range(6)] == [False, False, True, False, False, True]
    assert all(ends_optimizer_step(trainer(), i) for i in range(4))


def test_the_epochs_last_partial_accumulation_ends_a_step_as_lightning_steps_there():
    """5 batches, 2 accumulated: Lightning steps the optimizer 3 times, the last on one batch."""
    import lightning as L
    import torch

    from lm_pretrain.training.module import LanguageModel

    ended = []

    class Count(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if ends_optimizer_step(trainer, batch_idx):
                ended.append(trainer.global_step)

    tokens = torch.randint(0, 64, (5, 1, 9))
    trainer_ = L.Trainer(max_epochs=1, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Count()])
    module = LanguageModel(vocab_size=64, block_size=8, n_layer=1, n_head=1, n_embd=8, warmup_steps=0)
    trainer_.fit(module, train_dataloaders=torch.utils.data.DataLoader([(t[:, :-1], t[:, 1:]) for t in tokens],
                                                                       batch_size=None))
    assert trainer_.global_step == 3 and ended == [1, 2, 3]


def test_due_every_n_steps_from_step_zero_and_never_for_zero_or_none():
    assert [s for s in range(12) if due(s, 4)] == [0, 4, 8]
    assert not any(due(s, 0) or due(s, None) for s in range(12))


def test_log_steps_follow_the_trainers_interval_and_off_means_never():
    assert [s for s in range(11) if is_log_step(trainer(log_every_n_steps=5), s)] == [0, 5, 10]
    assert is_log_step(trainer(global_step=10)) and not is_log_step(trainer(global_step=11))
    assert not any(is_log_step(trainer(log_every_n_steps=0), s) for s in range(10))


def test_checks_default_to_log_steps_and_to_every_step_when_logging_is_off():
    assert every_or_log_steps(7, trainer()) == 7
    assert every_or_log_steps(None, trainer(log_every_n_steps=20)) == 20
    assert every_or_log_steps(None, trainer(log_every_n_steps=0)) == 1
