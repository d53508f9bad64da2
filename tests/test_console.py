"""What the terminal shows (rlhf/console.py): our lines and errors on it, every component's log in a file.

The first tests run small scripts through the real entry point (rlhf.cli.hydra_main) and the real
redirection, without Ray. The last ones run ``python -m rlhf.train +experiment=tiny_smoke`` once in
its own process tree and count what reached its stdout and stderr.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from support.runs import ROOT, TrainProcess

# A stand-in for a run: our lines, a warning of ours, library noise of three kinds, then a failure.
NOISY_RUN = textwrap.dedent("""
    import logging, os, warnings
    from rlhf.cli import hydra_main

    def run(cfg):
        print("step 1/2 reward=0.500")
        logging.getLogger("rlhf.experience.prompts").warning("dropped 3 of 10 prompts")
        logging.getLogger("vllm").warning("library logging noise")
        warnings.warn("deprecated noise", FutureWarning)
        os.write(2, b"native noise\\n")  # as C++ code writes: straight to the descriptor
        raise RuntimeError("rollout engine 0 died during generate")

    if __name__ == "__main__":
        hydra_main(run)()
""")


def run_script(tmp_path: Path, source: str, *args: str) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(source)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(script), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_an_error_reaches_the_terminal_with_where_the_logs_are(tmp_path):
    out = tmp_path / "run"
    done = run_script(tmp_path, NOISY_RUN, f"trainer.output_dir={out}")
    logs = out / "logs"
    assert done.returncode == 1, done.stderr
    assert done.stdout.splitlines() == [
        f"component logs: {logs}/ (trainer.console=full shows them here instead)",
        "step 1/2 reward=0.500",
    ]
    assert "WARNING rlhf.experience.prompts: dropped 3 of 10 prompts" in done.stderr  # our warnings are for the user
    assert "RuntimeError: rollout engine 0 died during generate" in done.stderr
    assert done.stderr.rstrip().endswith(f"full logs of the run's components: {logs}/ (driver.log)")
    assert "noise" not in done.stdout + done.stderr
    driver_log = (logs / "driver.log").read_text()
    for line in ["step 1/2 reward=0.500", "library logging noise", "FutureWarning: deprecated noise",
                 "native noise", "RuntimeError: rollout engine 0 died during generate"]:
        assert line in driver_log, line


def test_full_console_keeps_everything_live_and_writes_no_logs(tmp_path):
    out = tmp_path / "run"
    done = run_script(tmp_path, NOISY_RUN, f"trainer.output_dir={out}", "trainer.console=full")
    assert done.returncode == 1
    assert "step 1/2 reward=0.500" in done.stdout
    for line in ["library logging noise", "deprecated noise", "native noise",
                 "RuntimeError: rollout engine 0 died during generate"]:
        assert line in done.stdout + done.stderr, line
    assert not (out / "logs").exists()


def test_an_unknown_console_mode_is_a_config_error(tmp_path):
    done = run_script(tmp_path, NOISY_RUN, f"trainer.output_dir={tmp_path / 'run'}", "trainer.console=quiet")
    assert done.returncode == 2
    assert done.stderr.strip() == "config error: trainer.console='quiet' is not one of ['progress', 'full']"


def test_redirected_output_includes_native_writes_and_child_processes(tmp_path):
    """What an actor does at start: afterwards nothing of it (or of the processes it starts, as vLLM
    starts its engine core) reaches the terminal, and all of it is in its log file."""
    log = tmp_path / "logs" / "engine-0.log"
    done = run_script(tmp_path, textwrap.dedent("""
        import logging, os, subprocess, sys
        from rlhf.console import redirect_output

        print("before")
        redirect_output(sys.argv[1])
        print("python print")
        logging.getLogger("vllm").warning("library logging")
        os.write(2, b"native stderr\\n")
        subprocess.run([sys.executable, "-c", "print('child process')"], check=True)
    """), str(log))
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == ("before\n", "")
    text = log.read_text()
    for line in ["python print", "library logging", "native stderr", "child process"]:
        assert line in text, line


# ----------------------------------------------------------------------------- a real run
@pytest.fixture(scope="module")
def tiny_run(tiny_model_path, tmp_path_factory):
    """One ``python -m rlhf.train +experiment=tiny_smoke``, default console. rollout.reproducible=false:
    vLLM then runs its engine core in a process of its own, whose output must reach the engine's log
    through the inherited descriptors (the actor's own output is checked too)."""
    tmp = tmp_path_factory.mktemp("console")
    run = TrainProcess(["+experiment=tiny_smoke", f"trainer.output_dir={tmp / 'run'}",
                        "rollout.reproducible=false"], tmp / "console.txt")
    try:
        code = run.wait(timeout_s=900)
        console = run.output()
    finally:
        survivors = run.close()
    return code, console, tmp / "run", survivors


def test_a_run_prints_only_its_progress(tiny_run):
    code, console, run_dir, survivors = tiny_run
    assert code == 0 and survivors == [], console[-3000:]
    lines = console.splitlines()
    # tiny_smoke: 1 "component logs:" line + eval @ step 0 + 2 step lines + eval @ step 2 + the cost
    # summary's 8 lines (rlhf/run/ledger.py format_summary: header, wall time, tokens, teacher tokens,
    # run cost, serving cost, closed API, ratio) + "run folder:" = 14. Before, ~70 lines.
    assert len(lines) <= 14, console
    ours = ["component logs:", "eval @ step 0:", "step 1/2 ", "step 2/2 ", "eval @ step 2:", "cost ledger",
            "run folder:"]
    starts = [next(i for i, line in enumerate(lines) if line.startswith(prefix)) for prefix in ours]
    assert starts == sorted(starts), console  # all there, in the order they happen


def test_the_components_logs_are_in_the_run_folder(tiny_run):
    code, console, run_dir, _ = tiny_run
    assert code == 0, console[-3000:]
    logs = run_dir / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["driver.log", "engine-0.log", "learner-rank-0.log"]
    engine = (logs / "engine-0.log").read_text()
    assert "non-default args" in engine  # vLLM's LLM(), in the actor's process
    assert "Initializing a V1 LLM engine" in engine  # vLLM's engine core, in its own process
    assert "Loading weights" in (logs / "learner-rank-0.log").read_text()  # transformers, in the rank
    driver = (logs / "driver.log").read_text()
    assert "Started a local Ray instance" in driver  # Ray's own logging in this process
    assert "step 2/2 " in driver  # our lines too, so the file reads as the whole story
