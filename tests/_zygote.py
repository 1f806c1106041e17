"""One-process command launches forked from an interpreter that has already imported everything.

`python -m distlstm.<command> ...` (or `python tests/_resume_util.py ...`) spends ~2.1 s of its
first ~2.4 s on the 2-core CI machine starting the interpreter and importing torch, pyarrow and
distlstm, and the tests start a few hundred of them (the SIGKILL resume test alone 26). The zygote
pays for the imports once. Each launch is then a fork of it that sets argv, the environment, the
working directory and sys.path[0] as `python` would, points stdin at /dev/null and stdout and stderr
at files, starts a session of its own and runs the module or script as `__main__` (runpy, as
`python -m` and `python script.py` do), then exits through the interpreter's normal shutdown
(atexit, flushes). Signals and SIGKILLs reach it as they reach any process. What differs from a
fresh interpreter: the process's /proc cmdline is the zygote's (so `"target": "job"` of
_resume_util, which finds a run's processes by command line, stays with torchrun launches, which
never come here), and what an interpreter reads at its start (OMP_*, MKL_*, TORCH_*, PYTHON*
variables) comes from the zygote's environment: there is one zygote per distinct set of them.

Reference runs that other launches are compared with stay fresh interpreters (tests/test_resume.py's
`clean_one`: a zygote launch that drifted from the CLI shows as a different parameter hash), and
the tests of the command line itself (tests/test_layout.py, the README walk) never come here.
DISTLSTM_TEST_ZYGOTE=0 starts a fresh interpreter for every launch.

Protocol, one Unix-socket connection per launch: the client sends one JSON line {"argv", "env",
"cwd", "stdout", "stderr"}; the zygote forks a handler (so that launches can overlap), the handler
forks the command's process and answers "pid N", waits for it and answers "exit CODE"
(subprocess's convention: -N for death by signal N).
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# ------------------------------------------------------------------------------------- the zygote


def _serve(path: str) -> None:
    import distlstm.evaluate  # noqa: F401  (and through them torch, pyarrow, the whole package)
    import distlstm.export  # noqa: F401
    import distlstm.generate  # noqa: F401
    import distlstm.predict  # noqa: F401
    import distlstm.prep  # noqa: F401
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
            _handle(conn)  # returns only in the command's process
            return
        conn.close()


def _handle(conn: socket.socket) -> None:
    """In the handler: fork the command's process, report its pid and then its exit status."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # waitpid below, and the command's own subprocesses
    conn.settimeout(None)
    with conn.makefile("rb") as lines:
        request = json.loads(lines.readline())
    pid = os.fork()
    if pid == 0:
        conn.close()
        _become_command(request)
        return
    conn.sendall(f"pid {pid}\n".encode())
    _, status = os.waitpid(pid, 0)
    conn.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
    os._exit(0)


def _become_command(request: dict) -> None:
    os.setsid()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    stdin = os.open(os.devnull, os.O_RDONLY)
    os.dup2(stdin, 0)
    os.close(stdin)
    for fd, name in ((1, "stdout"), (2, "stderr")):
        out = os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(out, fd)
        os.close(out)
    argv = request["argv"]
    # The interpreter's own exit: SystemExit unwinds _serve, and the zygote's `__main__` exits with it.
    if argv[0] == "-m":
        spec = importlib.util.find_spec(argv[1])
        sys.argv = [spec.origin, *argv[2:]]
        sys.path[0] = os.getcwd()  # `python -m` puts the working directory first
        # `python -m` runs the module as __main__ before anything imports it under its own name
        # (an import of it then makes a second copy); forget the zygote's copy so that the same holds.
        sys.modules.pop(argv[1], None)
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))  # `python script.py`: the script's folder
        runpy.run_path(argv[0], run_name="__main__")
    raise SystemExit(0)


# ------------------------------------------------------------------------------------- the client


class Launch:
    """One forked process: `pid` (also its session id) and `wait()` for its exit code."""

    def __init__(self, conn: socket.socket):
        self.conn, self.received = conn, b""
        self.pid = int(self._line(time.monotonic() + 60).removeprefix("pid "))

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code, or None when `timeout` seconds pass first."""
        try:
            line = self._line(None if timeout is None else time.monotonic() + timeout)
        except TimeoutError:
            return None
        self.conn.close()
        return int(line.removeprefix("exit "))

    def _line(self, deadline: float | None) -> str:
        """The next line from the handler (both of its lines may arrive in one read)."""
        while b"\n" not in self.received:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self.conn.settimeout(left)
            chunk = self.conn.recv(256)
            if not chunk:
                raise ConnectionError(f"the test zygote closed the connection after {self.received!r}")
            self.received += chunk
        line, self.received = self.received.split(b"\n", 1)
        return line.decode()

    def kill(self) -> None:
        """SIGKILL the process's session and wait for the process."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.wait()


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

    def launch(self, argv: list[str], *, env: dict, cwd: str, stdout: str, stderr: str | None = None) -> Launch:
        """Start `python <argv>` (argv: ["-m", module, ...] or [script, ...]); output appended to the files."""
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.path)
        request = {"argv": argv, "env": env, "cwd": cwd, "stdout": stdout, "stderr": stderr or stdout}
        conn.sendall((json.dumps(request) + "\n").encode())
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
_READ_AT_START = ("OMP_", "MKL_", "KMP_", "TORCH_", "PYTHON")


def zygote(env: dict) -> Zygote | None:
    """The zygote for launches with `env` (one per distinct set of the variables an interpreter reads
    at its start), started on first use; None with DISTLSTM_TEST_ZYGOTE=0."""
    if os.environ.get("DISTLSTM_TEST_ZYGOTE", "1") == "0":
        return None
    key = tuple(sorted((k, v) for k, v in env.items() if k.startswith(_READ_AT_START)))
    if key not in _zygotes:
        _zygotes[key] = Zygote(env)
        atexit.register(_zygotes[key].close)
    return _zygotes[key]


def run(cmd: list[str], *, env: dict | None = None, cwd=None, timeout: float | None = None,
        check: bool = False) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True, ...)` for `cmd` = [sys.executable, "-m",
    module, ...] or [sys.executable, script.py, ...], forked from the zygote (see the module
    docstring); torchrun (`-m torch.distributed.run`), any other command, or DISTLSTM_TEST_ZYGOTE=0,
    runs as subprocess.run would."""
    env = dict(os.environ if env is None else env)
    python = len(cmd) > 1 and cmd[0] == sys.executable and (cmd[1].endswith(".py") or (
        cmd[1] == "-m" and len(cmd) > 2 and cmd[2] != "torch.distributed.run"))
    forks = zygote(env) if python else None
    if forks is None:
        return subprocess.run(cmd, env=env, cwd=cwd, timeout=timeout, check=check, capture_output=True, text=True)
    with tempfile.TemporaryDirectory(prefix="distlstm-run-") as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        child = forks.launch([str(a) for a in cmd[1:]], env=env, cwd=str(cwd or os.getcwd()), stdout=out,
                             stderr=err)
        code = child.wait(timeout)
        if code is None:
            child.kill()
        stdout, stderr = (Path(f).read_text(errors="replace") if os.path.exists(f) else "" for f in (out, err))
    if code is None:
        raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr)
    done = subprocess.CompletedProcess(cmd, code, stdout, stderr)
    if check:
        done.check_returncode()
    return done


if __name__ == "__main__":
    _serve(sys.argv[1])
