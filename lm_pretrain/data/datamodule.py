"""LightningDataModule over the token shards written by `lm_pretrain.data.prepare`.

Each sample is a window of block_size + 1 consecutive tokens (litdata's TokensLoader cuts the token
stream into non-overlapping windows); a batch of windows becomes inputs x = window[:-1] and
targets y = window[1:], so every position is trained to predict the token that follows it.

The shards may be a folder or an s3:// prefix in object storage (streamed and cached locally by
litdata), and several prepared datasets can be mixed with weights (`mixture`).
"""

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch
from litdata import CombinedStreamingDataset

from lm_pretrain.data import built_in, storage
from lm_pretrain.data.prepared import load_metadata, verify_shards
from lm_pretrain.model.loss import IGNORE_INDEX
from lm_pretrain.utils import ranges
from lm_pretrain.utils.errors import UserError
from lm_pretrain.utils.ranges import Context, NonNegativeWorkers, PositiveInt, Seed

log = logging.getLogger("lm_pretrain.data.datamodule")

MIXTURE_KEYS = ("data_dir", "weight")
PADDING = -1  # the token id of a padding window (EvenSplit), which no tokenizer has


@dataclass
class PreparedData:
    """One prepared dataset to read: where it is, its share of the training samples, its metadata."""

    location: str  # a folder, or s3://bucket/prefix
    weight: float = 1.0
    metadata: dict | None = None

    def split(self, name: str) -> str:
        """Where the split's shards are (pathlib would turn s3://b/p into s3:/b/p)."""
        if storage.is_remote(self.location):
            return f"{self.location.rstrip('/')}/{name}"
        return str(Path(self.location) / name)


class WeightedMixture(CombinedStreamingDataset):
    """litdata's weighted mix of datasets, given a length: the most sequences an epoch could hold.

    (An epoch ends as soon as any dataset runs out, so it is usually shorter.) The length is for
    Lightning, which reads one batch ahead from loaders that have none; a checkpoint then records the
    loader one batch past the last one trained on, and the resumed run would skip that batch.
    """

    def get_len(self, num_workers: int, batch_size: int) -> int:
        super().get_len(num_workers, batch_size)  # keeps num_workers and batch_size
        return self._get_total_length()


class EvenSplit(torch.utils.data.IterableDataset):
    """Validation windows dealt round-robin to the processes, each process getting as many.

    Every forward pass of a sharded model is a collective: if one process ran more validation
    batches than another, the others would wait for it forever. (litdata gives the windows that do
    not divide evenly all to the last process.) Process r of N reads windows r, r + N, r + 2N, ...,
    padded at the end with windows of PADDING (no loss, not counted: `inputs_and_targets`), so N
    processes evaluate exactly the windows one process would, in the same order.

    Several val splits (a mixture) are interleaved in proportion to their sizes, the same way every
    time. DataLoader workers take whole batches in turn, so batches arrive in the same order as
    with none. `limit` keeps the first that many windows (of all processes together): the windows a
    single process would score, whatever the number of processes.
    """

    def __init__(self, datasets: list, batch_size: int, window: int, limit: int | None = None,
                 replicas: tuple[int, int] | None = None):
        super().__init__()
        self.datasets, self.batch_size, self.window, self.limit = datasets, batch_size, window, limit
        self.replicas = replicas  # (this replica, replicas); None: each process is one (torch.distributed's)
        self._sizes: list[int] | None = None

    @property
    def sizes(self) -> list[int]:
        """Windows in each dataset, all processes together (a StreamingDataset's len() is one process's share)."""
        if self._sizes is None:
            self._sizes = [windows_in(d) for d in self.datasets]
        return self._sizes

    def order(self) -> np.ndarray:
        """(dataset, window) pairs of every window in reading order: window k of n sits at (k + 0.5) / n."""
        pairs = np.concatenate([np.stack([np.full(n, d), np.arange(n)], axis=1) for d, n in enumerate(self.sizes)])
        keys = np.concatenate([(np.arange(n) + 0.5) / n for n in self.sizes])
        return pairs[np.argsort(keys, kind="stable")][:self.limit]

    def __len__(self) -> int:
        return math.ceil(min(sum(self.sizes), self.limit or math.inf) / (self.replicas or _rank_and_world())[1])

    def __iter__(self):
        rank, world = self.replicas or _rank_and_world()
        worker = torch.utils.data.get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        mine, length = self.order()[rank::world], len(self)
        for start in range(worker_id * self.batch_size, length, workers * self.batch_size):
            for i in range(start, min(start + self.batch_size, length)):
                if i < len(mine):
                    yield self.datasets[mine[i][0]][int(mine[i][1])].to(torch.int32)
                else:  # padding: this process has run out of windows
                    yield torch.full((self.window,), PADDING, dtype=torch.int32)


