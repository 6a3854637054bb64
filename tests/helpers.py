"""Callbacks that tests add to train.py runs with --trainer.callbacks+=... (tests/ is on PYTHONPATH)."""

import hashlib
import json
import os
import signal

import lightning as L
import torch


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


class PoisonAt(L.Callback):
    """Make the final norm's weights NaN before optimizer step `step`: the loss is NaN from there.
    With restore, put them back after that batch (only that one batch's loss is NaN)."""

    def __init__(self, step: int, restore: bool = False):
        self.step, self.restore, self.saved = step, restore, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.saved is None:
            with torch.no_grad():
                self.saved = module.model.ln_f.weight.clone()
                module.model.ln_f.weight.fill_(float("nan"))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.restore and self.saved is not None:
            with torch.no_grad():
                module.model.ln_f.weight.copy_(self.saved)
            self.restore = False


def read_records(path) -> list[dict]:
    """Every rank's records, the later entry for a (rank, step) winning (a resumed run repeats steps)."""
    from pathlib import Path

    rows = {}
    for f in sorted(Path(path).parent.glob(Path(path).name + ".rank*")):
        for line in f.read_text().splitlines():
            row = json.loads(line)
            rows[(row["rank"], row["step"])] = row
    return [rows[k] for k in sorted(rows)]


class ReadLossEveryStep(L.Callback):
    """Reads the loss back to the host after every batch, as careless code would (a host sync)."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if outputs:
            float(outputs["loss"])


class SaveFullWeights(L.Callback):
    """At the end of training, gather the model's whole weights (also when sharded) and save them to
    `path` from the first process: what a sharded checkpoint of the same step must hold."""

    def __init__(self, path: str):
        self.path = path

    def on_train_end(self, trainer, module) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if trainer.global_rank == 0:
            torch.save(state, self.path)
