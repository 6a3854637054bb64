"""Plot a run's training and validation loss from its TensorBoard logs into a PNG.

    python scripts/plot_run.py [RUN_DIR] [--output docs/images/demo-loss.png]

RUN_DIR defaults to the newest runs/tiny/version_N (the demo's). README's loss curve is made this way
from a real run of `bash scripts/demo.sh`.
"""

import argparse
import math
from pathlib import Path

import matplotlib
import yaml

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def newest_run(runs: Path) -> Path:
    versions = sorted(runs.glob("version_*"), key=lambda p: int(p.name.removeprefix("version_")))
    if not versions:
        raise SystemExit(f"error: no run in {runs}; run bash scripts/demo.sh first")
    return versions[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", default=None)
    parser.add_argument("--output", default=str(ROOT / "docs" / "images" / "demo-loss.png"))
    args = parser.parse_args()
    run = Path(args.run_dir) if args.run_dir else newest_run(ROOT / "runs" / "tiny")
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    curves = {tag: [(e.step + 1, e.value) for e in events.Scalars(tag)] for tag in ("train/loss", "val/loss")}
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(*zip(*curves["train/loss"]), label="training loss (one batch)", color="#8aa9d6", linewidth=1)
    ax.plot(*zip(*curves["val/loss"]), "o-", label="validation loss", color="#c0392b")
    for step, value in curves["val/loss"]:
        ax.annotate(f"{value:.2f}", (step, value), textcoords="offset points", xytext=(0, 8), ha="center")
    config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else {}
    batch, block = (config.get("data") or {}).get("batch_size"), (config.get("model") or {}).get("block_size")
    ax.set_xlabel(f"optimizer step ({batch} x {block} tokens each)" if batch and block else "optimizer step")
    ax.set_ylabel("cross-entropy (nats per token)")
    vocab = (config.get("model") or {}).get("vocab_size")
    ax.set_title("bash scripts/demo.sh: the tiny model on Shakespeare, 2-core CPU"
                 + (f"\n({vocab:,}-token vocabulary: chance is ln {vocab} = {math.log(vocab):.2f})" if vocab else ""))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output)
    print(f"wrote {args.output} from {run}")


if __name__ == "__main__":
    main()