def windows_in(dataset) -> int:
    """How many windows a StreamingDataset holds in all (read on a copy: the original opens its own
    reader in whichever process uses it)."""
    counter = copy.copy(dataset)
    counter.cache = None
    counter[0]  # opens the index
    return sum(i.roi_end_idx - i.roi_start_idx for i in counter.cache.get_chunk_intervals())


def data_replicas(trainer) -> tuple[int, int]:
    """(this process's replica, how many): the processes that read different data. Each process is
    one, except under tensor parallelism, where a group of processes computes on the same batches
    (Lightning's distributed_sampler_kwargs say so for every strategy)."""
    kwargs = getattr(getattr(trainer, "strategy", None), "distributed_sampler_kwargs", None) or {}
    return kwargs.get("rank", 0), kwargs.get("num_replicas", 1)


class ReplicaLoader:
    """Reads litdata's training datasets per data replica, not per process (litdata counts the
    processes of torch.distributed; its maintainers' way is to set a dataset's distributed_env, and
    its loader reads the world size once more when it restores its state)."""

    def __init__(self, replica: int, replicas: int, nodes: int):
        from litdata.utilities.env import _DistributedEnv

        self.env = _DistributedEnv(world_size=replicas, global_rank=replica, num_nodes=nodes)

    def apply(self, datasets: list) -> None:
        for dataset in datasets:
            dataset.distributed_env = self.env

    def restoring(self):
        """A context in which the loader's load_state_dict sees the replicas as its world."""
        from unittest import mock

        import litdata.streaming.dataloader as dataloader

        return mock.patch.object(dataloader._DistributedEnv, "detect", lambda *args, **kwargs: self.env)


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class TokenDataModule(L.LightningDataModule):
    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: PositiveInt = 8,
        block_size: Context | None = None,
        num_workers: NonNegativeWorkers = 0,
        seed: Seed = 42,
        verify: Literal["sha256", "size", "none"] = "sha256",
        mixture: list[dict] | None = None,
        storage_options: dict | None = None,
        cache_dir: str | None = None,
    ):
        """
        Args:
            data_dir: a folder written by `lm-pretrain-prepare`, or the s3://bucket/prefix it was
                uploaded to (streamed from there). data/shakespeare and data/shakespeare-bpe2k,
                the built-in corpus with GPT-2's tokenizer and with a 2,048-token one of its own, are
                prepared on first use; any other folder must exist.
            batch_size: sequences per batch on each device.
            block_size: tokens per sequence; empty means the model's block_size.
            num_workers: DataLoader worker processes per device (0 reads in the training process).
            seed: seed of the shuffle of training windows (and of the draws between mixed datasets).
            verify: check the shards against metadata.json before training: "sha256" (sizes and
                checksums, once per machine; ~1 s per GB), "size" (sizes only), or "none". Data in
                object storage is checked by size only: checksums would mean downloading it all first.
            mixture: several prepared datasets to train on at once, instead of data_dir: a list of
                {data_dir: FOLDER_OR_S3_URL, weight: W}, e.g. in YAML
                `mixture: [{data_dir: data/a, weight: 0.7}, {data_dir: data/b, weight: 0.3}]`. Each
                training sequence comes from one dataset, drawn at random in proportion to the weights
                (normalised to sum to 1); an epoch ends when any dataset runs out, and the next one
                reshuffles them all. Validation reads every dataset's val split, interleaved in a fixed
                order, each in proportion to its size. All must share one tokenizer.
            storage_options: for data in object storage: boto3 client arguments, e.g.
                {"endpoint_url": "http://127.0.0.1:9000"} for MinIO or another S3-compatible store.
                Credentials and the rest come from the usual AWS_* environment variables
                (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, ...)
                or ~/.aws; keep secrets there, not here: these options are saved with the run's config
                and checkpoints.
            cache_dir: where shards streamed from object storage are cached; empty means litdata's
                default ($LITDATA_CACHE_DIR, else ~/.lightning/chunks). Each dataset URL and version
                gets its own subfolder, so a dataset prepared again is never read from a stale copy.
        """
        super().__init__()
        # block_size stays out: Lightning merges these with the model's and refuses two values.
        self.save_hyperparameters(ignore=["block_size"])
        self.hparams.update(ranges.plain(dict(self.hparams)))
        ranges.check(TokenDataModule.__init__, {"batch_size": batch_size, "block_size": block_size,
                                                "num_workers": num_workers, "verify": verify, "seed": seed}, "data")
        if mixture is not None and data_dir is not None:
            raise UserError("give data.data_dir or data.mixture, not both")
        if mixture is None and data_dir is None:
            raise UserError(f"data.data_dir is not set: prepare a corpus with lm-pretrain-prepare and pass "
                            f"--data.data_dir DIR (or --data.data_dir {built_in.DEFAULT_DATA_DIR}, the built-in corpus)")
        self.sources = parse_mixture(mixture) if mixture is not None else [PreparedData(data_dir)]
        for source in self.sources:  # now, before the Trainer creates run folders
            local = not storage.is_remote(source.location)
            if local and not built_in.is_built_in(source.location) and not Path(source.location).is_dir():
                raise UserError(f"data folder {source.location} does not exist; create it with lm-pretrain-prepare")
        self.batch_size, self.block_size, self.num_workers, self.seed = ranges.plain((batch_size, block_size, num_workers,
                                                                                     seed))
        self.verify, self.storage_options, self.cache_dir = verify, storage_options, cache_dir
        self._replica_loader: ReplicaLoader | None = None

    def tokenizer_vocab_size(self) -> int:
        """How many token ids the data's tokenizer has, from its metadata.json (the first dataset's: a
        mixture shares one tokenizer, checked in `setup`), without preparing anything: a built-in
        folder not made yet has its tokenizer's known size. train.py gives the model this vocab_size
        when none is set."""
        source = self.sources[0]
        if built_in.missing(source.location):
            return built_in.vocab_size(source.location)
        return load_metadata(source.location, self.storage_options)["vocab_size"]

    def prepare_data(self) -> None:
        # Runs once per machine, before `setup`. Only the built-in folders are ever created for the
        # user: a folder they named that does not exist is an error (raised in `__init__`).
        for source in self.sources:
            built_in.make_if_missing(source.location)
        for source in self.sources:  # hashing is slow: once per machine, here
            if self.verify == "sha256" and not storage.is_remote(source.location) and Path(source.location).is_dir():
                verify_shards(source.location, load_metadata(source.location), checksums=True)

    def setup(self, stage: str) -> None:
        from litdata import StreamingDataset, TokensLoader

        for source in self.sources:
            source.metadata = load_metadata(source.location, self.storage_options)
            if self.verify != "none":  # every process: sizes are cheap to check
                verify_shards(source.location, source.metadata, checksums=False, storage_options=self.storage_options)
        self.check_same_tokenizer()
        val = [source.metadata["splits"]["val"] for source in self.sources]
        # bytes of text per token of the val splits, for bits per byte (datasets prepared before
        # metadata format 2 did not count bytes: no bpb for them)
        self.val_bytes_per_token = sum(v["bytes"] for v in val) / sum(v["tokens"] for v in val) \
            if all("bytes" in v for v in val) else None
        model = self.trainer.lightning_module if self.trainer is not None else None
        if model is not None:
            model.adopt_tokenizer(self.sources[0].metadata, self.sources[0].location)
            self.check_compatible(model.config.vocab_size, model.config.block_size)
        if self.block_size is None:
            if model is None:
                raise UserError("data.block_size is not set and there is no model to take it from")
            self.block_size = model.config.block_size
        if any(storage.is_remote(source.location) for source in self.sources):
            storage.let_litdata_use_http_endpoints()

        def dataset(source: PreparedData, split: str, shuffle: bool) -> StreamingDataset:
            tokens = source.metadata["splits"][split]["tokens"]
            if tokens < self.block_size + 1:
                raise UserError(f"{source.split(split)} holds {tokens} tokens, fewer than one sequence of "
                                f"block_size + 1 = {self.block_size + 1}; use more text or a smaller block_size")
            # Validation reads windows by index (EvenSplit), so litdata's split between processes
            # (and its drop_last) only applies to training, where every process gets as many.
            return StreamingDataset(source.split(split), item_loader=TokensLoader(block_size=self.block_size + 1),
                                    shuffle=shuffle, seed=self.seed, drop_last=True if shuffle else None,
                                    storage_options=storage.litdata_options(self.storage_options),
                                    cache_dir=self.cache_dir)

        # Validation goes through every val split, the same windows in the same order each time. The
        # Trainer's limit_val_batches counts one process's batches: here it counts all processes'
        # windows together, so 1 and N processes score the same windows (val/loss, bits per byte).
        limit = getattr(self.trainer, "limit_val_batches", None)
        replica, replicas = data_replicas(self.trainer)
        self.val_dataset = EvenSplit([dataset(s, "val", shuffle=False) for s in self.sources], self.batch_size,
                                     self.block_size + 1, limit * self.batch_size if isinstance(limit, int) else None,
                                     replicas=(replica, replicas))
        train = [dataset(s, "train", shuffle=True) for s in self.sources]
        # Under tensor parallelism fewer replicas than processes read the training data: each group
        # reads one share, its processes the same batches.
        self._replica_loader = None
        if self.trainer is not None and replicas != self.trainer.world_size:
            self._replica_loader = ReplicaLoader(replica, replicas, self.trainer.num_nodes)
            self._replica_loader.apply(train)
        if stage == "fit":
            self.check_one_batch(train)
        if len(self.sources) == 1:
            self.train_dataset = train[0]
        else:  # each training sequence's dataset is drawn by weight; the epoch ends when one runs out
            self.train_dataset = WeightedMixture(train, weights=[s.weight for s in self.sources], seed=self.seed,
                                                 iterate_over_all=False)

    def check_one_batch(self, train: list) -> None:
        """A train split too small for one batch per process would end `fit` after 0 steps, exit 0 and
        no checkpoint (the loader drops the incomplete batch): refused instead, naming the numbers."""
        processes = data_replicas(self.trainer)[1]
        for source, data in zip(self.sources, train):
            windows = windows_in(data)
            if windows // processes < self.batch_size:
                raise UserError(f"{source.split('train')} holds {windows} windows of block_size + 1 = "
                                f"{self.block_size + 1} tokens, fewer than one batch of data.batch_size "
                                f"{self.batch_size} for each of {processes} process(es): no training step could "
                                f"be taken; use more text, or a smaller data.batch_size or block_size")

    def check_same_tokenizer(self) -> None:
        """Mixed datasets are one token stream to the model: the ids must mean the same everywhere."""
        first = self.sources[0]
        for other in self.sources[1:]:
            for key in ("tokenizer", "tokenizer_sha256", "vocab_size", "eot_id"):
                if other.metadata.get(key) != first.metadata.get(key):
                    raise UserError(f"data.mixture: {other.location} has {key} {other.metadata.get(key)!r} but "
                                    f"{first.location} has {first.metadata.get(key)!r}; the datasets of a mixture must "
                                    f"be prepared with the same --tokenizer")

    def check_compatible(self, vocab_size: int, block_size: int) -> None:
        """Refuse shards the model cannot read: ids beyond its vocabulary, or sequences longer than
        its context. (Their tokenizer is the model's: LanguageModel.adopt_tokenizer.)"""
        for source in self.sources:
            meta, where = source.metadata, source.location
            if meta["vocab_size"] > vocab_size:
                raise UserError(f"{where} has token ids up to {meta['vocab_size'] - 1} but model.vocab_size is "
                                f"{vocab_size}; set model.vocab_size to at least {meta['vocab_size']}")
        if self.block_size is not None and self.block_size > block_size:
            raise UserError(f"data.block_size {self.block_size} is longer than the model's block_size {block_size}")

    def train_dataloader(self):
        from litdata import StreamingDataLoader

        loader = StreamingDataLoader(self.train_dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                                     pin_memory=torch.cuda.is_available(), drop_last=True)
        if self._replica_loader is not None:  # restored with the replicas as its world
            load_state_dict, restoring = loader.load_state_dict, self._replica_loader.restoring

            def load_per_replica(state: dict) -> None:
                with restoring():
                    load_state_dict(state)
            loader.load_state_dict = load_per_replica
        return loader

    def val_dataloader(self):
        # A plain DataLoader: EvenSplit deals the windows to processes and workers itself, and there
        # is no position to save (validation always starts from the top).
        return torch.utils.data.DataLoader(self.val_dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                                           pin_memory=torch.cuda.is_available())

    def on_after_batch_transfer(self, batch: torch.Tensor, dataloader_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Here, on the device: shards store uint16 ids (half the bytes of int32) and cross that way.
        return inputs_and_targets(batch, padded=self.trainer is None or not self.trainer.training)


def inputs_and_targets(windows: torch.Tensor, padded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of block_size + 1 tokens (B, T + 1) -> inputs x = windows[:, :-1] and targets
    y = windows[:, 1:], int64 as embeddings want. With `padded` (validation, EvenSplit), a padding
    window's targets become IGNORE_INDEX (no loss, not counted) and its inputs id 0 (any valid id:
    what they predict is ignored); training windows are never padding."""
    tokens = windows.long()
    x, y = tokens[:, :-1], tokens[:, 1:]
    if padded:
        x, y = x.masked_fill(x == PADDING, 0), y.masked_fill(y == PADDING, IGNORE_INDEX)
    return x, y


def parse_mixture(mixture: list[dict]) -> list[PreparedData]:
    """The datasets of `data.mixture`, each checked: a data_dir, and a positive weight."""
    if not isinstance(mixture, list) or len(mixture) < 1:
        raise UserError("data.mixture must be a list of {data_dir: ..., weight: ...}, one per dataset")
    sources = []
    for i, entry in enumerate(mixture):
        where = f"data.mixture[{i}]"
        if not isinstance(entry, dict):
            raise UserError(f"{where} must be a mapping like {{data_dir: data/mine, weight: 0.5}}, got {entry!r}")
        unknown = sorted(set(entry) - set(MIXTURE_KEYS))
        if unknown:
            raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; expected {' and '.join(MIXTURE_KEYS)}")
        if not isinstance(entry.get("data_dir"), str) or not entry["data_dir"]:
            raise UserError(f"{where} needs a data_dir (a prepared folder or s3:// prefix)")
        weight = entry.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise UserError(f"{where} needs a weight greater than 0, got {weight!r}")
        sources.append(PreparedData(entry["data_dir"], float(weight)))
    locations = [s.location for s in sources]
    if len(set(locations)) != len(locations):
        raise UserError(f"data.mixture names a dataset twice ({locations}); give it one entry with the summed weight")
    return sources
