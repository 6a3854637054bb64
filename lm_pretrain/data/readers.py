"""Reading documents out of inputs: one reader per format.

    .txt                        the whole file is one document
    .jsonl, .jsonl.gz,          one JSON object per line; its text field ("text", or --text_key) is a
    .jsonl.zst, .jsonl.bz2,     document, other fields are ignored; blank lines skipped, CRLF fine;
    .jsonl.xz                   a compressed file must end with its format's end marker (not cut short)
    .parquet                    one document per row, in the text column ("text", or --text_key)
    a folder written by Hugging Face `datasets`' save_to_disk: one document per row, likewise
    --hf_dataset NAME           a dataset of the Hugging Face hub (or a local one load_dataset reads),
                                streamed: nothing is downloaded in full

Text is UTF-8; a byte-order mark at the start of a file is dropped. A reader yields the text of
each document in order, None for one that is empty (or undecodable under errors="skip"), so that
skipped documents are counted. A large JSON Lines file can be read in pieces (`Input.pieces`: byte
ranges, each holding the lines that begin in it), so that one big file keeps several workers busy.
Every problem is a UserError naming the file (and line, row or byte).

A new format is one reader function here and one entry in READERS.
"""

import bz2
import dataclasses
import glob
import gzip
import io
import json
import lzma
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lm_pretrain.utils.errors import UserError
from lm_pretrain.utils.extras import require

log = logging.getLogger("lm_pretrain.data.readers")

_SURROGATE = re.compile("[\ud800-\udfff]")  # halves of UTF-16 pairs: no UTF-8 text holds them alone
SURROGATES_REPLACED = ("replaced %d lone surrogate(s) (JSON escapes \\ud800-\\udfff that are not a pair, which no UTF-8 "
                       "text holds) with U+FFFD")  # the one warning, with counts["surrogates"]
BOM = b"\xef\xbb\xbf"  # the UTF-8 byte-order mark some editors and exporters put first: not text
DEFAULT_TEXT_KEY = "text"
# What to do with bytes that are not UTF-8: fail naming the file and byte, write U+FFFD for them, or
# skip the document that holds them (--encoding_errors of lm-pretrain-prepare).
EncodingErrors = Literal["strict", "replace", "skip"]


@dataclass(frozen=True)
class ReadOptions:
    """How documents are read out of any input: one object for every reader, each using what applies
    to its format."""

    text_key: str = DEFAULT_TEXT_KEY  # the JSON field or table column that holds each document's text
    errors: EncodingErrors = "strict"  # bytes that are not UTF-8 (in .txt and JSON Lines files)


@dataclass(frozen=True)
class Input:
    """One thing to read documents from: a file or folder (`path`), or a hub dataset (`hf_name`)."""

    path: Path | None = None
    hf_name: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    start: int = 0  # a piece of a JSON Lines file: the lines that begin in bytes [start, end)
    end: int | None = None

    @property
    def format(self) -> str:
        if self.hf_name is not None:
            return "hub"
        if self.path.is_dir():
            return "hf-folder"
        name = self.path.name
        return next((suffix for suffix in READERS if name.endswith(suffix)), self.path.suffix)

    def pieces(self, piece_bytes: int) -> list["Input"]:
        """This input as pieces of about `piece_bytes` that can be read independently (a plain JSON
        Lines file cut into byte ranges; any other input is one piece)."""
        size = self.path.stat().st_size if self.format == ".jsonl" else 0
        bounds = list(range(0, size, piece_bytes))[1:]
        return [dataclasses.replace(self, start=a, end=b) for a, b in zip([0, *bounds], [*bounds, None])]

    def __str__(self) -> str:
        if self.hf_name is not None:
            return f"{self.hf_name}" + (f" ({self.hf_config})" if self.hf_config else "") + f" [{self.hf_split}]"
        return str(self.path)


