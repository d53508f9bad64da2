"""Naming a Python object in config: a built-in name, ``pkg.module:attr`` or ``path/to/file.py:attr``.

Rewards (rewards/api.py), environments (rollouts/env/api.py) and agents (rlhf/experience/agent_api.py)
are all loaded this way; each passes its own table of built-ins and the word its errors use
("reward", "env", "agent"). A Ray task names what it runs by :func:`portable_spec`. Imports nothing
of ours, so any floor may use it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import threading
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# A file's module is in sys.modules before it has run; another thread must not take it half-made
# (agents load their callable in each episode's thread).
_FILE_IMPORT = threading.RLock()


def resolve_spec(spec: str, builtins: dict[str, str], kind: str) -> Any:
    """The object ``spec`` names; ``builtins`` maps built-in names to dotted specs. Errors name
    the ``kind`` and the spec, and what was missing."""
    if spec in builtins:
        return resolve_spec(builtins[spec], {}, kind)
    if ":" not in spec:
        known = f"a built-in ({', '.join(sorted(builtins))})" if builtins else "a built-in"
        raise ValueError(
            f"{kind} {spec!r} is not {known} and has no ':attr' part; write 'my_pkg.module:name' or "
            "'path/to/file.py:name'"
        )
    where, attr = spec.rsplit(":", 1)
    if where.endswith(".py") or "/" in where or "\\" in where:
        with _FILE_IMPORT:
            module = _import_file(spec, Path(where), kind)
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(f"{kind} {spec!r}: cannot import module {where!r}: {e}") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        public = sorted(n for n in vars(module) if not n.startswith("_"))
        raise AttributeError(
            f"{kind} {spec!r}: {where!r} has no attribute {attr!r} (it has: {', '.join(public)})"
        ) from None


def portable_spec(spec: str) -> str:
    """``spec`` as a Ray worker on any node can resolve it: a file inside the project relative to the
    project root (the worker resolves it against its own copy), any other file absolute."""
    where, sep, attr = spec.rpartition(":")
    if not sep or not (where.endswith(".py") or "/" in where or "\\" in where):
        return spec  # a built-in name or an importable module
    path = Path(where).expanduser().resolve()
    try:
        return f"{path.relative_to(PROJECT_ROOT).as_posix()}:{attr}"
    except ValueError:
        return f"{path}:{attr}"


def local_spec(spec: str) -> str:
    """A :func:`portable_spec` as this process resolves it: a relative file against its project root."""
    where, sep, attr = spec.rpartition(":")
    if sep and (where.endswith(".py") or "/" in where) and not Path(where).is_absolute():
        return f"{PROJECT_ROOT / where}:{attr}"
    return spec


def _import_file(spec: str, path: Path, kind: str) -> Any:
    path = path.expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{kind} {spec!r}: file {str(path)!r} not found")
    # A name unique to the file, so two rewards.py files in different folders do not collide.
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    mod_name = f"_{kind}_file_{path.stem}_{digest}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    module_spec = importlib.util.spec_from_file_location(mod_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ImportError(f"{kind} {spec!r}: cannot import {str(path)!r} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[mod_name]
        raise
    return module
