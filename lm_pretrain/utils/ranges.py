"""The allowed values of every setting, declared once: as the type of its parameter. A numeric
setting's range is a restricted number type; a setting that takes one of a fixed set of strings is a
`Literal`:

    def __init__(self, learning_rate: PositiveFloat = 6e-4, warmup_steps: NonNegativeInt = 100,
                 verify: Literal["sha256", "size", "none"] = "sha256"): ...

The command line (jsonargparse, under every entry point) refuses a value outside the range, or not
among the choices, as it parses, before any data is read or any file is written; `--help` lists the
choices. `check` does the same for a call made from Python. `describe` turns jsonargparse's refusal
into the one line a user sees, naming the flag, the value and the range or the choices. Settings of
Lightning's own classes that the presets use are declared in TRAINER_RANGES and checked by the
training command the same way.
"""

import ast
import math
import operator
import re
import types
import typing

from jsonargparse.typing import ClosedUnitInterval, restricted_number_type

from lm_pretrain.utils.errors import UserError

__all__ = ["ClosedUnitInterval", "FiniteFloat", "Fraction", "NonNegativeFloat", "NonNegativeInt", "OpenUnitInterval", "PositiveFloat",
           "PositiveInt", "Probability", "Seed", "VocabSize", "Characters", "Workers", "NonNegativeWorkers", "Layers", "Heads", "Experts", "Width",
           "Context", "check", "check_config", "choices", "describe", "plain", "restrictions"]

# Every count has both bounds. 2**31 - 1 at most: beyond, torch's and NumPy's index types overflow,
# and a count that large asks for more processes, memory or steps than any machine has (prepare
# --workers 100000 hung starting processes). jsonargparse's PositiveInt and NonNegativeInt have no
# upper bound, hence these.
MAX_COUNT = 2**31 - 1
PositiveInt = restricted_number_type("PositiveCount", int, [(">", 0), ("<=", MAX_COUNT)])
NonNegativeInt = restricted_number_type("NonNegativeCount", int, [(">=", 0), ("<=", MAX_COUNT)])
Characters = restricted_number_type("Characters", int, [(">", 0), ("<=", 10**15)])  # a petabyte of text
# Processes: more than a machine's cores only wait on each other.
MAX_WORKERS = 512
Workers = restricted_number_type("Workers", int, [(">", 0), ("<=", MAX_WORKERS)])
NonNegativeWorkers = restricted_number_type("NonNegativeWorkers", int, [(">=", 0), ("<=", MAX_WORKERS)])
# The architecture, at 8x or more the largest in use (126 layers, 128 heads, width 25,600, contexts
# of 10M tokens): beyond, the model cannot be built on any machine, and building it would take hours.
Layers = restricted_number_type("Layers", int, [(">", 0), ("<=", 2048)])
Heads = restricted_number_type("Heads", int, [(">", 0), ("<=", 1024)])
Experts = restricted_number_type("Experts", int, [(">", 0), ("<=", 4096)])  # DeepSeek-V3: 256 per block
Width = restricted_number_type("Width", int, [(">", 0), ("<=", 1 << 18)])
Context = restricted_number_type("Context", int, [(">", 0), ("<=", 1 << 27)])

# Unbounded above, but finite: jsonargparse's PositiveFloat takes inf (and a learning rate of inf
# trains a run of NaNs); nan fails every comparison, so every range here refuses it.
PositiveFloat = restricted_number_type("PositiveFiniteFloat", float, [(">", 0), ("<", math.inf)])
NonNegativeFloat = restricted_number_type("NonNegativeFiniteFloat", float, [(">=", 0), ("<", math.inf)])
FiniteFloat = restricted_number_type("FiniteFloat", float, [(">", -math.inf), ("<", math.inf)])
Fraction = restricted_number_type("Fraction", float, [(">=", 0), ("<", 1)])  # [0, 1): dropout, AdamW betas
OpenUnitInterval = restricted_number_type("OpenUnitInterval", float, [(">", 0), ("<", 1)])  # (0, 1): val_fraction
Probability = restricted_number_type("Probability", float, [(">", 0), ("<=", 1)])  # (0, 1]: top_p
AtLeastMinusOne = restricted_number_type("AtLeastMinusOne", int, [(">=", -1), ("<=", MAX_COUNT)])  # -1: "no limit"
# Seeds: the range NumPy's legacy seeding and Lightning's seed_everything take, [0, 2**32).
Seed = restricted_number_type("Seed", int, [(">=", 0), ("<=", 2**32 - 1)])
# Token ids: 8x the largest vocabularies in use (Gemma's 262,144); a larger one is a typo, and would
# otherwise fail deep inside the tokenizer trainer or the model's memory.
MAX_VOCAB = 1 << 21
VocabSize = restricted_number_type("VocabSize", int, [(">", 0), ("<=", MAX_VOCAB)])

