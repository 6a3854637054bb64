"""Turn raw text into litdata token shards: `lm-pretrain-prepare INPUT ... --output DIR`.

INPUT is a file, a folder (searched recursively) or a glob of files in a format of
`lm_pretrain.data.readers` (.txt, JSON Lines plain or compressed, parquet, Hugging Face datasets).
Every document is tokenized and followed by the end-of-text token, so the model sees where
documents stop. Documents, not tokens, are split into train and val, deterministically for a seed,
so no text leaks from one to the other. The output is a prepared dataset (`lm_pretrain.data.prepared`):
it appears only when complete; a killed run leaves no folder that looks finished.

Two passes: the first reads and tokenizes every input (big files in pieces, all cores busy) into
token files in the staging folder, and stops at the first bad input before any shard exists; the
second shuffles the documents across inputs and writes them into litdata shards. At its peak the
staging folder holds the tokens twice (token files and shards: about 2 bytes per GPT-2 token each).

DIR may be `s3://bucket/prefix` (see `lm_pretrain.data.storage`): the dataset is built in a temporary
folder ($TMPDIR), then uploaded with metadata.json last, so the prefix looks finished only once it
is. With --overwrite, the old dataset stays readable while the new one is tokenized and stops being
a dataset (its metadata.json is deleted first) when the upload begins.

Non-UTF-8 bytes: by default a one-line error naming the file and byte offset (`--encoding_errors
strict`); `replace` swaps bad bytes for U+FFFD, `skip` drops the documents that hold them.
Files with NUL bytes are taken to be binary and refused. Empty documents are skipped and counted.
"""

import contextlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from lm_pretrain.utils import assets, ranges
from lm_pretrain.data import storage
from lm_pretrain.utils.errors import UserError
from lm_pretrain.utils.files import (check_can_create, done_with, full_disk_is_one_line, partial_path, publish,
                               refuse_output_over_inputs, remove_orphans)
from lm_pretrain.data.prepared import METADATA_FILE, METADATA_FORMAT, SPLITS, read_index, shard_checksums, token_dtype
from lm_pretrain.utils.ranges import OpenUnitInterval, Seed, Workers
from lm_pretrain.data.readers import (DEFAULT_TEXT_KEY, SURROGATES_REPLACED, EncodingErrors, Input, ReadOptions,
                                  read_documents)
from lm_pretrain.tokenizer.encoding import DEFAULT_TOKENIZER, encode_document, from_record, is_file_spec
from lm_pretrain.tokenizer.encoding import record as tokenizer_record

log = logging.getLogger("lm_pretrain.data.prepare")

ITEM_BYTES = 1 << 20  # documents go to the writing workers in groups of about this much text
PIECE_BYTES = 8 << 20  # the first read cuts big JSON Lines files into pieces of at most this size
CORPORA = {"shakespeare": assets.shakespeare_texts}
Corpus = Literal[tuple(CORPORA)]  # --corpus: one of the names above
# Workers are forked on Linux: spawning re-imports torch and litdata in each (~2 s a worker, twice
# per run), which for small corpora cost 10x the tokenizing. macOS and Windows must spawn.
START_METHOD = "fork" if sys.platform == "linux" else "spawn"


# ---------------------------------------------------------------------------------------------
# The first read: every input read once, in pieces, several at a time, before any shard is written.
# Each document is tokenized as it is read (so it is parsed once) and its tokens, end-of-text
# included, are appended to its piece's token file in the staging folder. Nothing but these files
# and a few numbers per document is kept; the shards are written from the token files afterwards.


@dataclass(frozen=True)
class Settings:
    """What a prepare run was asked for, carried whole from `prepare` to every step and worker."""

    val_fraction: float = 0.05
    tokenizer: dict = dataclasses.field(default_factory=lambda: {"tokenizer": DEFAULT_TOKENIZER})  # tokenizer.record's:
    # read once, so a tokenizer file changed during the run cannot give the workers another one
    workers: int = 1
    seed: int = 0
    chunk_bytes: str = "64MB"
    reading: ReadOptions = ReadOptions()  # the text field or column, and what non-UTF-8 bytes do


