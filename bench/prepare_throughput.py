"""Data preparation throughput: `prepare` against tiktoken's own batch encoder (the ceiling).

    python bench/prepare_throughput.py [--copies 8] [--workers N]   # Shakespeare, copied
    python bench/prepare_throughput.py --generate_gb 2 --repeats 1   # a generated corpus of 2 GB

The small corpus is Shakespeare's complete works written `--copies` times (as separate files, so the
work splits over workers). The large one (`--generate_gb`) is JSON Lines files of 128 MB holding
documents of 5 to 200 random Shakespeare paragraphs, so no two documents are alike.

The ceiling is tiktoken's fastest encoder (`encode_to_numpy`, as prepare uses) in `--workers`
processes over texts already in memory, with nothing read or written (for the large corpus, its first
`--ceiling_mb` of documents: the ceiling is a rate, and the whole corpus would not fit the memory
budget being measured). `encode_ordinary_batch` (threads) is not the ceiling: it builds Python lists
of ints, and on a 2-core machine it is slower than prepare itself. `prepare` runs as its own process (`python -m
lm_pretrain.data.prepare`), timed end to end: start-up, the first pass (reading, parsing, tokenizing,
checksums of the inputs), writing the shuffled shards in litdata workers, checksums of the shards. Its first pass (reading, parsing and
tokenizing every input, from prepare's log) is also reported against the ceiling: it is the part
that tokenizes; the rest is start-up and writing the shuffled shards. Its peak memory is the
largest sum of resident memory over its process tree, sampled every 0.1 s (pages shared between
processes count once per process, so this overstates). Results are appended to BENCHMARKS.md.
"""

import argparse
import json
import os
import random
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from common import ROOT, median, record
from lm_pretrain.utils import assets
from lm_pretrain.tokenizer.encoding import get_tokenizer

FILE_BYTES = 128 << 20
_TEXTS: list[str] = []  # the ceiling's texts, inherited by its forked workers


def _encode_share(share: tuple[int, int]) -> int:
    enc = get_tokenizer("gpt2")
    return sum(len(enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())) + 1
               for text in _TEXTS[share[0]:share[1]])


def ceiling_rate(texts: list[str], workers: int) -> tuple[float, int]:
    """(tokens per second, tokens) of encoding `texts` in `workers` forked processes."""
    import multiprocessing

    _TEXTS[:] = texts
    bounds = np.linspace(0, len(texts), 8 * workers + 1).astype(int)
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(_encode_share, [(0, 1)] * workers)  # workers started and the tokenizer loaded before timing
        start = time.perf_counter()
        tokens = sum(pool.map(_encode_share, list(zip(bounds[:-1], bounds[1:])), chunksize=1))
        return tokens / (time.perf_counter() - start), tokens


def shakespeare_copies(folder: Path, copies: int) -> list[str]:
    """Write the works `copies` times as .txt files; returns the texts (all of them)."""
    texts = []
    for copy in range(copies):
        for source in assets.shakespeare_texts():
            text = source.read_text()
            (folder / f"{copy}-{source.name}").write_text(text)
            texts.append(text)
    return texts


def generated_corpus(folder: Path, gigabytes: float, ceiling_bytes: int, seed: int = 0) -> list[str]:
    """Write about `gigabytes` of JSON Lines documents; returns the first `ceiling_bytes` of texts."""
    paragraphs = [p.strip() for source in assets.shakespeare_texts() for p in source.read_text().split("\n\n")]
    paragraphs = [p for p in paragraphs if p]
    rng, target, written, sample, number = random.Random(seed), int(gigabytes * 1e9), 0, [], 0
    while written < target:
        with open(folder / f"part-{number:05d}.jsonl", "w") as f:
            size = 0
            while size < FILE_BYTES and written + size < target:
                text = "\n\n".join(rng.choices(paragraphs, k=rng.randint(5, 200)))
                line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                f.write(line)
                size += len(line.encode())
                if sum(map(len, sample)) < ceiling_bytes:
                    sample.append(text)
        written, number = written + size, number + 1
    return sample


