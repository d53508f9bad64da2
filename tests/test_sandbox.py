"""The code-execution sandbox: each hostile program is contained and reported; the caller carries on.

Every test checks the outcome the sandbox reports, and that the parent process is unaffected.
Which containment this machine gets is printed by `rewards.sandbox.isolation()`; the strongest
("namespaces", as root) is what these tests expect where it is available.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from rlhf.config import RewardConfig, RewardFnConfig
from rewards import sandbox
from rewards.builtin.code_exec import code_exec
from rewards.runner import RewardRunner
from rewards.sandbox import SandboxError, SandboxLimits, extract_code, isolation, run_tests

ADD = "def add(a, b):\n    return a + b\n"
needs_namespaces = pytest.mark.skipif(isolation() != "namespaces", reason=f"isolation is {isolation()}")


def test_pass_fraction():
    r = run_tests(ADD, ["assert add(1, 2) == 3", "assert add(2, 2) == 5", "assert add(-1, 1) == 0"])
    assert r.outcomes[0] == "pass" and r.outcomes[2] == "pass"
    assert r.outcomes[1].startswith("fail: AssertionError")
    assert r.fraction == pytest.approx(2 / 3)


def test_code_exec_reward_reads_the_fenced_block():
    completion = f"Here you go:\n```python\n{ADD}```\nDone."
    tests = ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]
    assert code_exec(["q"], [completion], tests=[tests]) == [1.0]
    # Tests as a JSON string (how csv/parquet columns often hold them): 1 of 2 passes.
    assert code_exec(["q"], [completion], tests=['["assert add(1, 2) == 3", "assert add(1, 1) == 3"]']) == [0.5]
    with pytest.raises(ValueError, match="`tests` column"):
        code_exec.score_one("q", completion)


def test_infinite_loop_is_killed_and_earlier_results_kept():
    r = run_tests(ADD, ["assert add(1, 2) == 3", "while True: pass", "assert True"], SandboxLimits(time_s=2))
    assert r.timed_out
    assert r.outcomes == ["pass", "not run", "not run"]
    assert r.fraction == pytest.approx(1 / 3)


def test_huge_allocation_hits_the_memory_limit():
    r = run_tests("x = bytearray(8 * 2**30)", ["assert True"], SandboxLimits(memory_mb=256))
    assert r.setup_error.startswith("MemoryError")
    assert r.fraction == 0.0 and not r.timed_out


def test_network_attempt_fails():
    code = "import socket\ns = socket.create_connection(('127.0.0.1', 22), timeout=2)\n"
    r = run_tests(code, ["assert True"])
    assert r.fraction == 0.0
    # In a fresh network namespace no interface is up, loopback included.
    expected = "Network is unreachable" if isolation() != "socket-patch" else "network access is disabled"
    assert expected in r.setup_error


def folder_outside_private_mounts() -> Path:
    """A root-owned folder of this test's own that the parent can write to, outside the mounts the
    sandbox replaces with its own (/tmp, ...). Not the home: it may itself lie under /tmp (a fresh
    machine's `HOME=$(mktemp -d)`), where the sandbox sees no such path at all, and a test has no
    business writing there."""
    for base in (Path("/var/cache"), Path("/opt"), Path("/srv"), Path.home()):
        real = base.resolve()
        hidden = any(real == Path(m) or Path(m) in real.parents for m in sandbox._PRIVATE_MOUNTS)
        if real.is_dir() and not hidden and os.access(real, os.W_OK):
            return Path(tempfile.mkdtemp(prefix="sandbox-escape-", dir=real))
    pytest.fail("no writable folder outside the sandbox's private mounts to test with")


@needs_namespaces
def test_write_outside_the_temp_dir_is_refused(tmp_path):
    # The sandboxed code runs as `nobody`: a root-owned folder the parent can write to is not its.
    folder = folder_outside_private_mounts()
    target = folder / "escaped.txt"
    try:
        r = run_tests(f"open({str(target)!r}, 'w').write('x')", ["assert True"])
        assert r.setup_error.startswith("PermissionError"), r.setup_error
        assert not target.exists()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    # The host's /tmp is hidden behind the sandbox's own: the parent's temp folder is not there.
    hidden = tmp_path / "escaped.txt"
    r = run_tests(f"open({str(hidden)!r}, 'w').write('x')", ["assert True"])
    assert r.setup_error.startswith("FileNotFoundError")
    assert not hidden.exists()


@needs_namespaces
def test_temp_dir_is_private_and_thrown_away():
    # The code may write in its working directory (/tmp inside the sandbox)...
    code = "open('scratch.txt', 'w').write('x')\nimport os\n"
    tests = ["assert os.getcwd() == '/tmp'", "assert os.listdir('.') == ['scratch.txt']"]
    assert run_tests(code, tests).fraction == 1.0
    # ...and nothing of it is left on the host, and a second run starts from an empty directory.
    assert not Path("/tmp/scratch.txt").exists()
    assert run_tests("import os", ["assert os.listdir('.') == []"]).fraction == 1.0


def test_parent_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("RLHF_SANDBOX_SECRET", "hunter2")
    code = "import os\nseen = os.environ.get('RLHF_SANDBOX_SECRET')\n"
    r = run_tests(code, ["assert seen is None", "assert 'PATH' not in os.environ and 'HOME' not in os.environ"])
    assert r.outcomes == ["pass", "pass"]
    assert os.environ["RLHF_SANDBOX_SECRET"] == "hunter2"  # the parent is untouched


def test_printed_text_cannot_pose_as_results():
    # A forged result line without the run's nonce is ignored; os._exit skips the real tests.
    code = 'print(\'["x", 0, "pass", ""]\')\nimport os\nos._exit(0)\n'
    r = run_tests(code, ["assert False"])
    assert r.outcomes == ["not run"] and r.fraction == 0.0


def test_sys_exit_in_the_code_fails_the_tests():
    r = run_tests("import sys\nsys.exit(0)", ["assert True"])
    assert r.setup_error.startswith("SystemExit") and r.fraction == 0.0


def test_a_sandbox_killed_before_the_code_ran_raises_instead_of_scoring_zero():
    # No interpreter starts (let alone unshare and the mounts) in 1 ms: the harness never reports
    # "ready", so the missing test results say nothing about the code.
    with pytest.raises(SandboxError, match=r"failed before the code ran: killed after time_s=0.001"):
        run_tests(ADD, ["assert add(1, 2) == 3"], SandboxLimits(time_s=0.001))


def test_harness_failure_is_a_counted_failure_in_the_runner():
    # Every completion hits the same harness failure: both are None and counted as failures
    # (max_failure_rate=1.0 so the runner reports instead of stopping).
    cfg = RewardConfig(functions=[RewardFnConfig(fn="code_exec", kwargs={"time_s": 0.001})],
                       timeout_s=30, max_failure_rate=1.0)
    with RewardRunner(cfg) as runner:
        got = runner.score(["q", "q"], [ADD, "x = 1"], {"tests": [["assert add(1, 2) == 3"], ["assert x == 1"]]})
    assert got.per_fn["code_exec"] == [None, None]
    assert got.metrics["reward/code_exec/failures"] == 2.0


def test_the_codes_own_memory_blow_up_still_scores_zero_in_the_runner():
    # The contrast to the harness failure: the code ran and failed, so the tests failed (0.0).
    cfg = RewardConfig(functions=[RewardFnConfig(fn="code_exec", kwargs={"memory_mb": 256})], timeout_s=30)
    with RewardRunner(cfg) as runner:
        got = runner.score(["q"], ["x = bytearray(8 * 2**30)"], {"tests": [["assert True"]]})
    assert got.per_fn["code_exec"] == [0.0]
    assert got.metrics["reward/code_exec/failures"] == 0.0


@needs_namespaces
def test_a_privilege_drop_failure_is_reported_by_the_harness(monkeypatch):
    # gid 2**32 does not fit in a gid_t: os.setgid fails inside the harness, whose stderr is
    # /dev/null by then; the error must come back on the results channel.
    monkeypatch.setattr(sandbox, "_nobody", lambda: [2**32, 2**32])
    with pytest.raises(SandboxError, match=r"\(namespaces\) failed before the code ran: OverflowError"):
        run_tests(ADD, ["assert add(1, 2) == 3"])


@needs_namespaces
def test_isolation_probe_runs_every_step_of_a_real_job(monkeypatch, caplog):
    # The probe must take the real path (unshare, mounts, limits, privilege drop), not `unshare
    # true`: with the privilege drop broken, "namespaces" cannot work and the probe says so.
    monkeypatch.setattr(sandbox, "_nobody", lambda: [2**32, 2**32])
    isolation.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="rewards.sandbox"):
            mode = isolation()
    finally:
        isolation.cache_clear()  # the next caller probes this machine as it really is
    assert mode in ("userns", "socket-patch")
    assert "'namespaces' does not work here" in caplog.text and "OverflowError" in caplog.text


def test_extract_code():
    assert extract_code("```python\nx = 1\n```") == "x = 1\n"
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("a\n```py\nx = 1\n```\nb\n```python\ny = 2\n```") == "y = 2\n"  # the last block
    assert extract_code("x = 1") == "x = 1"
