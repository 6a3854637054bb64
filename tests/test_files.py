"""lm_pretrain.files: a folder is replaced whole, and an output folder is checked before any work."""

import os

import pytest

from lm_pretrain.errors import UserError
from lm_pretrain.files import check_can_create, publish


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
