"""Parameters and training FLOPs per token of configs: `python -m lm_pretrain.sizes configs/*.yaml`.

Prints a Markdown table computed from each config's `model:` section by `model.model_size`,
without building the model.
"""

import argparse
import sys
from pathlib import Path

import yaml

from lm_pretrain.errors import UserError, exit_on_user_error
from lm_pretrain.model import GPTConfig, model_size


def config_from_yaml(path: str | Path) -> GPTConfig:
    """The GPTConfig of a train.py config file's `model:` section (defaults as LanguageModel's)."""
    import inspect

    from lm_pretrain.module import LanguageModel

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from None
    defaults = {k: p.default for k, p in inspect.signature(LanguageModel).parameters.items()}
    model = {**defaults, **(data.get("model") or {})}
    try:
        return GPTConfig(**{k: v for k, v in model.items() if k in GPTConfig.__dataclass_fields__})
    except (TypeError, ValueError) as err:
        raise UserError(f"{path}: {err}") from None


def table(paths: list[str]) -> str:
    rows = ["| preset | blocks | layers | width | heads (kv) | context | parameters | non-embedding | GFLOPs/token |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for path in paths:
        c = config_from_yaml(path)
        size = model_size(c)
        style = "GPT-2" if c.position == "learned" else "Llama"
        rows.append(f"| {Path(path).stem} | {style} | {c.n_layer} | {c.n_embd} | {c.n_head} ({c.n_kv_head}) | "
                    f"{c.block_size} | {size['params'] / 1e6:,.1f}M | {size['non_embedding_params'] / 1e6:,.1f}M | "
                    f"{size['flops_per_token'] / 1e9:.2f} |")
    return "\n".join(rows)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lm_pretrain.sizes", description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="train.py config files")
    print(table(parser.parse_args(argv).configs))


if __name__ == "__main__":
    main(sys.argv[1:])
