"""Callbacks the template adds to the Trainer."""

import os
import signal
import threading
import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lm_pretrain.generate import sample
from lm_pretrain.hardware import peak_flops
from lm_pretrain.model import model_size


class TextSamples(L.Callback):
    """Samples text for fixed prompts at the end of training (printed), and every `every_n_steps`
    optimizer steps (to TensorBoard as text), so you can read what the model has learned.

    Every process samples (a sharded model needs all of them for each forward pass; the same seed
    keeps them in step); only the first prints and logs.
    """

    def __init__(self, prompts: list[str] = ("",), max_new_tokens: int = 100, temperature: float = 0.8,
                 top_k: int | None = 200, every_n_steps: int = 0, seed: int = 1234):
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
            experiment = getattr(trainer.logger, "experiment", None) if trainer.is_global_zero else None
            if hasattr(experiment, "add_text"):
                for i, text in enumerate(texts):
                    experiment.add_text(f"samples/{i}", text.replace("\n", "  \n"), global_step=step)

    def on_train_end(self, trainer, module) -> None:
        texts = self._samples(module)
        if trainer.is_global_zero:
            print(f"\n=== samples after {trainer.global_step} steps ===")
            for text in texts:
                print(text.strip() + "\n---")


class Preemption(L.Callback):
    """On SIGTERM (a scheduler's preemption notice) or SIGINT (Ctrl-C), finish the current optimizer
    step, save last.ckpt, and stop cleanly; `--ckpt_path last` then continues from there.

    The signal only sets a flag: the checkpoint is written between steps, where the model, optimizer,
    schedule and data loader agree. With several processes they agree on when to stop through one
    collective every `check_every_n_steps` steps (a single process checks every step for free).
    """

    def __init__(self, check_every_n_steps: int = 10):
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

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def on_fit_end(self, trainer, module) -> None:
        self._restore_handlers()

    def on_exception(self, trainer, module, exception) -> None:
        self._restore_handlers()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # mid-accumulation: the gradients so far would be lost
        if trainer.world_size > 1:
            if trainer.global_step % self.check_every_n_steps:
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

    def __init__(self, log_every_n_steps: int | None = None):
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
        if (batch_idx + 1) % trainer.accumulate_grad_batches or trainer.global_step % self.every:
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
            module.log("tok/s", metrics["perf/tokens_per_s"], prog_bar=True, logger=False)
        self._start, self._tokens = now, 0