def decode(data: bytes, where: str, errors: EncodingErrors) -> str | None:
    """UTF-8 text of `data`; None when the policy is to skip it. `where` names it in errors."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        if errors == "replace":
            return data.decode("utf-8", errors="replace")
        if errors == "skip":
            return None
        raise UserError(f"{where}: not UTF-8 (byte {err.start}); re-encode it, or pass "
                        f"--encoding_errors replace|skip") from None


def _present(text: str | None) -> str | None:
    return text if text and not text.isspace() else None  # isspace: no copy, unlike strip


# ---------------------------------------------------------------------------------------------
# The readers: each yields the text of each document, or None


def read_txt(source: Input, options: ReadOptions, counts: dict):
    data = source.path.read_bytes().removeprefix(BOM)
    if b"\x00" in data:
        raise UserError(f"{source}: binary file (NUL bytes); expected UTF-8 text")
    yield _present(decode(data, str(source), options.errors))


def _json_lines(lines, where_prefix: str, options: ReadOptions, counts: dict, start: int = 0, end: int | None = None):
    """Texts of JSON Lines from an iterable of byte lines beginning at byte `start`, up to the last
    line that begins before byte `end`. A lone surrogate (an escape like \\ud800 that JSON allows and
    UTF-8 cannot hold) becomes U+FFFD, counted in counts["surrogates"]."""
    offset = start
    for line_number, line in enumerate(lines, start=1):
        here, offset = offset, offset + len(line)
        if end is not None and here >= end:
            break
        if here == 0:
            line = line.removeprefix(BOM)
        if not line or line.isspace():
            continue  # blank lines separate nothing in JSON Lines
        where = f"{where_prefix}:{line_number}" if start == 0 else f"{where_prefix} at byte {here}"
        if b"\x00" in line:
            raise UserError(f"{where}: binary data (NUL bytes); expected JSON Lines text")
        raw = decode(line, where, options.errors)
        if raw is None:
            yield None
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(options.text_key), str):
            raise UserError(f'{where}: each line must be a JSON object with a string "{options.text_key}" field '
                            f'(--text_key chooses the field)')
        text = record[options.text_key]
        if b"\\u" in line and _SURROGATE.search(text):  # only a JSON \\u escape can make one
            text, replaced = _SURROGATE.subn("\ufffd", text)
            counts["surrogates"] = counts.get("surrogates", 0) + replaced
        yield _present(text)


def read_jsonl(source: Input, options: ReadOptions, counts: dict):
    with open(source.path, "rb") as f:
        start = source.start
        if start:  # the line that began before `start` belongs to the piece before
            f.seek(start - 1)
            f.readline()
            start = f.tell()
        yield from _json_lines(f, str(source), options, counts, start, source.end)


def _open_compressed(source: Input):
    """The decompressed bytes of a compressed file, as a file that raises EOFError if the compressed
    data stops before its end marker (a download or copy cut short): gzip, bz2 and xz do so
    themselves; zstandard's own reader would end quietly, so its frames are checked here."""
    if source.format == ".jsonl.gz":
        return gzip.open(source.path, "rb")
    if source.format == ".jsonl.bz2":
        return bz2.open(source.path, "rb")
    if source.format == ".jsonl.xz":
        return lzma.open(source.path, "rb")
    return io.BufferedReader(_ZstdFrames(source.path), buffer_size=1 << 20)


class _ZstdFrames(io.RawIOBase):
    """A .zst file's decompressed bytes, every frame read to its end (several frames follow on, as
    `cat a.zst b.zst` makes); EOFError when the file stops inside a frame."""

    def __init__(self, path: Path):
        import zstandard

        self.file, self.decompressor = open(path, "rb"), zstandard.ZstdDecompressor()
        self.frame, self.in_frame = self.decompressor.decompressobj(), False
        self.pending, self.at = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.at == len(self.pending):
            compressed = self.file.read(1 << 14)  # small: what one read decompresses to stays bounded
            if not compressed:
                if self.in_frame:
                    raise EOFError("the file ends inside a zstd frame (truncated)")
                return 0
            out = []
            while compressed:
                out.append(self.frame.decompress(compressed))
                self.in_frame = not self.frame.eof
                if self.in_frame:
                    break
                compressed = self.frame.unused_data  # the next frame, if any, begins here
                self.frame = self.decompressor.decompressobj()
            self.pending, self.at = b"".join(out), 0
        n = min(len(buffer), len(self.pending) - self.at)
        buffer[:n] = self.pending[self.at:self.at + n]
        self.at += n
        return n

    def close(self) -> None:
        self.file.close()
        super().close()


