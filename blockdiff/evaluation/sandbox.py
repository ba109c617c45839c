"""Run untrusted model-written programs: one isolated `python -I` process each, with limits.

What this protects against is a weak model's accidents (infinite loops, huge allocations,
floods of output, sys.exit, crashes), not a deliberate attacker: like HumanEval's own
execution harness it is not a security boundary. A program passes only if the harness inside
the child reaches its end and writes a nonce the program never saw, so `sys.exit(0)` or
`os._exit(0)` before the tests ran counts as a failure, not a pass.
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# Runs in the child. The limits are set here, first thing, rather than in a preexec_fn: the
# parent has torch's worker threads running, and the subprocess docs warn that preexec_fn can
# deadlock the child in a threaded parent. The effect is the same: both soft and hard limits
# are set before a line of the candidate runs, so it cannot raise them back.
_HARNESS = """\
import resource, sys
for name, value in {limits!r}:
    resource.setrlimit(getattr(resource, name), (value, value))
nonce = sys.stdin.readline().strip()
sys.stdin.close()
source = open("program.py", encoding="utf-8").read()
exec(compile(source, "program.py", "exec"), {{"__name__": "__main__"}})
with open("passed", "w") as f:
    f.write(nonce)
"""

OUTPUT_TAIL = 2000  # characters of stderr kept per program, enough for the traceback's last line


@dataclass
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock, then the whole process group is killed
    memory_bytes: int = 1 << 30  # RLIMIT_AS
    output_bytes: int = 1 << 20  # RLIMIT_FSIZE on the stdout/stderr files: a flood is killed, not stored

    def rlimits(self) -> list[tuple[str, int]]:
        cpu = int(self.timeout_s) + 1  # a busy loop also dies on CPU time even if the clock is slow
        return [("RLIMIT_AS", self.memory_bytes), ("RLIMIT_CPU", cpu),
                ("RLIMIT_FSIZE", self.output_bytes), ("RLIMIT_CORE", 0)]


@dataclass
class SandboxResult:
    passed: bool
    status: str  # passed | failed | timeout | error (could not even start)
    returncode: int | None
    stderr_tail: str = ""


def run_program(source: str, limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run `source` (candidate + tests + the call to check) in a fresh interpreter."""
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="blockdiff-eval-") as tmp:
        work = Path(tmp)
        (work / "program.py").write_text(source, encoding="utf-8")
        (work / "harness.py").write_text(_HARNESS.format(limits=limits.rlimits()), encoding="utf-8")
        # A clean environment: no tokens, keys or proxy settings of the caller leak into the child,
        # and -I ignores PYTHON* variables, the user site directory and the script's directory.
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": tmp, "TMPDIR": tmp}
        with open(work / "stdout", "wb") as out, open(work / "stderr", "wb") as err:
            try:
                proc = subprocess.Popen([sys.executable, "-I", "harness.py"], cwd=tmp, env=env,
                                        stdin=subprocess.PIPE, stdout=out, stderr=err,
                                        start_new_session=True)  # its own group, so kill takes children too
            except OSError as e:
                return SandboxResult(False, "error", None, str(e))
            try:
                proc.communicate(input=(nonce + "\n").encode(), timeout=limits.timeout_s)
                status = None
            except subprocess.TimeoutExpired:
                status = "timeout"
            finally:
                _kill_group(proc)
        passed_file = work / "passed"
        passed = status is None and proc.returncode == 0 and passed_file.is_file() \
            and passed_file.read_text(errors="replace") == nonce
        status = status or ("passed" if passed else "failed")
        return SandboxResult(passed, status, proc.returncode, _tail(work / "stderr"))


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill the child and anything it forked, and reap it.

    After a normal exit the group may still hold forked children; its id cannot be reused while
    they live, and once they are gone killpg fails with ProcessLookupError, which is ignored.
    """
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _tail(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - OUTPUT_TAIL))
        return f.read().decode("utf-8", errors="replace")


def run_programs(sources: list[str], limits: SandboxLimits = SandboxLimits(),
                 workers: int = 4) -> list[SandboxResult]:
    """Run many programs, a few at a time (each is a subprocess, so threads are enough)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda s: run_program(s, limits), sources))
