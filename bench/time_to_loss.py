"""Time to loss: how fast training configs reach a target val loss, beside nanoGPT's train.py.

    python bench/time_to_loss.py --configs configs/tiny.yaml configs/tiny-gpt2.yaml \\
        --reference PATH/TO/nanoGPT [--repeats 2] [--second_corpus]
    python bench/time_to_loss.py --data_dir data/MINE --target 4.0 \\
        --configs configs/gpt2-124m.yaml configs/gpt2-124m.yaml+configs/overlays/fast.yaml \\
        -- --trainer.max_steps 2000 --trainer.val_check_interval 500   # on a GPU

Every config (a preset, or a preset and overlays joined by "+") trains with train.py on the same
prepared data (default: the built-in Shakespeare with GPT-2's tokenizer; the model takes the data's
vocabulary; flags after -- go to every run, e.g. `-- --trainer.max_steps 350
--trainer.val_check_interval 350` for configs/tiny.yaml's steps before it got its own tokenizer) and is scored on
the same windows: the first 600 non-overlapping 129-token windows, in order, of the val
split (the run's own validation is set to exactly these, and the last checkpoint is scored again here
to check). Per config it reports the final val loss, the whole run's wall time (process start to
exit, validations and text samples included), the time to the target val loss (from process start
to the first validation at or below it), the median optimizer-step time, and the val loss at each
validation (equal tokens across configs when their batch sizes match).

--reference runs nanoGPT's train.py (a checkout of karpathy/nanoGPT, copied to a temporary folder;
nothing of it enters this repository) as the yardstick: the same size as configs/tiny.yaml (4 layers,
4 heads, width 128, context 128, 8 x 128 tokens per step, 300 steps, float32, no compile), its own
AdamW recipe (lr 1e-3 -> 1e-4 cosine, warmup 30, biases), trained on the train split exported in
stream order, its last checkpoint scored on the same windows. Runs alternate between the reference
and the configs, repeat by repeat; repeat r trains every run with seed 1337 + r (nanoGPT's too, in its
temporary copy), since at this size the seed moves the val loss by up to ~0.2; figures are medians.

--second_corpus also scores every run's last checkpoint on text unlike its training data: the
docstrings of Python's standard library, prepared with the same tokenizer (loss and bits per byte).
Results are appended to BENCHMARKS.md.
"""

import argparse
import ast
import glob
import importlib.util
import json
import math
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import yaml

from common import ROOT, median, record

WINDOWS, WINDOW = 600, 129
REFERENCE_ARGS = dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=8, gradient_accumulation_steps=1,
                      max_iters=300, lr_decay_iters=300, learning_rate=1e-3, min_lr=1e-4, warmup_iters=30, bias=True,
                      dropout=0.0, eval_interval=100, eval_iters=38, log_interval=1, always_save_checkpoint=True,
                      device="cpu", compile=False, dtype="float32")


class WallClock(L.Callback):
    """Added to the benchmarked runs: one JSON line per validation (step, wall-clock time, val loss)
    and per-step times, into the file named by $TIME_TO_LOSS_LOG."""

    def __init__(self):
        self.path, self.step_started, self.step_seconds = os.environ["TIME_TO_LOSS_LOG"], None, []

    def _write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.step_started = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.step_seconds.append(time.perf_counter() - self.step_started)

    def on_validation_end(self, trainer, module) -> None:
        if not trainer.sanity_checking:
            self._write({"step": trainer.global_step, "time": time.time(),
                         "val_loss": float(trainer.callback_metrics["val/loss"])})

    def on_train_end(self, trainer, module) -> None:
        self._write({"step_seconds": self.step_seconds})


# ---------------------------------------------------------------------------------------------
# Data and scoring


def ensure_prepared(data_dir: Path, corpus: str = "shakespeare") -> None:
    if not (data_dir / "metadata.json").is_file():
        subprocess.run([sys.executable, "-m", "lm_pretrain.commands.prepare", "--corpus", corpus, "--output", str(data_dir)],
                       cwd=ROOT, check=True)


