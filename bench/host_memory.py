"""Peak host memory per process of a sharded run: built on the meta device against built whole.

    python bench/host_memory.py [--config configs/gpt2-350m.yaml] [--data_dir data/shakespeare-bpe2k] [--no-record]

One training step of a preset (GPT-2 350M by default, with GPT-2's 50,257-token vocabulary: 355M
parameters) on CPU processes, three ways: one process (the whole model, as any one-device run), two
FSDP2 processes as train.py runs them (the network built on the meta device, each process keeping
only its shards: strategies.materialize), and two FSDP2 processes that each build the whole model
first and shard it after (what train.py did before). Each process's peak resident memory (getrusage)
is read once the model is laid out and its optimizer made, and after the step (gradients, AdamW's
two moments). Float32, 64-token sequences, batch 1: the activations are small, so the figures are
the model's state. Results go to BENCHMARKS.md.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, record

VARIANTS = {  # name: (processes, built on the meta device)
    "1 process": (1, False),
    "2 processes, FSDP2, built on meta (train.py)": (2, True),
    "2 processes, FSDP2, each built whole first": (2, False),
}


def run_one(args, processes: int, meta: bool, folder: Path) -> list[dict]:
    """Train one step in fresh processes; every rank's records."""
    record_path = folder / "memory"
    train_args = [
        "fit", "--config", str(ROOT / args.config), "--data.data_dir", str(Path(args.data_dir).resolve()),
        "--model.vocab_size", "50257", "--model.compile", "false", "--model.block_size", "64",
        "--data.batch_size", "1", "--trainer.accelerator", "cpu", "--trainer.devices", str(processes),
        "--trainer.precision", "32-true", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
        "--trainer.logger.init_args.save_dir", str(folder / "runs"), "--checkpoint.save_last", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.callbacks", "[]", "--trainer.accumulate_grad_batches", "1",
        "--trainer.callbacks+=" + json.dumps({"class_path": "lm_pretrain.training.debug.PeakHostMemory",
                                              "init_args": {"path": str(record_path)}})]
    if processes > 1:
        train_args += ["--config", str(ROOT / "configs" / "overlays" / "fsdp.yaml"),
                       "--model.activation_checkpointing", "false"]
    done = subprocess.run([sys.executable, __file__, "--train", "meta" if meta else "whole", *train_args],
                          cwd=folder, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"the {processes}-process run failed:\n{done.stderr[-3000:]}")
    return [json.loads(line) for f in sorted(folder.glob("memory.rank*")) for line in f.read_text().splitlines()]


def train(build: str, train_args: list[str]) -> None:
    """train.py with these flags (also in the processes Lightning starts: they run this file again)."""
    sys.path.insert(0, str(ROOT))
    import lm_pretrain.commands.train as train_py

    if build == "whole":  # as before: every process builds the whole model, then shards it
        train_py.shards_the_model = lambda config: False
    sys.argv = [sys.argv[0], "--train", build, *train_args]
    train_py.main(train_args)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--train":
        return train(sys.argv[2], sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/gpt2-350m.yaml")
    parser.add_argument("--data_dir", default="data/shakespeare-bpe2k")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    gib = 2 ** 30
    rows = ["| run | process | peak once built (GiB) | peak after one step (GiB) |", "|---|---|---|---|"]
    peaks = {}
    for name, (processes, meta) in VARIANTS.items():
        with tempfile.TemporaryDirectory() as folder:
            records = run_one(args, processes, meta, Path(folder))
        for rank in range(processes):
            built = max(r["peak_bytes"] for r in records if r["rank"] == rank and r["at"] == "built")
            trained = max(r["peak_bytes"] for r in records if r["rank"] == rank and r["at"] == "trained")
            peaks.setdefault(name, []).append(trained)
            rows.append(f"| {name} | {rank} | {built / gib:.2f} | {trained / gib:.2f} |")
            print(rows[-1], flush=True)
    one = peaks["1 process"][0]
    notes = "Ratio of the highest per-process peak to one process's: " + ", ".join(
        f"{name}: {max(p) / one:.2f}x" for name, p in peaks.items() if name != "1 process") + "."
    print(notes)
    if not args.no_record:
        record("Peak host memory per process, sharded (FSDP2) against one process",
               f"python bench/host_memory.py --config {args.config} --data_dir {args.data_dir}", rows, notes)


if __name__ == "__main__":
    main()
