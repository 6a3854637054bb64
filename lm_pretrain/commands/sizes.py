"""Parameters and training FLOPs per token of configs: `lm-pretrain-sizes configs/*.yaml`.

Prints a Markdown table computed from each config's `model:` section by `config.model_size` (a
mixture of experts' parameters all, and those a token goes through: active, which set its FLOPs),
without building the model (and without torch, so it takes a moment, not seconds). With
`--gpus [8,16,64]`, also each config's memory per GPU when FSDP shards it over that many, and with
`--tensor_parallel [1,2,4,8]` in tensor-parallel groups of those sizes
(`training.hardware.training_memory_bytes`: a rough plan, not a promise).
"""

import sys
from pathlib import Path
import yaml

from lm_pretrain.commands.parsing import command_parser, parse
from lm_pretrain.model.config import GPTConfig, check_tensor_parallel, model_size
from lm_pretrain.utils import ranges
from lm_pretrain.utils.errors import UserError, exit_on_user_error
from lm_pretrain.utils.ranges import PositiveInt


def config_from_yaml(path: str | Path) -> GPTConfig:
    """The GPTConfig of a train.py config file's `model:` section (GPTConfig's defaults for the rest)."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    try:
        return GPTConfig.from_dict(data.get("model") or {})
    except (TypeError, ValueError) as err:
        raise UserError(f"{path}: {err}") from None


def table(paths: list[str]) -> str:
    rows = ["| preset | blocks | layers | width | heads (kv) | context | parameters | non-embedding | active | "
            "GFLOPs/token |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for path in paths:
        c = config_from_yaml(path)
        size = model_size(c)
        style = ("GPT-2" if c.position == "learned" else "Llama") + (f", MoE {c.top_k}/{c.n_experts}" if c.mlp == "moe" else "")
        rows.append(f"| {Path(path).stem} | {style} | {c.n_layer} | {c.n_embd} | {c.n_head} ({c.n_kv_head}) | "
                    f"{c.block_size} | {size['params'] / 1e6:,.1f}M | {size['non_embedding_params'] / 1e6:,.1f}M | "
                    f"{size['active_params'] / 1e6:,.1f}M | {size['flops_per_token'] / 1e9:.2f} |")
    return "\n".join(rows)


def memory_table(paths: list[str], gpus: list[int], tensor_parallel: list[int] = (1,)) -> str:
    """Per-GPU memory of each config trained on each number of GPUs, FSDP sharding weights,
    gradients and AdamW state over all of them, in groups of each tensor_parallel size that split
    the blocks (sizes that do not divide the GPUs or the model are left out); per-GPU batch and
    activation checkpointing as the config sets them."""
    from lm_pretrain.training.hardware import training_memory_bytes

    rows = ["| preset | GPUs | tensor parallel | batch per group | checkpointing | states GiB | activations GiB | "
            "total GiB |", "|---|---:|---:|---:|---|---:|---:|---:|"]
    for path in paths:
        config, data = config_from_yaml(path), yaml.safe_load(Path(path).read_text()) or {}
        batch = (data.get("data") or {}).get("batch_size", 8)
        checkpointing = bool((data.get("model") or {}).get("activation_checkpointing", False))
        for count in gpus:
            for tp in tensor_parallel:
                try:
                    check_tensor_parallel(config, tp) if tp > 1 else None
                except UserError:
                    continue
                if count % tp:
                    continue
                memory = training_memory_bytes(config, batch, shards=count, activation_checkpointing=checkpointing,
                                               tensor_parallel=tp)
                rows.append(f"| {Path(path).stem} | {count} | {tp} | {batch} | {'yes' if checkpointing else 'no'} | "
                            f"{memory['states'] / 2**30:,.1f} | {memory['activations'] / 2**30:,.1f} | "
                            f"{memory['total'] / 2**30:,.1f} |")
    return "\n".join(rows)


def sizes(configs: list[str] | None = None, gpus: list[PositiveInt] | None = None,
          tensor_parallel: list[PositiveInt] | None = None) -> str:
    """Print parameters and training FLOPs per token of train.py config files, as a Markdown table.

    Args:
        configs: config files (also given as CONFIGs before the flags).
        gpus: also plan the memory per GPU on each of these numbers of GPUs (FSDP over all of them).
        tensor_parallel: with --gpus, plan each of these tensor-parallel group sizes too (default: 1).
    """
    if not configs:
        raise UserError("give at least one config file, e.g. configs/*.yaml")
    ranges.check(sizes, {"gpus": gpus, "tensor_parallel": tensor_parallel}, "")
    if tensor_parallel and not gpus:
        raise UserError("--tensor_parallel plans memory per GPU: give --gpus too")
    text = table(configs)
    if gpus:
        text += "\n\n" + memory_table(configs, gpus, tensor_parallel or [1])
    print(text)
    return text


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = command_parser("lm-pretrain-sizes", sizes)
    parser.add_argument("paths", nargs="*", metavar="CONFIG", help="the same as --configs")
    args = parse(parser, argv)
    sizes([*args.paths, *(args.configs or [])], args.gpus, args.tensor_parallel)


if __name__ == "__main__":
    main(sys.argv[1:])
