"""Callbacks: what the template adds to Lightning's training loop.

The training command adds ProgressBar, Preemption and Throughput (lm_pretrain.commands.train); the presets add
TextSamples; every run of LanguageModel gets NonFiniteGuard and RestoreRNG (its configure_callbacks),
however its Trainer was made.

Anything that reads a value back from the GPU (printing the loss, checking for NaN, agreeing on a
stop between processes) waits for the GPU to finish the queued work, which stalls a fast training
loop. Here all of that happens on log steps (every `trainer.log_every_n_steps` optimizer steps) and
nowhere else; lm_pretrain.training.debug.HostSyncCheck proves it.
"""

import os
import signal
import threading
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info

from lm_pretrain.data.datamodule import data_replicas
from lm_pretrain.training import checkpoints
from lm_pretrain.utils import ranges
from lm_pretrain.utils.errors import UserError
from lm_pretrain.training.hardware import peak_flops
from lm_pretrain.model.config import model_size
from lm_pretrain.utils.ranges import NonNegativeFloat, NonNegativeInt, PositiveInt, Seed
from lm_pretrain.model.sampling import sample
from lm_pretrain.training.steps import due, ends_optimizer_step, every_or_log_steps, is_log_step


class ProgressBar(TQDMProgressBar):
    """Lightning's progress bar, showing the training loss and speed as of the last log step.

    The bar moves every batch, but the loss lives on the GPU: reading it every batch would make each
    step wait for the GPU. (Lightning reads every value logged with prog_bar=True after every batch,
    so the module logs train/loss without it, and the bar takes it from here on log steps.)
    """

    SHOWN = {"train/loss": "loss", "perf/tokens_per_s": "tok/s"}  # logged name -> name on the bar

    def __init__(self, refresh_rate: int = 1, **kwargs):
        super().__init__(refresh_rate=refresh_rate, **kwargs)
        self._shown: dict = {}
        self._batch_idx = 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._batch_idx = batch_idx
        super().on_train_batch_end(trainer, module, outputs, batch, batch_idx)

    def get_metrics(self, trainer, module) -> dict:
        if not trainer.training or (ends_optimizer_step(trainer, self._batch_idx) and is_log_step(trainer)):
            logged = trainer.callback_metrics
            self._shown = {short: f"{float(logged[name]):.4g}" for name, short in self.SHOWN.items() if name in logged}
        return {**super().get_metrics(trainer, module), **self._shown}


class TextSamples(L.Callback):
    """Samples text for fixed prompts at the end of training (printed), and every `every_n_steps`
    optimizer steps (to the logger, see `log_text`), so you can read what the model has learned.

    Every process samples (a sharded model needs all of them for each forward pass; the same seed
    keeps them in step); only the first prints and logs.
    """

    def __init__(self, prompts: list[str] = ("",), max_new_tokens: NonNegativeInt = 100,
                 temperature: NonNegativeFloat = 0.8, top_k: PositiveInt | None = 200, every_n_steps: NonNegativeInt = 0,
                 seed: Seed = 1234):
        ranges.check(TextSamples.__init__, {"max_new_tokens": max_new_tokens, "temperature": temperature,
                                            "top_k": top_k, "every_n_steps": every_n_steps, "seed": seed}, "trainer.callbacks")
        self.prompts, self.max_new_tokens = list(prompts), max_new_tokens
        self.temperature, self.top_k, self.every_n_steps, self.seed = temperature, top_k, every_n_steps, seed
        self._last_logged_step = -1  # with gradient accumulation several batches share a step

    def _samples(self, module) -> list[str]:
        was_training = module.training
        module.eval()
        try:
            return [sample(module, p, self.max_new_tokens, self.temperature, self.top_k, self.seed + i)
                    for i, p in enumerate(self.prompts)]
        finally:
            module.train(was_training)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if due(step, self.every_n_steps) and step != self._last_logged_step:
            self._last_logged_step = step
            texts = self._samples(module)
            if trainer.is_global_zero and trainer.logger is not None:
                for i, text in enumerate(texts):
                    log_text(trainer.logger, f"samples/{i}", text, step)

    def on_train_end(self, trainer, module) -> None:
        texts = self._samples(module)
        if trainer.is_global_zero:
            print(f"\n=== samples after {trainer.global_step} steps ===")
            for text in texts:
                print(text.strip() + "\n---")


