"""Which BPE trainer: rustbpe against Hugging Face `tokenizers`, on the same text and split pattern.

    python bench/tokenizer_train.py [--vocab_sizes 2048 4096 8192 16384] [--repeats 2] [--record]

Both train on Shakespeare's train split (the 40 plays and poems that `lm-pretrain-prepare` puts
into train; the 2 of val are held out) with lm_pretrain.tokenizer.bpe's split pattern, on every core.
Reported per trainer and vocabulary size: training time (median of --repeats, alternating the
trainers) and MB/s of training text, and compression as UTF-8 bytes per token on held-out text: the
val split, and text unlike Shakespeare (the docstrings of Python's standard library, as in
bench/time_to_loss.py). GPT-2's tokenizer is the reference row.
"""

import argparse
import ast
import glob
import os
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, record  # noqa: E402

from lm_pretrain import assets, bpe  # noqa: E402
from lm_pretrain.data.prepare import split_documents  # noqa: E402
from lm_pretrain.tokenizer.encoding import encoding_from_ranks, get_tokenizer  # noqa: E402


def stdlib_docstrings(limit_bytes: int = 2_000_000) -> str:
    """The docstrings of Python's standard library (sorted files), up to limit_bytes of UTF-8."""
    out, size = [], 0
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        try:
            tree = ast.parse(Path(path).read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    out.append(doc)
                    size += len(doc.encode())
        if size >= limit_bytes:
            break
    return "\n\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab_sizes", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--trainers", nargs="+", default=["rustbpe", "hf"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--record", action="store_true", help="append the table to BENCHMARKS.md")
    args = parser.parse_args()

    files = assets.shakespeare_texts()
    is_val = split_documents(len(files), 0.05, 0)  # prepare's split of the built-in corpus
    train = [f.read_text(encoding="utf-8") for f, v in zip(files, is_val) if not v]
    val = "".join(f.read_text(encoding="utf-8") for f, v in zip(files, is_val) if v)
    other = stdlib_docstrings()
    train_mb = sum(len(t.encode()) for t in train) / 1e6

    def bytes_per_token(enc, text: str) -> float:
        return len(text.encode()) / len(enc.encode_ordinary(text))

    gpt2 = get_tokenizer("gpt2")
    rows = ["| trainer | vocabulary | train time (s) | train MB/s | val bytes/token | stdlib docstrings bytes/token | "
            "the same tokens as the first trainer's |",
            "|---|---:|---:|---:|---:|---:|---|",
            f"| GPT-2 (reference) | {gpt2.n_vocab} | | | {bytes_per_token(gpt2, val):.3f} | {bytes_per_token(gpt2, other):.3f} | |"]
    for vocab_size in args.vocab_sizes:
        times, ranks = {t: [] for t in args.trainers}, {}
        for _ in range(args.repeats):
            for trainer in args.trainers:
                start = time.perf_counter()
                ranks[trainer] = bpe.train(train, vocab_size, trainer)
                times[trainer].append(time.perf_counter() - start)
        for trainer in args.trainers:
            enc = encoding_from_ranks(ranks[trainer], bpe.SPLIT_PATTERN, f"{trainer}-{vocab_size}")
            seconds = median(times[trainer])
            row = (f"| {trainer} | {len(ranks[trainer])} | {seconds:.2f} | {train_mb / seconds:.2f} | "
                   f"{bytes_per_token(enc, val):.3f} | {bytes_per_token(enc, other):.3f} | "
                   f"{set(ranks[trainer]) == set(ranks[args.trainers[0]])} |")
            rows.append(row)
            print(row, flush=True)
    notes = (f"Training text: Shakespeare's train split, {train_mb:.2f} MB in {len(train)} documents; val: "
             f"{len(val.encode()) / 1e6:.2f} MB in {int(is_val.sum())}; stdlib docstrings: {len(other.encode()) / 1e6:.2f} MB. "
             f"Times are medians of {args.repeats} runs per trainer, alternating. The vocabulary column counts "
             "the ranks (256 bytes + merges); each encoding adds <|endoftext|>.")
    print("\n".join(rows) + "\n\n" + notes)
    if args.record:
        command = "python bench/tokenizer_train.py " + " ".join(sys.argv[1:])
        record("Tokenizer training: rustbpe vs Hugging Face tokenizers", command.strip(), rows, notes)


if __name__ == "__main__":
    main()