def read_compressed_jsonl(source: Input, options: ReadOptions, counts: dict):
    try:
        with _open_compressed(source) as f:
            yield from _json_lines(f, str(source), options, counts)
    except UserError:
        raise
    except Exception as err:  # gzip.BadGzipFile, zstd.ZstdError, EOFError: not an archive, or a truncated one
        raise UserError(f"{source}: cannot decompress ({type(err).__name__}: {err})") from None


def _rows(table_batches, source: Input, text_key: str):
    """Texts of the `text_key` column of record batches (pyarrow), one document per row."""
    row = 0
    for batch in table_batches:
        if text_key not in batch.schema.names:
            raise UserError(f"{source}: no column {text_key!r} (columns: {', '.join(batch.schema.names)}); "
                            f"--text_key chooses the column")
        for text in batch.column(text_key).to_pylist():
            row += 1
            if text is not None and not isinstance(text, str):
                raise UserError(f"{source}: row {row} of column {text_key!r} is not text")
            yield _present(text)


def read_parquet(source: Input, options: ReadOptions, counts: dict):
    pq = require("pyarrow.parquet", "data", "reading .parquet files", "pyarrow")

    try:
        parquet = pq.ParquetFile(source.path)
        yield from _rows(parquet.iter_batches(batch_size=1024, columns=None), source, options.text_key)
    except UserError:
        raise
    except Exception as err:  # pyarrow's ArrowInvalid and friends: not a parquet file, corrupt
        raise UserError(f"{source}: not a readable parquet file ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from None


ARROW_STREAM_END = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # Arrow IPC's end-of-stream marker
ARROW_FILE_END = b"ARROW1"  # the magic an Arrow IPC file (not stream) ends with


def check_arrow_ends(file: Path) -> None:
    """UserError unless an Arrow file written by `datasets` ends as a finished one does. pyarrow
    reads a stream cut between two record batches as a shorter, valid one: the rows after the cut
    would be lost without a word."""
    with open(file, "rb") as f:
        f.seek(max(0, file.stat().st_size - 8))
        tail = f.read()
    if not (tail.endswith(ARROW_STREAM_END) or tail.endswith(ARROW_FILE_END)):
        raise UserError(f"{file}: truncated Arrow file (no end-of-stream marker); copy or save the dataset again")


def read_hf_folder(source: Input, options: ReadOptions, counts: dict):
    datasets = require("datasets", "data", "reading a Hugging Face dataset folder")

    for file in sorted(source.path.glob("*.arrow")):
        check_arrow_ends(file)
    try:
        dataset = datasets.load_from_disk(str(source.path))
    except Exception as err:
        raise UserError(f"{source}: not a folder of text files nor a Hugging Face dataset saved with "
                        f"save_to_disk ({type(err).__name__})") from None
    if isinstance(dataset, datasets.DatasetDict):
        raise UserError(f"{source} holds several splits ({', '.join(dataset)}); give the folder of one, "
                        f"e.g. {source.path / next(iter(dataset))}")
    yield from _rows(dataset.data.to_batches(max_chunksize=1024), source, options.text_key)


def read_hf_hub(source: Input, options: ReadOptions, counts: dict):
    datasets = require("datasets", "data", "--hf_dataset")

    text_key = options.text_key
    try:
        dataset = datasets.load_dataset(source.hf_name, source.hf_config, split=source.hf_split, streaming=True)
        first = True
        for row_number, row in enumerate(dataset, start=1):
            if first and text_key not in row:
                raise UserError(f"{source}: no column {text_key!r} (columns: {', '.join(row)}); --text_key chooses it")
            first = False
            text = row.get(text_key)
            if text is not None and not isinstance(text, str):
                raise UserError(f"{source}: row {row_number} of column {text_key!r} is not text")
            yield _present(text)
    except UserError:
        raise
    except Exception as err:  # no network, no such dataset, config or split
        raise UserError(f"--hf_dataset {source}: cannot be read ({type(err).__name__}: "
                        f"{' '.join(str(err).split())[:200]})") from None


READERS = {".txt": read_txt, ".jsonl": read_jsonl, ".jsonl.gz": read_compressed_jsonl,
           ".jsonl.zst": read_compressed_jsonl, ".jsonl.bz2": read_compressed_jsonl, ".jsonl.xz": read_compressed_jsonl,
           ".parquet": read_parquet, "hf-folder": read_hf_folder,
           "hub": read_hf_hub}
FILE_SUFFIXES = tuple(s for s in READERS if s.startswith("."))
SUFFIXES = ", ".join(FILE_SUFFIXES)


def read_documents(source: Input, options: ReadOptions = ReadOptions(), counts: dict | None = None):
    """Yield the text (or None) of each document of `source`; `counts` gathers what was repaired on
    the way ({"surrogates": n})."""
    try:
        yield from READERS[source.format](source, options, {} if counts is None else counts)
    except OSError as err:
        raise UserError(f"{source}: cannot read ({err.strerror or err})") from None


def _is_input_file(path: Path) -> bool:
    return path.is_file() and path.name.endswith(FILE_SUFFIXES)


def _is_hf_folder(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def _input_files_under(folder: Path) -> list[Path]:
    """Every input file under `folder`, following symlinked folders as a user expects (pathlib's rglob
    skips them without a word). A link that leads back into its own ancestry would never end: it is
    refused in one line."""
    found = []

    def walk(directory: Path, ancestors: dict) -> None:
        info = directory.stat()
        identity = (info.st_dev, info.st_ino)
        if identity in ancestors:
            raise UserError(f"{directory}: a symlinked folder that loops back to {ancestors[identity]}; remove the "
                            f"link, or name the folders to read one by one")
        ancestors = {**ancestors, identity: directory}
        try:
            entries = sorted(directory.iterdir())
        except PermissionError:  # e.g. lost+found on a data disk: said, not silently dropped
            log.warning("skipping %s: not readable", directory)
            return
        for entry in entries:
            if entry.is_dir():  # (follows links)
                walk(entry, ancestors)
            elif _is_input_file(entry):
                found.append(entry)

    walk(folder, {})
    return found


def find_inputs(patterns: list[str]) -> list[Input]:
    """The inputs named by paths, folders (searched recursively, symlinked folders followed; a Hugging
    Face dataset folder is one input) and globs, sorted and without repeats."""
    found: set[Path] = set()
    for pattern in patterns:
        path = Path(pattern)
        if path.is_file():
            if not _is_input_file(path):
                raise UserError(f"{path}: unsupported file type; expected {SUFFIXES}, or a dataset folder")
            found.add(path.resolve())
        elif path.is_dir():
            if _is_hf_folder(path):
                found.add(path.resolve())
                continue
            files = _input_files_under(path)
            if not files:
                raise UserError(f"{path}: folder holds no {SUFFIXES} files")
            found.update(p.resolve() for p in files)
        elif glob.has_magic(pattern):
            files = [Path(p) for p in glob.glob(pattern, recursive=True)]
            files = [p for p in files if _is_input_file(p) or (p.is_dir() and _is_hf_folder(p))]
            if not files:
                raise UserError(f"{pattern}: pattern matches no {SUFFIXES} files")
            found.update(p.resolve() for p in files)
        else:
            raise UserError(f"{pattern}: no such file or folder")
    return [Input(path) for path in sorted(found)]
