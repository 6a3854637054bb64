"""Debugging aids, switched on by an explicit flag, never by a preset:

    python train.py fit ... --trainer.callbacks+=lm_pretrain.training.debug.HostSyncCheck

HostSyncCheck fails a run whose quiet steps wait for the GPU; it patches torch.Tensor methods for as
long as the run lasts, which is why it is here and not among the callbacks every run uses
(lm_pretrain.training.callbacks). CompiledStepCheck fails a compiled run whose training step recompiles or
falls back to eager; peak_cpu_bytes measures what a step allocates at most on a CPU. RecordBatches and SignalAt check resuming: record what each step trained on,
kill a run at a given step, resume it, and compare the records (read_records) with a straight run's.
"""

import collections
import hashlib
import json
import os
import signal
import traceback
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from lm_pretrain.utils import ranges
from lm_pretrain.utils.errors import UserError
from lm_pretrain.utils.ranges import NonNegativeInt, PositiveInt
from lm_pretrain.training.steps import ends_optimizer_step, is_log_step


class HostSyncCheck(L.Callback):
    """Fails the run if a training step that does not log makes the host wait for the GPU.

    On CUDA this is PyTorch's own detector (`torch.cuda.set_sync_debug_mode("error")`), switched on
    between log steps: the first synchronising call raises, with its stack. On CPUs (tests) it counts
    the calls that would synchronise on a GPU (`.item()`, `.tolist()`, `.cpu()`, `.numpy()`,
    `bool()`, `int()`, `float()` of a tensor) in the same places, except on tensors that stay on the
    host on a GPU machine too (see HOST_SIDE), and raises at the end of training if there were any. Log steps, validation,
    checkpoint saves and the first `skip_steps` steps (compilation, optimizer state) are exempt.

        python train.py fit ... --trainer.callbacks+=lm_pretrain.training.debug.HostSyncCheck
    """

    SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")
    # Calls from these work on tensors that stay on the host on a GPU machine too: data loading, and
    # optimizer step counters (kept on the host unless the optimizer is fused or capturable).
    HOST_SIDE = (f"{os.sep}litdata{os.sep}", f"{os.sep}torch{os.sep}utils{os.sep}data{os.sep}",
                 f"loops{os.sep}fetchers.py", f"torch{os.sep}optim{os.sep}optimizer.py")
    HOST_SIDE_FUNCTIONS = ("_vote_of_last_step",)  # Preemption's flag: a CPU tensor on every machine

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
                if not any(part in frame.filename for frame in stack for part in self.HOST_SIDE) and \
                        not any(frame.name in self.HOST_SIDE_FUNCTIONS for frame in stack):
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


class CompiledStepCheck(L.Callback):
    """Fails a run (model.compile true) whose compiled training step does not stay compiled to the end.

    - After the first optimizer step of this process, training batches run under torch.compiler's
      "fail_on_recompile" stance: a new graph or a recompile there raises at once, naming the guard
      that failed. Validation, samples and checkpoints run outside it (they may compile graphs of
      their own, but never invalidate the training one).
    - The operators that optimizer steps `early` and `late` run (torch.profiler, host side) must be the
      same: had the training graph fallen back to eager between the two, the late step would run the
      model's layers as separate operators. Pick two steps that are not log steps (which add the
      gradient norm) and put samples, a validation and a checkpoint between them.
    - At the end no frame was skipped and no graph broke (torch._dynamo's counters).

        python train.py fit ... --model.compile true --trainer.callbacks+=lm_pretrain.training.debug.CompiledStepCheck
    """

    # Operators that compute nothing: they relabel, allocate or copy a tensor. Logging, and FSDP's
    # storage handling in the step after a checkpoint, add a few of these, which says nothing about
    # what ran compiled; a layer that fell back to eager shows as linear, layer_norm, softmax, ...
    NOT_COMPUTE = {"aten::detach", "aten::detach_", "aten::alias", "aten::view", "aten::_unsafe_view",
                   "aten::as_strided", "aten::t", "aten::transpose", "aten::expand", "aten::slice", "aten::select",
                   "aten::reshape", "aten::squeeze", "aten::unsqueeze", "aten::resolve_conj", "aten::resolve_neg",
                   "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::set_",
                   "aten::resize_", "aten::copy_", "aten::to", "aten::_to_copy", "aten::lift_fresh", "aten::clone"}

    def __init__(self, early: PositiveInt = 1, late: PositiveInt = 6):
        ranges.check(CompiledStepCheck.__init__, {"early": early, "late": late}, "trainer.callbacks")
        if late <= early:
            raise UserError(f"CompiledStepCheck: late ({late}) must come after early ({early})")
        self.early, self.late = early, late
        self.operators: dict[int, collections.Counter] = {}
        self._profiler, self._profiled_step, self._steps = None, None, 0

    def setup(self, trainer, module, stage: str) -> None:
        if not module.hparams.get("compile"):
            raise UserError("CompiledStepCheck checks compiled runs: set model.compile true")
        # First among the callbacks, so that the profiled window closes before another callback's
        # on_train_batch_end (a sample, say) runs its own operators.
        trainer.callbacks.remove(self)
        trainer.callbacks.insert(0, self)
        from torch._dynamo.utils import counters  # this run's frames and breaks, not earlier ones in the process

        self._before = (counters["frames"]["total"] - counters["frames"]["ok"], sum(counters["graph_break"].values()))

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        torch.compiler.set_stance("fail_on_recompile" if self._steps > 0 else "default")
        first_batch_of_step = batch_idx % trainer.accumulate_grad_batches == 0
        if first_batch_of_step and trainer.global_step in (self.early, self.late) and self._profiler is None:
            self._profiled_step = trainer.global_step
            self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self._profiler.__enter__()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        torch.compiler.set_stance("default")
        if not ends_optimizer_step(trainer, batch_idx):
            return
        self._steps += 1
        if self._profiler is not None:
            self._profiler.__exit__(None, None, None)
            self.operators[self._profiled_step] = collections.Counter(
                event.name for event in self._profiler.events()
                if event.name.startswith(("aten::", "Torch-Compiled Region", "CompiledFunction"))
                and event.name not in self.NOT_COMPUTE)
            self._profiler = None

    def on_exception(self, trainer, module, exception) -> None:
        torch.compiler.set_stance("default")

    def on_train_end(self, trainer, module) -> None:
        from torch._dynamo.utils import counters

        if set(self.operators) != {self.early, self.late}:
            raise UserError(f"CompiledStepCheck: steps {self.early} and {self.late} must both run in this process "
                            f"(profiled: {sorted(self.operators)})")
        early, late = self.operators[self.early], self.operators[self.late]
        if early != late:
            changed = {name: (early[name], late[name]) for name in sorted(early.keys() | late.keys())
                       if early[name] != late[name]}
            raise RuntimeError(f"CompiledStepCheck: step {self.late} ran other operators than step {self.early} "
                               f"(name: calls at {self.early}, at {self.late}): {changed}")
        regions = sum(n for name, n in early.items() if name.startswith("Torch-Compiled Region"))
        if not regions:
            raise RuntimeError(f"CompiledStepCheck: step {self.early} ran no compiled code")
        skipped = counters["frames"]["total"] - counters["frames"]["ok"] - self._before[0]
        breaks = sum(counters["graph_break"].values()) - self._before[1]
        if skipped or breaks:
            raise RuntimeError(f"CompiledStepCheck: {skipped} frames skipped, {breaks} graph breaks: "
                               f"{dict(counters['graph_break'])}")
        rank_zero_info(f"CompiledStepCheck: the {self._steps - 1} training steps after this process's first reused "
                       f"the graphs compiled in it; "
                       f"steps {self.early} and {self.late} ran the same {sum(early.values())} operators "
                       f"({regions} compiled regions); no frame skipped, no graph break")


