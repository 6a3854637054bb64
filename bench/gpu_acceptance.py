"""GPU acceptance: every path that only a GPU runs, checked in one go, with its figures recorded.

    bash bench/gpu_acceptance.sh [--out DIR] [--record FILE]    (sets up an offline machine, then runs this)
    bash bench/gpu_acceptance.sh --cpu-smoke                      the same steps, tiny models, on a CPU

Steps, most important first, each in its own process with its own time limit (a failure is recorded
and the next step runs; steps that would not finish within the overall budget are skipped):
  1. gpt2-124m as shipped (bf16, compile): template train.py vs the bench's bare loop (tok/s,
     TFLOP/s, MFU, peak memory, the ratio against its 0.98 target), a few steps under
     torch.cuda.set_sync_debug_mode("error") outside log steps (debug.HostSyncCheck), the steady
     step time after a sample, a validation and a checkpoint with debug.CompiledStepCheck on, and
     the top kernels of the step (profiler).
  2. Kill + resume on the GPU: a small model trained 8 steps straight, and again killed (SIGKILL)
     after step 6 and resumed from the step-4 checkpoint: the same batches and losses (with
     deterministic algorithms: trainer.deterministic true); then
     `generate` and `export` from its checkpoint.
  3. FSDP2 (configs/overlays/fsdp.yaml: per-block sharding, activation checkpointing) on one GPU with the
     largest preset, gpt2-1.5b: tok/s and peak memory.
  4. Kill + resume under FSDP2, then `generate` and `export` from the sharded checkpoint folder.
  5. llama-125m as shipped: as step 1, without the profile.
  6. moe-1b-7b (OLMoE-1B-7B's shape: 64 experts, 8 per token, bf16 grouped matmul, compile) cut to
     2 of its 16 blocks to fit one GPU, under FSDP2: tok/s, MFU over active parameters, peak memory.
The section appended to BENCHMARKS.md (or --record FILE) names the card; --out DIR also keeps
every step's log and JSON.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, record  # noqa: E402


BUDGET_S = 8 * 60  # the whole run on one H100/H200
RATIO_TARGET = 0.98  # template train.py / bare loop, same recipe
SMOKE_BUDGET_S = 60 * 60
CORPUS_COPIES = 8  # 12.5M tokens: 95 steps of gpt2-124m per epoch
SMOKE = {  # --cpu-smoke: the GPU presets shrunk to run in seconds on a CPU (still bf16-mixed, as on GPUs)
    "model": {"n_layer": 2, "n_head": 2, "n_kv_head": None, "n_embd": 32, "mlp_hidden": None, "block_size": 32,
              "compile": False},
    "trainer": {"accelerator": "cpu", "devices": 1, "precision": "bf16-mixed", "accumulate_grad_batches": 2},
    "data": {"batch_size": 2, "num_workers": 0},
}
RESUME_MODEL = ["--model.n_layer", "2", "--model.n_head", "4", "--model.n_embd", "128", "--model.block_size", "128",
                "--model.compile", "false", "--model.dropout", "0.1", "--data.batch_size", "8",
                "--trainer.accumulate_grad_batches", "2",
                "--trainer.callbacks.init_args.max_new_tokens", "8"]  # the preset's TextSamples: short samples
RESUME_SMOKE = ["--model.n_embd", "32", "--model.block_size", "32", "--data.batch_size", "2"]  # after RESUME_MODEL


class Acceptance:
    def __init__(self, smoke: bool, work: Path, out: Path | None):
        self.smoke, self.work, self.out = smoke, work, out
        self.start = time.monotonic()
        self.rows: list[str] = []  # | check | result |
        self.notes: list[str] = []
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(ROOT), str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")]),
            "PYTHONUNBUFFERED": "1"}

    # -- running things -----------------------------------------------------------------------

    def left(self) -> float:
        """Seconds left of the GPU budget (a CPU smoke run has none: a busy CPU must not skip steps)."""
        return (SMOKE_BUDGET_S if self.smoke else BUDGET_S) - (time.monotonic() - self.start)

    def run(self, name: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
        """python ARGS in the work folder; its output goes to NAME.log (and --out)."""
        timeout = max(10.0, min(timeout, self.left()))
        began = time.monotonic()
        try:
            done = subprocess.run([sys.executable, *args], cwd=self.work, env=self.env, capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            done = subprocess.CompletedProcess(args, -1, err.stdout or "", (err.stderr or "") +
                                               f"\n[timed out after {timeout:.0f} s]")
            done.stdout = done.stdout.decode() if isinstance(done.stdout, bytes) else done.stdout
            done.stderr = done.stderr.decode() if isinstance(done.stderr, bytes) else done.stderr
        log = f"$ python {' '.join(args)}\n[exit {done.returncode} after {time.monotonic() - began:.0f} s]\n" \
              f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}\n"
        (self.work / f"{name}.log").write_text(log)
        if self.out:
            (self.out / f"{name}.log").write_text(log)
        print(f"[{time.monotonic() - self.start:5.0f} s] {name}: exit {done.returncode} "
              f"({time.monotonic() - began:.0f} s)", flush=True)
        return done

    def step(self, title: str, fn, needs_s: float) -> None:
        if self.left() < needs_s:
            self.rows.append(f"| {title} | skipped: {self.left():.0f} s of the time budget left |")
            return
        try:
            fn(title)
        except Exception as err:  # one broken step must not hide the others' results
            self.rows.append(f"| {title} | **failed**: {type(err).__name__}: {' '.join(str(err).split())[:300]} |")

    @staticmethod
    def failure(done: subprocess.CompletedProcess) -> str:
        lines = [line for line in (done.stderr or "").strip().splitlines() if line.strip()]
        return f"**failed** (exit {done.returncode}): {' '.join(lines[-1].split())[:300] if lines else 'no output'}"

    # -- configs ------------------------------------------------------------------------------

    def preset(self, name: str) -> str:
        """configs/NAME.yaml, or in smoke mode a shrunk copy of it."""
        path = ROOT / "configs" / f"{name}.yaml"
        if not self.smoke:
            return str(path)
        config = yaml.safe_load(path.read_text())
        for section, values in SMOKE.items():
            config.setdefault(section, {}).update(values)
        shrunk = self.work / f"{name}-smoke.yaml"
        shrunk.write_text(yaml.safe_dump(config))
        return str(shrunk)

    def device_args(self) -> list[str]:
        # smoke: fp32 (bf16 is ~20x slower on CPUs; the throughput steps already run the presets' bf16)
        return ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true"] if self.smoke else \
            ["--trainer.accelerator", "gpu", "--trainer.precision", "bf16-mixed"]

    # -- the steps ----------------------------------------------------------------------------

    def prepare(self) -> None:
        """Shakespeare, repeated on a GPU so that no timed window reaches the end of an epoch (1.5M
        tokens are 11 optimizer steps of gpt2-124m; a new epoch restarts the loader's workers)."""
        from lm_pretrain.utils import assets

        corpus = self.work / "corpus"
        for copy in range(1 if self.smoke else CORPUS_COPIES):
            (corpus / str(copy)).mkdir(parents=True)
            for text in assets.shakespeare_texts():
                shutil.copyfile(text, corpus / str(copy) / text.name)  # copies: prepare reads a link once, by its target
        done = self.run("prepare", ["-m", "lm_pretrain.commands.prepare", str(corpus), "--output", str(self.work / "data")],
                        timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"could not prepare the corpus: {self.failure(done)}")
        self.data = str(self.work / "data")

    def measure(self, title: str, log_name: str, config: str, steps: int, warmup: int, *extra: str) -> dict | None:
        """bench/train_throughput.py's figures for one config, or None (and a failed row)."""
        out = self.work / f"{log_name}.json"
        args = [str(ROOT / "bench" / "train_throughput.py"), "--config", config, "--steps", str(steps), "--warmup",
                str(warmup), "--repeats", "1", "--json", str(out), "--no-record", "--data.data_dir", self.data, *extra]
        done = self.run(log_name, args, timeout=450)  # four compiled fits with --steady
        if done.returncode != 0 or not out.exists():
            self.rows.append(f"| {title} | {self.failure(done)} |")
            return None
        self.keep(out)
        return json.loads(out.read_text())

    @staticmethod
    def speed(r: dict, path: str) -> str:
        mfu = f", MFU {r['mfu']:.1%}" if r["mfu"] else ""
        return (f"{r[f'{path}_tok_s'][0]:,.0f} tok/s, {r['tflops']:.1f} TFLOP/s{mfu}, peak memory "
                f"{r['memory_gib'][path]:.1f} GiB")

    def throughput(self, name: str, profile: bool):
        def check(title: str) -> None:
            steps, warmup = (4, 2) if self.smoke else (10, 3)
            r = self.measure(title, name, self.preset(name), steps, warmup, "--sync-check", "--steady",
                             *(["--profile", "5"] if profile else []))
            if r is None:
                return
            self.rows.append(f"| {title}: template train.py | {self.speed(r, 'template')} |")
            target = "met" if r["ratio"] >= RATIO_TARGET else "**not met**"
            self.rows.append(f"| {title}: bare loop, same recipe | {r['bare_tok_s'][0]:,.0f} tok/s, peak memory "
                             f"{r['memory_gib']['bare']:.1f} GiB; **template / bare = {r['ratio']:.3f}** "
                             f"(target >= {RATIO_TARGET}: {target}) |")
            steady = r["steady"]
            if steady["after_tok_s"]:
                check = steady["compiled_check"]
                check = "not compiled" if check is None else check if check == "passed" else \
                    f"**failed**: {' '.join(check.split())[-300:]}"
                self.rows.append(f"| {title}: steady steps after a sample, a validation and a checkpoint | "
                                 f"{steady['after_tok_s']:,.0f} tok/s (before them {steady['before_tok_s']:,.0f}; "
                                 f"after / before = {steady['after_tok_s'] / steady['before_tok_s']:.3f}); "
                                 f"compiled graph kept (debug.CompiledStepCheck): {check} |")
            else:
                self.rows.append(f"| {title}: steady steps after samples and a validation | **failed**: "
                                 f"{' '.join(str(steady['compiled_check']).split())[-300:]} |")
            sync = r["sync_check"]
            detector = "sync counter (CPU)" if self.smoke else 'set_sync_debug_mode("error")'
            self.rows.append(f"| {title}: no host sync outside log steps, {detector} | " +
                             (f"passed ({sync['checked_steps']} steps)" if sync["passed"] else
                              f"**failed**: {' '.join(sync['error'].split())[-400:]}") + " |")
            if r["kernels"]:
                self.notes.append(f"Top {'kernels' if not self.smoke else 'operators'} of the {name} bare-loop step "
                                  f"(profiler, 5 steps; self time):\n\n| kernel | ms per step | share | calls per step |\n"
                                  "|---|---:|---:|---:|\n" + "\n".join(
                                      f"| `{k['name']}` | {k['ms_per_step']:.3f} | {k['share']:.1%} | {k['calls']} |"
                                      for k in r["kernels"]))
        return check

    def fsdp_throughput(self, title: str) -> None:
        steps, warmup = (3, 1) if self.smoke else (8, 2)
        r = self.measure(title, "fsdp-gpt2-1.5b", self.preset("gpt2-1.5b"), steps, warmup, "--template-only",
                         "--overlay", str(ROOT / "configs" / "overlays" / "fsdp.yaml"),
                         "--trainer.accumulate_grad_batches", "1", "--model.compile", "false", "--trainer.devices", "1")
        if r is not None:
            self.rows.append(f"| {title} | {self.speed(r, 'template')} (the preset's batch, no accumulation, "
                             f"no compile) |")

    def resume(self, name: str, overlay: list[str]):
        """Straight run vs killed + resumed run, then generate and export from the checkpoint."""
        def check(title: str) -> None:
            folders = {k: self.work / f"{name}-{k}" for k in ("straight", "resumed")}

            def fit(kind: str, label: str, *extra: str) -> subprocess.CompletedProcess:
                folders[kind].mkdir(exist_ok=True)
                record_cb = json.dumps({"class_path": "lm_pretrain.training.debug.RecordBatches",
                                        "init_args": {"path": str(folders[kind] / "rec")}})
                args = [str(ROOT / "train.py"), "fit", "--config", self.preset("gpt2-124m"), *overlay,
                        "--data.data_dir", self.data, *RESUME_MODEL,
                        *(RESUME_SMOKE if self.smoke else []), *self.device_args(), "--trainer.devices", "1",
                        "--trainer.max_steps", "8", "--trainer.val_check_interval", "1000000",
                        "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1",
                        "--checkpoint.every_n_train_steps", "4", "--trainer.deterministic", "true",
                        "--trainer.enable_progress_bar", "false", f"--trainer.callbacks+={record_cb}",
                        "--trainer.logger.init_args.save_dir", str(folders[kind] / "runs"), *extra]
                return self.run(f"{name}-{label}", args, timeout=120)

            straight = fit("straight", "straight")
            if straight.returncode != 0:
                self.rows.append(f"| {title} | straight run {self.failure(straight)} |")
                return
            killed = fit("resumed", "killed", "--trainer.callbacks+=" + json.dumps(
                {"class_path": "lm_pretrain.training.debug.SignalAt", "init_args": {"step": 6}}))
            resumed = fit("resumed", "resumed", "--ckpt_path", "last")
            if killed.returncode != -9 or resumed.returncode != 0:
                self.rows.append(f"| {title} | killed run exit {killed.returncode} (want -9); resumed "
                                 f"{self.failure(resumed) if resumed.returncode else 'ok'} |")
                return
            from lm_pretrain.training.debug import read_records

            a, b = read_records(folders["straight"] / "rec"), read_records(folders["resumed"] / "rec")
            same_batches = [r["rows"] for r in a] == [r["rows"] for r in b]
            diff = max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) if len(a) == len(b) else float("inf")
            verdict = "**identical** (bitwise)" if a == b else f"same batches: {same_batches}, max loss difference {diff:.2e}"
            self.rows.append(f"| {title} | 8 steps, killed after step 6, resumed from the step-4 checkpoint: {verdict} |")
            ckpt = next((folders["resumed"] / "runs").glob("*/version_*/checkpoints/last.ckpt"))
            device = "cpu" if self.smoke else "cuda"
            sample = self.run(f"{name}-generate", ["-m", "lm_pretrain.commands.generate", "--ckpt_path", str(ckpt), "--prompt",
                                                   "ROMEO:", "--max_new_tokens", "12", "--seed", "0", "--device",
                                                   device], timeout=90)
            export = self.run(f"{name}-export", ["-m", "lm_pretrain.commands.export", "--ckpt_path", str(ckpt), "--output",
                                                 str(self.work / f"{name}-hf")], timeout=120)
            text = " ".join(sample.stdout.split())[:80]
            self.rows.append(f"| {title}: generate and export from its {'folder' if ckpt.is_dir() else 'file'} "
                             f"checkpoint | generate: {'ok, `' + text + '`' if sample.returncode == 0 else self.failure(sample)}; "
                             f"export: {'ok' if export.returncode == 0 else self.failure(export)} |")
        return check

    def moe_throughput(self, title: str) -> None:
        steps, warmup = (3, 1) if self.smoke else (8, 3)
        config = yaml.safe_load(Path(self.preset("moe-1b-7b")).read_text())  # cut in the file: the FLOPs follow
        config["model"]["n_layer"] = 2
        config["trainer"].update(accumulate_grad_batches=1, devices=1)
        cut = self.work / "moe-1b-7b-cut.yaml"
        cut.write_text(yaml.safe_dump(config))
        r = self.measure(title, "moe-1b-7b", str(cut), steps, warmup, "--template-only")
        if r is not None:
            self.rows.append(f"| {title} | {self.speed(r, 'template')} (the preset's batch, no accumulation) |")

    def keep(self, path: Path) -> None:
        if self.out:
            shutil.copy(path, self.out / path.name)

    def all(self) -> None:
        self.prepare()
        small = "tiny GPT (smoke)" if self.smoke else "as shipped (bf16, compile)"
        fsdp = ["--config", str(ROOT / "configs" / "overlays" / "fsdp.yaml")]
        self.step(f"gpt2-124m, {small}", self.throughput("gpt2-124m", profile=True), needs_s=150)
        # The smoke run checks this script's code, each path once: the 1-device resume and llama-125m
        # run the same code as the FSDP2 resume and gpt2-124m (and the tests resume on one process).
        if not self.smoke:
            self.step("kill + resume, 1 device", self.resume("resume", []), needs_s=60)
        self.step("FSDP2, gpt2-1.5b on 1 device, activation checkpointing" if not self.smoke else
                  "FSDP2, gpt2-1.5b shrunk, 1 device", self.fsdp_throughput, needs_s=60)
        self.step("kill + resume, FSDP2 on 1 device", self.resume("resume-fsdp", fsdp), needs_s=60)
        self.step("MoE, moe-1b-7b cut to 2 blocks, FSDP2 on 1 device" if not self.smoke else
                  "MoE, moe-1b-7b shrunk, 1 device", self.moe_throughput, needs_s=90)
        if not self.smoke:
            self.step(f"llama-125m, {small}", self.throughput("llama-125m", profile=False), needs_s=120)
        else:
            self.notes.append("Smoke run: the 1-device resume and llama-125m are left out (the same code as the "
                              "FSDP2 resume and gpt2-124m).")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU, to check the script itself")
    parser.add_argument("--out", default=None, help="also keep every step's log and JSON in this folder")
    parser.add_argument("--record", default=str(ROOT / "BENCHMARKS.md"), help="append the results here")
    args = parser.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU here; use --cpu-smoke to check the steps on a CPU")
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-acceptance-") as work:
        acceptance = Acceptance(args.cpu_smoke, Path(work), out)
        try:
            acceptance.all()
        finally:
            seconds = time.monotonic() - acceptance.start
            rows = ["| check | result |", "|---|---|", *acceptance.rows]
            notes = "\n\n".join(acceptance.notes + [f"Whole run: {seconds:.0f} s."])
            title = "GPU acceptance (CPU smoke run: the steps, not figures)" if args.cpu_smoke else "GPU acceptance"
            command = "bash bench/gpu_acceptance.sh" + (" --cpu-smoke" if args.cpu_smoke else "")
            text = record(title, command, rows, notes, path=Path(args.record))
            print(text)
            if out:
                (out / "section.md").write_text(text)
    failed = [r for r in acceptance.rows if "**failed**" in r or "skipped" in r]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
