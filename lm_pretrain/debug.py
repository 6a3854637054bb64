"""Debugging aids, switched on by an explicit flag, never by a preset:

    python train.py fit ... --trainer.callbacks+=lm_pretrain.debug.HostSyncCheck

HostSyncCheck fails a run whose quiet steps wait for the GPU; it patches torch.Tensor methods for as
long as the run lasts, which is why it is here and not among the callbacks every run uses
(lm_pretrain.callbacks). RecordBatches and SignalAt check resuming: record what each step trained on,
kill a run at a given step, resume it, and compare the records (read_records) with a straight run's.
"""

import hashlib
import json
import os
import signal
import traceback
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lm_pretrain import ranges
from lm_pretrain.ranges import NonNegativeInt
from lm_pretrain.steps import ends_optimizer_step, is_log_step


class HostSyncCheck(L.Callback):
    """Fails the run if a training step that does not log makes the host wait for the GPU.

    On CUDA this is PyTorch's own detector (`torch.cuda.set_sync_debug_mode("error")`), switched on
    between log steps: the first synchronising call raises, with its stack. On CPUs (tests) it counts
    the calls that would synchronise on a GPU (`.item()`, `.tolist()`, `.cpu()`, `.numpy()`,
    `bool()`, `int()`, `float()` of a tensor) in the same places, except on tensors that stay on the
    host on a GPU machine too (see HOST_SIDE), and raises at the end of training if there were any. Log steps, validation,
    checkpoint saves and the first `skip_steps` steps (compilation, optimizer state) are exempt.

        python train.py fit ... --trainer.callbacks+=lm_pretrain.debug.HostSyncCheck
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
        quiet = (step > self.skip_steps and not is_log_step(trainer, step)
                 and (trainer.max_steps < 0 or step < trainer.max_steps))
        if quiet and ends_optimizer_step(trainer, batch_idx):
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


class RecordBatches(L.Callback):
    """Append {rank, step, loss, batch sha} per training batch to a JSON Lines file (one per rank)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        x, _ = batch
        loss = float(outputs["loss"]) if outputs else None  # None: the batch was skipped
        row = {"rank": trainer.global_rank, "step": trainer.global_step, "loss": loss,
               "rows": [hashlib.sha1(r.cpu().numpy().tobytes()).hexdigest()[:16] for r in x]}
        with open(f"{self.path}.rank{trainer.global_rank}", "a") as f:
            f.write(json.dumps(row) + "\n")


class SignalAt(L.Callback):
    """Send `signal_name` to this process after optimizer step `step` (every rank does the same)."""

    def __init__(self, step: int, signal_name: str = "SIGKILL"):
        self.step, self.signum = step, getattr(signal, signal_name)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def read_records(path) -> list[dict]:
    """Every rank's records, the later entry for a (rank, step) winning (a resumed run repeats steps)."""
    rows = {}
    for f in sorted(Path(path).parent.glob(Path(path).name + ".rank*")):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            rows[(row["rank"], row["step"])] = row
    return [rows[k] for k in sorted(rows)]
