"""Training throughput: the template's train.py path against a bare PyTorch loop, same model and recipe.

    python bench/train_throughput.py --config configs/tiny.yaml [--steps 30 --warmup 5 --repeats 3]

The template path is LightningCLI + Trainer exactly as shipped (logging, metrics, progress bar,
checkpoint/LR/throughput/preemption callbacks, litdata loader); the bare loop is a hand-written loop
over the same GPT with the same recipe (AdamW fused, the same parameter groups and schedule, gradient
clipping, autocast when the config says bf16, torch.compile when it says so) on random tokens
already on the device. Both time the same optimizer steps after a warm-up; runs alternate and the
medians are compared. Results are appended to BENCHMARKS.md.
"""

import argparse
import contextlib
import resource
import shlex
import sys
import tempfile
import time

import lightning as L
import torch
import yaml

from common import median, record
from lm_pretrain.hardware import peak_flops
from lm_pretrain.model import GPT, model_size
from lm_pretrain.module import lr_multiplier
from lm_pretrain.sizes import config_from_yaml


class StepTimer(L.Callback):
    """Wall time from the end of optimizer step `warmup` to the end of step `warmup + steps`."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps, self.t0, self.seconds = warmup, steps, None, None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        if trainer.global_step in (self.warmup, self.warmup + self.steps):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if trainer.global_step == self.warmup:
                self.t0 = time.perf_counter()
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
            else:
                self.seconds = time.perf_counter() - self.t0


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB, whole process


def template_run(config: str, warmup: int, steps: int, extra: list[str]) -> float:
    from lm_pretrain.cli import run

    with tempfile.TemporaryDirectory() as logs:
        cli = run(["fit", "--config", config, "--trainer.max_steps", str(warmup + steps),
                   "--trainer.val_check_interval", str(10 * (warmup + steps) * 64), "--trainer.logger.init_args.save_dir",
                   logs, "--trainer.limit_val_batches", "0", *extra])
        timer_seconds = next(c for c in cli.trainer.callbacks if type(c).__name__ == "StepTimer").seconds
    return timer_seconds


def bare_run(config_path: str, warmup: int, steps: int) -> float:
    """A hand-written loop with the same recipe as the template."""
    raw = yaml.safe_load(open(config_path))
    trainer_cfg, model_cfg, data_cfg = raw.get("trainer", {}), raw.get("model", {}), raw.get("data", {})
    config = config_from_yaml(config_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = GPT(config).to(device)
    if model_cfg.get("compile"):
        model.compile()
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in embeddings]
    no_decay = [p for p in model.parameters() if not (p.dim() >= 2 and id(p) not in embeddings)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": model_cfg.get("weight_decay", 0.1)},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=model_cfg.get("learning_rate", 6e-4),
                                  betas=tuple(model_cfg.get("betas", (0.9, 0.95))), fused=True)
    total = warmup + steps
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, model_cfg.get("warmup_steps", 100), total, model_cfg.get("min_lr_ratio", 0.1)))
    batch, accumulate = data_cfg.get("batch_size", 8), trainer_cfg.get("accumulate_grad_batches", 1)
    clip = trainer_cfg.get("gradient_clip_val")
    bf16 = "bf16" in str(trainer_cfg.get("precision", "32"))
    tokens = torch.randint(0, 50257, (accumulate, batch, config.block_size + 1), device=device)
    autocast = torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    t0 = None
    for step in range(total):
        if step == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
        for micro in range(accumulate):
            x, y = tokens[micro, :, :-1], tokens[micro, :, 1:]
            with autocast:
                logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.reshape(-1))
            (loss / accumulate).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile, caches)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args, extra = parser.parse_known_args()
    extra = [*extra, "--trainer.callbacks+=" + '{"class_path": "train_throughput.StepTimer", "init_args": '
             f'{{"warmup": {args.warmup}, "steps": {args.steps}}}}}']
    raw = yaml.safe_load(open(args.config))
    config = config_from_yaml(args.config)
    tokens_per_step = raw["data"]["batch_size"] * config.block_size * raw["trainer"].get("accumulate_grad_batches", 1)
    flops = model_size(config)["flops_per_token"]
    template, bare, memory = [], [], {}
    for _ in range(args.repeats):
        bare.append(args.steps * tokens_per_step / bare_run(args.config, args.warmup, args.steps))
        memory["bare"] = peak_memory_gib()
        template.append(args.steps * tokens_per_step / template_run(args.config, args.warmup, args.steps, extra))
        memory["template"] = peak_memory_gib()
        print(f"bare {bare[-1]:,.0f} tok/s, template {template[-1]:,.0f} tok/s", file=sys.stderr)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    peak = peak_flops(name, raw["trainer"].get("precision", "32-true")) if name else None

    def row(label, values, mem):
        tps = median(values)
        mfu = f"{tps * flops / peak:.1%}" if peak else "-"
        return (f"| {label} | {tps:,.0f} | {tps * flops / 1e12:.3f} | {mfu} | {mem:.2f} | "
                f"{', '.join(f'{v:,.0f}' for v in values)} |")

    rows = ["| path | tok/s (median) | TFLOP/s | MFU | peak memory GiB | runs (tok/s) |", "|---|---:|---:|---:|---:|---|",
            row("template train.py", template, memory["template"]), row("bare PyTorch loop", bare, memory["bare"]),
            "", f"**template / bare = {median(template) / median(bare):.3f}** (medians of {args.repeats} alternating runs, "
            f"{args.steps} timed steps of {tokens_per_step:,} tokens after {args.warmup} warm-up steps)"]
    mem_note = "" if torch.cuda.is_available() else \
        "Peak memory on CPU is the process's max RSS so far (both paths run in one process: the later includes the earlier)."
    command = "python bench/train_throughput.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    text = "\n".join(rows) if args.no_record else record(f"Training throughput, {args.config}", command, rows, mem_note)
    print(text)


if __name__ == "__main__":
    main()
