"""Running untrusted code (a model's completion) against tests in a contained subprocess.

What contains it, strongest available first (:func:`isolation` says which one this machine gets):

- ``namespaces`` (running as root): ``unshare --net --mount``. The new network namespace has no
  interfaces up, so every connection fails. In the new mount namespace, fresh tmpfs mounts cover
  /tmp, /var/tmp, /dev/shm and /run/lock; the code runs in that private /tmp (a throw-away working
  directory that vanishes with the process). Before the code runs, the harness drops to the
  ``nobody`` user (with no_new_privs set), so it cannot write anywhere else, read root's files,
  or raise its own limits.
- ``userns`` (not root, user namespaces allowed): ``unshare --user --map-root-user --net
  --mount`` with the same tmpfs mounts; no user switch, so files the calling user may write
  elsewhere stay writable.
- ``socket-patch`` (neither): a throw-away directory from ``tempfile``; network blocked only by
  replacing ``socket.socket`` in the harness, which determined code can get around. Weak: use it
  for trusted-ish code only.

Always: an empty environment (no parent variables), ``python -I``, resource limits set by the
harness before the code runs (address space, CPU seconds, file size, core dumps, processes), a
wall-clock limit enforced by the parent (the whole process group is killed), the code's own
stdout/stderr discarded. Results come back on a private descriptor, each line tagged with a random
nonce so printed text cannot pose as a result. This is containment, not a proof against code
written to attack the harness itself (it runs in the same interpreter as the code).

Whose fault a bad run is: the harness reports "ready" just before it runs the code. Without that
line (``unshare``, a mount, the limits, ``prctl``/``setuid`` or the interpreter start failed or ran
past the time limit) no test result means nothing about the code, so :func:`run_tests` raises
:class:`SandboxError` (the reward runner counts a failure). After it, a crash, a timeout, a memory
blow-up or an early exit is the code's doing and its tests count as failed. :func:`isolation`
picks a mode by running a real probe job through that same path.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

_PRIVATE_MOUNTS = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock")
# Imported before dropping privileges: the interpreter's own files may be unreadable to `nobody`.
_PRELOAD = ("math", "cmath", "itertools", "functools", "collections", "heapq", "bisect", "re",
            "string", "random", "json", "typing", "dataclasses", "operator", "fractions", "decimal",
            "statistics", "copy", "time", "datetime", "array", "io", "socket", "traceback",
            "encodings.idna", "encodings.latin_1", "unicodedata")


class SandboxError(RuntimeError):
    """The sandbox itself failed before the code ran: no verdict on the code (not a 0)."""


@dataclass(frozen=True)
class SandboxLimits:
    time_s: float = 5.0  # wall clock for the whole run: interpreter start, the code, every test
    memory_mb: int = 512  # address space (RLIMIT_AS)
    file_size_mb: int = 16  # largest file the code may write (RLIMIT_FSIZE)
    max_processes: int = 32  # RLIMIT_NPROC of the sandbox user (namespaces mode)


@dataclass
class SandboxResult:
    outcomes: list[str]  # per test: "pass", "fail: <error>", or "not run" (killed or exited first)
    setup_error: str | None = None  # the code itself raised before any test ran
    timed_out: bool = False
    returncode: int | None = None
    isolation: str = ""
    stderr: str = field(default="", repr=False)  # the harness's own stderr (code output is discarded)

    @property
    def passed(self) -> int:
        return sum(o == "pass" for o in self.outcomes)

    @property
    def fraction(self) -> float:
        return self.passed / len(self.outcomes) if self.outcomes else 0.0


# The start-up probe: a file written in the working directory and read back by a test, run through
# every step a real job takes (unshare, mounts, limits, privilege drop).
_PROBE_CODE = "open('probe.txt', 'w').write('ok')\n"
_PROBE_TESTS = ["assert open('probe.txt').read() == 'ok'"]
_PROBE_LIMITS = SandboxLimits(time_s=30.0)  # generous: interpreter start on a loaded machine


@functools.lru_cache(maxsize=1)
def isolation() -> str:
    """The strongest containment whose probe job passes: ``namespaces``, ``userns`` or ``socket-patch``.

    A mode whose probe fails is logged (with why) and the next one is tried; if none passes,
    :class:`SandboxError`.
    """
    candidates = []
    if shutil.which("unshare") and shutil.which("mount"):
        if os.geteuid() == 0:
            candidates.append("namespaces")
        candidates.append("userns")
    candidates.append("socket-patch")
    failures = []
    for mode in candidates:
        try:
            result = _run(mode, _PROBE_CODE, _PROBE_TESTS, _PROBE_LIMITS)
        except (SandboxError, OSError) as e:
            failures.append(f"{mode}: {e}")
        else:
            if result.outcomes == ["pass"]:
                return mode
            failures.append(f"{mode}: probe test outcomes {result.outcomes}, setup_error={result.setup_error!r}")
        log.warning("sandbox isolation %r does not work here, trying a weaker one: %s", mode, failures[-1])
    raise SandboxError("no sandbox isolation mode works on this machine: " + "; ".join(failures))


def run_tests(code: str, tests: list[str], limits: SandboxLimits = SandboxLimits()) -> SandboxResult:
    """Run ``code``, then each test (Python statements, e.g. ``assert f(2) == 4``) in its namespace.

    Raises :class:`SandboxError` when the harness failed before the code ran.
    """
    return _run(isolation(), code, tests, limits)


def _run(mode: str, code: str, tests: list[str], limits: SandboxLimits) -> SandboxResult:
    nonce = secrets.token_hex(16)
    payload = {
        "nonce": nonce,
        "code": code,
        "tests": list(tests),
        "memory_bytes": limits.memory_mb * 2**20,
        "cpu_s": int(limits.time_s) + 1,
        "file_bytes": limits.file_size_mb * 2**20,
        "max_processes": limits.max_processes,
        "drop_to": _nobody() if mode == "namespaces" else None,
        "block_sockets": mode == "socket-patch",
        "preload": list(_PRELOAD),
    }
    # The real interpreter, not a venv link: a venv under /tmp vanishes behind the sandbox's private
    # /tmp, and the harness needs the standard library only.
    python = [os.path.realpath(sys.executable), "-I", "-c", _HARNESS]
    workdir = None
    if mode == "socket-patch":
        workdir = tempfile.mkdtemp(prefix="rlhf-sandbox-")
        cmd, cwd = python, workdir
    else:
        mounts = " && ".join(
            f"{shutil.which('mount')} -t tmpfs -o size=64m,mode=1777 tmpfs {d}"
            for d in _PRIVATE_MOUNTS if os.path.isdir(d)
        )
        user = ["--user", "--map-root-user"] if mode == "userns" else []
        cmd = [shutil.which("unshare"), *user, "--net", "--mount", "--", "/bin/sh", "-c",
               f'{mounts} && cd /tmp && exec "$@"', "sandbox", *python]
        cwd = "/"
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={}, cwd=cwd, start_new_session=True)
        timed_out = False
        try:
            out, err = proc.communicate(json.dumps(payload).encode(), timeout=limits.time_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
    finally:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    result, ready, harness_error = _parse(out.decode(errors="replace"), nonce, len(tests), timed_out,
                                          proc.returncode, mode, err.decode(errors="replace")[-2000:])
    if not ready:
        why = harness_error or (f"killed after time_s={limits.time_s}" if timed_out else
                                f"exit code {proc.returncode}, stderr: {result.stderr.strip()[-500:]!r}")
        raise SandboxError(f"the sandbox ({mode}) failed before the code ran: {why}")
    return result


def extract_code(completion: str) -> str:
    """The last fenced code block (```python ... ``` or ``` ... ```), else the whole completion."""
    fence = "```"
    end = completion.rfind(fence)
    start = completion.rfind(fence, 0, end) if end > 0 else -1
    if start < 0:
        return completion
    block = completion[start + len(fence) : end]
    first_line, _, rest = block.partition("\n")
    return rest if first_line.strip().isidentifier() or not first_line.strip() else block


def _parse(out: str, nonce: str, num_tests: int, timed_out: bool, returncode: int | None, mode: str,
           stderr: str) -> tuple[SandboxResult, bool, str | None]:
    """(the result, whether the harness reached the code, the harness's own error if it reported one)."""
    outcomes = ["not run"] * num_tests
    setup_error = harness_error = None
    ready = False
    for line in out.splitlines():
        try:
            tag, index, status, detail = json.loads(line)
        except (ValueError, TypeError):
            continue
        if tag != nonce:
            continue
        if status == "ready":
            ready = True
        elif status == "harness":
            harness_error = detail
        elif index == -1:
            setup_error = detail
        elif 0 <= index < num_tests:
            outcomes[index] = "pass" if status == "pass" else f"fail: {detail}"
    result = SandboxResult(outcomes=outcomes, setup_error=setup_error, timed_out=timed_out,
                           returncode=returncode, isolation=mode, stderr=stderr)
    return result, ready, harness_error


def _nobody() -> list[int]:
    try:
        entry = pwd.getpwnam("nobody")
        return [entry.pw_uid, entry.pw_gid]
    except KeyError:
        return [65534, 65534]


# Runs inside the sandbox as `python -I -c`, reading its job as JSON on stdin. Everything before
# exec(code) is ours; the order matters: imports, limits, then privileges are dropped. Its own
# failures are reported as "harness" (stderr is /dev/null by then); "ready" marks the hand-over.
_HARNESS = r'''
import json, os, resource, sys

def main():
    job = json.loads(sys.stdin.read())
    nonce = job.pop("nonce")
    results = os.fdopen(os.dup(1), "w", buffering=1)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)

    def report(index, status, detail=""):
        results.write(json.dumps([nonce, index, status, detail[:300]]) + "\n")

    try:
        contain(job)
    except BaseException as e:
        report(None, "harness", f"{type(e).__name__}: {e}")
        return
    report(None, "ready")
    run(job, report)

def contain(job):
    for name in job["preload"]:
        try:
            __import__(name)
        except ImportError:
            pass
    import ctypes  # the harness's own, before the memory limit (loading it maps memory)
    for limit, value in ((resource.RLIMIT_AS, job["memory_bytes"]), (resource.RLIMIT_CPU, job["cpu_s"]),
                         (resource.RLIMIT_FSIZE, job["file_bytes"]), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(limit, (value, value))
    if job["drop_to"] is not None:
        uid, gid = job["drop_to"]
        resource.setrlimit(resource.RLIMIT_NPROC, (job["max_processes"], job["max_processes"]))
        if ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
            raise OSError("prctl(PR_SET_NO_NEW_PRIVS) failed")
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    if job["block_sockets"]:
        import socket

        class _Blocked(socket.socket):
            def __init__(self, *a, **k):
                raise PermissionError("network access is disabled in the sandbox")

        socket.socket = _Blocked
        socket.create_connection = lambda *a, **k: _Blocked()

def run(job, report):
    scope = {"__name__": "solution"}
    try:
        exec(compile(job["code"], "solution.py", "exec"), scope)
    except BaseException as e:
        report(-1, "error", f"{type(e).__name__}: {e}")
        for i in range(len(job["tests"])):
            report(i, "fail", "the solution raised before the tests ran")
        return
    for i, test in enumerate(job["tests"]):
        try:
            exec(compile(test, f"test_{i}", "exec"), scope)
            report(i, "pass")
        except BaseException as e:
            report(i, "fail", f"{type(e).__name__}: {e}")

main()
sys.stdout.flush()
os._exit(0)
'''
