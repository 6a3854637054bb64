"""One kind of error for everything a user can get wrong, and one way to report it.

Entry points wrap their work in `exit_on_user_error`, so a wrong path, corpus, flag or checkpoint
ends with a single `error: ...` line and exit status 2 instead of a traceback, and Ctrl-C with
`error: interrupted` and exit status 130 (the shell's code for SIGINT), whatever caught it first.
"""

import functools
import signal
import sys
import threading


class UserError(Exception):
    """A problem with the user's input (paths, corpora, configs, flags, checkpoints)."""


class Interrupted(Exception):
    """Ctrl-C, handled on the way: the work stopped cleanly and the message says what was kept."""


_interrupted = False  # set by the SIGINT handler of exit_on_user_error


def _on_sigint(signum, frame) -> None:
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def exit_on_user_error(main):
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        # Lightning catches KeyboardInterrupt itself and exits with status 1: the flag tells that
        # exit from any other, so that Ctrl-C ends every command alike.
        global _interrupted
        ours = threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGINT) is signal.default_int_handler
        if ours:
            _interrupted = False
            signal.signal(signal.SIGINT, _on_sigint)
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except Interrupted as stopped:
            print(f"error: interrupted: {stopped}", file=sys.stderr)
            sys.exit(130)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            sys.exit(130)
        except SystemExit as exit:
            if _interrupted and exit.code not in (0, None, 130):
                print("error: interrupted", file=sys.stderr)
                sys.exit(130)
            raise
        finally:
            if ours:
                signal.signal(signal.SIGINT, signal.default_int_handler)

    return wrapper
