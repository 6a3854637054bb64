"""Training throughput: the template's train.py path against a bare PyTorch loop, same model and recipe.

    python bench/train_throughput.py --config configs/tiny.yaml [--steps 30 --warmup 5 --repeats 3]

The template path is LightningCLI + Trainer exactly as shipped (logging, metrics, progress bar,
checkpoint/LR/throughput/preemption callbacks, litdata loader); the bare loop is a hand-written loop
over the same GPT with the same recipe (AdamW fused, the same parameter groups and schedule, gradient
clipping, autocast when the config says bf16, torch.compile when it says so) on random tokens
already on the device. Both time the same optimizer steps after a warm-up; runs alternate and the
medians are compared. Results are appended to BENCHMARKS.md.

Arguments it does not know go to train.py for the template path (e.g. `--data.data_dir DIR`, or
`--trainer.devices 2`). Also:
  --overlay YAML add a config to the template path only (e.g. configs/overlays/fsdp.yaml, with --template-only)
  --sync-check   then run a few more template steps under debug.HostSyncCheck (on a GPU,
                 torch.cuda.set_sync_debug_mode("error") between log steps) and report the result
  --profile N    then profile N steps of the bare loop and list the top kernels by device time
  --steady       then time the template's steps before and after a sample, a validation and a
                 checkpoint (a step that fell back to eager after them would show here), with
                 debug.CompiledStepCheck on when the config compiles
  --json PATH    write every figure to PATH as well (bench/gpu_acceptance.py reads it)
"""

import argparse
import contextlib
import json
import resource
import shlex
import sys
import tempfile
import time

import lightning as L
import torch
import yaml

from common import median, preset_values, record
from lm_pretrain.training.hardware import peak_flops
from lm_pretrain.model.loss import next_token_loss, pick_loss
from lm_pretrain.model import GPT, model_size
from lm_pretrain.training.optim import lr_multiplier
from lm_pretrain.commands.sizes import config_from_yaml


class StepTimer(L.Callback):
    """Wall time and tokens from the end of optimizer step `warmup` to the end of step `warmup + steps`."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps, self.t0, self.seconds, self.tokens = warmup, steps, None, None, 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.t0 is not None and self.seconds is None:
            self.tokens += batch[0].numel() * trainer.world_size
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
    """Tokens per second of train.py over the timed steps."""
    from lm_pretrain.commands.train import run

    timer = ('--trainer.callbacks+={"class_path": "train_throughput.StepTimer", "init_args": '
             f'{{"warmup": {warmup}, "steps": {steps}}}}}')
    with tempfile.TemporaryDirectory() as logs:
        cli = run(["fit", "--config", config, "--trainer.max_steps", str(warmup + steps),
                   "--trainer.val_check_interval", str(10 * (warmup + steps) * 64), "--trainer.logger.init_args.save_dir",
                   logs, "--trainer.limit_val_batches", "0", "--checkpoint.save_last", "false", *extra, timer])
        timer = next(c for c in cli.trainer.callbacks if type(c).__name__ == "StepTimer")
    return timer.tokens / timer.seconds


class Windows(L.Callback):
    """Tokens per second over two windows of `steps` optimizer steps: from the end of step `warmup`,
    and from one step after `events` (the step whose end samples, validates and checkpoints)."""

    def __init__(self, warmup: int, steps: int, events: int):
        self.starts = (warmup, events + 1)
        self.steps, self.began, self.tok_s = steps, {}, {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        for start in self.starts:
            if trainer.global_step in (start, start + self.steps):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                if trainer.global_step == start:
                    self.began[start] = time.perf_counter()
                else:
                    tokens = self.steps * batch[0].numel() * trainer.accumulate_grad_batches * trainer.world_size
                    self.tok_s[start] = tokens / (time.perf_counter() - self.began[start])


def steady_run(config: str, warmup: int, steps: int, extra: list[str]) -> dict:
    """The template's tok/s before and after a sample, a validation and a checkpoint (at step
    warmup + steps), and whether debug.CompiledStepCheck passed (None when the config does not compile)."""
    from lm_pretrain.commands.train import run

    events = warmup + steps + 1  # one step after the first window: preset callbacks run before Windows
    total = events + 1 + steps + 1  # the last step is profiled by CompiledStepCheck, after the timed ones
    compiled = bool(setting(config, extra, "model.compile", False))
    accumulate = int(setting(config, extra, "trainer.accumulate_grad_batches", 1))
    # no log step in the run: CompiledStepCheck compares two steps that do the same (a log step adds
    # the gradient norm); the timed windows would skip log steps' work either way
    args = ["fit", "--config", config, "--trainer.max_steps", str(total), "--trainer.log_every_n_steps", str(total + 1),
            "--trainer.val_check_interval",
            str(events * accumulate), "--checkpoint.every_n_train_steps",
            str(events), "--trainer.limit_val_batches", "4", "--trainer.callbacks.init_args.every_n_steps", str(events),
            "--trainer.callbacks.init_args.max_new_tokens", "16", *extra,
            '--trainer.callbacks+={"class_path": "train_throughput.Windows", "init_args": '
            f'{{"warmup": {warmup}, "steps": {steps}, "events": {events}}}}}']
    if compiled:
        args.append('--trainer.callbacks+={"class_path": "lm_pretrain.training.debug.CompiledStepCheck", "init_args": '
                    f'{{"early": {warmup - 1}, "late": {total - 1}}}}}')
    with tempfile.TemporaryDirectory() as logs:
        try:
            cli = run([*args, "--trainer.logger.init_args.save_dir", logs])
        except Exception as err:  # CompiledStepCheck raises at the end of a run whose graph did not hold
            return {"before_tok_s": None, "after_tok_s": None, "compiled_check": f"{type(err).__name__}: {err}"[-1500:]}
        windows = next(c for c in cli.trainer.callbacks if type(c).__name__ == "Windows")  # (imported as train_throughput)
    before, after = (windows.tok_s.get(start) for start in windows.starts)
    return {"before_tok_s": before, "after_tok_s": after, "compiled_check": "passed" if compiled else None}


def setting(config: str, extra: list[str], key: str, default=None):
    """The value of `key` ("model.compile") for this run: the flag in `extra` if given, else the preset's."""
    flag = f"--{key}"
    if flag in extra[:-1]:
        return yaml.safe_load(extra[extra.index(flag) + 1])
    section, name = key.split(".")
    return preset_values(config).get(section, {}).get(name, default)