def peak_cpu_bytes(step) -> int:
    """Peak of the CPU allocator's total while step() runs, above its value when it began (from
    torch.profiler's memory events: CPUs have no torch.cuda.max_memory_allocated)."""
    import tempfile

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = [e for e in json.loads(trace.read_text())["traceEvents"] if e.get("name") == "[memory]"]
    if not events:
        return 0
    start = events[0]["args"]["Total Allocated"] - events[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in events) - start


class PeakHostMemory(L.Callback):
    """Append each process's peak resident host memory so far (bytes; the kernel's count, getrusage)
    to a JSON Lines file (one per rank) twice: once the model is built, laid out and its optimizer
    made ("built"), and when training ends ("trained": gradients and optimizer state too). The first
    process's count includes what it did before starting the others (LightningCLI builds the model
    there first)."""

    def __init__(self, path: str):
        self.path = path

    def write(self, trainer, at: str) -> None:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        with open(f"{self.path}.rank{trainer.global_rank}", "a") as f:
            f.write(json.dumps({"rank": trainer.global_rank, "at": at, "peak_bytes": peak}) + "\n")

    def on_fit_start(self, trainer, module) -> None:
        self.write(trainer, "built")

    def on_train_end(self, trainer, module) -> None:
        self.write(trainer, "trained")


class RecordBatches(L.Callback):
    """Append {rank, step, loss, batch sha, threads} per training batch to a JSON Lines file (one per
    rank). The intra-op thread count is there because rounding depends on it: two runs compared
    bitwise with different counts then differ by name, not by a loss's last bit."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        x, _ = batch
        loss = float(outputs["loss"]) if outputs else None  # None: the batch was skipped
        row = {"rank": trainer.global_rank, "step": trainer.global_step, "loss": loss,
               "rows": [hashlib.sha1(r.cpu().numpy().tobytes()).hexdigest()[:16] for r in x],
               "threads": torch.get_num_threads()}
        with open(f"{self.path}.rank{trainer.global_rank}", "a") as f:
            f.write(json.dumps(row) + "\n")


class SignalAt(L.Callback):
    """Send `signal_name` to this process after optimizer step `step`: every rank does the same, or
    only the process of global rank `rank`."""

    def __init__(self, step: int, signal_name: str = "SIGKILL", rank: int | None = None):
        self.step, self.signum, self.rank = step, getattr(signal, signal_name), rank

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), self.signum)


def read_records(path) -> list[dict]:
    """Every rank's records, the later entry for a (rank, step) winning (a resumed run repeats steps)."""
    rows = {}
    for f in sorted(Path(path).parent.glob(Path(path).name + ".rank*")):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            rows[(row["rank"], row["step"])] = row
    return [rows[k] for k in sorted(rows)]
