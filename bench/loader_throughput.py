"""Loader throughput: tokens per second the data module delivers to one rank, as shipped.

    python bench/loader_throughput.py --config configs/gpt2-124m.yaml [--batches 300]

Builds the config's TokenDataModule (its batch size, block size and workers) on the prepared data
and times iterating the training loader, batches moved through `on_after_batch_transfer` (the
uint16 -> int64 widening and the x/y shift) on the CPU. Results are appended to BENCHMARKS.md.
"""

import argparse
import shlex
import sys
import time

import yaml

from common import median, record
from lm_pretrain.data.datamodule import TokenDataModule
from lm_pretrain.commands.sizes import config_from_yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/gpt2-124m.yaml")
    parser.add_argument("--data-dir", default=None, help="prepared data (default: the config's, or data/shakespeare)")
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    data_cfg = yaml.safe_load(open(args.config)).get("data", {}) or {}
    block = config_from_yaml(args.config).block_size
    dm = TokenDataModule(args.data_dir or data_cfg.get("data_dir"), batch_size=data_cfg.get("batch_size", 8),
                         block_size=block, num_workers=data_cfg.get("num_workers", 0), verify="size")
    dm.prepare_data()
    dm.setup("fit")
    rates = []
    for _ in range(args.repeats):
        loader = dm.train_dataloader()
        tokens, start = 0, None
        for i, batch in enumerate(loader):
            if i == 10:  # after worker start-up
                start, tokens = time.perf_counter(), 0
            x, _ = dm.on_after_batch_transfer(batch, 0)
            tokens += x.numel()
            if i == 10 + args.batches:
                break
        rates.append(tokens / (time.perf_counter() - start))
        print(f"{rates[-1] / 1e6:.2f}M tok/s", file=sys.stderr)
    rows = ["| loader | batch x block | workers | M tok/s per rank (median) | runs |", "|---|---|---:|---:|---|",
            f"| {args.config} | {dm.batch_size} x {block} | {dm.num_workers} | {median(rates) / 1e6:.2f} | "
            f"{', '.join(f'{r / 1e6:.2f}' for r in rates)} |"]
    command = "python bench/loader_throughput.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    print("\n".join(rows) if args.no_record else record("Loader throughput", command, rows))


if __name__ == "__main__":
    main()
