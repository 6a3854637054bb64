"""Fresh processes without the wait: `python` for the tests that starts with torch and Lightning
already imported.

Importing torch, Lightning and what torchmetrics pulls in takes ~10 s on a 2-core machine, most of a
tiny test run. A server imports them once, runs nothing
else (no thread pool is running when it forks), and forks one child per command. The tests start an
executable file, `client`, in place of `python`: a stdlib-only script that starts in milliseconds,
hands the server its arguments, working folder, environment and its stdin/stdout/stderr, and exits
as the child exits (the same code, or killed by the same signal). Signals sent to it go to the child;
killed with SIGKILL, it takes the child with it. In the child `sys.executable` is the client again,
so the processes a run starts itself (Lightning's DDP launcher, torchrun's workers) are warm too.

What a child does not redo is the import, and at its end it skips the interpreter's teardown of
every module (~2 s more; exit_as_python keeps the rest of a normal exit). Settings read at import
time are the server's, which is why only the commands in WARM (the training and model commands,
whose imports read none) go to the server; for any other command line the client runs the real
interpreter in its place.

    server = WarmServer(["lm_pretrain.commands.train"], env)
    subprocess.run([server.client, "train.py", "fit", ...])   # as with sys.executable
"""

import atexit
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# What the client hands to the server: a script path ending so, `-m` one of the modules, or `-c CODE`.
WARM = {"scripts": ["/train.py", "/tests/sharded_equivalence.py", "/bench/gpu_acceptance.py",
                    "/bench/train_throughput.py", "/scripts/config_reference.py"],
        "modules": ["lm_pretrain.commands.generate", "lm_pretrain.commands.export", "lm_pretrain.commands.evaluate", "lm_pretrain.commands.prepare",
                    "lm_pretrain.commands.tokenizer", "torch.distributed.run", "ipykernel_launcher"]}

CLIENT = '''#!{python} -SE
# python for the tests: runs warm commands in a child of the server at ADDRESS (tests/warm.py)
import json, os, signal, socket, sys
ADDRESS, PYTHON, WARM = {address!r}, {python!r}, {warm!r}
args = sys.argv[1:]
flags = []
while args and args[0] in ("-u", "-B"):
    flags.append(args.pop(0))
if not args or not (args[0] == "-m" and args[1:2] and args[1] in WARM["modules"] or args[0] == "-c" or
                    any(os.path.abspath(args[0]).endswith(s) for s in WARM["scripts"])):
    os.execv(PYTHON, [PYTHON, *sys.argv[1:]])
server = socket.socket(socket.AF_UNIX)
try:
    server.connect(ADDRESS)
except OSError:
    os.execv(PYTHON, [PYTHON, *sys.argv[1:]])  # no server (any more): start cold
request = {{"args": args, "flags": flags, "cwd": os.getcwd(), "env": dict(os.environ), "client": os.getpid()}}
socket.send_fds(server, [json.dumps(request).encode() + b"\\n"], [0, 1, 2])
reply = server.makefile()
pid = json.loads(reply.readline())["pid"]
for forwarded in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT):
    signal.signal(forwarded, lambda number, frame: os.kill(pid, number))
line = reply.readline()
code = json.loads(line)["returncode"] if line else 1
if code < 0:  # die of the same signal
    if -code not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
'''


class WarmServer:
    def __init__(self, preload: list[str], env: dict):
        self.folder = Path(tempfile.mkdtemp(prefix="warm-"))
        self.address = str(self.folder / "socket")
        self.client = str(self.folder / "python")
        Path(self.client).write_text(CLIENT.format(python=sys.executable, address=self.address, warm=WARM))
        os.chmod(self.client, 0o755)
        self.log = open(self.folder / "server.log", "w")
        self.process = subprocess.Popen([sys.executable, __file__, self.address, *preload], env=env,
                                        stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        # Until the server listens, a client starts cold (it cannot connect): nobody waits for it.

    def wait_until_ready(self, timeout: float = 300) -> None:
        """Block until the server listens (the clients of tests that must run warm start after it)."""
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.address):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the warm server is not up; see {self.log.name}")
            time.sleep(0.1)

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        self.log.close()
        for path in self.folder.iterdir():
            path.unlink()
        self.folder.rmdir()


# ---------------------------------------------------------------------------------------------
# The server (python tests/warm.py ADDRESS MODULE...) and its children