def windows(split_dir: Path, length: int, count: int | None = None) -> torch.Tensor:
    """The first `count` (all, if None) non-overlapping windows of `length` tokens of a prepared split, in order."""
    from litdata import StreamingDataset, TokensLoader

    dataset = StreamingDataset(str(split_dir), item_loader=TokensLoader(block_size=length), shuffle=False)
    count = len(dataset) if count is None else min(count, len(dataset))
    return torch.stack([dataset[i] for i in range(count)]).long()


@torch.no_grad()
def mean_loss(logits_of, data: torch.Tensor, batch_size: int = 25) -> float:
    """Mean next-token cross-entropy over all windows; logits_of maps (B, T) ids to (B, T, V) logits."""
    total = 0.0
    for batch in data.split(batch_size):
        logits = logits_of(batch[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum").item()
    return total / (data.shape[0] * (data.shape[1] - 1))


def our_scorer(ckpt: Path):
    from lm_pretrain.training.module import LanguageModel

    module = LanguageModel.from_checkpoint(str(ckpt)).eval()
    return module.model


def reference_scorer(reference: Path, ckpt: Path):
    spec = importlib.util.spec_from_file_location("nanogpt_model", reference / "model.py")
    nanogpt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nanogpt)
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    model = nanogpt.GPT(nanogpt.GPTConfig(**saved["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in saved["model"].items()})
    model.eval()
    # with targets, nanoGPT returns the logits of every position (without, only the last one's)
    return lambda idx: model(idx, targets=torch.zeros_like(idx))[0]


def stdlib_docstrings(folder: Path) -> int:
    """Write the docstrings of each module of Python's standard library as one .txt file; returns the count."""
    stdlib, written = Path(sysconfig.get_paths()["stdlib"]), 0
    for path in sorted(stdlib.rglob("*.py")):
        if {"test", "tests", "site-packages", "idlelib", "lib2to3"} & set(path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        docs = [ast.get_docstring(node) for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        text = "\n\n".join(d for d in docs if d and len(d) > 40)
        if len(text) > 500:
            (folder / f"{'.'.join(path.relative_to(stdlib).with_suffix('').parts)}.txt").write_text(text)
            written += 1
    return written


# ---------------------------------------------------------------------------------------------
# Runs


def run_config(config: str, data_dir: Path, work: Path, seed: int, extra: list[str]) -> dict:
    """Train one config; its wall time, validations, step times and last checkpoint."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log = work / "time_to_loss.jsonl"
    configs = config.split("+")  # a preset and its overlays, e.g. configs/gpt2-124m.yaml+configs/overlays/fast.yaml
    batch_size = 8
    for path in configs:
        batch_size = (yaml.safe_load(Path(path).read_text()).get("data") or {}).get("batch_size", batch_size)
    vocab_size = json.loads((data_dir / "metadata.json").read_text())["vocab_size"]  # the data's, whatever the config's
    command = [sys.executable, "train.py", "fit", *[a for path in configs for a in ("--config", path)],
               "--data.data_dir", str(data_dir), "--model.vocab_size", str(vocab_size),
               "--trainer.limit_val_batches", str(WINDOWS // batch_size), "--trainer.default_root_dir", str(work),
               "--trainer.callbacks+=time_to_loss.WallClock", "--seed_everything", str(seed), *extra]
    env = {**os.environ, "TIME_TO_LOSS_LOG": str(log),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "bench"), str(ROOT)])}
    start = time.time()
    done = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.time() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    validations = [{"step": r["step"], "seconds": r["time"] - start, "val_loss": r["val_loss"]}
                   for r in records if "val_loss" in r]
    steps = next(r["step_seconds"] for r in records if "step_seconds" in r)
    last = sorted(glob.glob(str(work / "**" / "last.ckpt"), recursive=True))[-1]
    return {"seconds": seconds, "validations": validations, "step_ms": 1000 * median(steps[5:]),
            "ckpt": Path(last), "tokens_per_step": batch_size * (WINDOW - 1)}


def export_for_reference(data_dir: Path, folder: Path) -> None:
    """The prepared train and val splits as nanoGPT's uint16 train.bin / val.bin (stream order)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        tokens = windows(data_dir / split, 1024).flatten().numpy().astype(np.uint16)
        tokens.tofile(folder / f"{split}.bin")
    vocab = json.loads((data_dir / "metadata.json").read_text())["vocab_size"]
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": vocab}, f)


def run_reference(reference: Path, data_dir: Path, work: Path, steps: int, seed: int) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for name in ("model.py", "configurator.py"):
        shutil.copy(reference / name, work / name)
    script = (reference / "train.py").read_text()
    seeding = "torch.manual_seed(1337 + seed_offset)"  # nanoGPT's seed is not a setting
    if seeding not in script:
        raise SystemExit(f"{reference / 'train.py'} has no line {seeding!r} to set the seed in")
    (work / "train.py").write_text(script.replace(seeding, f"torch.manual_seed({seed} + seed_offset)"))
    export_for_reference(data_dir, work / "data" / "lmpretrain")
    interval = min(REFERENCE_ARGS["eval_interval"], steps)  # it saves a checkpoint only when it evaluates
    settings = {**REFERENCE_ARGS, "max_iters": steps, "lr_decay_iters": steps, "eval_interval": interval,
                "dataset": "lmpretrain", "out_dir": "out"}
    args = [f"--{k}={v}" for k, v in settings.items()]
    start = time.time()
    done = subprocess.run([sys.executable, "train.py", *args], cwd=work, capture_output=True, text=True)
    seconds = time.time() - start
    if done.returncode != 0:
        raise SystemExit(f"nanoGPT's train.py failed:\n{done.stderr[-3000:]}")
    steps = [float(ms) for it, ms in re.findall(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", done.stdout)
             if int(it) % interval and int(it) > 5]  # evaluation steps also time the evaluation
    return {"seconds": seconds, "step_ms": median(steps), "ckpt": work / "out" / "ckpt.pt",
            "steps": steps, "tokens_per_step": REFERENCE_ARGS["batch_size"] * 128}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="*", default=["configs/tiny.yaml"])
    parser.add_argument("--reference", type=Path, help="a checkout of karpathy/nanoGPT")
    parser.add_argument("--data_dir", type=Path, default=ROOT / "data" / "shakespeare")
    parser.add_argument("--target", type=float, default=5.73)
    parser.add_argument("--reference_steps", type=int, default=300, help="fewer only to try the script out")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--second_corpus", action="store_true")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("extra", nargs="*", help="flags for every config's train.py run (after --)")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    data_dir = args.data_dir.resolve()
    ensure_prepared(data_dir)
    scored = windows(data_dir / "val", WINDOW, WINDOWS)
    names = (["nanoGPT train.py"] if args.reference else []) + args.configs
    results: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        second = second_corpus(Path(tmp)) if args.second_corpus else None
        for repeat in range(args.repeats):
            seed = 1337 + repeat
            for name in names:
                work = Path(tmp) / re.sub(r"\W", "_", name)
                if name == "nanoGPT train.py":
                    result = run_reference(args.reference.resolve(), data_dir, work, args.reference_steps, seed)
                    logits_of = reference_scorer(args.reference.resolve(), result["ckpt"])
                else:
                    result = run_config(name, data_dir, work, seed, args.extra)
                    logits_of = our_scorer(result["ckpt"])
                result["seed"], result["val_loss"] = seed, mean_loss(logits_of, scored)
                if second:
                    result["second_loss"] = mean_loss(logits_of, second["windows"])
                results[name].append(result)
                print(f"{name} #{repeat + 1} (seed {seed}): val {result['val_loss']:.3f}, {result['seconds']:.0f} s, "
                      f"{result['step_ms']:.0f} ms/step", file=sys.stderr)
    rows = table(results, args.target, "nanoGPT train.py" if args.reference else None)
    rows += second_corpus_table(results, second) if second else []
    command = "python bench/time_to_loss.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print("\n".join(rows) if args.no_record else record("Time to loss", command, rows))


def table(results: dict[str, list[dict]], target: float, reference: str | None) -> list[str]:
    def time_to_target(result: dict) -> float:
        if "validations" not in result:  # the reference: only its last checkpoint is scored
            return result["seconds"] if result["val_loss"] <= target else math.inf
        hit = [v["seconds"] for v in result["validations"] if v["val_loss"] <= target]
        return hit[0] if hit else math.inf

    base = {k: median([r[k] for r in results[reference]]) for k in ("seconds", "step_ms")} if reference else None
    rows = [f"| run | val loss ({WINDOWS} windows) | wall time, whole run | time to val ≤ {target} | "
            f"ms / step | steps/s vs reference |", "|---|---:|---:|---:|---:|---:|"]
    for name, runs in results.items():
        seconds, step_ms = median([r["seconds"] for r in runs]), median([r["step_ms"] for r in runs])
        reach = median([time_to_target(r) for r in runs])
        ratio = f"{reach / base['seconds']:.2f}x the reference's run" if base and math.isfinite(reach) else ""
        rows.append(f"| {name} | {median([r['val_loss'] for r in runs]):.3f} | {seconds:.0f} s | "
                    f"{'not reached' if not math.isfinite(reach) else f'{reach:.0f} s'} {ratio} | {step_ms:.0f} | "
                    f"{base['step_ms'] / step_ms if base else 1:.2f} |")
    rows += ["", "Val loss of each run, by seed:", "", "| run | " + " | ".join(
        f"seed {r['seed']}" for r in next(iter(results.values()))) + " |",
        "|---|" + "---:|" * len(next(iter(results.values())))]
    rows += [f"| {name} | " + " | ".join(f"{r['val_loss']:.3f}" for r in runs) + " |" for name, runs in results.items()]
    rows += ["", "Val loss at each validation (first repeat; tokens = steps x tokens per step):", "",
             "| run | " + " | ".join(["tokens: val loss"] * 1) + " |", "|---|---|"]
    for name, runs in results.items():
        if "validations" in runs[0]:
            points = ", ".join(f"{v['step'] * runs[0]['tokens_per_step'] // 1000}k: {v['val_loss']:.3f}"
                               for v in runs[0]["validations"])
            rows.append(f"| {name} | {points} |")
    return rows


def second_corpus(tmp: Path) -> dict:
    """The stdlib docstrings, prepared: their first windows and what scoring them needs."""
    corpus, prepared = tmp / "stdlib", tmp / "stdlib-prepared"
    corpus.mkdir()
    files = stdlib_docstrings(corpus)
    subprocess.run([sys.executable, "-m", "lm_pretrain.commands.prepare", str(corpus), "--output", str(prepared),
                    "--val_fraction", "0.5"], cwd=ROOT, check=True, capture_output=True)
    split = json.loads((prepared / "metadata.json").read_text())["splits"]["val"]
    return {"files": files, "windows": windows(prepared / "val", WINDOW, WINDOWS),
            "bytes_per_token": split["bytes"] / split["tokens"]}


def second_corpus_table(results: dict[str, list[dict]], second: dict) -> list[str]:
    def bpb(loss: float) -> float:
        return loss / math.log(2) / second["bytes_per_token"]

    runs_of_any = next(iter(results.values()))
    rows = ["", f"On text unlike the training data: docstrings of Python's standard library ({second['files']} "
                f"modules; val split, {second['windows'].shape[0]} windows, {second['bytes_per_token']:.2f} bytes "
                f"per token); medians, and bits per byte by seed:", "",
            "| run | val loss | bits per byte | " + " | ".join(f"seed {r['seed']}" for r in runs_of_any) + " |",
            "|---|---:|---:|" + "---:|" * len(runs_of_any)]
    for name, runs in results.items():
        loss = median([r["second_loss"] for r in runs])
        rows.append(f"| {name} | {loss:.3f} | {bpb(loss):.3f} | "
                    + " | ".join(f"{bpb(r['second_loss']):.3f}" for r in runs) + " |")
    return rows

if __name__ == "__main__":
    main()
