"""Sample text from a checkpoint: `python -m lm_pretrain.generate --ckpt PATH --prompt TEXT`."""

import argparse
import sys
from pathlib import Path

import torch

from lm_pretrain.errors import UserError, exit_on_user_error
from lm_pretrain.tokenizer import get_tokenizer


def load_model(ckpt: str | Path, device: str = "cpu"):
    """The LanguageModel saved in a checkpoint (a file, or the folder of a sharded run), in eval mode
    on `device`."""
    from lm_pretrain.checkpoints import load_module

    return load_module(ckpt, device)


def sample(model, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8, top_k: int | None = 200,
           seed: int | None = None, top_p: float | None = None, stop_at_eot: bool = True) -> str:
    """The prompt followed by up to `max_new_tokens` sampled tokens, decoded; sampling stops at the
    end-of-text token when stop_at_eot."""
    enc = get_tokenizer(model.hparams.tokenizer)
    ids = enc.encode_ordinary(prompt) or [enc.eot_token]  # an empty prompt starts a new document
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    idx = torch.tensor([ids], dtype=torch.long, device=model.device)
    out = model.model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                               generator=generator, vocab_limit=enc.n_vocab,
                               stop_token=enc.eot_token if stop_at_eot else None)[0].tolist()
    if not prompt:
        out = out[1:]
    if stop_at_eot and out and out[-1] == enc.eot_token and len(out) > len(ids):
        out = out[:-1]
    return enc.decode(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lm_pretrain.generate", description="Sample text from a checkpoint.")
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by train.py (e.g. .../checkpoints/last.ckpt)")
    parser.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="tokens to sample (default 200)")
    parser.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 is greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=200, help="sample among the k likeliest tokens; 0 for all (default 200)")
    parser.add_argument("--top-p", type=float, default=None, help="sample among the likeliest tokens whose probability adds up to p (nucleus sampling)")
    parser.add_argument("--no-stop-at-eot", dest="stop_at_eot", action="store_false",
                        help="keep sampling past the end-of-text token")
    parser.add_argument("--num-samples", type=int, default=1, help="how many samples to print (default 1)")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be at least 0, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be at least 0, got {args.temperature}")
    if args.top_k < 0:
        raise UserError(f"--top-k must be at least 0, got {args.top_k}")
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}")
    model = load_model(args.ckpt, args.device)
    for i in range(args.num_samples):
        seed = None if args.seed is None else args.seed + i
        text = sample(model, args.prompt, args.max_new_tokens, args.temperature, args.top_k or None, seed,
                      args.top_p, args.stop_at_eot)
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---")
        print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