def tree_rss(root: int) -> int:
    """Resident bytes of process `root` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def run_prepare(files: list[Path] | Path, output: Path, workers: int) -> tuple[float, float, int, int]:
    """Run prepare in its own process: (seconds, seconds of its first pass, tokens written, peak
    resident bytes of its tree)."""
    inputs = [str(files)] if isinstance(files, Path) else [str(f) for f in files]
    command = [sys.executable, "-m", "lm_pretrain.commands.prepare", *inputs, "--output", str(output), "--workers", str(workers)]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak, done = [0], threading.Event()

    def sample():
        while not done.wait(0.1):
            peak[0] = max(peak[0], tree_rss(process.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = process.communicate()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"prepare failed: {stderr[-2000:]}")
    splits = json.loads((output / "metadata.json").read_text())["splits"]
    first_pass = float(re.search(r"read and tokenized in ([\d.]+) s", stderr).group(1))
    return seconds, first_pass, sum(s["tokens"] for s in splits.values()), peak[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=8, help="Shakespeare copies (without --generate_gb)")
    parser.add_argument("--generate_gb", type=float, default=None, help="a generated corpus of this many GB")
    parser.add_argument("--ceiling_mb", type=int, default=256, help="text the ceiling is measured on (large corpus)")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        if args.generate_gb:
            texts = generated_corpus(corpus, args.generate_gb, args.ceiling_mb << 20)
            what = f"generated JSON Lines, {sum(f.stat().st_size for f in corpus.iterdir()) / 1e9:.2f} GB"
        else:
            texts = shakespeare_copies(corpus, args.copies)
            what = f"Shakespeare x{args.copies}"
        files = sorted(corpus.iterdir())
        ceiling, ours, first, peaks = [], [], [], []
        for i in range(args.repeats):
            os.sync()  # the corpus just written (or the last run's files) flushed first, not during the timing
            rate, sample_tokens = ceiling_rate(texts, args.workers)
            ceiling.append(rate)
            seconds, first_pass, tokens, peak = run_prepare(files, Path(tmp) / "out", args.workers)
            ours.append(tokens / seconds)
            first.append(tokens / first_pass)
            peaks.append(peak)
            subprocess.run(["rm", "-rf", str(Path(tmp) / "out")], check=True)
            print(f"ceiling {ceiling[-1] / 1e6:.2f}M tok/s, prepare {ours[-1] / 1e6:.2f}M tok/s "
                  f"(first pass {first[-1] / 1e6:.2f}M) "
                  f"({tokens / 1e6:.0f}M tokens in {seconds:.0f} s), peak RSS {peak / 2**30:.2f} GiB", file=sys.stderr)
    rows = ["| path | M tok/s (median) | runs | peak RSS (GiB) |", "|---|---:|---|---:|",
            f"| tiktoken encode_to_numpy, {args.workers} processes, text in memory | {median(ceiling) / 1e6:.2f} | "
            f"{', '.join(f'{v / 1e6:.2f}' for v in ceiling)} | |",
            f"| lm-pretrain-prepare, {args.workers} workers | {median(ours) / 1e6:.2f} | "
            f"{', '.join(f'{v / 1e6:.2f}' for v in ours)} | {max(peaks) / 2**30:.2f} |",
            f"| its first pass (read, parse, tokenize) | {median(first) / 1e6:.2f} | "
            f"{', '.join(f'{v / 1e6:.2f}' for v in first)} | |", "",
            f"**prepare / ceiling = {median(ours) / median(ceiling):.3f}**, first pass / ceiling = "
            f"{median(first) / median(ceiling):.3f} ({what}: {tokens / 1e6:.1f}M tokens in {len(files)} files; "
            f"ceiling on {sample_tokens / 1e6:.1f}M tokens in memory)"]
    command = "python bench/prepare_throughput.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print("\n".join(rows) if args.no_record else record("Data preparation throughput", command, rows))


if __name__ == "__main__":
    main()