# Lightning's settings that the presets use (train.py flag -> type), checked before the Trainer is
# made: Lightning itself accepts some of these values silently, or fails later with a traceback.
TRAINER_RANGES = {
    "seed_everything": Seed | bool,
    "trainer.max_steps": AtLeastMinusOne,
    "trainer.accumulate_grad_batches": PositiveInt,
    "trainer.log_every_n_steps": NonNegativeInt,
    "trainer.gradient_clip_val": NonNegativeFloat | None,
    "trainer.num_sanity_val_steps": AtLeastMinusOne,
    "trainer.num_nodes": PositiveInt,
    "trainer.check_val_every_n_epoch": PositiveInt | None,
    "trainer.val_check_interval": PositiveFloat | None,
    "trainer.limit_val_batches": NonNegativeFloat | None,
    "checkpoint.every_n_train_steps": NonNegativeInt | None,
    "checkpoint.save_top_k": AtLeastMinusOne,
}

_OPERATORS = {operator.gt: ">", operator.ge: ">=", operator.lt: "<", operator.le: "<=", operator.eq: "==",
              operator.ne: "!="}


def restrictions(annotation) -> list[tuple[str, float]] | None:
    """[(">", 0), ...] of a restricted number type, else None."""
    found = getattr(annotation, "_restrictions", None)
    return [(_OPERATORS[op], bound) for op, bound in found] if found else None