@dataclass
class Piece:
    """One piece of an input after the first read."""

    input: int  # which input it belongs to
    tokens_file: str
    tokens: np.ndarray  # tokens of each non-empty document, end-of-text included, in the order read
    text_bytes: np.ndarray  # UTF-8 bytes of each non-empty document's text
    skipped: int  # empty or undecodable documents
    surrogates: int = 0  # lone surrogates (JSON escapes UTF-8 cannot hold) replaced by U+FFFD


def read_piece(job: tuple[int, Input, str, Settings]) -> Piece:
    """Read and tokenize one piece; `job` is (input index, piece, token file, settings)."""
    number, piece, tokens_file, settings = job
    enc = from_record(settings.tokenizer)
    dtype = token_dtype(enc.n_vocab)
    tokens, text_bytes, skipped, counts = [], [], 0, {}
    with open(tokens_file, "wb") as out:
        for batch in text_batches(read_documents(piece, settings.reading, counts)):
            # Parsed a batch at a time, then tokenized: interleaving the two per document evicts the
            # tokenizer's tables from the CPU cache (3 % slower).
            skipped += batch.count(None)
            for text in filter(None, batch):
                # Straight into a NumPy array (a third faster than a list of ints), a long document
                # in segments; "<|endoftext|>" in text is text.
                ids = encode_document(enc, text)
                document = np.empty(len(ids) + 1, dtype=dtype)
                document[:-1], document[-1] = ids, enc.eot_token
                out.write(document.data)
                tokens.append(len(document))
                text_bytes.append(len(text) if text.isascii() else len(text.encode("utf-8")))  # isascii is O(1)
    return Piece(number, tokens_file, np.array(tokens, dtype=np.int64), np.array(text_bytes, dtype=np.int64), skipped,
                 counts.get("surrogates", 0))


def text_batches(texts, batch_chars: int = 4 << 20):
    """Lists of consecutive `texts` (None included) of about `batch_chars` characters."""
    batch, size = [], 0
    for text in texts:
        batch.append(text)
        size += len(text) if text else 0
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def copy_as_jsonl(job: tuple[Input, Path, ReadOptions]) -> int:
    """Write the documents of an input into a plain JSON Lines file ({text_key: text} per line), which
    can be cut into pieces; `job` is (input, path, reading options). Returns the documents skipped
    and the lone surrogates replaced."""
    source, path, reading = job
    skipped, counts = 0, {}
    with open(path, "wb") as out:
        for text in read_documents(source, reading, counts):
            if text is None:
                skipped += 1
            else:
                out.write(json.dumps({reading.text_key: text}, ensure_ascii=False).encode() + b"\n")
    return skipped, counts.get("surrogates", 0)


