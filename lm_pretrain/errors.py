"""One kind of error for everything a user can get wrong, and one way to report it.

Entry points wrap their work in `exit_on_user_error`, so a wrong path, corpus, flag or checkpoint
ends with a single `error: ...` line and exit status 2 instead of a traceback.
"""

import functools
import sys


class UserError(Exception):
    """A problem with the user's input (paths, corpora, configs, flags, checkpoints)."""


def exit_on_user_error(main):
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            sys.exit(130)

    return wrapper
