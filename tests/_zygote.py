"""Single-process training launches forked from an interpreter that has already imported everything.

A launch of `python tests/_resume_util.py ...` spends ~2.2 s of its ~2.4 s on the 2-core CI machine
starting the interpreter and importing torch, pyarrow and distlstm before the first step, and the
resume tests start dozens of them (the SIGKILL test alone 26). The zygote pays for the imports once.
Each launch is then a fork of it that sets argv, the environment and the working directory, points
stdin at /dev/null and stdout and stderr at the launch's log, starts a session of its own and runs
`_resume_util.main()`, the same entry point and command line as the fresh interpreter runs, and
exits through the interpreter's normal shutdown (atexit, flushes). Signals and SIGKILLs reach it as
they reach any process. What differs from a fresh interpreter: the process's /proc cmdline is the
zygote's (so `"target": "job"`, which finds a run's processes by command line, stays with torchrun
launches, which never come here), and the OpenMP thread count is read once, from the zygote's
environment (the tests launch everything with OMP_NUM_THREADS=1).

The reference runs (tests/test_resume.py's `clean_one`) still start a fresh interpreter, so a
zygote launch that drifted from the CLI shows as a parameter hash that differs from theirs.
DISTLSTM_TEST_ZYGOTE=0 starts a fresh interpreter for every launch.

Protocol, one Unix-socket connection per launch: the client sends one JSON line {"argv", "env",
"cwd", "log"}; the zygote forks a handler (so that launches can overlap), the handler forks the
training process and answers "pid N", waits for it and answers "exit CODE" (subprocess's convention:
-N for death by signal N).
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------- the zygote


def _serve(path: str) -> None:
    sys.path.insert(0, str(HERE))
    import _resume_util  # noqa: F401  (and through it, on first use: distlstm.train, torch, pyarrow)
    import distlstm.checkpoint.manager  # noqa: F401
    import distlstm.run.trainer  # noqa: F401
    import distlstm.train  # noqa: F401

    parent = os.getppid()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the handlers are reaped by the kernel
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    server.settimeout(1.0)
    print("ready", flush=True)
    while os.getppid() == parent:  # ends with the test session that started it
        try:
            conn, _ = server.accept()
        except TimeoutError:
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            server.close()
            _handle(conn)  # returns only in the training process
            return
        conn.close()


def _handle(conn: socket.socket) -> None:
    """In the handler: fork the training process, report its pid and then its exit status."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # waitpid below, and subprocesses of the trainer
    conn.settimeout(None)
    request = json.loads(_read_line(conn))
    pid = os.fork()
    if pid == 0:
        conn.close()
        _become_trainer(request)
        return
    conn.sendall(f"pid {pid}\n".encode())
    _, status = os.waitpid(pid, 0)
    conn.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
    os._exit(0)


def _become_trainer(request: dict) -> None:
    os.setsid()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    stdin = os.open(os.devnull, os.O_RDONLY)
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(stdin, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(stdin)
    os.close(log)
    sys.argv = [str(HERE / "_resume_util.py"), *request["argv"]]
    import _resume_util
    # The interpreter's own exit: SystemExit unwinds _serve, and the zygote's `__main__` exits with it.
    raise SystemExit(_resume_util.main())


def _read_line(conn: socket.socket, deadline: float | None = None) -> str:
    data = b""
    while not data.endswith(b"\n"):
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            conn.settimeout(left)
        chunk = conn.recv(256)
        if not chunk:
            raise ConnectionError(f"the zygote closed the connection after {data!r}")
        data += chunk
    return data.decode().strip()


# ------------------------------------------------------------------------------------- the client


class Launch:
    """One forked training process: `pid` (also its session id) and `wait()` for its exit code."""

    def __init__(self, conn: socket.socket):
        self.conn = conn
        self.pid = int(_read_line(conn, time.monotonic() + 60).removeprefix("pid "))

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code, or None when `timeout` seconds pass first."""
        try:
            line = _read_line(self.conn, None if timeout is None else time.monotonic() + timeout)
        except TimeoutError:
            return None
        self.conn.close()
        return int(line.removeprefix("exit "))


class Zygote:
    def __init__(self, env: dict):
        self.dir = tempfile.mkdtemp(prefix="distlstm-zygote-")
        self.path = os.path.join(self.dir, "socket")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), self.path], env=env,
                                     stdout=subprocess.PIPE, text=True, start_new_session=True)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.close()
            raise RuntimeError(f"the test zygote did not start (printed {line!r}, exit {self.proc.poll()})")

    def launch(self, argv: list[str], *, env: dict, cwd: str, log: str) -> Launch:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.path)
        conn.sendall((json.dumps({"argv": argv, "env": env, "cwd": cwd, "log": log}) + "\n").encode())
        return Launch(conn)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.rmdir(self.dir)


_zygotes: dict[tuple, Zygote] = {}


def zygote(env: dict) -> Zygote | None:
    """The zygote for launches with `env` (one per distinct OMP_NUM_THREADS and PYTHONPATH, what an
    interpreter reads at start), started on first use; None with DISTLSTM_TEST_ZYGOTE=0."""
    if os.environ.get("DISTLSTM_TEST_ZYGOTE", "1") == "0":
        return None
    key = (env.get("OMP_NUM_THREADS"), env.get("PYTHONPATH"))
    if key not in _zygotes:
        _zygotes[key] = Zygote(env)
        atexit.register(_zygotes[key].close)
    return _zygotes[key]


if __name__ == "__main__":
    _serve(sys.argv[1])
