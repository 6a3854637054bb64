"""Does a tokenizer of your own pay? The demo's model and recipe on Shakespeare with BPEs trained on
its train split only, against GPT-2's tokenizer, in bits per byte of the same val text.

    python bench/tokenizer_learning.py [--vocab_sizes 2048 4096 8192] [--repeats 2] [--second_corpus]

The demo's model and recipe (configs/tiny.yaml) trains on data prepared with GPT-2's tokenizer for
350 steps (the demo as it was before it got a tokenizer of its own), then on the same corpus prepared
with each own tokenizer (`lm-pretrain-tokenizer --corpus shakespeare --vocab_size N`, which holds out
prepare's val documents; model.vocab_size N), first for the same 350 steps, then for as many steps as
fit in the GPT-2 run's step time x 350 (equal wall time of training: a smaller output layer makes
each step cheaper). The 2,048-token run at equal time is the demo as it is now (configs/tiny.yaml
fixes its steps at 2,100, what this gave). Every last checkpoint is scored on
every window of its val split (the same two plays whatever the tokenizer) in bits per byte: loss per
token / ln 2 / UTF-8 bytes per token. --second_corpus also scores them on text unlike Shakespeare
(the standard library's docstrings, as in bench/time_to_loss.py, prepared with each tokenizer).
Repeat r trains every run with seed 1337 + r; figures are medians. Results go to BENCHMARKS.md.
"""

import argparse
import json
import math
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, median, record  # noqa: E402
from time_to_loss import WINDOW, ensure_prepared, mean_loss, our_scorer, run_config, stdlib_docstrings, windows  # noqa: E402

DEMO = "configs/tiny.yaml"
DEMO_STEPS = 350


def run(*args: str) -> None:
    subprocess.run([sys.executable, "-m", *args], cwd=ROOT, check=True, capture_output=True, text=True)


def bits_per_byte(ckpt: Path, data: Path) -> float:
    meta = json.loads((data / "metadata.json").read_text())["splits"]["val"]
    loss = mean_loss(our_scorer(ckpt), windows(data / "val", WINDOW))
    return loss / math.log(2) / (meta["bytes"] / meta["tokens"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab_sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--second_corpus", action="store_true")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gpt2_data = ROOT / "data" / "shakespeare"
        ensure_prepared(gpt2_data)
        datasets = {"GPT-2 (50,257)": (gpt2_data, 50257, None)}
        docstrings = tmp / "stdlib"
        if args.second_corpus:
            docstrings.mkdir()
            stdlib_docstrings(docstrings)
            run("lm_pretrain.commands.prepare", str(docstrings), "--output", str(tmp / "stdlib-gpt2"), "--val_fraction", "0.5")
        for size in args.vocab_sizes:
            tokenizer, data = tmp / f"bpe-{size}.json", tmp / f"shakespeare-{size}"
            run("lm_pretrain.commands.tokenizer", "--corpus", "shakespeare", "--vocab_size", str(size), "--output", str(tokenizer))
            run("lm_pretrain.commands.prepare", "--corpus", "shakespeare", "--tokenizer", str(tokenizer), "--output", str(data))
            if args.second_corpus:
                run("lm_pretrain.commands.prepare", str(docstrings), "--output", str(tmp / f"stdlib-{size}"), "--val_fraction", "0.5",
                    "--tokenizer", str(tokenizer))
            datasets[f"own BPE ({size:,})"] = (data, size, tmp / f"stdlib-{size}")
        datasets["GPT-2 (50,257)"] = (gpt2_data, 50257, tmp / "stdlib-gpt2")

        results: dict[str, list[dict]] = {}
        gpt2_step_ms, equal_steps = None, {}
        for repeat in range(args.repeats):
            seed = 1337 + repeat
            for name, (data, vocab, second) in datasets.items():
                if vocab == 50257:
                    plans = [(name, DEMO_STEPS)]
                else:  # the first repeat's 350-step run gives the step time that sets the equal-time steps
                    plans = ([(f"{name}, {DEMO_STEPS} steps", DEMO_STEPS)] if repeat == 0 else []) + [(f"{name}, equal time", None)]
                for label, steps in plans:
                    steps = steps or equal_steps[name]
                    result = run_config(DEMO, data, tmp / "work", seed, ["--model.vocab_size", str(vocab),
                                        "--trainer.max_steps", str(steps), "--trainer.val_check_interval", str(steps)])
                    result["bpb"] = bits_per_byte(result["ckpt"], data)
                    if args.second_corpus:
                        result["second_bpb"] = bits_per_byte(result["ckpt"], second)
                    result["steps"], result["seed"] = steps, seed
                    results.setdefault(label, []).append(result)
                    if vocab == 50257 and repeat == 0:
                        gpt2_step_ms = result["step_ms"]
                    if label.endswith(f"{DEMO_STEPS} steps"):
                        equal_steps[name] = round(DEMO_STEPS * gpt2_step_ms / result["step_ms"])
                    print(f"{label} (seed {seed}): {steps} steps, val {result['bpb']:.3f} bits per byte"
                          + (f", out of domain {result['second_bpb']:.3f}" if args.second_corpus else "")
                          + f", {result['seconds']:.0f} s, {result['step_ms']:.0f} ms/step", file=sys.stderr, flush=True)

    second = " | out of domain, bits per byte" if args.second_corpus else ""
    rows = [f"| run | steps | val bits per byte | wall time, whole run | ms / step{second} | per seed (val bpb) |",
            "|---|---:|---:|---:|---:|" + ("---:|" if second else "") + "---|"]
    for label, runs in results.items():
        cells = [label, f"{median([r['steps'] for r in runs]):.0f}", f"{median([r['bpb'] for r in runs]):.3f}",
                 f"{median([r['seconds'] for r in runs]):.0f} s", f"{median([r['step_ms'] for r in runs]):.0f}"]
        if second:
            cells.append(f"{median([r['second_bpb'] for r in runs]):.3f}")
        cells.append(", ".join(f"{r['bpb']:.3f} (seed {r['seed']})" for r in runs))
        rows.append("| " + " | ".join(cells) + " |")
    notes = ("Equal time: the own tokenizer's step count is 350 x (GPT-2 run's ms/step) / (its own ms/step at "
             "350 steps), both of the first seed. Val: every 129-token window of the val split (Shakespeare's two held-out "
             "plays), so each tokenizer is scored on the same text.")
    command = "python bench/tokenizer_learning.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print("\n".join(rows) + "\n\n" + notes if args.no_record else record("Tokenizer of your own: learning at equal time",
                                                                          command.strip(), rows, notes))


if __name__ == "__main__":
    main()
