"""Callbacks the template adds to the Trainer.

Anything that reads a value back from the GPU (printing the loss, checking for NaN, agreeing on a
stop between processes) waits for the GPU to finish the queued work, which stalls a fast training
loop. Here all of that happens on log steps (every `trainer.log_every_n_steps` optimizer steps) and
nowhere else; `HostSyncCheck` proves it.
"""

import os
import signal
import threading
import time
import traceback
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info

from lm_pretrain import ranges
from lm_pretrain.generate import sample
from lm_pretrain.hardware import peak_flops
from lm_pretrain.model import model_size
from lm_pretrain.ranges import NonNegativeFloat, NonNegativeInt, PositiveInt


def step_ends_here(trainer, batch_idx: int) -> bool:
    """Whether this training batch completes an optimizer step (the last of its accumulated batches)."""
    return (batch_idx + 1) % trainer.accumulate_grad_batches == 0


def logged_step(trainer) -> bool:
    """In on_train_batch_end: whether the optimizer step just taken is one Lightning logs."""
    return trainer.log_every_n_steps > 0 and trainer.global_step % trainer.log_every_n_steps == 0


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
        if not trainer.training or (step_ends_here(trainer, self._batch_idx) and logged_step(trainer)):
            logged = trainer.callback_metrics
            self._shown = {short: f"{float(logged[name]):.4g}" for name, short in self.SHOWN.items() if name in logged}
        return {**super().get_metrics(trainer, module), **self._shown}


class HostSyncCheck(L.Callback):
    """Fails the run if a training step that does not log makes the host wait for the GPU.

    On CUDA this is PyTorch's own detector (`torch.cuda.set_sync_debug_mode("error")`), switched on
    between log steps: the first synchronising call raises, with its stack. On CPUs (tests) it counts
    the calls that would synchronise on a GPU (`.item()`, `.tolist()`, `.cpu()`, `.numpy()`,
    `bool()`, `int()`, `float()` of a tensor) in the same places, except on tensors that stay on the
    host on a GPU machine too (see HOST_SIDE), and raises at the end of training if there were any. Log steps, validation,
    checkpoint saves and the first `skip_steps` steps (compilation, optimizer state) are exempt.

        python train.py fit ... --trainer.callbacks+=lm_pretrain.callbacks.HostSyncCheck
    """

    SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")
    # Calls from these work on tensors that stay on the host on a GPU machine too: data loading, and
    # optimizer step counters (kept on the host unless the optimizer is fused or capturable).
    HOST_SIDE = (f"{os.sep}litdata{os.sep}", f"{os.sep}torch{os.sep}utils{os.sep}data{os.sep}",
                 f"loops{os.sep}fetchers.py", f"torch{os.sep}optim{os.sep}optimizer.py")

    def __init__(self, skip_steps: NonNegativeInt = 2):
        ranges.check(HostSyncCheck.__init__, {"skip_steps": skip_steps}, "trainer.callbacks")
        self.skip_steps = skip_steps
        self.checked_steps = 0  # optimizer steps watched in full
        self.syncs: list[str] = []  # CPU: where each counted call came from
        self._active, self._originals, self._cuda = False, {}, False

    def on_fit_start(self, trainer, module) -> None:
        self._cuda = trainer.strategy.root_device.type == "cuda"
        if not self._cuda:
            for name in self.SYNCING:
                self._originals[name] = original = getattr(torch.Tensor, name)
                setattr(torch.Tensor, name, self._counting(original))

    def _counting(self, original):
        def method(tensor, *args, **kwargs):
            if self._active:
                stack = traceback.extract_stack()[:-1]
                if not any(part in frame.filename for frame in stack for part in self.HOST_SIDE):
                    self.syncs.append("".join(traceback.format_list(stack[-6:])))
            return original(tensor, *args, **kwargs)

        return method

    def _watch(self, active: bool) -> None:
        if active != self._active and self._cuda:
            torch.cuda.set_sync_debug_mode("error" if active else "default")
        self._active = active

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        step = trainer.global_step + 1  # the optimizer step this batch belongs to
        quiet = (step > self.skip_steps and (trainer.log_every_n_steps == 0 or step % trainer.log_every_n_steps)
                 and (trainer.max_steps < 0 or step < trainer.max_steps))
        if quiet and step_ends_here(trainer, batch_idx):
            self.checked_steps += 1
        self._watch(bool(quiet))

    def on_save_checkpoint(self, trainer, module, checkpoint) -> None:
        self._watch(False)

    def on_validation_start(self, trainer, module) -> None:
        self._watch(False)

    def on_exception(self, trainer, module, exception) -> None:
        self._stop()

    def on_train_end(self, trainer, module) -> None:
        self._stop()
        if self.syncs:
            raise RuntimeError(f"{len(self.syncs)} host syncs in training steps that do not log; the first:\n"
                               f"{self.syncs[0]}")
        rank_zero_info(f"HostSyncCheck: {self.checked_steps} optimizer steps without a log step checked, "
                       f"no host sync in them")

    def _stop(self) -> None:
        self._watch(False)
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)
        self._originals.clear()


