import pytest
import torch
from helpers import attach

from lm_pretrain.data import TokenDataModule
from lm_pretrain.errors import UserError


def test_batches_are_shifted_pairs(prepared):
    dm = attach(TokenDataModule(str(prepared), batch_size=4))
    dm.setup("fit")
    assert dm.block_size == 32  # taken from the model
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (4, 33) and batch.dtype == torch.uint16
    x, y = dm.on_after_batch_transfer(batch, 0)
    assert x.dtype == torch.long and x.shape == y.shape == (4, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_val_is_ordered_and_train_shuffled(prepared):
    dm = attach(TokenDataModule(str(prepared), batch_size=2))
    dm.setup("fit")
    first = [b for b in dm.val_dataloader()]
    again = [b for b in dm.val_dataloader()]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other = attach(TokenDataModule(str(prepared), batch_size=2, seed=1))
    other.setup("fit")
    assert not torch.equal(next(iter(dm.train_dataloader())), next(iter(other.train_dataloader())))


def test_refuses_data_the_model_cannot_read(prepared, tmp_path):
    with pytest.raises(UserError, match="model.vocab_size"):
        attach(TokenDataModule(str(prepared)), vocab_size=1000).setup("fit")
    with pytest.raises(UserError, match="tokenized with 'gpt2'.*'r50k_base'"):
        attach(TokenDataModule(str(prepared)), tokenizer="r50k_base").setup("fit")
    with pytest.raises(UserError, match="data.block_size 64 is longer than the model's block_size 32"):
        attach(TokenDataModule(str(prepared), block_size=64)).setup("fit")
    with pytest.raises(UserError, match="fewer than one sequence"):
        attach(TokenDataModule(str(prepared)), block_size=100_000).setup("fit")


def test_named_missing_folder_is_an_error_not_a_download(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="does not exist"):  # at once, before a Trainer makes run folders
        TokenDataModule(str(tmp_path / "nope"))
    assert not (tmp_path / "nope").exists() and not (tmp_path / "data").exists()


def test_default_folder_is_prepared_on_first_use(tmp_path, monkeypatch, corpus):
    from lm_pretrain import assets

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(assets, "shakespeare_texts", lambda: sorted(corpus[0].glob("*.txt")))
    dm = attach(TokenDataModule("data/shakespeare"))
    dm.prepare_data()
    dm.setup("fit")
    splits = dm.sources[0].metadata["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == 12
    assert (tmp_path / "data" / "shakespeare" / "metadata.json").is_file()


def test_bad_arguments():
    with pytest.raises(UserError, match="batch_size"):
        TokenDataModule(batch_size=0)