def choices(annotation) -> tuple | None:
    """("sha256", "size", "none") of Literal["sha256", "size", "none"] (also inside `... | None`), else None."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        found = [c for a in typing.get_args(annotation) for c in choices(a) or ()]
        return tuple(found) or None
    return None


def _in_range(annotation, value) -> bool:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return any(value == c and type(value) is type(c) for c in args)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_in_range(a, value) for a in args)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if typing.get_origin(annotation) is tuple:
        return isinstance(value, (tuple, list)) and len(value) == len(args) and all(map(_in_range, args, value))
    if restrictions(annotation) is None:
        return True  # no range declared
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        annotation(value)
    except (TypeError, ValueError):
        return False
    return True


def range_text(annotation) -> str:
    """"> 0", ">= 0 and < 1", ...: the allowed values of `annotation`, for messages."""
    limits = restrictions(_first(annotation))
    text = _bounds_text(" and ".join(f"{op} {_number(bound)}" for op, bound in limits)) if limits else "a valid value"
    if any(a is type(None) for a in typing.get_args(annotation)):
        text += ", or null"
    return text


def _number(bound: float) -> str:
    """A bound as written: whole numbers in full (4294967295, not 4.29497e+09), others short."""
    return str(int(bound)) if math.isfinite(bound) and float(bound).is_integer() else f"{bound:g}"


def refusal(flag: str, value, annotation) -> str:
    """The one line refusing `value` for `flag`: not among its choices, or out of its range."""
    allowed = choices(annotation)
    if allowed is None:
        return f"{flag} {value!r} is out of range: it must be {range_text(annotation)}"
    text = ", ".join(map(str, allowed))
    if any(a is type(None) for a in typing.get_args(annotation)):
        text += ", or null"
    return f"{flag} {value!r} is not one of {text}"


def check(function, values: dict, prefix: str) -> None:
    """UserError naming the first of `values` outside the range, or not among the choices (Literal),
    that its parameter of `function` declares (`prefix` names the flags' group, e.g. "model"; empty
    for an entry point's own flags)."""
    hints = typing.get_type_hints(function)
    for name, value in values.items():
        annotation = hints.get(name)
        if annotation is not None and _is_checked(annotation) and not _in_range(annotation, value):
            raise UserError(refusal(f"--{prefix}.{name}" if prefix else f"--{name}", value, annotation))


def check_config(config, table: dict = TRAINER_RANGES) -> None:
    """UserError for the first setting of `table` ("trainer.max_steps": type) outside its range in a
    parsed train.py config (a jsonargparse Namespace)."""
    for key, annotation in table.items():
        value = config.get(key)
        if value is not None and not isinstance(value, str) and not _in_range(annotation, value):
            raise UserError(refusal(f"--{key}", value, annotation))


def plain(value):
    """`value` with the restricted numbers the parser made (PositiveInt(8), ...) turned back into
    plain ints and floats, so checkpoints hold only types torch.load(weights_only=True) accepts."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def _has_restrictions(annotation) -> bool:
    """Whether `annotation` declares a numeric range (within a union or tuple too)."""
    return restrictions(annotation) is not None or any(_has_restrictions(a) for a in typing.get_args(annotation))


def _is_checked(annotation) -> bool:
    """Whether `check` has something to enforce: a numeric range, or a Literal's choices."""
    return _has_restrictions(annotation) or choices(annotation) is not None


def _first(annotation):
    """The restricted type within `annotation` (for tuples, its first item's)."""
    if restrictions(annotation) is not None:
        return annotation
    return next(_first(a) for a in typing.get_args(annotation) if _has_restrictions(a))


def describe(message: str) -> str:
    """jsonargparse's multi-line refusal of an out-of-range value, or of a value that is not one of a
    Literal's choices (or not true or false), as one line: the flag, the value, the range or the
    choices. Other parse errors come back as they are, on one line."""
    message = " ".join(message.split())
    choice = _refused_choice(message)
    if choice:
        return choice
    nonfinite = re.search(r"Given value: ([+-]?(?:inf|infinity|nan))(?: |$)", message, re.IGNORECASE)
    if nonfinite:  # a number setting of a class of Lightning's, which reads "inf" as a string
        return f"--{_flag(message)} {nonfinite.group(1)} is out of range: it must be a finite number"
    limit = re.search(r"Not of type \w+: (?:(\S+) )?does not conform to restriction (v[^-]*?)(?: - |$| Expected| Given)",
                      message)
    if not limit:
        return message
    value = limit.group(1)
    if value is None:
        given = re.search(r"Given value: (\S+)", message)
        value = given.group(1) if given else "the value"
    allowed = _bounds_text(re.sub(r"v(>=|<=|!=|==|>|<)\s*", r"\1 ", limit.group(2)).strip())
    return f"--{_flag(message[:limit.start()])} {value} is out of range: it must be {allowed}"


def _bounds_text(text: str) -> str:
    """"> 0 and < inf" -> "a finite number > 0"; "> -inf and < inf" -> "a finite number"."""
    if "inf" not in text:
        return text
    kept = [part for part in text.split(" and ") if "inf" not in part]
    return "a finite number" + (f" {' and '.join(kept)}" if kept else "")


def _refused_choice(message: str) -> str | None:
    """The one line for a value refused by a setting typed Literal[...] or bool (or either | None);
    None for any other refusal, e.g. of a setting that also takes a class or a number."""
    expected = re.findall(r"Expected a (typing\.Literal\[[^\]]*\]|<class '[\w.]+'>|\S+)", message)
    kinds = [e if e.startswith("typing.Literal[") else e.removeprefix("<class '").removesuffix("'>") for e in expected]
    if not all(k.startswith("typing.Literal[") or k in ("bool", "NoneType") for k in kinds) or \
            set(kinds) <= {"NoneType"}:
        return None
    allowed = [str(c) for k in kinds if k.startswith("typing.Literal[") for c in ast.literal_eval(f"[{k[15:-1]}]")]
    allowed += ["true", "false"] if "bool" in kinds else []
    first = message.index("Expected a ")
    given = re.search(r"(?:Got|Given) value: (.*?)(?: - |$)", message[first:])
    value = repr(given.group(1)) if given else "the value"
    return (f"--{_flag(message[:first])} {value} is not one of {', '.join(allowed)}"
            f"{', or null' if 'NoneType' in kinds else ''}")


def _flag(message: str) -> str:
    """The flag a refusal is about, from the keys named before it in `message`: e.g. data.verify,
    or trainer.callbacks (TextSamples) max_new_tokens for a setting of a class in a list."""
    keys = re.findall(r'Parser key "([^"]+)"', message)
    owner = re.findall(r"class_path '[\w.]*?(\w+)'", message)
    if not keys:
        return "the value"
    return keys[0] + (f" ({owner[-1]}) {keys[-1]}" if len(keys) > 1 and owner else "")
