"""Memory of the loss, per loss path: how many logits-sized buffers one training step holds at its peak.

    python bench/loss_memory.py [--vocab 50257 --batch 4 --block 256 --n_embd 64] [--no-record]

One forward + backward of a one-block GPT whose output layer dominates (the logits are vocab x
tokens floats, ~200 MB here; everything else is a few MB), profiled with torch.profiler's memory
tracking on the CPU. The peak of the allocator's total above its value at the start of the step is
given in float32 logits tensors (tokens x vocab x 4 bytes): 1.0 is one float32 buffer, 0.5 one bf16
buffer. --bf16 runs under bf16 autocast as a bf16-mixed GPU run does (on this CPU ~10x slower: the
times are for float32 only). The paths are those of lm_pretrain.model.loss (model.loss): plain and fused,
eager and compiled; "auto" takes fused when eager and plain when compiled. Each path also gets its
step time (median of --repeats). Results go to BENCHMARKS.md.
"""

import argparse
import time

import torch

from common import median, record
from lm_pretrain.training.debug import peak_cpu_bytes
from lm_pretrain.model.config import GPTConfig
from lm_pretrain.model.loss import next_token_loss
from lm_pretrain.model import GPT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--n_embd", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bf16", action="store_true", help="under bf16 autocast, as a bf16-mixed GPU run")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=args.vocab, block_size=args.block, n_layer=1, n_head=2, n_embd=args.n_embd))
    x, y = (torch.randint(0, args.vocab, (args.batch, args.block)) for _ in range(2))
    logits_bytes = args.batch * args.block * args.vocab * 4
    compiled = torch.compile(next_token_loss)
    rows = ["| loss path | peak above the step's start | in logits tensors | step time (median) |", "|---|---:|---:|---:|"]
    chunk = max(1, args.batch * args.block // 8)  # the chunked loss in 8 chunks
    for name, fn, fused, chunk_rows in [("plain, eager", next_token_loss, False, None),
                                  ("fused, eager (auto's choice)", next_token_loss, True, None),
                                  ("plain, compiled (auto's choice)", compiled, False, None),
                                  ("fused, compiled", compiled, True, None),
                                  ("chunked (8 chunks), eager", next_token_loss, True, chunk),
                                  ("chunked (8 chunks), compiled", compiled, True, chunk)]:
        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                loss = fn(model, x, y, fused=fused, chunk=chunk_rows)
            loss.backward()
            model.zero_grad(set_to_none=True)

        step()  # compile, allocate once
        peak = peak_cpu_bytes(step)
        times = []
        for _ in range(args.repeats):
            began = time.perf_counter()
            step()
            times.append(time.perf_counter() - began)
        rows.append(f"| {name} | {peak / 2**20:,.0f} MiB | {peak / logits_bytes:.2f} | {median(times) * 1e3:.0f} ms |")
        print(rows[-1], flush=True)
    notes = (f"One float32 logits tensor: {args.batch} x {args.block} tokens x {args.vocab} x 4 bytes = "
             f"{logits_bytes / 2**20:,.0f} MiB; the model's weights and gradients are "
             f"{sum(p.numel() for p in model.parameters()) * 8 / 2**20:,.0f} MiB together.")
    if not args.no_record:
        record("Loss memory per loss path" + (", bf16 autocast" if args.bf16 else ", float32"),
               "python bench/loss_memory.py" + (" --bf16" if args.bf16 else ""), rows, notes)
    print(notes)


if __name__ == "__main__":
    main()
