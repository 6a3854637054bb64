"""lm_pretrain.utils.files: a file or folder is replaced whole (also on a full disk), a killed write's
leftovers are removed, and an output folder is checked before any work."""

import os
import socket
import subprocess
import sys

import pytest
import torch

from lm_pretrain.training.checkpoints import AtomicCheckpointIO
from lm_pretrain.utils.errors import UserError
from lm_pretrain.utils.files import check_can_create, done_with, partial_path, publish, remove_orphans, write_atomically


def test_publish_replaces_a_folder_whole(tmp_path):
    target, staged = tmp_path / "last.ckpt", tmp_path / ".last.ckpt.partial"
    target.mkdir()
    (target / "old").write_text("old")
    staged.mkdir()
    (staged / "new").write_text("new")
    publish(staged, target)
    assert [p.name for p in target.iterdir()] == ["new"] and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_publish_puts_a_new_folder_in_place_and_clears_a_leftover_old_copy(tmp_path):
    target, staged = tmp_path / "data", tmp_path / ".data.partial"
    (tmp_path / ".data.old").mkdir()  # left by a run killed between its two renames
    staged.mkdir()
    (staged / "index.json").write_text("{}")
    publish(staged, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"] and (target / "index.json").read_text() == "{}"


def test_check_can_create_refuses_files_in_the_way_and_unwritable_parents(tmp_path):
    check_can_create(tmp_path / "new" / "deeper", "--output")  # creatable: no error, nothing made
    assert not (tmp_path / "new").exists()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(UserError, match="--output .*a-file: exists and is not a folder"):
        check_can_create(tmp_path / "a-file", "--output")
    with pytest.raises(UserError, match="cannot be created, .*a-file is a file"):
        check_can_create(tmp_path / "a-file" / "below", "--output")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # (root may write anywhere)
            with pytest.raises(UserError, match="is not writable"):
                check_can_create(locked / "run", "--checkpoint.dirpath")
    finally:
        locked.chmod(0o700)


def test_write_atomically_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"old")

    def broken(f):
        f.write(b"half")
        raise RuntimeError("killed halfway")

    with pytest.raises(RuntimeError, match="halfway"):
        write_atomically(path, broken)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]
    write_atomically(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_a_full_disk_is_one_line_and_leaves_the_old_checkpoint(small_disk):
    path = small_disk / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.zeros(1000)}, path)
    with pytest.raises(UserError, match=r"no space left to write .*last.ckpt: it needs ~2 MiB, 1,0\d\d KiB are free there; the previous last.ckpt is kept"):
        AtomicCheckpointIO().save_checkpoint({"step": 2, "w": torch.zeros(500_000)}, path)  # 2 MB
    assert torch.load(path, weights_only=True)["step"] == 1 and [p.name for p in small_disk.iterdir()] == ["last.ckpt"]


def test_orphans_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".last.ckpt.partial-{dead.stdout.strip()}@{host}"
    old_style = tmp_path / f".data.partial-{dead.stdout.strip()}"  # no host: this machine's
    other_machine = tmp_path / f".last.ckpt.partial-{dead.stdout.strip()}@another-host"
    live = partial_path(tmp_path / "last.ckpt")  # this process is writing it
    reused_pid = tmp_path / f".best.ckpt.partial-{os.getpid()}@{host}"  # a killed run's, with this pid again
    for path in (orphan, other_machine, live, reused_pid, tmp_path / "last.ckpt"):
        path.write_bytes(b"x")
    old_style.mkdir()
    assert sorted(remove_orphans(tmp_path)) == sorted([orphan, old_style, reused_pid])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other_machine.name, "last.ckpt"])
    done_with(live)


@pytest.mark.slow
def test_a_training_run_on_a_full_disk_ends_in_one_line(small_disk, prepared, tmp_path):
    from helpers import one_line_error, run_cli, train_args

    done = run_cli([*train_args(prepared, max_steps=3), "--checkpoint.every_n_train_steps", "2",
                    "--trainer.logger.init_args.save_dir", str(small_disk / "runs")], cwd=tmp_path)
    line = one_line_error(done)
    assert "no space left to write" in line and "last.ckpt: it needs ~" in line and "nothing was written" in line, line
    assert not [p for p in small_disk.rglob("*") if "partial" in p.name or p.suffix == ".ckpt"]


def test_publish_without_an_atomic_swap_moves_the_old_copy_aside_first(tmp_path, monkeypatch):
    """Where renameat2's exchange is missing (another system, a network file system): two renames,
    the old copy out of the way first; what is left after either is whole."""
    from lm_pretrain.utils import files

    target, staged = tmp_path / "data", tmp_path / ".data.partial-1@host"
    target.mkdir()
    (target / "x").write_text("old")
    staged.mkdir()
    (staged / "x").write_text("new")
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    files.publish(staged, target)
    assert (target / "x").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    monkeypatch.undo()
    staged.mkdir()
    (staged / "x").write_text("newer")
    files.publish(staged, target)  # the atomic swap: the old copy ends at the staged name, then goes
    assert (target / "x").read_text() == "newer" and sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_an_output_that_is_contains_or_lies_inside_an_input_is_refused(tmp_path):
    from lm_pretrain.utils.files import refuse_output_over_inputs

    (tmp_path / "corpus" / "deep").mkdir(parents=True)
    (tmp_path / "corpus" / "a.txt").write_text("text")
    (tmp_path / "alias").symlink_to(tmp_path / "corpus")
    inputs = {"INPUT": [str(tmp_path / "corpus"), None, "s3://bucket/data"], "--tokenizer": "gpt2"}
    for output, relation in ((tmp_path / "corpus", "is"), (tmp_path / "corpus" / "deep" / "out", "lies inside"),
                             (tmp_path, "contains"), (tmp_path / "alias", "is"), (tmp_path / "alias" / "x", "lies inside")):
        with pytest.raises(UserError, match=f"^--output {output} {relation} {tmp_path / 'corpus'}, one of its inputs "
                                            r"\(INPUT\): a command never writes over what it reads"):
            refuse_output_over_inputs(output, inputs)
    # a symlinked input is compared by what it points to, and named as given
    with pytest.raises(UserError, match=rf"is {tmp_path / 'alias'} \({tmp_path / 'corpus'}\)"):
        refuse_output_over_inputs(tmp_path / "corpus", {"INPUT": str(tmp_path / "alias")})
    for output in (tmp_path / "elsewhere", tmp_path / "corpus-2", "s3://bucket/data"):  # a sibling, a prefix, remote
        refuse_output_over_inputs(output, inputs)
    # a writer of top-level files only (checkpoints): "contains" counts only so many levels down
    refuse_output_over_inputs(tmp_path, {"--data.data_dir": str(tmp_path / "corpus")}, contains_depth=0)
    refuse_output_over_inputs(tmp_path, {"--model.init_from": str(tmp_path / "corpus" / "a.txt")}, contains_depth=1)
    with pytest.raises(UserError, match="contains"):
        refuse_output_over_inputs(tmp_path / "corpus", {"--model.init_from": str(tmp_path / "corpus" / "a.txt")},
                                  contains_depth=1)
