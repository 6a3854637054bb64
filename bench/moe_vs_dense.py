"""What does a mixture of experts buy on a CPU? The demo's model (configs/tiny.yaml) against the same
model with 8 experts of half the MLP's width, 2 per token: the same active parameters (and FLOPs) per
token, 4x the MLP's parameters. Val bits per byte on the same windows.

    python bench/moe_vs_dense.py [--steps 1050] [--repeats 3]

Runs, each for every seed (1337 + r), on the demo's data (data/shakespeare-bpe2k, made on first use):
    dense                   configs/tiny.yaml for --steps steps
    MoE, equal tokens       8 experts, top-2, expert width 176 (the dense 352 / 2), the auxiliary loss
                            (0.01) and z-loss (0.001) of OLMoE, the same steps
    MoE, equal time         the same, for as many steps as fit in the dense run's time (its ms/step x
                            steps over the MoE's, both of the first seed)
    MoE with bias balancing the equal-tokens run with DeepSeek-V3's bias (router_bias_rate 0.001)
                            instead of the auxiliary loss
Every last checkpoint is scored on every window of the val split (lm_pretrain's scorer, as
bench/tokenizer_learning.py). Figures are medians of the seeds; results go to BENCHMARKS.md.
"""

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, median, record  # noqa: E402
from time_to_loss import run_config  # noqa: E402
from tokenizer_learning import bits_per_byte  # noqa: E402

DEMO = "configs/tiny.yaml"
DATA = ROOT / "data" / "shakespeare-bpe2k"
MOE = ["--model.mlp", "moe", "--model.n_experts", "8", "--model.top_k", "2", "--model.mlp_hidden", "176"]
RUNS = {
    "dense (tiny.yaml)": [],
    "MoE 8 experts, top-2, equal tokens": MOE,
    "MoE, equal time": MOE,
    "MoE with bias balancing, equal tokens": [*MOE, "--model.router_aux_loss", "0", "--model.router_bias_rate", "0.001"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1050)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    from lm_pretrain.data.built_in import make_if_missing

    make_if_missing(str(DATA))
    results: dict[str, list[dict]] = {}
    steps = {name: args.steps for name in RUNS}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            seed = 1337 + repeat
            for name, flags in RUNS.items():
                result = run_config(DEMO, DATA, Path(tmp) / "work", seed, [
                    *flags, "--trainer.max_steps", str(steps[name]), "--trainer.val_check_interval", str(steps[name])])
                result.update(bpb=bits_per_byte(result["ckpt"], DATA), steps=steps[name], seed=seed)
                results.setdefault(name, []).append(result)
                if repeat == 0 and name == "MoE 8 experts, top-2, equal tokens":
                    dense_ms = results["dense (tiny.yaml)"][0]["step_ms"]
                    steps["MoE, equal time"] = round(args.steps * dense_ms / result["step_ms"])
                print(f"{name} (seed {seed}): {steps[name]} steps, val {result['bpb']:.3f} bits per byte, "
                      f"{result['seconds']:.0f} s, {result['step_ms']:.0f} ms/step", file=sys.stderr, flush=True)

    rows = ["| run | steps | val bits per byte | ms / step | wall time, whole run | per seed (val bpb) |",
            "|---|---:|---:|---:|---:|---|"]
    for name, runs in results.items():
        rows.append(f"| {name} | {median([r['steps'] for r in runs]):.0f} | {median([r['bpb'] for r in runs]):.3f} | "
                    f"{median([r['step_ms'] for r in runs]):.0f} | {median([r['seconds'] for r in runs]):.0f} s | "
                    + ", ".join(f"{r['bpb']:.3f} (seed {r['seed']})" for r in runs) + " |")
    notes = ("Dense: 4 blocks of width 128, SwiGLU of width 352 (1.00M parameters). MoE: each MLP 8 SwiGLU experts of "
             "width 176, 2 per token, and a router (1.00M parameters active per token, 0.4 % more FLOPs for the "
             "router; 2.63M in all). "
             "Equal time: the MoE's steps are steps x (dense ms/step) / (MoE ms/step), both of the first seed. Val: "
             "every 129-token window of the val split.")
    command = "python bench/moe_vs_dense.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print("\n".join(rows) + "\n\n" + notes if args.no_record else record(
        "Mixture of experts against the dense model at equal active parameters", command.strip(), rows, notes))


if __name__ == "__main__":
    main()
