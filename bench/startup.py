"""Start-up time of the commands: each `--help`, `lm-pretrain-sizes`, and train.py to its first step.

    python bench/startup.py [--repeats 5] [--variant LABEL=PYTHON[:TREE] ...] [--record]

Each command runs in a fresh interpreter, as from a shell; a variant is an interpreter (a venv's
python: which packages are installed is what decides most of the start-up) and a source tree (a
checkout of this repository, default: this one). Variants alternate within each repeat, so load from
other processes falls on all of them alike; the table gives medians in seconds. Without --variant:
this interpreter and this tree.

"train.py to first step" is `train.py fit --config configs/tiny.yaml --trainer.max_steps 1` on GPT-2's
tokens (the same first step for every tree: the demo had GPT-2's vocabulary until it got its own), timed
from the start of the process to the end of the first optimizer step (a callback, FirstStep below,
reports the time and ends the process there), with the run in a temporary folder and the
Shakespeare corpus of data/shakespeare (prepared here on first use, ~20 s once).
--record appends the table to BENCHMARKS.md.
"""

import argparse
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = "startup-mark"
STAGES = {"built": "imports done, config parsed", "fit": "fit starts", "step": "first step starts",
          "stepped": "first step done"}

if __name__ != "__main__":  # imported by train.py for the callback: Lightning is loaded there already
    from lightning.pytorch.callbacks import Callback

    def mark(stage: str) -> None:
        print(f"{MARK} {stage} {time.time():.6f} {time.process_time():.6f}", flush=True)

    class FirstStep(Callback):
        """Print the time at a few stages up to the end of the first optimizer step, then end the process
        at once (no teardown: checkpoint, samples)."""

        def __init__(self):
            mark("built")  # imports done, config parsed, Trainer being built

        def on_fit_start(self, *args) -> None:
            mark("fit")

        def on_train_batch_start(self, *args) -> None:
            mark("step")

        def on_train_batch_end(self, *args) -> None:
            mark("stepped")
            os._exit(0)


def commands(data_dir: Path, run_dir: str) -> dict[str, list[str]]:
    configs = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*.yaml"))
    table = {f"{name} --help": ["-m", f"lm_pretrain.{module}", "--help"] for name, module in [
        ("lm-pretrain-sizes", "sizes"), ("lm-pretrain-prepare", "prepare"), ("lm-pretrain-generate", "generate"),
        ("lm-pretrain-export", "export"), ("lm-pretrain-evaluate", "evaluate")]}
    return {
        "lm-pretrain-sizes configs/*.yaml": ["-m", "lm_pretrain.commands.sizes", *configs],
        **table,
        "train.py fit --help": ["train.py", "fit", "--help"],
        "import lightning (for reference)": ["-c", "import lightning"],
        "train.py to first step": ["train.py", "fit", "--config", "configs/tiny.yaml", "--data.data_dir", str(data_dir),
                                   "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false",
                                   "--trainer.default_root_dir", run_dir, "--trainer.callbacks+=startup.FirstStep"],
    }


def time_once(python: str, tree: Path, args: list[str]) -> dict[str, tuple[float, float]]:
    """(wall-clock seconds, CPU seconds) from starting `python ARGS` in `tree` to its exit ("exit"),
    or to each stage FirstStep marks."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(ROOT / "bench")])}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    done = subprocess.run([python, *args], cwd=tree, env=env, capture_output=True, text=True, timeout=600)
    end = time.time()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    if done.returncode != 0:
        raise SystemExit(f"error: {shlex.join([python, *args])} (in {tree}) failed:\n{done.stderr[-2000:]}")
    marks = {stage: (float(t) - start, float(c)) for _, stage, t, c in
             (line.split() for line in done.stdout.splitlines() if line.startswith(MARK))}
    return marks or {"exit": (end - start, cpu)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=PYTHON[:TREE]")
    parser.add_argument("--only", action="append", default=[], help="time only the commands containing this text")
    parser.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
    args = parser.parse_args()
    variants = []
    for spec in args.variant or [f"this python={sys.executable}"]:
        label, _, where = spec.partition("=")
        python, _, tree = where.partition(":")
        variants.append((label, python, Path(tree or ROOT).resolve()))

    data_dir = ROOT / "data" / "shakespeare"
    if not data_dir.exists():  # the built-in corpus, prepared by train.py on first use of the default folder
        print(f"preparing {data_dir} (once) ...", file=sys.stderr)
        subprocess.run([variants[0][1], "-c", "from lm_pretrain import assets; from lm_pretrain.data.prepare import prepare; "
                        f"prepare(assets.shakespeare_texts(), {str(data_dir)!r})"], cwd=ROOT, check=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(variants[0][2])})
    with tempfile.TemporaryDirectory() as tmp:
        table = commands(data_dir, tmp)
        if args.only:
            table = {name: cmd for name, cmd in table.items() if any(o in name for o in args.only)}
        times = {}  # (row, label) -> seconds of each run
        for name, cmd in table.items():
            for _, python, tree in variants:  # warm-up: the page cache, .pyc files
                time_once(python, tree, cmd)
            for _ in range(args.repeats):
                for label, python, tree in variants:
                    for stage, (wall, cpu) in time_once(python, tree, cmd).items():
                        row = name if stage == "exit" else f"{name}: {STAGES[stage]}"
                        times.setdefault((row, label, "wall"), []).append(wall)
                        times.setdefault((row, label, "CPU"), []).append(cpu)
            print(name, {k[:2]: [round(t, 2) for t in v] for k, v in times.items() if k[0].startswith(name)
                         and k[2] == "wall"}, file=sys.stderr)

    labels = [label for label, _, _ in variants]
    rows = []
    for kind, what in [("wall", "wall-clock seconds"), ("CPU", "CPU seconds (user + system, all threads; less "
                                                              "sensitive to other load on the machine)")]:
        header = "| command | " + " | ".join(labels) + " |"
        if len(labels) > 1:
            header += "".join(f" {label} / {labels[0]} |" for label in labels[1:])
        rows += [f"{what}, medians:", "", header, "|---|" + "---:|" * (len(labels) * 2 - 1)]
        for row in dict.fromkeys(row for row, _, _ in times):
            medians = [statistics.median(times[row, label, kind]) for label in labels]
            base = times[row, labels[0], kind]
            # ratios of runs made side by side (one repeat), then their median: drift in the machine's
            # speed between repeats cancels out
            ratios = [statistics.median(t / b for t, b in zip(times[row, label, kind], base)) for label in labels[1:]]
            rows.append(f"| {row} | " + " | ".join(f"{m:.2f}" for m in medians) + " |"
                        + "".join(f" {r:.2f} |" for r in ratios))
        rows.append("")
    notes = "\n".join(f"- {label}: `{python}`, tree {tree}" for label, python, tree in variants)
    notes += (f"\n- medians of {args.repeats} runs per command and variant, alternating, after one warm-up run each; "
              f"the ratios are medians of the ratios within each repeat")
    print("\n".join(rows) + "\n\n" + notes)
    if args.record:
        from common import record

        record("Start-up time", "python bench/startup.py " + shlex.join(sys.argv[1:]), rows, notes)


if __name__ == "__main__":
    main()