def sync_check(config: str, extra: list[str]) -> dict:
    """A short template run under HostSyncCheck: {"passed": bool, "checked_steps": n, "error": text}."""
    from lm_pretrain.training.debug import HostSyncCheck
    from lm_pretrain.commands.train import run

    with tempfile.TemporaryDirectory() as logs:
        try:
            cli = run(["fit", "--config", config, "--trainer.max_steps", "12", "--trainer.log_every_n_steps", "5",
                       "--trainer.val_check_interval", "1000000", "--trainer.limit_val_batches", "0",
                       "--trainer.logger.init_args.save_dir", logs, "--checkpoint.save_last", "false", *extra,
                       "--trainer.callbacks+=lm_pretrain.training.debug.HostSyncCheck"])
        except Exception as err:  # set_sync_debug_mode("error") raises RuntimeError at the culprit
            return {"passed": False, "checked_steps": None, "error": f"{type(err).__name__}: {err}"[-2000:]}
        finally:
            if torch.cuda.is_available():
                torch.cuda.set_sync_debug_mode("default")
        check = next(c for c in cli.trainer.callbacks if isinstance(c, HostSyncCheck))
    return {"passed": True, "checked_steps": check.checked_steps, "error": None}


def bare_run(config_path: str, warmup: int, steps: int, profile_steps: int = 0) -> tuple[float, list[dict]]:
    """A hand-written loop with the same recipe as the template: (seconds for the timed steps, and the
    top kernels of `profile_steps` more steps, profiled)."""
    raw = preset_values(config_path)
    trainer_cfg, model_cfg, data_cfg = raw.get("trainer", {}), raw.get("model", {}), raw.get("data", {})
    config = config_from_yaml(config_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = GPT(config).to(device)
    compiled = bool(model_cfg.get("compile"))
    fused = pick_loss(model_cfg.get("loss", "auto"), compiled, model_cfg.get("z_loss", 0.0), config.logit_softcap) == "fused"
    loss_fn = torch.compile(next_token_loss) if compiled else next_token_loss  # model and loss in one graph
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

    def step() -> None:
        for micro in range(accumulate):
            x, y = tokens[micro, :, :-1], tokens[micro, :, 1:]
            with autocast:
                loss = loss_fn(model, x, y, fused=fused)
            (loss / accumulate).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)

    t0 = None
    for i in range(total):
        if i == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if not profile_steps:
        return seconds, []
    try:
        return seconds, profile(step, profile_steps, device)
    except Exception as err:  # the profiler differs between versions; the timing stands without it
        return seconds, [{"name": f"profiler failed: {type(err).__name__}: {err}", "ms_per_step": 0.0, "share": 0.0,
                          "calls": 0}]


