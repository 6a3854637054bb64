"""What a prepared dataset is: its layout, its metadata.json, and the checks that it is intact.

`lm-pretrain-prepare` writes it; the data module reads it. A prepared dataset is a folder
(or an s3://bucket/prefix holding the same files):

    train/, val/      litdata chunks of token ids (TokensLoader format: each split one long stream,
                      documents in a seeded random order, each followed by the end-of-text token)
                      and litdata's index.json
    metadata.json     format, tokenizer, vocab_size, eot_id, dtype; documents, tokens and UTF-8 bytes
                      of text per split; every shard's name, size and sha256; the sources with
                      their sha256

A folder appears only when complete (built in a hidden sibling and renamed into place); in object
storage metadata.json is uploaded last, so a prefix without it is not a dataset.
"""

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from lm_pretrain.data import storage
from lm_pretrain.utils.assets import sha256_file
from lm_pretrain.utils.errors import UserError

METADATA_FILE = "metadata.json"
METADATA_FORMAT = 2  # 2 added each split's UTF-8 bytes (for bits per byte) and text_key
READABLE_FORMATS = (1, 2)
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)  # uint16 halves the shards


def read_index(split_dir: Path) -> tuple[int, int]:
    """(documents, tokens) recorded in a litdata index.json written with TokensLoader."""
    chunks = json.loads((split_dir / "index.json").read_text())["chunks"]
    return sum(c["chunk_size"] for c in chunks), sum(c["dim"] for c in chunks)


def shard_checksums(split_dir: Path) -> list[dict]:
    """Name, size and sha256 of every file of a split (chunks and index.json), hashed on all cores
    (hashlib lets go of the GIL while it hashes)."""
    files = [f for f in sorted(split_dir.iterdir()) if f.is_file()]
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        digests = list(pool.map(sha256_file, files))
    return [{"file": f.name, "bytes": f.stat().st_size, "sha256": digest} for f, digest in zip(files, digests)]


def verify_shards(data_dir: Path | str, metadata: dict, checksums: bool = True,
                  storage_options: dict | None = None) -> None:
    """UserError if a shard is missing, truncated or (with checksums) corrupted.

    In object storage the sizes come from one listing and checksums are not computed: that would
    download the whole dataset before the first step (litdata streams it during training instead).
    """
    remote = storage.ObjectStore(str(data_dir), storage_options) if storage.is_remote(data_dir) else None
    remote_sizes = remote.sizes() if remote else {}
    for split in SPLITS:
        for shard in metadata["shards"][split]:
            if remote:
                where, size = f"{remote.url}/{split}/{shard['file']}", remote_sizes.get(f"{split}/{shard['file']}")
            else:
                path = Path(data_dir) / split / shard["file"]
                where, size = str(path), path.stat().st_size if path.is_file() else None
            if size is None:
                raise UserError(f"{where} is missing; prepare the data again")
            if size != shard["bytes"]:
                raise UserError(f"{where} has {size} bytes, expected {shard['bytes']} (truncated "
                                f"or rewritten); prepare the data again")
            if checksums and not remote and sha256_file(path) != shard["sha256"]:
                raise UserError(f"{where} does not match its sha256 in metadata.json (corrupted); prepare the data again")


def load_metadata(data_dir: Path | str, storage_options: dict | None = None) -> dict:
    """The metadata of a prepared dataset (a folder or an s3:// prefix), or a UserError saying what
    is wrong with it."""
    if storage.is_remote(data_dir):
        store = storage.ObjectStore(str(data_dir), storage_options)
        raw = store.read(METADATA_FILE)
        if raw is None:
            raise UserError(f"{store.url} is not a prepared dataset (no {METADATA_FILE}); create it with "
                            f"lm-pretrain-prepare ... --output {store.url}")
        metadata = parse_metadata(raw, f"{store.url}/{METADATA_FILE}")
        names = store.sizes()
        for split in SPLITS:
            if f"{split}/index.json" not in names:
                raise UserError(f"{store.url}/{split} is missing or has no index.json; prepare the data again")
        return metadata
    path = Path(data_dir) / METADATA_FILE
    if not Path(data_dir).is_dir():
        raise UserError(f"data folder {data_dir} does not exist; create it with lm-pretrain-prepare")
    if not path.is_file():
        raise UserError(f"{data_dir} is not a prepared dataset (no {METADATA_FILE}); "
                        f"create it with lm-pretrain-prepare")
    metadata = parse_metadata(path.read_bytes(), str(path))
    for split in SPLITS:
        if not (Path(data_dir) / split / "index.json").is_file():
            raise UserError(f"{data_dir}/{split} is missing or has no index.json; prepare the data again")
    return metadata


def parse_metadata(text: str | bytes, where: str) -> dict:
    """metadata.json's content, checked; `where` names it in errors."""
    try:
        metadata = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{where} is not valid JSON") from None
    if not isinstance(metadata, dict) or metadata.get("format") not in READABLE_FORMATS or "shards" not in metadata:
        raise UserError(f"{where} is not metadata this version of lm_pretrain understands")
    return metadata