class TextSamples(L.Callback):
    """Samples text for fixed prompts at the end of training (printed), and every `every_n_steps`
    optimizer steps (to the logger, see `log_text`), so you can read what the model has learned.

    Every process samples (a sharded model needs all of them for each forward pass; the same seed
    keeps them in step); only the first prints and logs.
    """

    def __init__(self, prompts: list[str] = ("",), max_new_tokens: NonNegativeInt = 100,
                 temperature: NonNegativeFloat = 0.8, top_k: PositiveInt | None = 200, every_n_steps: NonNegativeInt = 0,
                 seed: int = 1234):
        ranges.check(TextSamples.__init__, {"max_new_tokens": max_new_tokens, "temperature": temperature,
                                            "top_k": top_k, "every_n_steps": every_n_steps}, "trainer.callbacks")
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
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_logged_step:
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
    schedule and data loader agree. With several processes they agree on when to stop through one
    collective every `check_every_n_steps` steps (default: on log steps, which wait for the GPU
    anyway); a single process checks every step for free.
    """

    def __init__(self, check_every_n_steps: PositiveInt | None = None):
        ranges.check(Preemption.__init__, {"check_every_n_steps": check_every_n_steps}, "trainer.callbacks")
        self.check_every_n_steps = check_every_n_steps
        self.requested: int | None = None  # the signal received
        self._previous_handlers: dict = {}

    def _request(self, signum, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.requested = signum

    def on_fit_start(self, trainer, module) -> None:
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous_handlers[signum] = signal.signal(signum, self._request)
            # Lightning's own SIGTERM flag (which these handlers replace) is broadcast from the first
            # process and read back on every step of a multi-process run: a host sync per step, for
            # a flag that can no longer be set.
            loop = trainer.fit_loop.epoch_loop
            if hasattr(loop, "_broadcast_sigterm_tensor"):
                loop._broadcast_sigterm_tensor = lambda: None

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def on_fit_end(self, trainer, module) -> None:
        self._restore_handlers()

    def on_exception(self, trainer, module, exception) -> None:
        self._restore_handlers()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if not step_ends_here(trainer, batch_idx):
            return  # mid-accumulation: the gradients so far would be lost
        if trainer.world_size > 1:
            every = self.check_every_n_steps or trainer.log_every_n_steps or 1
            if trainer.global_step % every:
                return
            stop = trainer.strategy.reduce_boolean_decision(self.requested is not None, all=False)
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
        name = signal.Signals(self.requested).name if self.requested else "another process's signal"
        rank_zero_info(f"{name}: saved {path} at step {trainer.global_step}; continue with --ckpt_path last")


class Throughput(L.Callback):
    """Tokens per second, achieved TFLOP/s and MFU, logged every `log_every_n_steps` optimizer steps
    (TensorBoard and progress bar).

    Counts every token of every micro-batch on every device, so it is right with gradient
    accumulation and several devices. Measures wall time between log steps, with one device sync
    there and none in between. MFU needs the device's peak (lm_pretrain.hardware); on CPUs and
    unknown GPUs it is left out.
    """

    def __init__(self, log_every_n_steps: PositiveInt | None = None):
        ranges.check(Throughput.__init__, {"log_every_n_steps": log_every_n_steps}, "trainer.callbacks")
        self.log_every_n_steps = log_every_n_steps
        self._tokens = 0
        self._start: float | None = None

    def on_train_start(self, trainer, module) -> None:
        self.every = self.log_every_n_steps or trainer.log_every_n_steps
        self.flops_per_token = model_size(module.config)["flops_per_token"]
        device = trainer.strategy.root_device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
        self.peak = peak_flops(name, trainer.precision) if name else None
        self._start, self._tokens = None, 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._tokens += batch[0].numel()  # a shape: no sync
        if not step_ends_here(trainer, batch_idx) or trainer.global_step % self.every:
            return
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._start is not None:
            per_device = self._tokens / (now - self._start)
            metrics = {"perf/tokens_per_s": per_device * trainer.world_size, "perf/tokens_per_s_per_device": per_device,
                       "perf/tflops_per_device": per_device * self.flops_per_token / 1e12}
            if self.peak:
                metrics["perf/mfu"] = per_device * self.flops_per_token / self.peak
            module.log_dict(metrics, on_step=True, on_epoch=False)
        self._start, self._tokens = now, 0
