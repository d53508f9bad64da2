"""The reward function API: what a reward is, and how a config spec becomes one.

A reward is a plain function of the batch::

    def my_reward(prompts: list[str], completions: list[str], **columns) -> list[float | None]

``columns`` are the prompt dataset's columns (``answer`` and any ``data.reward_columns``), one
value per completion. Sync or ``async def``. Return None for a completion the function cannot
score; the runner excludes it from its group's statistics and counts it. Per-sample functions
use :func:`per_sample`, which also lets the runner time out and isolate each completion.

A function that does not take ``**columns`` is passed only the columns it names, so built-ins
list the columns they read and a misspelt keyword in the config fails when the reward is loaded.

Each keyword parameter of the call (beyond prompts and completions) is filled from a column of
that name, else from the config's kwargs (a function's; a class's kwargs go to its constructor),
else its default. Given the column names that will be passed, :func:`column_problems` says which
parameters none of these fill: the runner refuses a required one at load time and warns once about
the ones left to their defaults (a misspelt column would otherwise silently take its default).

A config spec names the function three ways (``RewardFnConfig.fn``):

- a built-in name: ``math_answer`` (see :data:`BUILTINS`),
- a dotted path: ``my_pkg.rewards:score``,
- a file path: ``path/to/rewards.py:score`` (imported from the file; no package needed).

A class instead of a function is instantiated with the config's kwargs (for rewards that hold
resources, such as a model actor); its instances are called like functions and ``close()`` is
called when the runner shuts down. A constructor that declares ``run_dir`` or ``columns`` is also
given those (:data:`CONTEXT`). An instance may define ``usage() -> dict[str, float]``, cumulative
counters (requests, tokens, unparsable replies) the runner reports per step.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from rlhf.specs import resolve_spec

BatchFn = Callable[..., Any]  # (prompts, completions, **columns) -> list[float | None] (or awaitable)
SampleFn = Callable[..., Any]  # (prompt, completion, **row) -> float | None (or awaitable)

# Built-in rewards by name, as dotted paths so that heavy ones (reward_model: torch, Ray) are only
# imported when a config names them.
BUILTINS: dict[str, str] = {
    "math_answer": "rewards.builtin.math_answer:MathAnswer",
    "format": "rewards.builtin.format:format_reward",
    "length": "rewards.builtin.length:LengthPenalty",
    "code_exec": "rewards.builtin.code_exec:code_exec",
    "reward_model": "rewards.builtin.reward_model:RewardModel",
    "judge": "rewards.builtin.judge:Judge",
}

# What the runner hands a class reward whose constructor declares a parameter of that name:
# ``run_dir`` (the run folder, for caches and logs; None outside a run) and ``columns`` (the column
# names calls will be passed; None when unknown).
CONTEXT = ("run_dir", "columns")


def per_sample(fn: SampleFn) -> BatchFn:
    """Turn ``fn(prompt, completion, **row) -> float | None`` into the batch form.

    The batch form is an ordinary reward function. It keeps ``fn`` as ``.score_one`` so the runner
    can run (and time out) each completion on its own: one hanging sample then costs one None,
    not the whole batch.

    >>> @per_sample
    ... def exact(prompt, completion, answer, **_):
    ...     return float(completion.strip() == answer)
    >>> exact(["q", "q"], ["4", "5"], answer=["4", "4"])
    [1.0, 0.0]
    """

    one = _accepting_known_columns(fn)

    @functools.wraps(fn)
    def batch(prompts: list[str], completions: list[str], **columns: list) -> list:
        return [
            one(p, c, **{k: v[i] for k, v in columns.items()})
            for i, (p, c) in enumerate(zip(prompts, completions))
        ]

    batch.score_one = fn  # type: ignore[attr-defined]
    return batch


@dataclass
class LoadedReward:
    """A reward function resolved from its spec, with the config's kwargs bound."""

    name: str
    spec: str
    weight: float
    batch_fn: BatchFn
    sample_fn: SampleFn | None  # set for per-sample rewards: the runner schedules each completion
    owner: Any = None  # the instance of a class-based reward (closed by the runner)

    def close(self) -> None:
        close = getattr(self.owner, "close", None)
        if callable(close):
            close()


def load_reward(spec: str, kwargs: dict[str, Any] | None = None, weight: float = 1.0,
                name: str | None = None, context: dict[str, Any] | None = None) -> LoadedReward:
    """Resolve ``spec`` (built-in name, ``module:attr`` or ``file.py:attr``) and bind ``kwargs``;
    a class also gets the entries of ``context`` (:data:`CONTEXT`) its constructor declares."""
    kwargs = dict(kwargs or {})
    target = resolve(spec)
    owner = None
    if inspect.isclass(target):
        try:
            owner = target(**kwargs, **_context_for(spec, target, kwargs, context or {}))
        except TypeError as e:
            raise TypeError(f"reward {spec!r}: cannot build it from kwargs {sorted(kwargs)}: {e}") from e
        batch_fn: BatchFn = owner
        one = getattr(owner, "score_one", None)
        sample_fn = one if callable(one) else None
    else:
        if not callable(target):
            raise TypeError(f"reward {spec!r} resolves to {type(target).__name__}, not a function")
        _check_kwargs(spec, target, kwargs)
        one = getattr(target, "score_one", None)
        if callable(one):
            # Rebuild the batch form around the bound sample function: the batch wrapper treats
            # every keyword as a per-completion column.
            sample_fn = _accepting_known_columns(functools.partial(one, **kwargs) if kwargs else one)
            batch_fn = per_sample(sample_fn)
        else:
            sample_fn = None
            batch_fn = functools.partial(target, **kwargs) if kwargs else target
    return LoadedReward(
        name=name or default_name(spec),
        spec=spec,
        weight=float(weight),
        batch_fn=_accepting_known_columns(batch_fn),
        sample_fn=_accepting_known_columns(sample_fn) if sample_fn else None,
        owner=owner,
    )