def profile(step, steps: int, device: str, top: int = 15) -> list[dict]:
    """The `top` kernels (GPU) or operators (CPU) by their own time over `steps` steps."""
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if (e.self_device_time_total if device == "cuda" else e.self_cpu_time_total) > 0]
    if device == "cuda":  # device-side entries only: kernels and copies
        events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA] or events
    key = (lambda e: e.self_device_time_total) if device == "cuda" else (lambda e: e.self_cpu_time_total)
    total = sum(key(e) for e in events) or 1
    return [{"name": e.key[:90], "ms_per_step": key(e) / 1000 / steps, "share": key(e) / total, "calls": e.count // steps}
            for e in sorted(events, key=key, reverse=True)[:top]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile, caches)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--template-only", action="store_true", help="no bare loop (e.g. for FSDP)")
    parser.add_argument("--sync-check", action="store_true")
    parser.add_argument("--profile", type=int, default=0, metavar="N")
    parser.add_argument("--steady", action="store_true")
    parser.add_argument("--json", default=None, metavar="PATH")
    parser.add_argument("--overlay", action="append", default=[], metavar="YAML",
                        help="another config for the template path only (e.g. configs/overlays/fsdp.yaml)")
    parser.add_argument("--no-record", action="store_true", help="print only; do not append to BENCHMARKS.md")
    args, extra = parser.parse_known_args()
    extra = [*(a for overlay in args.overlay for a in ("--config", overlay)), *extra]
    raw = preset_values(args.config)
    config = config_from_yaml(args.config)
    tokens_per_step = raw["data"]["batch_size"] * config.block_size * raw["trainer"].get("accumulate_grad_batches", 1)
    flops = model_size(config)["flops_per_token"]
    template, bare, memory, kernels = [], [], {}, []
    for _ in range(args.repeats):
        if not args.template_only:
            seconds, kernels = bare_run(args.config, args.warmup, args.steps, args.profile if not bare else 0)
            bare.append(args.steps * tokens_per_step / seconds)
            memory["bare"] = peak_memory_gib()
        template.append(template_run(args.config, args.warmup, args.steps, extra))
        memory["template"] = peak_memory_gib()
        print(f"bare {bare[-1] if bare else 0:,.0f} tok/s, template {template[-1]:,.0f} tok/s", file=sys.stderr)
    sync = sync_check(args.config, extra) if args.sync_check else None
    steady = steady_run(args.config, max(args.warmup, 2), args.steps, extra) if args.steady else None
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    precision = next((extra[i + 1] for i, a in enumerate(extra[:-1]) if a == "--trainer.precision"),
                     raw["trainer"].get("precision", "32-true"))
    peak = peak_flops(name, precision) if name else None

    def row(label, values, mem):
        tps = median(values)
        mfu = f"{tps * flops / peak:.1%}" if peak else "-"
        return (f"| {label} | {tps:,.0f} | {tps * flops / 1e12:.3f} | {mfu} | {mem:.2f} | "
                f"{', '.join(f'{v:,.0f}' for v in values)} |")

    rows = ["| path | tok/s (median) | TFLOP/s | MFU | peak memory GiB | runs (tok/s) |", "|---|---:|---:|---:|---:|---|",
            row("template train.py", template, memory["template"])]
    ratio = median(template) / median(bare) if bare else None
    if bare:
        rows += [row("bare PyTorch loop", bare, memory["bare"]), "",
                 f"**template / bare = {ratio:.3f}** (medians of {args.repeats} alternating runs, "
                 f"{args.steps} timed steps of {tokens_per_step:,} tokens after {args.warmup} warm-up steps)"]
    if sync:
        rows += ["", f"Host syncs outside log steps: {'none' if sync['passed'] else 'FOUND'}"
                     f" ({sync['checked_steps']} steps checked)" if sync["passed"] else f": {sync['error']}"]
    if steady and steady["after_tok_s"]:
        rows += ["", f"Steady steps after a sample, a validation and a checkpoint: {steady['after_tok_s']:,.0f} tok/s, "
                     f"before them {steady['before_tok_s']:,.0f} (after / before = "
                     f"{steady['after_tok_s'] / steady['before_tok_s']:.3f}); CompiledStepCheck: {steady['compiled_check']}"]
    elif steady:
        rows += ["", f"Steady-step run failed: {steady['compiled_check']}"]
    if kernels:
        rows += ["", "| top kernels of the bare loop's step | ms per step | share | calls per step |",
                 "|---|---:|---:|---:|"] + [f"| `{k['name']}` | {k['ms_per_step']:.3f} | {k['share']:.1%} | {k['calls']} |"
                                           for k in kernels]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config, "device": name or "cpu", "flops_per_token": flops,
                       "template_tok_s": template, "bare_tok_s": bare, "ratio": ratio, "memory_gib": memory,
                       "tflops": median(template) * flops / 1e12, "mfu": median(template) * flops / peak if peak else None,
                       "sync_check": sync, "steady": steady, "kernels": kernels, "extra": extra}, f, indent=1)
    mem_note = "" if torch.cuda.is_available() else \
        "Peak memory on CPU is the process's max RSS so far (both paths run in one process: the later includes the earlier)."
    command = "python bench/train_throughput.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    text = "\n".join(rows) if args.no_record else record(f"Training throughput, {args.config}", command, rows, mem_note)
    print(text)


if __name__ == "__main__":
    main()
