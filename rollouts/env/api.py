"""The environment API: what an environment is, and how ``env.name`` becomes one.

An environment is a class; one instance serves one trajectory::

    class MyEnv:
        def __init__(self, **kwargs): ...                 # env.kwargs
        def reset(self, item: dict) -> str | None: ...    # first observation, or None
        def step(self, action: str) -> tuple[str | None, float | None, bool]: ...
        def metrics(self) -> dict[str, float]: ...        # optional: counts summed into env/*

``item`` is the prompt's row: ``prompt`` (the user's prompt as written), ``prompt_text`` (after
the chat template) and the reward columns (``answer``, ``data.reward_columns``). ``reset``'s
observation, when not None, is added to the prompt as an observation turn; it must be the same
for every sample of a prompt (they share one prompt). ``step`` gets the text of the model's
turn and returns the observation shown to the model next (None: nothing), a reward (None: none
this step; the trajectory's env reward is the sum of those given), and whether the trajectory
is done. Either method may be ``async def``. A trajectory that ends with no reward given is
unfinished, scored ``env.unfinished_reward`` (rlhf/experience/episodes.py), unless the environment ended it
itself (done with reward None: it declined to score, a None reward).

Specs name the class like rewards do (rlhf/specs.py): a built-in name, ``pkg.mod:Class`` or
``path/to/file.py:Class``. ``env.name: null`` is no environment: one turn, the single-turn case.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Protocol

from rlhf.specs import resolve_spec

BUILTINS: dict[str, str] = {
    "calculator": "rollouts.env.builtin.calculator:CalculatorEnv",
}


class EnvError(RuntimeError):
    """An environment that breaks the API (wrong return types, a reset that fails); names the env."""


class Environment(Protocol):
    def reset(self, item: dict[str, Any]) -> str | None: ...

    def step(self, action: str) -> tuple[str | None, float | None, bool]: ...


@dataclass(frozen=True)
class EnvFactory:
    """A resolved environment class with its kwargs: ``build()`` makes one instance per trajectory."""

    spec: str
    cls: Any
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> Any:
        try:
            return self.cls(**self.kwargs)
        except Exception as e:
            raise EnvError(f"env {self.spec!r}: cannot build it from env.kwargs {sorted(self.kwargs)}: "
                           f"{type(e).__name__}: {e}") from e


def resolve_env(spec: str) -> Any:
    return resolve_spec(spec, BUILTINS, "env")


def load_env(spec: str, kwargs: dict[str, Any] | None = None) -> EnvFactory:
    """Resolve ``spec`` and check its shape and kwargs (nothing is built). Raises ValueError naming
    ``env.name`` / ``env.kwargs``."""
    kwargs = dict(kwargs or {})
    try:
        cls = resolve_env(spec)
    except Exception as e:  # import errors and a user file's own errors: named by the spec here
        raise ValueError(f"env.name={spec!r}: {type(e).__name__}: {e}") from None
    if not inspect.isclass(cls):
        raise ValueError(f"env.name={spec!r} resolves to {type(cls).__name__}, not a class "
                         "(one instance serves one trajectory)")
    for method in ("reset", "step"):
        if not callable(getattr(cls, method, None)):
            raise ValueError(f"env.name={spec!r}: {cls.__name__} has no {method}() method")
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):  # no readable signature: the constructor will say
        signature = None
    if signature is not None:
        try:
            signature.bind(**kwargs)
        except TypeError as e:
            raise ValueError(f"env.kwargs (env.name={spec!r}): {e}; {cls.__name__} takes "
                             f"{list(signature.parameters)}") from None
    return EnvFactory(spec, cls, kwargs)


def check_reset(spec: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise EnvError(f"env {spec!r}: reset() returned {type(value).__name__} {value!r:.60}; "
                       "it returns the first observation text or None")
    return value


def check_step(spec: str, value: Any) -> tuple[str | None, float | None, bool]:
    """The step's (observation, reward, done), or EnvError naming what was wrong."""
    if not isinstance(value, tuple) or len(value) != 3:
        raise EnvError(f"env {spec!r}: step() returned {type(value).__name__} {value!r:.80}; it returns "
                       "(observation: str | None, reward: float | None, done: bool)")
    obs, reward, done = value
    if obs is not None and not isinstance(obs, str):
        raise EnvError(f"env {spec!r}: step() returned observation {type(obs).__name__} {obs!r:.60}, not str or None")
    if reward is not None and (isinstance(reward, bool) or not isinstance(reward, (int, float))):
        raise EnvError(f"env {spec!r}: step() returned reward {type(reward).__name__} {reward!r:.60}, "
                       "not a number or None")
    if reward is not None and reward != reward or reward in (float("inf"), float("-inf")):
        raise EnvError(f"env {spec!r}: step() returned reward {reward}, not a finite number")
    if not isinstance(done, bool):
        raise EnvError(f"env {spec!r}: step() returned done {type(done).__name__} {done!r:.60}, not a bool")
    return obs, None if reward is None else float(reward), done


def env_item(raw_prompt: str, prompt_text: str, columns: dict[str, Any]) -> dict[str, Any]:
    """What ``reset`` gets: the prompt as written, as templated, and the reward columns."""
    return {"prompt": raw_prompt, "prompt_text": prompt_text, **columns}
