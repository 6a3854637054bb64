"""lm_pretrain.training.steps: every "every N steps" in the template means the same steps."""

from types import SimpleNamespace

from lm_pretrain.training.steps import due, ends_optimizer_step, every_or_log_steps, is_log_step


def trainer(global_step=0, log_every_n_steps=5, accumulate_grad_batches=1):
    return SimpleNamespace(global_step=global_step, log_every_n_steps=log_every_n_steps,
                           accumulate_grad_batches=accumulate_grad_batches)


def test_only_the_last_accumulated_batch_ends_a_step():
    t = trainer(accumulate_grad_batches=3)
    assert [ends_optimizer_step(t, i) for i in range(6)] == [False, False, True, False, False, True]
    assert all(ends_optimizer_step(trainer(), i) for i in range(4))


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