def read_inputs(inputs: list[Input], folder: Path, settings: Settings) -> tuple[list[Piece], list[str | None]]:
    """Read and tokenize every input, `settings.workers` pieces at a time, into token files in `folder`;
    returns the pieces in input order and each input's sha256 (None for folders and hub datasets)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = [source.path if source.path is not None and source.path.is_file() else None for source in inputs]
    readable, skipped, repaired, workers = list(inputs), [0] * len(inputs), [0] * len(inputs), settings.workers
    with multiprocessing.get_context(START_METHOD).Pool(workers, initializer=leave_ctrl_c_to_the_main_process) \
            if workers > 1 else nullcontext() as pool:
        # An input that cannot be cut (compressed, parquet, datasets, hub) is one piece, tokenized by
        # one worker. When that would leave workers idle, such inputs are first copied into plain
        # JSON Lines (one worker each), which is cut into pieces like any other.
        uncut = [number for number, source in enumerate(inputs) if source.format not in (".jsonl", ".txt")]
        if uncut and sum(len(source.pieces(PIECE_BYTES)) for source in inputs) < workers:
            copies = [(inputs[number], folder / f"copy-{number:06d}.jsonl", settings.reading) for number in uncut]
            counts = pool.map(copy_as_jsonl, copies, chunksize=1) if pool else [copy_as_jsonl(c) for c in copies]
            for number, (_, copy, _), (count, surrogates) in zip(uncut, copies, counts):
                readable[number], skipped[number], repaired[number] = Input(copy), count, surrogates
        pieces = [(number, piece) for number, source in enumerate(readable) for piece in source.pieces(PIECE_BYTES)]
        jobs = [(number, piece, str(folder / f"{i:06d}.tokens"), settings) for i, (number, piece) in enumerate(pieces)]
        if pool:
            reading = pool.map_async(read_piece, jobs, chunksize=1)
            digesting = pool.map_async(_sha256, files, chunksize=1)  # after the pieces: short jobs fill the tail
            read, digests = reading.get(), digesting.get()
        else:
            read, digests = [read_piece(job) for job in jobs], [_sha256(f) for f in files]
    for source, mine, copy_skipped, copy_repaired in zip(inputs, by_input(read, len(inputs)), skipped, repaired):
        mine[0].skipped += copy_skipped  # those left out of its plain copy
        mine[0].surrogates += copy_repaired
        if sum(p.skipped for p in mine):
            log.warning("%s: skipped %d empty or undecodable document(s)", source, sum(p.skipped for p in mine))
    return read, digests


def leave_ctrl_c_to_the_main_process() -> None:
    """In a worker: ignore SIGINT, which Ctrl-C sends to every process of the group. The main process
    stops the workers and removes the partial output (each worker would print a traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def ctrl_c_in_optimize():
    """Ctrl-C while litdata's `optimize` writes shards: a KeyboardInterrupt in this process, the
    workers stopped, so that the partial output is removed on the way out.

    `optimize` installs a SIGINT handler of its own that ends the process with exit status 0 and no
    clean-up (os._exit), leaving a partial folder behind: it is kept from doing so while it runs (its
    module's reference to `signal`; tests/test_prepare.py fails if litdata changes this). The handler
    in force instead raises KeyboardInterrupt in this process; litdata's workers and their helper
    processes, forked from it, inherit it and there pass the signal on to their own children and end
    at once, quietly (a Ctrl-C reaches them all anyway; a SIGINT sent to this process alone reaches
    them through it).
    """
    from litdata.processing import data_processor

    main_pid, previous = os.getpid(), signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame) -> None:
        if os.getpid() == main_pid:
            if callable(previous):
                previous(signum, frame)  # the entry point's handler (lm_pretrain.utils.errors) raises
            raise KeyboardInterrupt
        stop(multiprocessing.active_children())  # in a worker: its own helper processes first
        os._exit(130)

    def stop(processes) -> None:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGINT)
        for process in processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()

    class KeepOurSigint:  # the `signal` module, less SIGINT handlers set by litdata
        def __getattr__(self, name):
            return getattr(signal, name)

        @staticmethod
        def signal(signum, handler):
            return signal.getsignal(signum) if signum == signal.SIGINT else signal.signal(signum, handler)

    theirs = getattr(data_processor, "signal", None)
    if threading.current_thread() is not threading.main_thread() or theirs is not signal or \
            previous in (signal.SIG_IGN, None):
        yield  # signals are the main thread's; litdata changed how it installs its handler; or Ctrl-C is
        return  # ignored here (a command started with & by a shell script) or handled outside Python
    data_processor.signal = KeepOurSigint()
    signal.signal(signal.SIGINT, on_sigint)
    others = set(multiprocessing.active_children())
    _children_die_with_parent(True)
    try:
        yield
    except KeyboardInterrupt:
        stop(list(set(multiprocessing.active_children()) - others))  # litdata's workers
        raise
    finally:
        _children_die_with_parent(False)
        data_processor.signal = theirs
        signal.signal(signal.SIGINT, previous)


_die_with_parent = {"on": False, "registered": False, "parent": 0, "prctl": None}


