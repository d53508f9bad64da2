"""The agent API: what an agent is, how ``agent.name`` / ``agent.command`` become one, and one episode.

An agent is the application a team already runs against a chat API, pointed at our gateway
(rollouts/gateway/) instead. Either a Python callable::

    def my_agent(client: openai.OpenAI, row: dict, **kwargs) -> float | None: ...
    async def my_agent(client: openai.AsyncOpenAI, row: dict, **kwargs) -> float | None: ...

``client`` is ready to use (base URL and the episode's own key set, no retries: a failed call is the
agent's to handle); ``row`` is the prompt's row (``prompt``, ``prompt_text``, ``answer`` and
data.reward_columns, as an environment's ``reset`` gets it); ``kwargs`` are agent.kwargs. It returns
the episode's reward, or None to leave it to a reward posted to the gateway or to reward.functions.

Or an external program (``agent.command``, an argv list) in any language: it reads OPENAI_BASE_URL,
OPENAI_API_KEY and OPENAI_MODEL from its environment and the row as JSON on stdin; a number on the
last line of its stdout is its reward. Exiting non-zero is an error.

Named like rewards and environments (rlhf/specs.py): a built-in (:data:`BUILTINS`), ``pkg.mod:fn``
or ``path/to/file.py:fn``. :func:`play` runs one episode in the calling process, a thread of the
driver's or a Ray worker (agent.executor); limits and counting are rlhf/experience/agents.py's.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import math
import os
import shutil
import signal
import ssl
import subprocess
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from rlhf.specs import local_spec, resolve_spec

BUILTINS: dict[str, str] = {
    "calculator": "rollouts.env.builtin.calculator_agent:calculator_agent",
}
EXECUTORS = ("threads", "ray")


class AgentError(RuntimeError):
    """An episode's agent broke its side of the API: a command that exited non-zero, a callable
    that returned something other than a number or None."""


@dataclass(frozen=True)
class AgentSpec:
    """What each episode runs; plain data, so a Ray task can carry it. ``name`` is portable
    (rlhf/specs.py portable_spec) when it travels to another node."""

    name: str | None = None
    command: tuple[str, ...] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 120.0  # the HTTP client's, and a command's own limit
    model_name: str = "policy"  # OPENAI_MODEL for a command


def load_agent(name: str, kwargs: dict[str, Any] | None = None) -> Callable[..., Any]:
    """The callable ``name`` resolves to, checked to accept ``(client, row, **kwargs)``; ValueError
    naming agent.name or agent.kwargs otherwise."""
    kwargs = dict(kwargs or {})
    try:
        fn = resolve_spec(name, BUILTINS, "agent")
    except Exception as e:  # import errors and a user file's own errors, named by the spec
        raise ValueError(f"agent.name={name!r}: {type(e).__name__}: {e}") from None
    if inspect.isclass(fn) or not callable(fn):
        raise ValueError(f"agent.name={name!r} resolves to {type(fn).__name__} {fn!r:.60}, not a function: an "
                         "agent is called as agent(client, row, **agent.kwargs)")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin with no readable signature: the call will say
        return fn
    try:
        signature.bind(None, {}, **kwargs)
    except TypeError as e:
        key = f"agent.kwargs {sorted(kwargs)}" if kwargs else f"agent.name={name!r}"
        raise ValueError(f"{key}: {e}; {getattr(fn, '__name__', name)}{signature} is called as "
                         "agent(client, row, **agent.kwargs)") from None
    return fn


def check_command(command: list[str] | tuple[str, ...]) -> None:
    """The program exists and can be run (nothing is started); ValueError naming agent.command."""
    if not command or not all(isinstance(a, str) and a for a in command):
        raise ValueError(f"agent.command={command!r} must be a non-empty list of non-empty strings (an argv)")
    if shutil.which(command[0]) is None:
        raise ValueError(f"agent.command={list(command)!r}: {command[0]!r} is not an executable file or a program "
                         "on PATH")


_loaded: dict[tuple[str, str], Callable[..., Any]] = {}  # per process: (name, kwargs) -> callable


def play(spec: AgentSpec, base_url: str, key: str, row: dict[str, Any]) -> float | None:
    """One episode here: the agent's own reward (the callable's return value, or the number on a
    command's last stdout line), None when it gave none. Raises what the callable raised,
    AgentError (non-zero exit, a return value that is not a number), TimeoutError (a command past
    ``spec.timeout_s``: killed with its process group)."""
    if spec.command is not None:
        return _run_command(spec, base_url, key, row)
    cache_key = (spec.name, json.dumps(spec.kwargs, sort_keys=True, default=str))
    if cache_key not in _loaded:
        _loaded[cache_key] = load_agent(local_spec(spec.name), spec.kwargs)
    fn = _loaded[cache_key]
    import openai

    options = dict(base_url=base_url, api_key=key, max_retries=0, timeout=spec.timeout_s)
    if _is_async(fn):
        async def episode() -> Any:
            http = openai.DefaultAsyncHttpxClient(verify=_tls())
            async with openai.AsyncOpenAI(**options, http_client=http) as client:
                return await fn(client, row, **spec.kwargs)

        result = asyncio.run(episode())
    else:
        with openai.OpenAI(**options, http_client=openai.DefaultHttpxClient(verify=_tls())) as client:
            result = fn(client, row, **spec.kwargs)
    if inspect.isawaitable(result):
        raise AgentError(f"agent {spec.name!r} returned an awaitable from a plain def: declare it async def")
    return check_reward(spec.name, result)


_tls_context: ssl.SSLContext | None = None
_tls_lock = threading.Lock()


def _tls() -> ssl.SSLContext:
    """One default TLS context per process for the episodes' clients. Each client would otherwise
    load the CA store again (about 25 ms of CPU): 32 episodes starting together then reach the
    gateway over most of a second, and their first calls miss one another's batch."""
    global _tls_context
    with _tls_lock:
        if _tls_context is None:
            _tls_context = ssl.create_default_context()
        return _tls_context


def play_task(spec: AgentSpec, base_url: str, key: str, row: dict[str, Any]):
    """:func:`play` as a Ray task's body (rewards/remote.py RayTasks): a start marker, from which
    the episode's timeout runs, then the reward."""
    yield None
    yield play(spec, base_url, key, row)


def check_reward(name: str | None, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AgentError(f"agent {name!r} returned {type(value).__name__} {value!r:.60}; it returns the "
                         "episode's reward, a finite number, or None")
    return float(value)


def _is_async(fn: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))


def _run_command(spec: AgentSpec, base_url: str, key: str, row: dict[str, Any]) -> float | None:
    env = {**os.environ, "OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": key, "OPENAI_MODEL": spec.model_name}
    # Its own session: a timeout kills whatever the program started too.
    proc = subprocess.Popen(list(spec.command), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(json.dumps(row, default=str), timeout=spec.timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise TimeoutError(f"agent.command {spec.command[0]!r} ran past agent.timeout_s={spec.timeout_s}s: "
                           "killed") from None
    if proc.returncode != 0:
        tail = " | ".join(err.strip().splitlines()[-3:])
        raise AgentError(f"agent.command {spec.command[0]!r} exited {proc.returncode}: {tail or '(no stderr)'}")
    lines = out.strip().splitlines()
    try:
        value = float(lines[-1]) if lines else None
    except ValueError:
        return None  # the last line is not a number: the program printed no reward
    return value if math.isfinite(value) else None