def _context_for(spec: str, cls: type, kwargs: dict[str, Any], context: dict[str, Any]) -> dict[str, Any]:
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return {}
    given = {k: v for k, v in context.items() if k in CONTEXT and k in params}
    clash = sorted(set(given) & set(kwargs))
    if clash:
        raise TypeError(f"reward {spec!r}: kwargs {clash} are set by the runner, not the config")
    return given


def check_specs(functions: Sequence[Any], columns: Sequence[str] | None = None) -> None:
    """Config validation: every reward spec resolves and its kwargs fit, without building anything.

    ``functions`` are ``reward.functions`` entries (``fn``, ``kwargs``, ``name``). Resolving imports
    the spec's module (a file spec runs the file's top level), but no class is instantiated and
    nothing is called. With ``columns`` (the names the runner will pass), a parameter that has no
    default and is neither a column nor a kwarg is an error too. Raises ValueError naming
    ``reward.functions[i].fn`` (or ``.kwargs``) and the spec.
    """
    for i, f in enumerate(functions):
        where, spec, kwargs = f"reward.functions[{i}]", f.fn, dict(f.kwargs or {})
        try:
            target = resolve(spec)
        except Exception as e:  # import errors and a user file's own errors: named by the spec here
            raise ValueError(f"{where}.fn={spec!r}: {type(e).__name__}: {e}") from None
        if not callable(target):
            raise ValueError(f"{where}.fn={spec!r} resolves to {type(target).__name__}, not a function or class")
        try:
            _check_fit(spec, target, kwargs)
        except TypeError as e:
            raise ValueError(f"{where}.kwargs (fn={spec!r}): {e}") from None
        if columns is not None:
            required, _ = column_problems(target, kwargs, columns)
            if required:
                raise ValueError(missing_columns_message(where, f.name or default_name(spec), spec, required,
                                                         columns))


def column_problems(target: Any, kwargs: dict[str, Any], columns: Sequence[str]) -> tuple[list[str], list[str]]:
    """(required, defaulted): the call's keyword parameters that no column and no kwarg fills.

    ``target`` is what a spec resolves to. For a class, the call is its instances' ``score_one`` (or
    ``__call__``); its kwargs went to the constructor, so they fill nothing here.
    """
    given = set(columns) if inspect.isclass(target) else set(columns) | set(kwargs)
    params = _call_parameters(target)
    required = sorted(p for p, needed in params.items() if needed and p not in given)
    defaulted = sorted(p for p, needed in params.items() if not needed and p not in given)
    return required, defaulted


def missing_columns_message(where: str, name: str, spec: str, missing: list[str], columns: Sequence[str]) -> str:
    return (f"{where} {name!r} ({spec}): parameter(s) {missing} have no default and are neither a "
            f"column nor a kwarg; the columns passed are {sorted(columns)} (data.answer_column as "
            "'answer', data.reward_columns, completion_length, completion_ids, transcript)")


def _call_parameters(target: Any) -> dict[str, bool]:
    """The call's keyword parameters after prompt(s) and completion(s): name -> has no default."""
    one = getattr(target, "score_one", None)
    if inspect.isclass(target):  # read from the class: self, prompt(s), completion(s) come first
        call, positional = (one if callable(one) else target.__call__), 3
    else:
        call, positional = (one if callable(one) else target), 2
    try:
        params = inspect.signature(call).parameters.values()
    except (TypeError, ValueError):  # no readable signature: nothing to check
        return {}
    out: dict[str, bool] = {}
    for p in params:
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and positional > 0:
            positional -= 1
        elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            out[p.name] = p.default is p.empty
    return out


def _check_fit(spec: str, target: Any, kwargs: dict[str, Any]) -> None:
    """TypeError when ``kwargs`` do not fit a class's constructor or a function's parameters."""
    if not inspect.isclass(target):
        _check_kwargs(spec, target, kwargs)
        return
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # no readable signature: the constructor will say
        return
    try:
        signature.bind(**kwargs)
    except TypeError as e:
        raise TypeError(f"reward {spec!r}: cannot build it from kwargs {sorted(kwargs)}: {e}") from None


def default_name(spec: str) -> str:
    """``math_answer`` -> ``math_answer``; ``pkg.mod:score`` and ``dir/f.py:score`` -> ``score``."""
    return spec.rsplit(":", 1)[-1] if ":" in spec else spec


def resolve(spec: str) -> Any:
    """The object a reward spec names. Errors name the spec and what was missing."""
    return resolve_spec(spec, BUILTINS, "reward")


def _check_kwargs(spec: str, fn: Callable, kwargs: dict[str, Any]) -> None:
    """Fail at load time, not at the first step, when the config passes a keyword fn lacks."""
    one = getattr(fn, "score_one", None)
    params = inspect.signature(one if callable(one) else fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise TypeError(f"reward {spec!r} takes no keyword argument(s) {unknown}; it takes {list(params)}")


def _accepting_known_columns(fn: Callable) -> Callable:
    """Pass a function without ``**kwargs`` only the columns it names, so it need not list them all."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn
    accepted = {n for n, p in params.items() if p.kind is not inspect.Parameter.POSITIONAL_ONLY}

    @functools.wraps(fn)
    def call(*args: Any, **columns: Any) -> Any:
        return fn(*args, **{k: v for k, v in columns.items() if k in accepted})

    return call
