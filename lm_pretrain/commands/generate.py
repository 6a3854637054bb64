"""Sample text from a checkpoint: `lm-pretrain-generate --ckpt_path PATH --prompt TEXT`."""

import sys
from pathlib import Path

from lm_pretrain.utils import ranges
from lm_pretrain.commands.parsing import call, command_parser
from lm_pretrain.utils.errors import exit_on_user_error
from lm_pretrain.utils.ranges import NonNegativeFloat, NonNegativeInt, PositiveInt, Probability, Seed


def load_model(ckpt: str | Path, device: str = "cpu"):
    """The LanguageModel saved in a checkpoint (a file, or the folder of a sharded run), in eval mode
    on `device`."""
    from lm_pretrain.training.module import LanguageModel  # here, not above: --help stays quick without Lightning

    return LanguageModel.from_checkpoint(ckpt, device)


def generate(ckpt_path: str, prompt: str = "", max_new_tokens: NonNegativeInt = 200, temperature: NonNegativeFloat = 0.8,
             top_k: NonNegativeInt = 200, top_p: Probability | None = None, stop_at_eot: bool = True,
             num_samples: PositiveInt = 1, seed: Seed | None = None, device: str | None = None) -> list[str]:
    """Sample text from a checkpoint, continuing a prompt.

    Args:
        ckpt_path: a checkpoint written by train.py (.../checkpoints/last.ckpt, a file, or the folder
            of a sharded run).
        prompt: text to continue; empty starts a new document.
        max_new_tokens: tokens to sample.
        temperature: softmax temperature; 0 is greedy.
        top_k: sample among the k likeliest tokens; 0 for all.
        top_p: sample among the likeliest tokens whose probability adds up to p (nucleus sampling).
        stop_at_eot: stop at the end-of-text token.
        num_samples: how many samples to print.
        seed: seed for reproducible samples (sample i uses seed + i).
        device: cpu or cuda; empty means cuda when there is a GPU.
    """
    ranges.check(generate, dict(locals()), "")
    from lm_pretrain.training.hardware import pick_device  # here, not above: --help stays quick without torch
    from lm_pretrain.model.sampling import sample

    model = load_model(ckpt_path, pick_device(device))
    texts = []
    for i in range(num_samples):
        text = sample(model, prompt, max_new_tokens, temperature, top_k or None, None if seed is None else seed + i,
                      top_p, stop_at_eot)
        if num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(text)
        texts.append(text)
    return texts


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    call(command_parser("lm-pretrain-generate", generate), generate, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