def _children_die_with_parent(on: bool) -> None:
    """While on, a process forked from this one (or from those) is killed when the process that forked
    it ends (Linux's PR_SET_PDEATHSIG): a worker forked at the moment of a Ctrl-C, not yet known to
    multiprocessing, would otherwise be left waiting on its queue forever."""
    if not sys.platform.startswith("linux"):
        return
    _die_with_parent["on"] = on
    if on and not _die_with_parent["registered"]:
        import ctypes

        _die_with_parent["prctl"] = ctypes.CDLL(None).prctl  # looked up here, not in a child just forked
        os.register_at_fork(before=_note_parent, after_in_child=_set_death_signal)
        _die_with_parent["registered"] = True


def _note_parent() -> None:
    _die_with_parent["parent"] = os.getpid()


def _set_death_signal() -> None:
    if _die_with_parent["on"]:
        _die_with_parent["prctl"](1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != _die_with_parent["parent"]:  # the parent ended before that took effect
            os._exit(130)


def by_input(pieces: list[Piece], n_inputs: int) -> list[list[Piece]]:
    """The pieces of each input (every input has at least one)."""
    grouped = [[] for _ in range(n_inputs)]
    for piece in pieces:
        grouped[piece.input].append(piece)
    return grouped


def _sha256(path: Path | None) -> str | None:
    return assets.sha256_file(path) if path else None


def split_documents(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """For each document, whether it goes to validation: a seeded random `val_fraction` of them, at
    least one, and at least one left for training."""
    if n_docs < 2:
        raise UserError(f"the corpus has {n_docs} non-empty document(s); the train/val split is by "
                        f"document, so give at least 2 (e.g. split one big file into several)")
    n_val = min(max(1, round(val_fraction * n_docs)), n_docs - 1)
    is_val = np.zeros(n_docs, dtype=bool)
    is_val[np.random.default_rng(seed).permutation(n_docs)[:n_val]] = True
    return is_val


def work_items(pieces: list[Piece], numbers: np.ndarray, seed: int) -> list[tuple[np.ndarray, ...]]:
    """The documents `numbers` (global numbers) in a seeded random order, cut into groups of about
    ITEM_BYTES of text: (piece index, first token, tokens) arrays, one triple per group. Shuffling
    documents across inputs here, before they are written, is what makes every chunk of the shards a
    mix of all inputs (litdata shuffles whole chunks, then windows within a chunk)."""
    which = np.repeat(np.arange(len(pieces), dtype=np.int32), [len(p.tokens) for p in pieces])
    tokens = np.concatenate([p.tokens for p in pieces])
    first = np.concatenate([np.cumsum(p.tokens) - p.tokens for p in pieces])  # within its piece's file
    text_bytes = np.concatenate([p.text_bytes for p in pieces])
    order = numbers[np.random.default_rng(seed).permutation(len(numbers))]
    group = np.cumsum(text_bytes[order]) // ITEM_BYTES  # each document's group, in order
    groups = np.split(order, np.flatnonzero(np.diff(group)) + 1)
    return [(which[g], first[g], tokens[g]) for g in groups if len(g)]


class WriteDocuments:
    """litdata `optimize` function: yields the tokens of each document of a work item, read back
    from the token files of the first read.

    A class (not a closure) so that litdata's worker processes can pickle it. Each worker keeps the
    files it reads open, since consecutive documents come from anywhere in the corpus (up to
    MAX_OPEN of them: a big corpus has thousands of pieces, more than a process may open).
    """

    MAX_OPEN = 256

    def __init__(self, pieces: list[Piece], dtype: np.dtype):
        self.files, self.dtype = [p.tokens_file for p in pieces], dtype
        self._open: dict[int, object] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}  # open files stay in the process that opened them

    def __call__(self, item: tuple[np.ndarray, ...]):
        import torch  # loaded already: litdata's workers start from a process that imported litdata

        for piece, first, tokens in zip(*item):
            piece = int(piece)
            if piece not in self._open:
                if len(self._open) == self.MAX_OPEN:
                    self.close()
                self._open[piece] = open(self.files[piece], "rb")
            file = self._open[piece]
            file.seek(int(first) * self.dtype.itemsize)
            yield torch.from_numpy(np.fromfile(file, dtype=self.dtype, count=int(tokens)))

    def close(self) -> None:
        for file in self._open.values():
            file.close()
        self._open.clear()


# ---------------------------------------------------------------------------------------------
# The whole job


def prepare(inputs: list[Input | Path], output: Path | str, val_fraction: OpenUnitInterval = 0.05,
            tokenizer: str = DEFAULT_TOKENIZER, workers: Workers | None = None, seed: Seed = 0, overwrite: bool = False,
            encoding_errors: EncodingErrors = "strict", chunk_bytes: str = "64MB", storage_options: dict | None = None,
            text_key: str = DEFAULT_TEXT_KEY) -> dict:
    """Tokenize `inputs` (readers.Input, or paths of files) into the prepared dataset `output` (a
    folder, or an s3://bucket/prefix, for which `storage_options` are boto3 client arguments);
    returns its metadata."""
    inputs = [source if isinstance(source, Input) else Input(Path(source)) for source in inputs]
    ranges.check(prepare, {"val_fraction": val_fraction, "workers": workers, "seed": seed, "encoding_errors": encoding_errors}, "")
    if not re.fullmatch(r"\d+(\.\d+)?\s*[KMGT]?B", chunk_bytes.strip(), re.IGNORECASE) or not float(
            re.match(r"[\d.]+", chunk_bytes.strip()).group()) > 0:
        raise UserError(f"--chunk_bytes {chunk_bytes!r} is not a size: give one like 64MB, 512KB or 1GB")
    recorded = tokenizer_record(tokenizer)
    from_record(recorded)  # a bad --tokenizer fails now, before any reading
    settings = Settings(val_fraction, recorded, workers or os.cpu_count() or 1, seed, chunk_bytes,
                        ReadOptions(text_key, encoding_errors))
    if storage.is_remote(output):
        store = storage.ObjectStore(str(output), storage_options)
        # Before hours of tokenizing: is the bucket there, are we allowed in, is the place free?
        if store.read(METADATA_FILE) is not None and not overwrite:
            raise UserError(f"output {store.url} already exists; pass --overwrite to replace it")
        with tempfile.TemporaryDirectory(prefix="lm_pretrain-prepare-") as scratch:  # in $TMPDIR
            metadata = build(inputs, Path(scratch) / "data", settings)
            upload_dataset(Path(scratch) / "data", store)
        log.info("uploaded to %s", store.url)
        return metadata
    refuse_output_over_inputs(output, {"INPUT": [source.path for source in inputs],
                                       "--tokenizer": tokenizer if is_file_spec(tokenizer) else None})
    output = Path(output).resolve()
    if output.exists() and not overwrite:
        raise UserError(f"output {output} already exists; pass --overwrite to replace it")
    check_can_create(output, "--output")
    # Built in a hidden sibling folder and renamed into place at the end: `output` either does not
    # exist or is complete; with --overwrite the old one goes only once the new one is finished.
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(output.parent)  # what prepares killed before left
    staging = partial_path(output)
    try:
        with full_disk_is_one_line(output):
            metadata = build(inputs, staging, settings)
            publish(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        done_with(staging)
    log.info("wrote %s", output)
    return metadata


def build(inputs: list[Input], folder: Path, settings: Settings) -> dict:
    """Tokenize `inputs` into `folder` (created; train/, val/, metadata.json); returns the metadata."""
    enc = from_record(settings.tokenizer)
    started = time.perf_counter()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        pieces, digests = read_inputs(inputs, folder / ".tokens", settings)
        n_docs, read_seconds = sum(len(p.tokens) for p in pieces), time.perf_counter() - started
        if n_docs == 0:
            raise UserError("the inputs hold no text (every document is empty or was skipped)")
        # imported only now: litdata (and torch) take seconds to import, which a bad input need not wait
        # for, and the reading workers start lighter without them
        from litdata import TokensLoader, optimize
        is_val = split_documents(n_docs, settings.val_fraction, settings.seed)
        tokens = np.concatenate([p.tokens for p in pieces])
        text_bytes = np.concatenate([p.text_bytes for p in pieces])
        # litdata's default scratch folders ($TMPDIR/chunks, $TMPDIR/data) are wiped by every
        # optimize on the machine; private ones keep parallel runs apart.
        scratch = {"DATA_OPTIMIZER_CACHE_FOLDER": str(folder / ".cache" / "chunks"),
                   "DATA_OPTIMIZER_DATA_CACHE_FOLDER": str(folder / ".cache" / "data")}
        saved_env = {key: os.environ.get(key) for key in scratch}
        os.environ.update(scratch)
        try:
            splits = {}
            for split, numbers in (("train", np.flatnonzero(~is_val)), ("val", np.flatnonzero(is_val))):
                items = work_items(pieces, numbers, settings.seed)
                with ctrl_c_in_optimize():
                    optimize(fn=WriteDocuments(pieces, token_dtype(enc.n_vocab)), inputs=items,
                             output_dir=str(folder / split), chunk_bytes=settings.chunk_bytes,
                             item_loader=TokensLoader(), num_workers=min(settings.workers, len(items)), verbose=False,
                             start_method=START_METHOD, keep_data_ordered=True)  # static work per worker: same shards
                # a worker that died without raising would leave a short index
                written, expected = read_index(folder / split), (len(numbers), int(tokens[numbers].sum()))
                if written != expected:
                    raise RuntimeError(f"{split}: wrote {written} (documents, tokens), expected {expected}")
                splits[split] = {"documents": written[0], "tokens": written[1],
                                 "bytes": int(text_bytes[numbers].sum())}
        finally:
            for key, value in saved_env.items():
                os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    finally:
        shutil.rmtree(folder / ".cache", ignore_errors=True)
        shutil.rmtree(folder / ".tokens", ignore_errors=True)
    metadata = {
        "format": METADATA_FORMAT,
        **{k: v for k, v in settings.tokenizer.items() if k != "tokenizer_file"},
        "vocab_size": enc.n_vocab,
        "eot_id": enc.eot_token,
        "dtype": token_dtype(enc.n_vocab).name,
        "seed": settings.seed,
        "val_fraction": settings.val_fraction,
        "encoding_errors": settings.reading.errors,
        "text_key": settings.reading.text_key,
        "splits": splits,
        "shards": {split: shard_checksums(folder / split) for split in SPLITS},
        "skipped_documents": sum(p.skipped for p in pieces),
        "replaced_surrogates": sum(p.surrogates for p in pieces),
        "sources": [source_entry(source, digest, mine)
                    for source, digest, mine in zip(inputs, digests, by_input(pieces, len(inputs)))],
        # last: a tokenizer of your own, whole (its ranks make it long)
        **{k: v for k, v in settings.tokenizer.items() if k == "tokenizer_file"},
    }
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    seconds = time.perf_counter() - started
    total = sum(s["tokens"] for s in splits.values())
    log.info("prepared %d documents, %d tokens (train %d, val %d) in %.1f s (%.2fM tok/s): read and tokenized "
             "in %.1f s, shards written in %.1f s", n_docs, total, splits["train"]["tokens"], splits["val"]["tokens"],
             seconds, total / seconds / 1e6, read_seconds, seconds - read_seconds)
    if metadata["replaced_surrogates"]:
        log.warning(SURROGATES_REPLACED, metadata["replaced_surrogates"])
    return metadata


def source_entry(source: Input, sha256: str | None, mine: list[Piece]) -> dict:
    """metadata.json's record of an input (`mine`: its pieces): its bytes are the file's size, or for
    folders and hub datasets the UTF-8 bytes of their text."""
    size = source.path.stat().st_size if sha256 else sum(int(p.text_bytes.sum()) for p in mine)
    return {"path": str(source), "sha256": sha256, "bytes": size, "documents": sum(len(p.tokens) for p in mine)}


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
