"""Data preparation throughput: `prepare` against tiktoken's own batch encoder (the ceiling).

    python bench/prepare_throughput.py [--copies 4] [--workers N]

The corpus is Shakespeare's complete works written `--copies` times (as separate files, so the work
splits over workers). The ceiling is `encode_ordinary_batch` over the same texts on all cores, with
the texts already in memory; `prepare` is timed end to end (scan, split, tokenize in litdata
workers, write shards, checksums). Results are appended to BENCHMARKS.md.
"""

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from common import median, record
from lm_pretrain import assets
from lm_pretrain.prepare import prepare
from lm_pretrain.tokenizer import get_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    enc = get_tokenizer("gpt2")
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        texts = []
        for copy in range(args.copies):
            for source in assets.shakespeare_texts():
                text = source.read_text()
                (corpus / f"{copy}-{source.name}").write_text(text)
                texts.append(text)
        files = sorted(corpus.iterdir())
        tokens = sum(len(t) for t in enc.encode_ordinary_batch(texts, num_threads=args.workers)) + len(texts)
        ceiling, ours = [], []
        for i in range(args.repeats):
            start = time.perf_counter()
            enc.encode_ordinary_batch(texts, num_threads=args.workers)
            ceiling.append(tokens / (time.perf_counter() - start))
            start = time.perf_counter()
            prepare(files, Path(tmp) / f"out{i}", workers=args.workers)
            ours.append(tokens / (time.perf_counter() - start))
            print(f"ceiling {ceiling[-1] / 1e6:.2f}M tok/s, prepare {ours[-1] / 1e6:.2f}M tok/s", file=sys.stderr)
    rows = ["| path | M tok/s (median) | runs |", "|---|---:|---|",
            f"| tiktoken encode_ordinary_batch, {args.workers} threads | {median(ceiling) / 1e6:.2f} | "
            f"{', '.join(f'{v / 1e6:.2f}' for v in ceiling)} |",
            f"| lm-pretrain-prepare, {args.workers} workers | {median(ours) / 1e6:.2f} | "
            f"{', '.join(f'{v / 1e6:.2f}' for v in ours)} |", "",
            f"**prepare / ceiling = {median(ours) / median(ceiling):.3f}** ({tokens / 1e6:.1f}M tokens in {len(texts)} files)"]
    command = "python bench/prepare_throughput.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print("\n".join(rows) if args.no_record else record("Data preparation throughput", command, rows))


if __name__ == "__main__":
    main()
