"""LightningModule: next-token prediction on every position of every sequence.

The loss is the mean cross-entropy of predicting token t+1 from tokens <= t; perplexity is exp of
that mean (the number of equally likely tokens the model is, on average, choosing between).

A training step that does not log never waits for the GPU: no value is read back to the host
(`.item()`, `bool(tensor)`, ...) outside log steps, so the CPU can queue the next step's kernels
while the GPU runs this one (tests/test_sync_free.py counts them).
"""

import dataclasses
import math

import lightning as L
import torch
from torchmetrics import Metric

from lm_pretrain import checkpoints, optim, ranges
from lm_pretrain.callbacks import step_ends_here
from lm_pretrain.errors import UserError
from lm_pretrain.model import GPT, GPTConfig, model_size
from lm_pretrain.ranges import (ClosedUnitInterval, Fraction, NonNegativeFloat, NonNegativeInt, OpenUnitInterval,
                                 PositiveFloat, PositiveInt)
from lm_pretrain.tokenizer import DEFAULT_TOKENIZER


IGNORE_INDEX = -100  # target of a padding position: no loss, not counted (see data.EvenSplit)


class MeanLoss(Metric):
    """Mean cross-entropy per target token over many batches, summed across processes.

    Fed each batch's summed loss and its number of targets (padding excluded), rather than logits as
    torchmetrics.text.Perplexity wants: that would run a second log-softmax over the whole vocabulary,
    the costliest op here. Two sums instead of torchmetrics' MeanMetric, whose NaN check reads a
    value back from the GPU on every update.
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
        tokenizer: str = DEFAULT_TOKENIZER,
        learning_rate: PositiveFloat = 6e-4,
        min_lr_ratio: ClosedUnitInterval = 0.1,
        warmup_steps: NonNegativeInt = 100,
        decay_steps: PositiveInt | None = None,
        schedule: str = "cosine",
        decay_fraction: OpenUnitInterval = 0.2,
        weight_decay: NonNegativeFloat = 0.1,
        betas: tuple[Fraction, Fraction] = (0.9, 0.95),
        optimizer: str = "adamw",
        muon_lr: PositiveFloat | None = None,
        head_lr: PositiveFloat | None = None,
        z_loss: NonNegativeFloat = 0.0,
        fused_loss: bool = False,
        compile: bool = False,
        activation_checkpointing: bool = False,
        init_from: str | None = None,
        nonfinite_loss: str = "stop",
        nonfinite_check_every: PositiveInt | None = None,
        **architecture,
    ):
        """
        Args:
            tokenizer: tiktoken encoding the data was prepared with; used to decode samples.
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
                blocks' matrices and AdamW for embeddings, head, norms and biases (lm_pretrain.optim).
                Muon needs whole matrices: not with the FSDP overlay.
            muon_lr: Muon's learning rate (its updates are scaled to AdamW's size); empty means
                learning_rate.
            head_lr: learning rate of an untied output layer (tie_embeddings false); empty means
                learning_rate.
            z_loss: weight of the z-loss (PaLM: 1e-4), the squared log of the softmax normaliser, which
                keeps the output logits from drifting; 0 turns it off.
            fused_loss: compute the output layer and the loss together (lm_pretrain.loss): the same
                loss and gradients with one logits-sized tensor instead of four; a third faster per
                step on CPUs. Not with z_loss or logit_softcap (those take the plain path).
            compile: torch.compile the model (worth it on GPUs; costs time and gains nothing on CPUs).
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
            architecture: the fields of `lm_pretrain.model.GPTConfig` (vocab_size, block_size,
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
        self.hparams.update({**ranges.plain(dict(self.hparams)), **dataclasses.asdict(self.config)})
        if nonfinite_loss not in ("stop", "skip"):
            raise UserError(f"model.nonfinite_loss must be stop or skip, got {nonfinite_loss!r}")
        for name, value, allowed in (("optimizer", optimizer, optim.OPTIMIZERS), ("schedule", schedule, optim.SCHEDULES)):
            if value not in allowed:
                raise UserError(f"model.{name} must be one of {', '.join(allowed)}, got {value!r}")
        if head_lr is not None and self.config.tie_embeddings:
            raise UserError("model.head_lr needs an untied output layer: set model.tie_embeddings false")
        self.model = GPT(self.config)
        self.val_loss = MeanLoss()
        self._nonfinite: torch.Tensor | None = None  # on the device: set once a loss was NaN/inf
        self.skipped_batches = 0
        self._rng_states_to_restore: dict | None = None

    def configure_model(self) -> None:
        self.model.checkpoint_blocks = self.hparams.activation_checkpointing
        if self.device_mesh is not None and not getattr(self, "_sharded", False):
            # ModelParallelStrategy: FSDP2 with one shard unit per block, then the rest (embeddings,
            # final norm, head) at the root; each unit's parameters are gathered only while it runs.
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for block in self.model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(self.model, mesh=mesh)
            self._sharded = True
        # nn.Module.compile compiles in place, so state_dict keys stay free of "_orig_mod." prefixes.
        if self.hparams.compile:
            self.model.compile()

    def setup(self, stage: str) -> None:
        # Before the optimizer exists; a resumed run (--ckpt_path) then overwrites these weights
        # with its own, as it should.
        if stage == "fit" and self.hparams.init_from:
            self.model.load_state_dict(checkpoints.load_weights(self.hparams.init_from, self.config))

    def on_fit_start(self) -> None:
        size = model_size(self.config)
        if self.trainer.is_global_zero:  # (self.print writes nothing before the progress bar exists)
            print(f"model: {size['params'] / 1e6:.2f}M parameters ({size['non_embedding_params'] / 1e6:.2f}M "
                  f"non-embedding), {size['flops_per_token'] / 1e9:.3f} GFLOPs per trained token", flush=True)
        if self.logger is not None:
            self.logger.log_metrics({f"model/{k}": float(v) for k, v in size.items()}, step=0)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy of the next-token predictions: their mean, or with reduction="sum" their sum
        (targets set to IGNORE_INDEX count in neither); the z-loss is added in training only, so val
        losses stay comparable across recipes."""
        x, y = batch
        return self.model(x, targets=y, ignore_index=IGNORE_INDEX, reduction=reduction,
                          fused_loss=self.hparams.fused_loss, z_loss=self.hparams.z_loss if self.training else 0.0)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor | None:
        loss = self._loss(batch)
        nonfinite = ~torch.isfinite(loss.detach())
        if self.hparams.nonfinite_loss == "skip":
            # every rank must agree, or DDP would wait forever for the gradients of a skipped rank
            if self.trainer.strategy.reduce_boolean_decision(bool(nonfinite), all=False):
                self.skipped_batches += 1
                self.print(f"warning: NaN/inf loss at step {self.global_step}, batch skipped "
                           f"({self.skipped_batches} so far)")
                return None
        else:  # remembered on the device; looked at every nonfinite_check_every steps
            self._nonfinite = nonfinite if self._nonfinite is None else self._nonfinite | nonfinite
        # Tensors go to the logger as they are; Lightning turns them into numbers only when it
        # writes (every log_every_n_steps), so logging adds no host sync to the step. Not prog_bar:
        # Lightning reads those back after every batch (callbacks.ProgressBar shows the loss instead).
        self.log("train/loss", loss)
        self.log("train/ppl", loss.detach().exp())
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if not step_ends_here(self.trainer, batch_idx):
            return  # mid-accumulation: check once per optimizer step, not once per batch
        if self.global_step % (self.hparams.nonfinite_check_every or self.trainer.log_every_n_steps or 1) == 0:
            self._stop_if_nonfinite()

    def on_before_optimizer_step(self, optimizer) -> None:
        # The gradient norm before clipping, only on steps that are logged (it costs a reduction).
        if self._trainer is None or (self.global_step + 1) % self.trainer.log_every_n_steps:
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: shards -> whole
            self.log("train/grad_norm", norm)

    def _stop_if_nonfinite(self) -> None:
        seen = self._nonfinite is not None and bool(self._nonfinite)
        if self._trainer is not None and self.trainer.strategy.reduce_boolean_decision(seen, all=False):
            last = next((c.last_model_path for c in self.trainer.checkpoint_callbacks if c.last_model_path), "none yet")
            raise UserError(f"the training loss became NaN or infinite at or before step {self.global_step}; "
                            f"stopped without saving (last good checkpoint: {last}). Lower model.learning_rate "
                            f"or set model.nonfinite_loss skip")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self._stop_if_nonfinite()  # never write a checkpoint of a diverged model
        checkpoint["rng_states"] = checkpoints.rng_states()  # a resumed run draws the same random numbers

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        checkpoints.check_architecture(checkpoint.get("hyper_parameters", {}), self.config, "checkpoint")
        if self._trainer is not None and "rng_states" in checkpoint:
            # applied at the first batch: restoring happens before the data loader's iterator is
            # made, and making it draws a random number
            self._rng_states_to_restore = checkpoint["rng_states"]

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self._rng_states_to_restore is not None:
            checkpoints.set_rng_states(self._rng_states_to_restore)
            self._rng_states_to_restore = None

    def validation_step(self, batch, batch_idx: int) -> None:
        self.val_loss.update(self._loss(batch, reduction="sum"), (batch[1] != IGNORE_INDEX).sum())

    def on_validation_epoch_end(self) -> None:
        # Every target token of every process weighs the same: the val loss of N processes is the
        # one a single process would compute over the same windows.
        loss = self.val_loss.compute()  # summed across processes
        self.val_loss.reset()
        metrics = {"val/loss": loss, "val/ppl": loss.exp()}
        # Bits per byte: the loss per UTF-8 byte of text rather than per token, so that models with
        # different tokenizers compare (the val split's bytes per token come from its metadata).
        bytes_per_token = getattr(self.trainer.datamodule, "val_bytes_per_token", None) if self._trainer else None
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
        fused = (self.device.type == "cuda" or (self.device.type == "cpu" and self.device_mesh is None)) \
            and self._gradient_scaler() is None
        optimizer = optim.build_optimizer(self.model, hp.optimizer, hp.learning_rate, hp.weight_decay, hp.betas,
                                          head_lr=hp.head_lr, muon_lr=hp.muon_lr, fused=fused)
        total = hp.decay_steps or self.trainer.estimated_stepping_batches
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: optim.lr_multiplier(step, hp.warmup_steps, int(total), hp.min_lr_ratio, hp.schedule,
                                                  hp.decay_fraction))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


    def _gradient_scaler(self):
        """fp16's GradScaler when training in 16-mixed, else None (bf16 and fp32 need none)."""
        return getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer is not None else None

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
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
