"""tests/warm.py: the tests' `python` that starts with torch imported must behave as a new python
process does, since every end-to-end test trusts what it reports."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import helpers


@pytest.fixture(scope="module")
def client() -> str:
    path = helpers.python()
    if path == sys.executable:
        pytest.skip("the tests start real interpreters here (TESTS_WARM=0)")
    helpers._warm.wait_until_ready()
    return path


def run(client: str, code: str, *args: str, cwd: Path | None = None, env: dict | None = None):
    return subprocess.run([client, "-c", code, *args], capture_output=True, text=True, timeout=60, cwd=cwd,
                          env=env)


def test_a_warm_process_is_a_new_one_with_the_callers_arguments_folder_environment_and_streams(client, tmp_path):
    code = ("import os, sys; print(os.getpid(), os.getcwd(), os.environ['PROBE'], sys.argv[1:], 'torch' in sys.modules,"
            " sys.executable); print('to stderr', file=sys.stderr); sys.exit(3)")
    done = run(client, code, "a", "b c", cwd=tmp_path, env={**os.environ, "PROBE": "value"})
    pid, cwd, probe, *rest = done.stdout.split(maxsplit=3)
    assert done.returncode == 3 and done.stderr == "to stderr\n"
    assert int(pid) not in (os.getpid(), helpers._warm.process.pid) and cwd == str(tmp_path) and probe == "value"
    assert rest == [f"['a', 'b c'] True {client}\n"]  # warm (torch is there), and it starts warm processes too


def test_it_ends_as_python_ends(client):
    assert run(client, "print('hi', end='')\nimport atexit; atexit.register(print, ' bye')").stdout == "hi bye\n"
    late = "import threading, time\nthreading.Thread(target=lambda: (time.sleep(0.3), print('joined'))).start()"
    assert run(client, late).stdout == "joined\n"
    pool = "import concurrent.futures as f\nf.ThreadPoolExecutor(1).submit(print, 'pooled')"  # never shut down
    assert run(client, pool).stdout == "pooled\n"
    error = run(client, "raise ValueError('boom')")
    assert error.returncode == 1 and error.stderr.startswith("Traceback") and "ValueError: boom" in error.stderr
    message = run(client, "import sys; sys.exit('stopped')")
    assert (message.returncode, message.stderr) == (1, "stopped\n")
    assert run(client, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)").returncode == -signal.SIGKILL
    assert run(client, "raise KeyboardInterrupt").returncode == -signal.SIGINT


def test_signals_reach_the_process_and_a_killed_client_takes_it_along(client):
    code = "import os, time; print(os.getpid(), flush=True); time.sleep(60)"
    for sent in (signal.SIGTERM, signal.SIGKILL):
        process = subprocess.Popen([client, "-c", code], stdout=subprocess.PIPE, text=True)
        child = int(process.stdout.readline())
        process.send_signal(sent)
        assert process.wait(timeout=30) == -sent
        deadline = time.monotonic() + 10
        while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
        process.stdout.close()


def test_other_commands_run_the_real_interpreter(client, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import sys\nprint('torch' in sys.modules, sys.executable)\n")
    done = subprocess.run([client, str(probe)], capture_output=True, text=True, timeout=60)
    assert done.stdout == f"False {sys.executable}\n"  # cold: imports nothing beforehand