def log_text(logger, tag: str, text: str, step: int) -> None:
    """Record a text sample with whatever the logger offers for text: TensorBoard's TEXT tab, a
    W&B table, an MLflow artifact; other loggers (CSV, ...) get samples.md in their run folder."""
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_text(tag, text.replace("\n", "  \n"), global_step=step)
    elif isinstance(logger, WandbLogger):
        logger.log_text(key=tag, columns=["step", "text"], data=[[step, text]], step=step)
    elif isinstance(logger, MLFlowLogger):
        logger.experiment.log_text(logger.run_id, text, f"{tag}/step{step:06d}.txt")
    elif getattr(logger, "log_dir", None):
        path = Path(logger.log_dir) / "samples.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(f"## {tag}, step {step}\n\n{text}\n\n")


class Preemption(L.Callback):
    """On SIGTERM (a scheduler's preemption notice) or SIGINT (Ctrl-C), finish the current optimizer
    step, save last.ckpt, and stop cleanly; `--ckpt_path last` then continues from there.

    The signal only sets a flag: the checkpoint is written between steps, where the model, optimizer,
    schedule and data loader agree. A single process looks at its flag after every step. Several
    processes must agree on the step to stop at, whichever of them got the signal: each step ends by
    starting an all-reduce of the flags over a CPU (gloo) process group of its own, and the next step
    ends by reading it, so the run stops one step after the signal, with no step waiting for the GPU
    or for the other processes' flags.
    """

    def __init__(self):
        self.requested: int | None = None  # the signal received
        self.saved: str | None = None  # "PATH at step N", once saved on a signal
        self._previous_handlers: dict = {}
        self._group = None  # the processes' CPU group for the flag
        self._vote: tuple[torch.Tensor, object] | None = None  # (the flag, its all-reduce in flight)

    def _request(self, signum, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            previous = self._previous_handlers.get(signum)
            if callable(previous):
                previous(signum, frame)  # the entry point's (lm_pretrain.utils.errors): it raises KeyboardInterrupt
            raise KeyboardInterrupt
        self.requested = signum

    def on_train_start(self, trainer, module) -> None:
        # Here, not at fit start: Lightning installs its SIGTERM handler after that, and its handler
        # broadcasts from inside the signal handler of whichever process got the signal, a collective
        # the others are not in (a crash when one process alone is signalled). Ours replaces it.
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous_handlers[signum] = signal.signal(signum, self._request)
            # Lightning's matching read of its SIGTERM flag, on every step of a multi-process run: a
            # host sync per step, for a flag that can no longer be set. (A private method:
            # tests/test_callbacks.py fails if Lightning renames it.)
            loop = trainer.fit_loop.epoch_loop
            if hasattr(loop, "_broadcast_sigterm_tensor"):
                loop._broadcast_sigterm_tensor = lambda: None
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            self._group = torch.distributed.new_group(backend="gloo")  # every process creates it, here

    def _start_vote(self) -> None:
        flag = torch.tensor([int(self.requested is not None)], dtype=torch.int32)
        self._vote = flag, torch.distributed.all_reduce(flag, torch.distributed.ReduceOp.MAX, group=self._group,
                                                        async_op=True)

    def _vote_of_last_step(self) -> bool:
        """Whether any process had a signal by the end of the previous step (its all-reduce is done
        by now; a CPU tensor: reading it waits for no GPU)."""
        if self._vote is None:
            return False
        flag, work = self._vote
        work.wait()
        return bool(flag[0] > 0)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def on_fit_end(self, trainer, module) -> None:
        if self._vote is not None:  # the last step's, never read: done before the group goes
            self._vote[1].wait()
            self._vote = None
        self._restore_handlers()

    def on_exception(self, trainer, module, exception) -> None:
        self._restore_handlers()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if not ends_optimizer_step(trainer, batch_idx):
            return  # mid-accumulation: the gradients so far would be lost
        if self._group is not None:
            stop = self._vote_of_last_step()  # the same answer on every process
            self._start_vote()
        else:
            stop = self.requested is not None
        if not stop:
            return
        checkpoint = next((c for c in trainer.checkpoint_callbacks if c.save_last), trainer.checkpoint_callback)
        if checkpoint is None or checkpoint.dirpath is None:
            raise RuntimeError("Preemption needs a ModelCheckpoint to know where to save")
        path = os.path.join(checkpoint.dirpath, checkpoint.CHECKPOINT_NAME_LAST + checkpoint.FILE_EXTENSION)
        trainer.save_checkpoint(path)
        trainer.should_stop = True
        # Lightning validates once more on the way out, and the checkpoint callbacks then save again:
        # that last.ckpt would hold the RNG and loader states after the extra validation, not those of
        # this step's end, and the resumed run would no longer match one that never stopped.
        for callback in trainer.checkpoint_callbacks:
            callback.save_last = False
        name = signal.Signals(self.requested).name if self.requested else "another process's signal"
        self.saved = f"saved {path} at step {trainer.global_step}; continue with --ckpt_path last"
        if self.requested != signal.SIGINT:  # Ctrl-C: the command's last line says it (exit status 130)
            rank_zero_info(f"{name}: {self.saved}")


class Throughput(L.Callback):
    """Tokens per second, achieved TFLOP/s and MFU, logged every `log_every_n_steps` optimizer steps
    (TensorBoard and progress bar).

    Counts every token of every micro-batch on every device, so it is right with gradient
    accumulation and several devices. Measures wall time between log steps, with one device sync
    there and none in between. MFU needs the device's peak (lm_pretrain.training.hardware); on CPUs and
    unknown GPUs it is left out. (Not Lightning's ThroughputMonitor: it synchronises the GPU after
    every batch.)
    """

    def __init__(self, log_every_n_steps: PositiveInt | None = None):
        ranges.check(Throughput.__init__, {"log_every_n_steps": log_every_n_steps}, "trainer.callbacks")
        self.log_every_n_steps = log_every_n_steps
        self._tokens = 0
        self._start: float | None = None

    def on_train_start(self, trainer, module) -> None:
        self.every = every_or_log_steps(self.log_every_n_steps, trainer)
        self.flops_per_token = model_size(module.config)["flops_per_token"]
        device = trainer.strategy.root_device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
        self.peak = peak_flops(name, trainer.precision) if name else None
        self._start, self._tokens = None, 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._tokens += batch[0].numel()  # a shape: no sync
        if not ends_optimizer_step(trainer, batch_idx) or not due(trainer.global_step, self.every):
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._start is not None:
            # The processes of a tensor-parallel group share their tokens (and split their work):
            # count each of those tokens once.
            replicas = data_replicas(trainer)[1]
            per_device = self._tokens / (now - self._start) * replicas / trainer.world_size
            metrics = {"perf/tokens_per_s": per_device * trainer.world_size, "perf/tokens_per_s_per_device": per_device,
                       "perf/tflops_per_device": per_device * self.flops_per_token / 1e12}
            if self.peak:
                metrics["perf/mfu"] = per_device * self.flops_per_token / self.peak
            module.log_dict(metrics, on_step=True, on_epoch=False)
        self._start, self._tokens = now, 0


class NonFiniteGuard(L.Callback):
    """What a NaN or infinite training loss does (`--model.nonfinite_loss`).

    "stop" ends the run with an error naming the last good checkpoint, and no checkpoint is written
    after such a loss. Each step's verdict stays on the device; it is read back every
    `check_every_n_steps` optimizer steps (default: on log steps, which wait for the GPU anyway) and
    before every checkpoint save, so other steps never wait for the GPU.
    "skip" drops that batch's update and goes on; it must decide before the backward pass, so it
    reads the loss back on every step (a host sync), and all processes agree (DDP would otherwise
    wait forever for the gradients of a rank that skipped).

    LanguageModel adds one to every run (configure_callbacks) and asks it in training_step.
    """

    def __init__(self, mode: str = "stop", check_every_n_steps: int | None = None):
        self.mode, self.check_every_n_steps = mode, check_every_n_steps
        self.skipped_batches = 0
        self._seen: torch.Tensor | None = None  # on the device: whether any loss so far was NaN/inf

    def skip_batch(self, trainer, loss: torch.Tensor) -> bool:
        """Whether training_step should drop this batch (mode "skip" and a NaN/inf loss on any process)."""
        nonfinite = ~torch.isfinite(loss.detach())
        if self.mode == "stop":
            self._seen = nonfinite if self._seen is None else self._seen | nonfinite
            return False
        if not trainer.strategy.reduce_boolean_decision(bool(nonfinite), all=False):
            return False
        self.skipped_batches += 1
        rank_zero_info(f"warning: NaN/inf loss at step {trainer.global_step}, batch skipped "
                       f"({self.skipped_batches} so far)")
        return True

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if ends_optimizer_step(trainer, batch_idx) and due(trainer.global_step,
                                                           every_or_log_steps(self.check_every_n_steps, trainer)):
            self.stop_if_nonfinite(trainer)

    def on_save_checkpoint(self, trainer, module, checkpoint) -> None:
        self.stop_if_nonfinite(trainer)  # never write a checkpoint of a diverged model
        # The loss is computed before the update: an update after the last finite loss can already
        # have made the weights NaN/inf. A save reads every weight anyway; one more look is cheap.
        if trainer.strategy.reduce_boolean_decision(not weights_finite(module), all=False):
            raise UserError(f"the model's weights became NaN or infinite by step {trainer.global_step} (the losses "
                            f"were finite); stopped without saving (last good checkpoint: {last_good(trainer)}). Lower "
                            f"model.learning_rate, or set trainer.gradient_clip_val")

    def stop_if_nonfinite(self, trainer) -> None:
        seen = self._seen is not None and bool(self._seen)
        if trainer.strategy.reduce_boolean_decision(seen, all=False):
            raise UserError(f"the training loss became NaN or infinite at or before step {trainer.global_step}; "
                            f"stopped without saving (last good checkpoint: {last_good(trainer)}). Lower model.learning_rate "
                            f"or set model.nonfinite_loss skip")


def last_good(trainer) -> str:
    """The newest checkpoint in the run's checkpoint folders (each was checked finite as it was
    saved), or "none yet". (ModelCheckpoint names its next file before the save that this guard
    stops, so its own paths can point at a file that was never written.)"""
    folders = {Path(c.dirpath) for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)}
    existing = [p for folder in folders if folder.is_dir() for p in folder.glob("*.ckpt")]
    return str(max(existing, key=lambda p: p.stat().st_mtime)) if existing else "none yet"


