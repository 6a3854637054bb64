"""Reading documents out of input files: one reader per format, chosen by the file's suffix.

    .txt     the whole file is one document
    .jsonl   one JSON object per line; its "text" field is a document (other fields are ignored);
             blank lines are skipped, CRLF line ends are fine

Text is UTF-8; a byte-order mark at the start of a file is dropped.

A reader yields (byte offset, text) for each document that begins in bytes [start, end) of the
file, and text None for one that is empty or undecodable under errors="skip", so that skipped
documents keep their place in the count: `prepare` scans every file once in the main process, then
its workers re-read byte ranges, and both must number documents the same way. Every problem is a
UserError naming the file (and line).

A new format is one function here and one entry in READERS.
"""

import glob
import json
from pathlib import Path

from lm_pretrain.errors import UserError


def decode(data: bytes, where: str, errors: str) -> str | None:
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


BOM = b"\xef\xbb\xbf"  # the UTF-8 byte-order mark some editors and exporters put first: not text


def read_txt(path: Path, start: int, end: int | None, errors: str):
    with open(path, "rb") as f:
        data = f.read().removeprefix(BOM)
    if b"\x00" in data:
        raise UserError(f"{path}: binary file (NUL bytes); expected UTF-8 text")
    text = decode(data, str(path), errors)
    yield 0, (text if text and text.strip() else None)


def read_jsonl(path: Path, start: int, end: int | None, errors: str):
    with open(path, "rb") as f:
        f.seek(start)
        offset = start
        for line_number, line in enumerate(f, start=1):
            if end is not None and offset >= end:
                return
            here, offset = offset, offset + len(line)
            if here == 0:
                line = line.removeprefix(BOM)
            if not line.strip():
                continue  # blank lines separate nothing in JSON Lines
            # The scan reads from the start, so it can name lines; workers only re-read checked text.
            where = f"{path}:{line_number}" if start == 0 else f"{path} at byte {here}"
            if b"\x00" in line:
                raise UserError(f"{where}: binary data (NUL bytes); expected JSON Lines text")
            raw = decode(line, where, errors)
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


READERS = {".txt": read_txt, ".jsonl": read_jsonl}
SUFFIXES = " or ".join(READERS)


def read_documents(path: Path, start: int = 0, end: int | None = None, errors: str = "strict"):
    """Yield (byte_offset, text) for each document of `path` that begins in [start, end); text None
    for a skipped (empty or undecodable) one."""
    try:
        yield from READERS[path.suffix](path, start, end, errors)
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from None


def find_inputs(patterns: list[str]) -> list[Path]:
    """Files named by paths, folders and globs, sorted and without repeats."""
    files = set()
    for pattern in patterns:
        path = Path(pattern)
        if path.is_file():
            if path.suffix not in READERS:
                raise UserError(f"{path}: unsupported file type {path.suffix!r}; expected {SUFFIXES}")
            files.add(path.resolve())
        elif path.is_dir():
            found = [p for p in path.rglob("*") if p.is_file() and p.suffix in READERS]
            if not found:
                raise UserError(f"{path}: folder holds no {SUFFIXES} files")
            files.update(p.resolve() for p in found)
        elif glob.has_magic(pattern):
            found = [Path(p) for p in glob.glob(pattern, recursive=True)]
            found = [p for p in found if p.is_file() and p.suffix in READERS]
            if not found:
                raise UserError(f"{pattern}: pattern matches no {SUFFIXES} files")
            files.update(p.resolve() for p in found)
        else:
            raise UserError(f"{pattern}: no such file or folder")
    return sorted(files)
