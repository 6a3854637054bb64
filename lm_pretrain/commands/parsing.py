"""The command line of every entry point: one flag style, the one train.py has (LightningCLI's).

Flags are `--name value` with underscores (`--max_new_tokens 50`); a yes/no option is a switch,
`--overwrite` alone meaning `--overwrite true` (`--overwrite false` works too). Every entry point has
`--help` and `--config FILE`, a YAML file of the same keys (`max_new_tokens: 50`, `overwrite: true`),
and `--print_config`. Options are declared once, as the parameters of a documented function, whose
docstring becomes the help text. A wrong flag or value ends in one `error: ...` line, exit status 2.
"""

import inspect
import itertools
import logging
import sys
import typing

import docstring_parser
from jsonargparse import ArgumentError, ArgumentParser, Namespace

from lm_pretrain.utils.errors import UserError
from lm_pretrain.utils.ranges import describe


def command_parser(prog: str, function, description: str | None = None) -> ArgumentParser:
    """A parser for `function`'s parameters, with --config and --help."""
    parser = ArgumentParser(prog=prog, description=description or function.__doc__.splitlines()[0],
                            exit_on_error=False)
    parser.add_argument("--config", action="config", help="a YAML file of these options")
    # In the order of the signature: runs of other parameters as jsonargparse declares them, each
    # `bool` one as a switch (jsonargparse's bool type with an optional value: alone it means true).
    hints, params = typing.get_type_hints(function), inspect.signature(function).parameters
    helps = {p.arg_name: p.description for p in docstring_parser.parse(function.__doc__ or "").params}
    for is_switch, run in itertools.groupby(params, key=lambda name: hints.get(name) is bool):
        run = list(run)
        if not is_switch:
            parser.add_function_arguments(function, fail_untyped=True, as_group=False,
                                          skip={name for name in params if name not in run})
        for name in run if is_switch else ():
            default, required = params[name].default, params[name].default is inspect.Parameter.empty
            parser.add_argument(f"--{name}", type=bool, nargs="?", const=True, metavar="{true,false}",
                                required=required, default=None if required else default, help=helps.get(name))
    return parser


def parse(parser: ArgumentParser, argv: list[str] | None) -> Namespace:
    """Parsed arguments, or a one-line UserError naming the bad flag and where to find help."""
    try:
        return parser.parse_args(argv)
    except ArgumentError as err:
        raise UserError(f"{describe(str(err))} (see {parser.prog} --help)") from None


def call(parser: ArgumentParser, function, argv: list[str] | None):
    """Parse `argv` and call `function` with the options (less --config)."""
    args = parse(parser, argv).as_dict()
    args.pop("config", None)
    return function(**args)


def call_with_inputs(prog: str, function, argv: list[str] | None):
    """`call` for a command whose `inputs` may also come first, as positional INPUTs before the
    flags (lm-pretrain-prepare, lm-pretrain-tokenizer): both lists are joined."""
    parser = command_parser(prog, function)
    parser.add_argument("paths", nargs="*", metavar="INPUT", help="the same as --inputs")
    args = parse(parser, argv).as_dict()
    paths = args.pop("paths")
    args.pop("config", None)
    return function(**{**args, "inputs": [*paths, *(args["inputs"] or [])]})


class _Stderr(logging.StreamHandler):
    """Writes to sys.stderr as it is when each message comes (notebooks and tests replace it)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def show_progress() -> None:
    """Print this package's progress messages ("prepared ...", "resuming from ...") on stderr."""
    ours = logging.getLogger("lm_pretrain")
    if not any(isinstance(h, _Stderr) for h in ours.handlers):
        ours.addHandler(_Stderr())
    ours.setLevel(logging.INFO)
    logging.getLogger("litdata").setLevel(logging.WARNING)  # its cache-size notices are noise here
    logging.getLogger("botocore").setLevel(logging.WARNING)  # "Found credentials in environment variables."
