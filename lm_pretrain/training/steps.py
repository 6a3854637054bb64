"""When things happen in a training run: which batches end an optimizer step, and which steps are
due for something done every N steps (logging, NaN checks, preemption checks, throughput, samples).

Lightning counts optimizer steps in `trainer.global_step`; with gradient accumulation several
batches make one step, and only the last of them should act. Everything periodic in the template
asks these questions here, so "every N steps" means the same thing everywhere (N = 0 or empty:
never; steps 0, N, 2N, ... otherwise).
"""


def ends_optimizer_step(trainer, batch_idx: int) -> bool:
    """Whether this training batch completes an optimizer step: the last of its accumulated batches,
    or the epoch's last batch, on which Lightning steps with the fewer batches it has."""
    return (batch_idx + 1) % trainer.accumulate_grad_batches == 0 or batch_idx + 1 == trainer.num_training_batches \
        or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch


def due(step: int, every: int | None) -> bool:
    """Whether `step` is one of every `every` steps (never when `every` is 0 or None)."""
    return bool(every) and step % every == 0


def is_log_step(trainer, step: int | None = None) -> bool:
    """Whether Lightning logs at optimizer step `step` (default: the one just taken, as seen from
    on_train_batch_end; pass trainer.global_step + 1 before the step is taken)."""
    return due(trainer.global_step if step is None else step, trainer.log_every_n_steps)


def every_or_log_steps(every: int | None, trainer) -> int:
    """`every` if set, else the Trainer's log interval (1 when logging is off): checks that read a
    value back from the GPU go on log steps by default, which wait for the GPU anyway."""
    return every or trainer.log_every_n_steps or 1