def weights_finite(module: torch.nn.Module) -> bool:
    """Whether every parameter of `module` is finite (under FSDP2: this process's shards)."""
    params = [p.to_local() if hasattr(p, "to_local") else p for p in module.parameters()]
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all()) if params else True


class RestoreRNG(L.Callback):
    """Saves the Python, NumPy and torch random number generators in every checkpoint, and restores
    them when a run resumes, so a resumed run draws the same random numbers (dropout, sampling) as
    one that never stopped. LanguageModel adds one to every run (configure_callbacks).

    Every process's own states, gathered into the checkpoint (one collective per save): process r
    resumes with the draws of process r, whose GPU's generator is its own (a resume with another
    number of processes takes those of process r modulo the saved number).

    The states are applied at the first training batch, not when the checkpoint is read: Lightning
    restores checkpoints before it makes the data loader's iterator, and making it draws a number.
    """

    def __init__(self):
        self._pending: dict | None = None

    def on_save_checkpoint(self, trainer, module, checkpoint) -> None:
        states = checkpoints.rng_states()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            every = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(every, states)  # every process saves: each takes part
            checkpoint["rng_states"] = every
        else:
            checkpoint["rng_states"] = [states]

    def on_load_checkpoint(self, trainer, module, checkpoint) -> None:
        saved = checkpoint.get("rng_states")
        if isinstance(saved, list):  # one per process (a dict: a checkpoint of before, one process's)
            rank = torch.distributed.get_rank() if torch.distributed.is_available() and \
                torch.distributed.is_initialized() else 0
            saved = saved[rank % len(saved)]
        self._pending = saved

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self._pending is not None:
            checkpoints.set_rng_states(self._pending)
            self._pending = None
