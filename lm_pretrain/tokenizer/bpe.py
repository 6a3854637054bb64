"""Training a byte-level BPE tokenizer on a corpus, and the file that holds one.

A tokenizer file is one JSON document, read back as a tiktoken encoding (tiktoken encodes and
decodes; the trainer only finds the merges):

    {"format": "lm-pretrain-tokenizer", "version": 1, "name": ..., "pattern": <split regex>,
     "ranks": [<base64 of token 0>, <base64 of token 1>, ...],      # the rank is the index
     "special_tokens": {"<|endoftext|>": n_ranks}, "trained_on": {...}}

Ranks 0-255 are the 256 single bytes, so every string encodes; each later rank is one merge, in
the order it was learnt. The split pattern is GPT-4's (cl100k_base) with numbers split in runs of at
most two digits, as nanochat's: text is cut into words, numbers, punctuation and whitespace first,
and merges never cross those pieces.

Two trainers, both byte-level BPE on the same pieces: rustbpe (nanochat's; the default: faster on
this kind of machine, see BENCHMARKS.md "Tokenizer training") and Hugging Face `tokenizers`.
"""

import base64
import hashlib
import json
from pathlib import Path
from typing import Iterable, Literal

from lm_pretrain.utils.errors import UserError

FORMAT = "lm-pretrain-tokenizer"
EOT_TEXT = "<|endoftext|>"
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")
Trainer = Literal["rustbpe", "hf"]


def train(texts: Iterable[str], vocab_size: int, trainer: Trainer = "rustbpe",
          pattern: str = SPLIT_PATTERN) -> list[bytes]:
    """The ranks of a byte-level BPE of `vocab_size` tokens (the 256 bytes, then merges in order;
    the end-of-text token comes on top, so the encoding has vocab_size + 1 ids)."""
    if vocab_size < 257:
        raise UserError(f"--vocab_size {vocab_size} is too small: the 256 single bytes come first, so at least 257")
    if trainer == "rustbpe":
        return _train_rustbpe(texts, vocab_size, pattern)
    return _train_hf(texts, vocab_size, pattern)


def _train_rustbpe(texts: Iterable[str], vocab_size: int, pattern: str) -> list[bytes]:
    import rustbpe  # a dependency of the package (pyproject.toml), imported only here
    tokenizer = rustbpe.Tokenizer()
    tokenizer.train_from_iterator(iter(texts), vocab_size, pattern=pattern)
    ranks = sorted(tokenizer.get_mergeable_ranks(), key=lambda pair: pair[1])
    assert [r for _, r in ranks] == list(range(len(ranks))), "rustbpe gave ranks with gaps"
    return [bytes(token) for token, _ in ranks]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 bytes to printable characters (Hugging Face's ByteLevel alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _train_hf(texts: Iterable[str], vocab_size: int, pattern: str) -> list[bytes]:
    from lm_pretrain.utils.extras import require

    tokenizers = require("tokenizers", "export", "lm-pretrain-tokenizer --trainer hf")
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, min_frequency=1)
    tokenizer.train_from_iterator(iter(texts), trainer)
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    vocab = tokenizer.get_vocab()  # token -> id; merged tokens get ids in the order they were learnt
    ranks = [bytes([b]) for b in range(256)]
    ranks += [bytes(to_byte[c] for c in token) for token, _ in sorted(vocab.items(), key=lambda kv: kv[1])
              if len(token) > 1]
    return ranks


def merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge that made each token of rank >= 256, in rank order: byte-level BPE of the token's
    bytes with only the ranks below its own ends in exactly two parts (how a tiktoken encoding
    becomes a merges list, for Hugging Face's BPE)."""
    out = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pair_ranks = [(ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)]
            best, i = min(pair_ranks)
            if best >= rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise UserError(f"tokenizer: token {token!r} (rank {rank}) is not one merge of two tokens of lower "
                            "ranks, so it has no byte-level BPE merges list")
        out.append((parts[0], parts[1]))
    return out


# ---------------------------------------------------------------------------------------------
# The file


def to_raw(parsed: dict) -> dict:
    """A tokenizer's fields as the file holds them (ranks in base64): the copy that prepared
    datasets and checkpoints carry."""
    return {**parsed, "ranks": [base64.b64encode(token).decode() for token in parsed["ranks"]]}


def serialize(raw: dict) -> bytes:
    return (json.dumps(raw, indent=1) + "\n").encode()


def digest(raw: dict) -> str:
    """The sha256 of a tokenizer as lm-pretrain-tokenizer writes its file (`sha256sum FILE` for one
    written by it): the identity that datasets, checkpoints and the checks between them compare."""
    return hashlib.sha256(serialize(raw)).hexdigest()


def write(path: str | Path, ranks: list[bytes], name: str, trained_on: dict, pattern: str = SPLIT_PATTERN) -> str:
    """Write a tokenizer file (whole or absent) and return its sha256."""
    from lm_pretrain.utils.files import write_atomically

    raw = to_raw({"format": FORMAT, "version": 1, "name": name, "pattern": pattern,
                  "special_tokens": {EOT_TEXT: len(ranks)}, "trained_on": trained_on, "ranks": ranks})
    data = serialize(raw)
    write_atomically(path, lambda f: f.write(data), len(data))
    return hashlib.sha256(data).hexdigest()


def read_raw(path: str | Path, what: str = "tokenizer file") -> dict:
    """A tokenizer file as it is written (checked); a UserError names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist" if not path.exists() else f"{what} {path} is not a file")
    try:
        raw = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{what} {path} is not a tokenizer file of this project (not JSON: {err})") from None
    parse(raw, f"{what} {path}")
    return raw


def read(path: str | Path, what: str = "tokenizer file") -> dict:
    """A tokenizer file's fields, checked, with "ranks" as bytes."""
    return parse(read_raw(path, what), f"{what} {path}")


def parse(raw: dict, what: str) -> dict:
    """Check a tokenizer's fields as written and decode its ranks; `what` starts the error message."""
    try:
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ValueError("it does not say format: lm-pretrain-tokenizer")
        if raw.get("version") != 1:
            raise ValueError(f"version {raw.get('version')!r}; this code reads version 1")
        ranks = [base64.b64decode(token, validate=True) for token in raw["ranks"]]
        if ranks[:256] != [bytes([b]) for b in range(256)] or len(set(ranks)) != len(ranks):
            raise ValueError("its first 256 tokens are not the single bytes, or a token repeats")
        if raw["special_tokens"] != {EOT_TEXT: len(ranks)}:
            raise ValueError(f"its special tokens are not {EOT_TEXT} = {len(ranks)}")
        if not isinstance(raw["pattern"], str) or not isinstance(raw["name"], str):
            raise ValueError("pattern and name must be strings")
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{what} is not a tokenizer file of this project ({err})") from None
    return {**raw, "ranks": ranks}
