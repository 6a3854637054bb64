"""Writing folders so that a reader never meets a half-written one."""

import os
import shutil
from pathlib import Path

from lm_pretrain.errors import UserError


def publish(staged: Path, target: Path) -> None:
    """Put the finished folder `staged` at `target`, replacing what is there.

    Build into a hidden sibling of `target` (same file system), then call this: the old copy is
    moved aside before the new one is renamed into place, so a process killed at any point leaves
    either the old folder, the new one, or the old one at `.NAME.old` (never a mix of both).
    """
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    if target.exists() or target.is_symlink():
        os.replace(target, old)
    os.replace(staged, target)
    if old.exists():
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def check_can_create(path: str | Path, what: str) -> None:
    """UserError unless `path` is a folder, or one that can be created (before any work is done):
    `what` names the setting in the message (e.g. "--output")."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path}: exists and is not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{what} {path}: cannot be created, {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: cannot be created, {existing} is not writable")