def serve(address: str) -> dict:
    """Fork a child per request and report its exit; returns the request in the child."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(address + ".tmp")
    listener.listen(64)
    os.rename(address + ".tmp", address)  # clients connect only once it listens
    waiting = {}  # pidfd -> (pid, connection)
    while True:
        ready, _, _ = select.select([listener, *waiting], [], [])
        for fd in ready:
            if fd is listener:
                connection = listener.accept()[0]
                data, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
                while data and not data.endswith(b"\n"):
                    more = connection.recv(1 << 20)
                    if not more:
                        break
                    data += more
                if len(fds) != 3 or not data.endswith(b"\n"):
                    connection.close(), [os.close(f) for f in fds]
                    continue
                sys.stdout.flush(), sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    listener.close(), connection.close()
                    for other_fd, (_, other) in waiting.items():
                        os.close(other_fd), other.close()
                    return {**json.loads(data), "fds": fds}
                [os.close(f) for f in fds]
                connection.sendall(json.dumps({"pid": pid}).encode() + b"\n")
                waiting[os.pidfd_open(pid)] = (pid, connection)
            else:
                pid, connection = waiting.pop(fd)
                os.close(fd)
                _, status = os.waitpid(pid, 0)
                try:
                    connection.sendall(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode() + b"\n")
                except OSError:  # the client is gone
                    pass
                connection.close()


def follow_client(pid: int) -> None:
    """Die with the client: a client killed by SIGKILL cannot pass the signal on."""
    try:
        select.select([os.pidfd_open(pid)], [], [])
    except ProcessLookupError:
        pass
    os.kill(os.getpid(), signal.SIGKILL)


def become(request: dict, client: str) -> None:
    """In the child: take over the client's stdio, folder, environment and identity."""
    for fd, passed in enumerate(request["fds"]):
        os.dup2(passed, fd)
        os.close(passed)
    threading.Thread(target=follow_client, args=(request["client"],), daemon=True).start()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if "-u" in request["flags"] or os.environ.get("PYTHONUNBUFFERED"):
        sys.stdout.reconfigure(write_through=True), sys.stderr.reconfigure(write_through=True)
    sys.executable = client
    tempfile.tempdir = None  # found again from this environment's TMPDIR
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()  # fresh entropy, as in a new interpreter (random reseeds itself)
    if request["args"][:2] == ["-m", "ipykernel_launcher"] and "matplotlib" in sys.modules and \
            not os.environ.get("MPLBACKEND"):  # what ipykernel sets before a cold kernel imports matplotlib
        sys.modules["matplotlib"].rcParams["backend"] = "module://matplotlib_inline.backend_inline"
    rank_zero = sys.modules.get("lightning.fabric.utilities.rank_zero")
    if rank_zero:  # Lightning reads the process's rank from the environment at import time
        rank_zero.rank_zero_only.rank = rank_zero._get_rank() or 0


def exit_as_python(run) -> None:
    """Run `run` and end the process as the interpreter ends one (exit code, traceback, thread
    joins, atexit handlers, flushed output), less the seconds it spends taking every module apart."""
    code, interrupted = 0, False
    try:
        run()
    except SystemExit as stop:
        code = stop.code
    except BaseException as error:
        sys.excepthook(type(error), error, error.__traceback__)
        code, interrupted = 1, isinstance(error, KeyboardInterrupt)
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    threading._shutdown()  # as the interpreter does first: thread pools' exit hooks, then joins
    atexit._run_exitfuncs()
    sys.stdout.flush(), sys.stderr.flush()
    if interrupted:  # as Python does: die of SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code & 0xFF)


def main() -> None:
    import importlib
    import runpy

    address, *preload = sys.argv[1:]
    for name in preload:
        importlib.import_module(name)
    request = serve(address)
    become(request, str(Path(address).with_name("python")))
    args = request["args"]
    if args[0] == "-c":
        sys.argv = ["-c", *args[2:]]
        sys.path[0] = ""
        exit_as_python(lambda: exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"}))
    elif args[0] == "-m":
        # A fresh `python -m X` runs X as __main__ beside any X that other modules import: the
        # same here, where X may be among those imports already (runpy would warn).
        sys.modules.pop(args[1], None)
        sys.argv = [args[1], *args[2:]]
        sys.path[0] = os.getcwd()
        exit_as_python(lambda: runpy.run_module(args[1], run_name="__main__", alter_sys=True))
    else:
        sys.argv = list(args)
        sys.path[0] = str(Path(args[0]).resolve().parent)
        exit_as_python(lambda: runpy.run_path(args[0], run_name="__main__"))


if __name__ == "__main__":
    main()
