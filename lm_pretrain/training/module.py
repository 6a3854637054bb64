"""LightningModule: next-token prediction on every position of every sequence.

The loss is the mean cross-entropy of predicting token t+1 from tokens <= t; perplexity is exp of
that mean (the number of equally likely tokens the model is, on average, choosing between).

What is where: the architecture is lm_pretrain.model.config (GPTConfig) and lm_pretrain.model.gpt (GPT maps
tokens to logits), the objective
lm_pretrain.model.loss, optimizers and schedules lm_pretrain.training.optim, sharding and activation checkpointing
lm_pretrain.training.strategies, and the training policy (NaN/inf losses, RNG states on resume) two
callbacks of lm_pretrain.training.callbacks that every run gets. This module ties them to Lightning.

A training step that does not log never waits for the GPU: no value is read back to the host
(`.item()`, `bool(tensor)`, ...) outside log steps, so the CPU can queue the next step's kernels
while the GPU runs this one (tests/test_sync_free.py counts them).
"""

import contextlib
import contextvars
import dataclasses
import inspect
import math
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torchmetrics import Metric

from lm_pretrain.training import checkpoints, optim
from lm_pretrain.utils import ranges
from lm_pretrain.training.callbacks import NonFiniteGuard, RestoreRNG
from lm_pretrain.training.experts import ExpertLoad, balance_group, choose_expert_matmul
from lm_pretrain.utils.errors import UserError
from lm_pretrain.training.hardware import allow_tf32
from lm_pretrain.model.loss import CHUNK_ROWS, IGNORE_INDEX, LossKind, next_token_loss, pick_loss
from lm_pretrain.model.config import GPTConfig, model_size
from lm_pretrain.model import GPT
from lm_pretrain.utils.ranges import (ClosedUnitInterval, Fraction, NonNegativeFloat, NonNegativeInt, OpenUnitInterval,
                                 PositiveFloat, PositiveInt)
from lm_pretrain.training.steps import ends_optimizer_step, is_log_step
from lm_pretrain.training.strategies import materialize, parallelize, total_norm
from lm_pretrain.tokenizer.encoding import DEFAULT_TOKENIZER, from_record
from lm_pretrain.tokenizer.encoding import describe as describe_tokenizer
from lm_pretrain.tokenizer.encoding import record as tokenizer_record
from lm_pretrain.tokenizer.encoding import names as tokenizer_names
from lm_pretrain.tokenizer.encoding import same as tokenizer_same


_NETWORK_ON_META = contextvars.ContextVar("network_on_meta", default=False)


@contextlib.contextmanager
def network_on_meta():
    """LanguageModels made inside this block build their network on the meta device, without memory;
    configure_model then gives each process its shard (strategies.materialize), the same weights as
    a model built whole. train.py builds so under a sharding strategy: no process builds the whole
    model (model.init_from still reads the checkpoint's whole weights in each process). Lightning's
    own way, trainer.init_module(empty_init=True), needs the Trainer before the model; LightningCLI
    makes the model first."""
    token = _NETWORK_ON_META.set(True)
    try:
        yield
    finally:
        _NETWORK_ON_META.reset(token)


def saved_tokenizer(checkpoint: dict) -> dict:
    """A checkpoint's tokenizer record (checkpoints before own tokenizers name theirs in the hparams)."""
    return checkpoint.get("tokenizer") or {
        "tokenizer": checkpoint.get("hyper_parameters", {}).get("tokenizer") or DEFAULT_TOKENIZER}


