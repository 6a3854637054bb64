"""Bytes FSDP2 moves per training step, with and without its mixed-precision policy.

    python bench/fsdp_traffic.py [--config configs/gpt2-124m.yaml] [--no-record]

Two gloo CPU processes shard a preset's model (GPT-2 124M by default, 50,257-token vocabulary) as
strategies.parallelize does and take one forward and backward pass. The collectives FSDP2 calls are
counted where it calls them (torch.distributed's all-gather and reduce-scatter of one flat tensor
per unit): the bytes each process receives whole from its all-gathers (the parameters of every unit,
gathered for the forward pass and again for the backward pass) and the bytes each sends into its
reduce-scatters (the gradients). Under bf16-mixed (policy: bf16 parameters, float32 reduction) the
gathers carry half the bytes; the reductions stay float32. Results go to BENCHMARKS.md.
"""

import argparse
import os
import sys
import tempfile
from collections import Counter

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common import record
from lm_pretrain.commands.sizes import config_from_yaml
from lm_pretrain.model import GPT
from lm_pretrain.training.strategies import materialize, parallelize

GATHERS = ("all_gather_single", "all_gather_into_tensor")  # the name FSDP2 calls, by torch version
REDUCES = ("reduce_scatter_single", "reduce_scatter_tensor")


def count_collectives(counts: Counter) -> None:
    """Wrap torch.distributed's flat all-gather and reduce-scatter to add up the bytes they move."""
    def wrap(name: str, kind: str, which: str):
        original = getattr(dist, name)

        def counted(*args, **kwargs):
            tensor = kwargs[which] if which in kwargs else args[0 if which == "output_tensor" else 1]
            counts[kind] += tensor.numel() * tensor.element_size()
            return original(*args, **kwargs)
        setattr(dist, name, counted)

    for name in GATHERS:
        if hasattr(dist, name):
            wrap(name, "gathered", "output_tensor")
    for name in REDUCES:
        if hasattr(dist, name):
            wrap(name, "reduced", "input")


def worker(rank: int, world: int, store: str, config_path: str, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    config = config_from_yaml(config_path)
    config.vocab_size = config.vocab_size or 50257
    counts = Counter()
    count_collectives(counts)
    for name, dtype in (("float32 (no policy)", None), ("bf16-mixed (policy)", torch.bfloat16)):
        torch.manual_seed(0)
        with torch.device("meta"):
            model = GPT(config)
        parallelize(model, mesh, param_dtype=dtype)
        materialize(model, torch.device("cpu"))
        tokens = torch.randint(0, config.vocab_size, (1, 65), generator=torch.Generator().manual_seed(rank))
        counts.clear()
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten()).backward()
        if rank == 0:
            results[name] = (dict(counts), sum(p.numel() for p in model.parameters()))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/gpt2-124m.yaml")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder, mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(2, os.path.join(folder, "store"), args.config, results), nprocs=2)
        results = dict(results)
    mib = 2 ** 20
    rows = ["| precision | parameters | all-gathered per step (MiB) | reduce-scattered per step (MiB) |",
            "|---|---|---|---|"]
    for name, (counts, params) in results.items():
        rows.append(f"| {name} | {params / 1e6:.1f}M | {counts.get('gathered', 0) / mib:.0f} | "
                    f"{counts.get('reduced', 0) / mib:.0f} |")
        print(rows[-1])
    plain, mixed = (results[k][0] for k in ("float32 (no policy)", "bf16-mixed (policy)"))
    notes = (f"Per process, 2 processes, one forward and backward pass. The policy's gathers move "
             f"{mixed['gathered'] / plain['gathered']:.2f}x the bytes of float32's; its gradient reductions "
             f"{mixed['reduced'] / plain['reduced']:.2f}x (float32, as torchtitan's).")
    print(notes)
    if not args.no_record:
        record("FSDP2 traffic per step, with and without the mixed-precision policy",
               f"python bench/fsdp_traffic.py --config {args.config}", rows, notes)


if __name__ == "__main__":
    sys.exit(main())
