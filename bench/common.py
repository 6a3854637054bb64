"""Shared bits of the benchmarks: environment description and appending results to BENCHMARKS.md."""

import datetime
import platform
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def device_description() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (1 of {torch.cuda.device_count()})"
    import os

    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def versions() -> str:
    import lightning
    import tiktoken

    try:
        import litdata
        litdata_version = litdata.__version__
    except ImportError:
        litdata_version = "-"
    return (f"python {platform.python_version()}, torch {torch.__version__}, lightning {lightning.__version__}, "
            f"litdata {litdata_version}, tiktoken {tiktoken.__version__}")


def preset_values(path: str | Path) -> dict:
    """A preset as train.py reads it: lm_pretrain/training/defaults.yaml with the preset's YAML over it (for
    scripts that take settings such as gradient clipping from a preset without the CLI)."""
    import yaml

    from lm_pretrain.commands.train import DEFAULTS_FILE

    def merged(base: dict, over: dict) -> dict:
        out = dict(base)
        for key, value in over.items():
            out[key] = merged(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        return out

    return merged(yaml.safe_load(DEFAULTS_FILE.read_text()), yaml.safe_load(Path(path).read_text()) or {})


def median(values: list[float]) -> float:
    return statistics.median(values)


def record(title: str, command: str, rows: list[str], notes: str = "", path: Path = ROOT / "BENCHMARKS.md") -> str:
    """Append a section to BENCHMARKS.md (or `path`) and return it."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (f"\n### {title} — {stamp}\n\n- device: {device_description()}\n- versions: {versions()}\n"
            f"- command: `{command}`\n\n" + "\n".join(rows) + "\n" + (f"\n{notes}\n" if notes else ""))
    with open(path, "a") as f:
        f.write(text)
    return text