class MeanLoss(Metric):
    """Mean cross-entropy per target token over many batches, summed across processes.

    Fed each batch's summed loss and its number of targets (padding excluded), rather than logits as
    torchmetrics.text.Perplexity wants: that would run a second log-softmax over the whole vocabulary,
    the costliest op here. Two sums instead of torchmetrics' MeanMetric, whose NaN check reads a
    value back from the GPU on every update, and which drops the weights when the check is off
    (nan_strategy="disable", torchmetrics 1.9; tests/test_module.py keeps watch).
    """

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("loss_sum", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("targets", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, loss_sum: torch.Tensor, targets: torch.Tensor) -> None:
        self.loss_sum += loss_sum.detach()
        self.targets += targets

    def compute(self) -> torch.Tensor:
        return self.loss_sum / self.targets


class LanguageModel(L.LightningModule):
    def __init__(
        self,
        tokenizer: str | None = None,
        learning_rate: PositiveFloat = 6e-4,
        min_lr_ratio: ClosedUnitInterval = 0.1,
        warmup_steps: NonNegativeInt = 100,
        decay_steps: PositiveInt | None = None,
        schedule: optim.Schedule = "cosine",
        decay_fraction: OpenUnitInterval = 0.2,
        weight_decay: NonNegativeFloat = 0.1,
        betas: tuple[Fraction, Fraction] = (0.9, 0.95),
        optimizer: optim.OptimizerName = "adamw",
        muon_lr: PositiveFloat | None = None,
        head_lr: PositiveFloat | None = None,
        z_loss: NonNegativeFloat = 0.0,
        loss: LossKind = "auto",
        compile: bool = False,
        compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default",
        activation_checkpointing: bool = False,
        init_from: str | None = None,
        nonfinite_loss: Literal["stop", "skip"] = "stop",
        nonfinite_check_every: PositiveInt | None = None,
        **architecture,
    ):
        """
        Args:
            tokenizer: empty means the training data's (what it was prepared with: a tiktoken name
                or a tokenizer file of your own, whose copy the data and every checkpoint keep);
                a name (gpt2) or a tokenizer file here must be the data's, or the run stops.
            learning_rate: peak learning rate, reached after warmup.
            min_lr_ratio: the decay ends at learning_rate * min_lr_ratio.
            warmup_steps: optimizer steps of linear warmup from 0.
            decay_steps: optimizer steps from the start to the end of the decay; empty means the
                Trainer's total (max_steps).
            schedule: "cosine" (decay from the end of warmup) or "wsd" (warmup, stable, then a linear
                decay over the last decay_fraction of the steps).
            decay_fraction: with schedule wsd, the fraction of decay_steps spent decaying.
            weight_decay: decay on matrices; never on norms, biases or embeddings.
            betas: AdamW betas.
            optimizer: "adamw" for every parameter, or "muon": Muon (torch.optim.Muon) for the
                blocks' matrices and AdamW for embeddings, head, norms and biases (lm_pretrain.training.optim).
                Muon needs whole matrices: not with the FSDP overlay.
            muon_lr: Muon's learning rate (its updates are scaled to AdamW's size); empty means
                learning_rate.
            head_lr: learning rate of an untied output layer (tie_embeddings false); empty means
                learning_rate.
            z_loss: weight of the z-loss (PaLM: 1e-4), the squared log of the softmax normaliser, which
                keeps the output logits from drifting; 0 turns it off.
            loss: how the loss is computed (lm_pretrain.model.loss): "fused" (the output layer and the loss
                in one step: the same loss and gradients with one logits-sized tensor instead of four, a
                third faster per step on CPUs; not with z_loss or logit_softcap), "chunked" (fused, 4096
                positions at a time: the full logits never exist), "plain", or "auto":
                fused when the model runs eagerly, plain under compile (which fuses it itself) or with
                z_loss or logit_softcap.
            compile: torch.compile the training and validation steps (worth it on GPUs; costs time and
                gains nothing on CPUs). Sampling always runs eagerly.
            compile_mode: torch.compile's mode: "max-autotune" tries kernel variants for each matmul
                (minutes more compilation), "reduce-overhead" adds CUDA graphs (for small models whose
                steps wait on the CPU), "max-autotune-no-cudagraphs" the first without the second.
            activation_checkpointing: recompute each block's activations in the backward pass
                instead of keeping them (~1/3 more compute, much less memory); configs/overlays/fsdp.yaml
                turns it on.
            init_from: a checkpoint (file, or a sharded run's folder) whose weights start this run
                (continued pre-training): the optimizer and schedule start fresh. Its architecture
                must match this config.
            nonfinite_loss: what a NaN/inf training loss does: "stop" ends the run with an error and
                never saves a checkpoint after it (the last good one remains); "skip" drops that
                batch's update and goes on (costs a host sync every step).
            nonfinite_check_every: with "stop", look for a NaN/inf loss every this many optimizer steps
                (and before every checkpoint); empty means on log steps (trainer.log_every_n_steps),
                which read values back from the GPU anyway: other steps never wait for it.
            architecture: the fields of `lm_pretrain.model.gpt.GPTConfig` (vocab_size, block_size,
                n_layer, ...), each a flag of its own: `--model.n_layer 6`.
        """
        super().__init__()
        ranges.check(LanguageModel.__init__, {k: v for k, v in locals().items() if k != "architecture"}, "model")
        try:
            self.config = GPTConfig(**architecture)
        except (TypeError, ValueError) as err:
            raise UserError(f"model: {err}") from None
        # In every checkpoint, the architecture complete (defaults and derived widths included): a
        # checkpoint alone rebuilds the model.
        self.save_hyperparameters(ignore=list(architecture))
        self._tokenizer: dict | None = None  # tokenizer_record's, once known
        # (saved again, whole: the loggers log the initial hyperparameters, now with the architecture)
        self.save_hyperparameters({**ranges.plain(dict(self.hparams)), **dataclasses.asdict(self.config)})
        if head_lr is not None and self.config.tie_embeddings:
            raise UserError("model.head_lr needs an untied output layer: set model.tie_embeddings false")
        self.loss_path  # an impossible loss setting stops here, before any work
        with torch.device("meta") if _NETWORK_ON_META.get() else contextlib.nullcontext():
            self.model = GPT(self.config)
        self.val_loss = MeanLoss()
        self._step_loss: torch.Tensor | None = None  # the summed losses of this optimizer step's micro-batches
        self._step_batches = 0
        self.nonfinite = NonFiniteGuard(nonfinite_loss, nonfinite_check_every)
        self._loss_fn = next_token_loss

    @property
    def tokenizer_record(self) -> dict:
        """The model's tokenizer as datasets and checkpoints record it (tokenizer.record): the
        training data's once adopted, a checkpoint's once loaded, else model.tokenizer's."""
        # (not kept: adopt_tokenizer must tell a tokenizer the model was loaded with from this default)
        return self._tokenizer or tokenizer_record(self.hparams.tokenizer or DEFAULT_TOKENIZER)

    @property
    def encoding(self):
        """The tiktoken encoding that turns text into this model's token ids and back."""
        return from_record(self.tokenizer_record)

    def adopt_tokenizer(self, data: dict, where: str) -> None:
        """The model's tokenizer is its training data's (`data`: the metadata of the dataset at
        `where`). One rule: if the model already has one, the checkpoint's it was loaded with, or
        else names one in model.tokenizer (a tiktoken name or a tokenizer file), it must be the
        data's (tokenizer.encoding.names), or the run stops with one line."""
        theirs = {k: data[k] for k in ("tokenizer", "tokenizer_sha256", "tokenizer_file") if data.get(k) is not None}
        mine = self._tokenizer or self.hparams.tokenizer
        if mine is not None and not tokenizer_names(mine, theirs):
            raise UserError(f"{where} was tokenized with {describe_tokenizer(theirs)} but the model's tokenizer is "
                            f"{describe_tokenizer(mine)} (model.tokenizer, or a resumed run's checkpoint's); prepare the "
                            f"data with that tokenizer, or leave model.tokenizer empty to use the data's")
        # (model.tokenizer itself stays as given: loggers have logged it, and MLflow refuses a changed
        # value when a resumed run logs it again; checkpoints carry the tokenizer used, on_save_checkpoint)
        self._tokenizer = theirs

    def check_tokenizer_of(self, saved: dict, what: str) -> None:
        """Refuse a checkpoint (resumed from, or init_from) of another tokenizer than the data's."""
        theirs = saved_tokenizer(saved)
        if not tokenizer_same(theirs, self.tokenizer_record):
            raise UserError(f"{what} was trained with tokenizer {describe_tokenizer(theirs)} but the data was prepared "
                            f"with {describe_tokenizer(self.tokenizer_record)}; token ids would mean other text")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["tokenizer"] = self.tokenizer_record  # with a tokenizer file of your own, a copy of it

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu") -> "LanguageModel":
        """The LanguageModel saved at `path` (a file or a sharded folder), in eval mode on `device`,
        uncompiled (for sampling, export and evaluation)."""
        checkpoint = checkpoints.read(path)
        accepted = inspect.signature(cls).parameters
        hparams = {k: v for k, v in checkpoint["hyper_parameters"].items()
                   if k in accepted or k in GPTConfig.__dataclass_fields__}
        try:
            module = cls(**{**hparams, "compile": False, "init_from": None, "tokenizer": None})
            module.load_state_dict(checkpoint["state_dict"])
            module._tokenizer = saved_tokenizer(checkpoint)
        except (TypeError, RuntimeError) as err:
            raise UserError(f"{path} does not hold this project's model ({' '.join(str(err).split())[:300]})") from None
        return module.to(device).eval()

    def configure_callbacks(self) -> list[L.Callback]:
        callbacks = [self.nonfinite, RestoreRNG()]
        given = self._trainer is not None and any(isinstance(c, ExpertLoad) for c in self.trainer.callbacks)
        if self.config.mlp == "moe" and not given:  # (one in trainer.callbacks, with its own settings, stays)
            callbacks.append(ExpertLoad())
        return callbacks

    def configure_model(self) -> None:
        hp, sharded = self.hparams, self.device_mesh is not None
        bf16 = self._trainer is not None and str(self.trainer.precision) == "bf16-mixed"
        parallelize(self.model, self.device_mesh, hp.activation_checkpointing, compile=hp.compile and sharded,
                    compile_mode=hp.compile_mode, param_dtype=torch.bfloat16 if bf16 else None)
        if self.model.lm_head.weight.is_meta:  # built by network_on_meta: each process makes its shard now
            materialize(self.model, self.trainer.strategy.root_device)
            if self.trainer.state.fn == "fit" and hp.init_from:  # (setup could not load into no memory)
                self._load_initial_weights()
        if hp.compile and not sharded:
            # The loss step is compiled, model and loss together (inductor fuses the cross-entropy
            # into the output layer's kernels); calls of the model itself, as in sampling, stay
            # eager and never recompile the training graph.
            self._loss_fn = torch.compile(next_token_loss, mode=hp.compile_mode)

    @property
    def loss_path(self) -> str:
        """How the loss is computed, "plain", "fused" or "chunked" (lm_pretrain.model.loss), chosen
        here alone: model.loss, where "auto" is plain when the loss step is compiled whole (compile
        on one device or DDP) and fused when it runs eagerly (no compile, or FSDP, which compiles
        only the blocks). UserError for a setting that cannot work."""
        hp = self.hparams
        return pick_loss(hp.loss, hp.compile and self.device_mesh is None, hp.z_loss, self.config.logit_softcap)

    @property
    def tensor_parallel(self) -> bool:
        """Whether the strategy splits blocks between processes (strategies.FSDP's tensor_parallel_size)."""
        return self.device_mesh is not None and self.device_mesh["tensor_parallel"].size() > 1

    def setup(self, stage: str) -> None:
        allow_tf32(self.trainer.strategy.root_device.type)
        if self.model.experts:  # balancing counts every process's choices; one expert matmul for the run
            self.model.balance_group = balance_group(self.trainer.strategy)
            choose_expert_matmul(self.model, self.trainer.strategy.root_device, self.trainer.precision)
        # Before the optimizer exists; a resumed run (--ckpt_path) then overwrites these weights
        # with its own, as it should.
        if stage == "fit" and self.hparams.init_from:
            self.check_tokenizer_of(checkpoints.read_hyperparameters(self.hparams.init_from, "model.init_from: checkpoint",
                                                                     full=True), f"model.init_from {self.hparams.init_from}")
            if not self.model.lm_head.weight.is_meta:  # else once configure_model has made the weights
                self._load_initial_weights()

    def _load_initial_weights(self) -> None:
        """model.init_from's weights, into the whole model or into this process's shards of it."""
        weights = checkpoints.load_weights(self.hparams.init_from, self.config)
        if self.device_mesh is None:
            self.model.load_state_dict(weights)
        else:
            set_model_state_dict(self.model, weights, options=StateDictOptions(full_state_dict=True))

    def on_fit_start(self) -> None:
        size = model_size(self.config)
        if self.trainer.is_global_zero:  # (self.print writes nothing before the progress bar exists)
            active = f", {size['active_params'] / 1e6:.2f}M active per token" if self.config.mlp == "moe" else ""
            print(f"model: {size['params'] / 1e6:.2f}M parameters ({size['non_embedding_params'] / 1e6:.2f}M "
                  f"non-embedding{active}), {size['flops_per_token'] / 1e9:.3f} GFLOPs per trained token", flush=True)
        if self.logger is not None:
            self.logger.log_metrics({f"model/{k}": float(v) for k, v in size.items()}, step=0)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of the next-token predictions: their mean, or with reduction="sum" their sum
        (targets set to IGNORE_INDEX count in neither); the z-loss is added in training only, so val
        losses stay comparable across recipes."""
        x, y = batch
        path = self.loss_path
        return self._loss_fn(self.model, x, y, fused=path != "plain", chunk=CHUNK_ROWS if path == "chunked" else None,
                             z_loss=self.hparams.z_loss if self.training else 0.0, reduction=reduction)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor | None:
        loss = self._loss(batch)
        skip = self.nonfinite.skip_batch(self.trainer, loss)
        if not skip:  # summed on the device: no host sync
            self._step_loss = loss.detach() + (self._step_loss if self._step_loss is not None else 0)
            self._step_batches += 1
        if ends_optimizer_step(self.trainer, batch_idx):
            self._log_step_loss()
        # A mixture of experts' router losses are trained, not logged as train/loss (lm_pretrain.training.experts)
        if skip:
            self.model.router_stats = None  # (their graph would hold the batch's activations)
            return None  # no backward, no optimizer step
        return loss + self.model.router_loss()

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        for layer in self.model.experts:  # part of the step: a checkpoint after it has its result
            layer.end_step(self.config.router_bias_rate)

    def _log_step_loss(self) -> None:
        """train/loss: the optimizer step's loss, the mean over its micro-batches and processes, on
        log steps only (the one all-reduce, and Lightning turns the tensors into numbers only when it
        writes). Logged from the last micro-batch, so the callbacks after it see this step's. Not
        prog_bar: Lightning reads those back after every batch (callbacks.ProgressBar shows it)."""
        if self._step_loss is not None and is_log_step(self.trainer, self.trainer.global_step + 1):
            loss = self.trainer.strategy.reduce(self._step_loss / self._step_batches, reduce_op="mean")
            self.log("train/loss", loss)
            self.log("train/ppl", loss.exp())
        self._step_loss, self._step_batches = None, 0

    def on_before_optimizer_step(self, optimizer) -> None:
        # The gradient norm before clipping, only on steps that are logged (it costs a reduction).
        if not is_log_step(self.trainer, self.global_step + 1):
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads:
            self.log("train/grad_norm", total_norm(grads))  # (sharded: the whole model's)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        checkpoints.check_architecture(checkpoint.get("hyper_parameters", {}), self.config, "checkpoint")
        if self._tokenizer is None:  # no data adopted (a datamodule of your own, load_from_checkpoint): the checkpoint's
            self._tokenizer = saved_tokenizer(checkpoint)
        self.check_tokenizer_of(checkpoint, "the checkpoint resumed from")

    def validation_step(self, batch, batch_idx: int) -> None:
        # (the processes of a tensor-parallel group score the same batches: each adds the same sums,
        # which leaves the mean over all processes as it is)
        self.val_loss.update(self._loss(batch, reduction="sum"), (batch[1] != IGNORE_INDEX).sum())

    def on_validation_epoch_end(self) -> None:
        # Every target token of every process weighs the same: the val loss of N processes is the
        # one a single process would compute over the same windows.
        loss = self.val_loss.compute()  # summed across processes
        self.val_loss.reset()
        metrics = {"val/loss": loss, "val/ppl": loss.exp()}
        # Bits per byte: the loss per UTF-8 byte of text rather than per token, so that models with
        # different tokenizers compare (the val split's bytes per token come from its metadata).
        bytes_per_token = getattr(self.trainer.datamodule, "val_bytes_per_token", None)
        if bytes_per_token:
            metrics["val/bpb"] = loss / math.log(2) / bytes_per_token
        # (the same on every process already; sync_dist only keeps Lightning from warning that it is not)
        self.log_dict(metrics, prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "muon" and self.device_mesh is not None:
            raise UserError("model.optimizer muon orthogonalises whole matrices, which FSDP shards: use adamw "
                            "with the FSDP overlay, or DDP")
        # One kernel for all AdamW parameters instead of many; not for FSDP2's sharded DTensor
        # parameters on CPUs, nor with fp16's gradient scaler (Lightning must unscale before clipping).
        # Tensor parallelism lays parameters out over two meshes, which one kernel cannot take together:
        # one parameter at a time there, on GPUs as on the CPUs of the tests.
        fused = (self.device.type == "cuda" or (self.device.type == "cpu" and self.device_mesh is None)) \
            and self._gradient_scaler() is None and not self.tensor_parallel
        optimizer = optim.build_optimizer(self.model, hp.optimizer, hp.learning_rate, hp.weight_decay, hp.betas,
                                          head_lr=hp.head_lr, muon_lr=hp.muon_lr, fused=fused,
                                          foreach=False if self.tensor_parallel else None)
        total = hp.decay_steps or self.trainer.estimated_stepping_batches
        # One closed-form multiplier of the step (optim.lr_multiplier): torch's LinearLR cannot warm up
        # from 0, and SequentialLR needs three schedulers for WSD and steps the cosine recursively.
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: optim.lr_multiplier(step, hp.warmup_steps, int(total), hp.min_lr_ratio, hp.schedule,
                                                  hp.decay_fraction))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _gradient_scaler(self):
        """fp16's GradScaler when training in 16-mixed, else None (bf16 and fp32 need none)."""
        return getattr(self.trainer.precision_plugin, "scaler", None)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning's mixed-precision plugin refuses to clip for a fused optimizer, since with fp16 a
        # fused step unscales the gradients itself. bf16 scales nothing: clip here, as in fp32 (the
        # whole model's norm, also when FSDP shards it).
        if not gradient_clip_val or self._gradient_scaler() is not None:
            return self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                # (one tensor at a time under tensor parallelism: torch's multi-tensor kernels take one
                # mesh's DTensors at once)
                torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, total_norm(grads),
                                                     foreach=False if self.tensor_parallel else None)
