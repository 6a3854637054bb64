"""Optional packages: the extras of pyproject.toml, imported only by the commands that need them.

`pip install lm-pretrain` installs what training, prepare, generate and sizes need. The rest comes
with an extra: `[data]` (parquet, Hugging Face datasets), `[export]` (transformers, safetensors),
`[eval]` (lm-eval), `[loggers]` (wandb, mlflow). A command that needs a missing one ends with one
line naming the extra to install (a UserError, so exit status 2), not a traceback.
"""

import importlib

from lm_pretrain.utils.errors import UserError


def require(module: str, extra: str, needed_for: str, package: str | None = None):
    """`importlib.import_module(module)`, or a UserError naming the extra that brings it.

    Args:
        module: the module to import, e.g. "transformers" or "pyarrow.parquet".
        extra: the extra of pyproject.toml that installs it, e.g. "export".
        needed_for: what needs it, for the message ("lm-pretrain-export", "parquet inputs").
        package: its name on the package index, when that is not the module's top-level name.
    """
    package = package or module.partition(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as err:
        hint = f"pip install 'lm-pretrain[{extra}]'"
        missing = getattr(err, "name", None)
        if missing is not None and (missing == module or module.startswith(f"{missing}.")):
            raise UserError(f"{needed_for} needs {package}, which is not installed: {hint}") from None
        # Installed, but something it imports is missing or broken: reinstalling the extra fixes that.
        detail = " ".join(str(err).split())
        raise UserError(f"{needed_for} needs {package}, which failed to import ({type(err).__name__}: "
                        f"{detail}): {hint}") from None
