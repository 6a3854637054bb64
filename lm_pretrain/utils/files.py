"""Writing files and folders so that a reader never meets a half-written one.

Everything is written beside its final place (a hidden sibling, on the same file system) and renamed
into it: a rename within one file system is atomic, a move from another one (say a tmpfs $TMPDIR)
is a copy that a kill can cut short.
"""

import contextlib
import ctypes
import errno
import os
import re
import shutil
import socket
import sys
from pathlib import Path
from typing import BinaryIO, Callable

from lm_pretrain.utils.errors import UserError


def publish(staged: Path, target: Path) -> None:
    """Put the finished file or folder `staged` at `target`, replacing what is there.

    Build into a hidden sibling of `target` (same file system, partial_path), then call this. Where
    the file system can (Linux: ext4, xfs, btrfs, tmpfs ...), the two swap places in one atomic step
    and the old copy, now at the staged name, is deleted: a kill at any point leaves `target` whole,
    old or new, and at most a partial_path orphan for remove_orphans. Elsewhere the old copy is
    moved aside to `.NAME.old` first, and a kill between the two renames leaves it there.
    """
    if (target.exists() or target.is_symlink()) and _exchange(staged, target):
        _remove(staged)  # the old copy
        return
    old = target.with_name(f".{target.name}.old")
    if old.exists() or old.is_symlink():
        _remove(old)
    if target.exists() or target.is_symlink():
        os.replace(target, old)
    os.replace(staged, target)
    if old.exists() or old.is_symlink():
        _remove(old)


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # from <fcntl.h> and <linux/fs.h>


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names of `a` and `b` atomically (Linux renameat2 with RENAME_EXCHANGE); False where
    the system or the file system cannot, so the caller renames in two steps instead."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc 2.28 and later
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False  # not supported here (an old kernel, a network or FUSE file system)
    raise OSError(err, os.strerror(err), str(b))


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


def refuse_output_over_inputs(output: str | Path, inputs: dict[str, object], what: str = "--output",
                              contains_depth: int | None = None) -> None:
    """UserError, before any work, when `output` is, contains or lies inside one of `inputs` (a
    {setting: path or paths} of what the command reads: corpus files and folders, tokenizer file,
    checkpoint, dataset), symlinks followed on both sides. --overwrite replaces an earlier output; it
    never makes a command delete or write into what it reads. Remote (s3://) paths are not compared.
    `contains_depth` limits "contains" to inputs that many levels down (1: directly inside), for an
    output folder whose writer only ever writes its top level; 0 never refuses it."""
    out = Path(output).resolve()
    for setting, paths in inputs.items():
        for given in paths if isinstance(paths, (list, tuple)) else [paths]:
            if given is None or str(given).startswith("s3://") or not Path(given).exists():
                continue
            read = Path(given).resolve()
            depth = read.parents.index(out) + 1 if out in read.parents else None
            contained = depth is not None and (contains_depth is None or depth <= contains_depth)
            relation = ("is" if out == read else "contains" if contained
                        else "lies inside" if read in out.parents else None)
            if relation:
                theirs = "" if str(given) == str(read) else f" ({read})"
                raise UserError(f"{what} {output} {relation} {given}{theirs}, one of its inputs ({setting}): a command "
                                f"never writes over what it reads, with or without --overwrite; choose another {what}")


PARTIAL = re.compile(r"^\.(?P<name>.+)\.partial-(?P<pid>\d+)(?:@(?P<host>.+))?$")  # .NAME.partial-PID@HOST
_IN_FLIGHT: set[Path] = set()  # this process's partial files and folders, being written now


def partial_path(path: str | Path) -> Path:
    """Where `path` is written before it is renamed into place: a hidden sibling naming this process
    and machine, so that remove_orphans never takes another live writer's (on a shared file system,
    from another machine or container). Forget it with done_with(...) once published or removed."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}@{socket.gethostname()}")
    _IN_FLIGHT.add(partial)
    return partial


def done_with(partial: Path) -> None:
    _IN_FLIGHT.discard(partial)


def write_atomically(path: str | Path, write: Callable[[BinaryIO], None], needed_bytes: int | None = None) -> None:
    """Call write(f) on a hidden sibling of `path` and rename it into place once it is complete and
    on disk: `path` is either its old self or the whole new file, whatever happens. A failed write
    leaves nothing behind; a full disk is a UserError naming the path (and `needed_bytes`, the size
    the file would have had, when the caller knows it)."""
    path = Path(path)
    partial = partial_path(path)
    with full_disk_is_one_line(path, needed_bytes):
        try:
            with open(partial, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        finally:
            done_with(partial)


@contextlib.contextmanager
def full_disk_is_one_line(path: str | Path, needed_bytes: int | None = None):
    """Turn a full disk (or quota) while writing `path` into one UserError naming it, what it needed
    (when known), the free space, and that the previous `path` is kept (the writer inside must
    publish only once complete, as write_atomically and publish do)."""
    path = Path(path)
    existed = path.exists()
    try:
        yield
    except UserError:
        raise
    except BaseException as err:
        folder = next((p for p in (path.parent, *path.parents) if p.exists()), Path("/"))
        free = shutil.disk_usage(folder).free
        # Some writers lose the OSError: torch's zip writer, under torch.distributed.checkpoint, raises a
        # RuntimeError ("unexpected pos"), which DCP wraps in its CheckpointException. Such an error with
        # less space left than the file needed is taken for a full disk too.
        lost = isinstance(err, RuntimeError) or type(err).__name__ == "CheckpointException"
        if not _disk_full(err) and not (lost and needed_bytes and free < needed_bytes):
            raise
        needed = f"it needs ~{_size(needed_bytes)}, " if needed_bytes else ""
        kept = f"the previous {path.name} is kept" if existed else "nothing was written"
        raise UserError(f"no space left to write {path}: {needed}{_size(free)} are free there; {kept}") from None


def _size(n_bytes: int) -> str:
    """1 MiB and more in MiB, less in KiB (a results file of 3 KiB is not "~0 MiB")."""
    return f"{n_bytes / 2**20:,.0f} MiB" if n_bytes >= 2**20 else f"{n_bytes / 2**10:,.0f} KiB"


def _disk_full(err: BaseException | None) -> bool:
    """Whether `err` comes from a full disk (or quota), also when re-raised as another error (torch.save
    turns the OSError of its writer into a RuntimeError)."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(err) or "Disk quota exceeded" in str(err):
            return True  # re-raised from a worker process as text
        failures = getattr(err, "failures", None)  # torch.distributed.checkpoint's, per rank
        if isinstance(failures, dict) and any(_disk_full(f) for f in failures.values() if isinstance(f, BaseException)):
            return True
        err = err.__cause__ or err.__context__
    return False


def remove_orphans(folder: str | Path) -> list[Path]:
    """Delete the partial files and folders (partial_path) left in `folder` by writers of this
    machine that were killed, and return them. Another machine's are left alone: its processes
    cannot be seen from here."""
    removed = []
    for entry in Path(folder).glob(".*.partial-*"):
        match = PARTIAL.match(entry.name)
        if not match or (match["host"] or socket.gethostname()) != socket.gethostname():
            continue
        pid = int(match["pid"])
        # (a restarted container can give this process the pid of the one that was killed)
        live = entry in _IN_FLIGHT if pid == os.getpid() else _alive(pid)
        if not live:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
