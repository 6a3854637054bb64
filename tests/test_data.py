import pytest
import torch
from helpers import attach

from lm_pretrain.data.datamodule import TokenDataModule
from lm_pretrain.utils.errors import UserError


def test_batches_are_shifted_pairs(prepared):
    dm = attach(TokenDataModule(str(prepared), batch_size=4))
    dm.setup("fit")
    assert dm.block_size == 32  # taken from the model
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (4, 33) and batch.dtype == torch.uint16
    x, y = dm.on_after_batch_transfer(batch, 0)
    assert x.dtype == torch.long and x.shape == y.shape == (4, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_padding_windows_become_ignored_targets():
    from lm_pretrain.data.datamodule import PADDING, inputs_and_targets
    from lm_pretrain.model.loss import IGNORE_INDEX

    windows = torch.tensor([[5, 6, 7, 8], [PADDING] * 4], dtype=torch.int32)
    x, y = inputs_and_targets(windows, padded=True)
    assert x.dtype == y.dtype == torch.long
    assert x.tolist() == [[5, 6, 7], [0, 0, 0]] and y.tolist() == [[6, 7, 8], [IGNORE_INDEX] * 3]
    x, y = inputs_and_targets(windows[:1].to(torch.uint16))  # training: never padding, nothing replaced
    assert x.tolist() == [[5, 6, 7]] and y.tolist() == [[6, 7, 8]]


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
    from lm_pretrain.utils import assets

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(assets, "shakespeare_texts", lambda: sorted(corpus[0].glob("*.txt")))
    dm = attach(TokenDataModule("data/shakespeare"))
    assert dm.tokenizer_vocab_size() == 50257 and not (tmp_path / "data").exists()  # known before it is made
    dm.prepare_data()
    dm.setup("fit")
    assert dm.sources[0].metadata["vocab_size"] == dm.tokenizer_vocab_size() == 50257
    splits = dm.sources[0].metadata["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == 12
    assert (tmp_path / "data" / "shakespeare" / "metadata.json").is_file()


def test_own_tokenizer_folder_is_made_on_first_use(tmp_path, monkeypatch, corpus):
    """data/shakespeare-bpe2k (the demo's): a BPE trained on the corpus's train split, then the
    corpus prepared with it; the model takes that tokenizer, which never saw a val document."""
    from lm_pretrain.utils import assets
    from lm_pretrain.tokenizer import bpe
    from lm_pretrain.data.prepare import CORPORA

    monkeypatch.chdir(tmp_path)
    texts = lambda: sorted(corpus[0].glob("*.txt"))  # noqa: E731
    monkeypatch.setattr(assets, "shakespeare_texts", texts)
    monkeypatch.setitem(CORPORA, "shakespeare", texts)
    dm = attach(TokenDataModule("data/shakespeare-bpe2k"), vocab_size=2048)
    assert dm.tokenizer_vocab_size() == 2048 and not (tmp_path / "data").exists()
    dm.prepare_data()
    dm.setup("fit")
    # (this small corpus has fewer merges to learn than asked for: Shakespeare's gives all 2048)
    assert dm.sources[0].metadata["vocab_size"] == dm.tokenizer_vocab_size() <= 2048
    tokenizer = tmp_path / "data" / "tokenizers" / "shakespeare-bpe2k.json"
    meta = dm.sources[0].metadata
    assert meta["tokenizer"] == "shakespeare-bpe2k" and meta["tokenizer_sha256"] == bpe.digest(bpe.read_raw(tokenizer))
    assert dm.trainer.lightning_module.tokenizer_record["tokenizer_sha256"] == meta["tokenizer_sha256"]
    trained_on = bpe.read(tokenizer)["trained_on"]
    assert trained_on["held_out_val"] is not None and trained_on["documents"] == meta["splits"]["train"]["documents"]
    assert meta["splits"]["val"]["documents"] > 0


def test_bad_arguments():
    with pytest.raises(UserError, match="batch_size"):
        TokenDataModule(batch_size=0)
