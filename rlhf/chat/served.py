"""Before anything is paid for or started: is the endpoint up, does the key open it, is the model served?

One GET ``<base_url>/models`` (the OpenAI-compatible list; vLLM's server and the closed APIs have
it). Each failure is a ConfigError naming the config keys (``owner``.base_url, .model,
.api_key_env); the key is redacted from every message and httpx exceptions are never chained
(they can quote header values).
"""

from __future__ import annotations

import httpx

from rlhf.config import ConfigError


def served_models(base_url: str, api_key: str | None, owner: str, timeout_s: float = 30.0) -> list[str]:
    """The model ids the endpoint lists; ConfigError when it cannot be reached or refuses."""
    url = f"{base_url.rstrip('/')}/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def redact(text: str) -> str:
        return text.replace(api_key, "***") if api_key else text

    try:
        resp = httpx.get(url, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as e:
        raise ConfigError(redact(f"{owner}.base_url={base_url!r}: cannot reach {url} "
                                 f"({type(e).__name__}: {e})")) from None
    if resp.status_code in (401, 403):
        raise ConfigError(redact(f"{owner}.api_key_env: {url} refused the key (HTTP {resp.status_code}): "
                                 f"{resp.text[:200]}"))
    if resp.status_code != 200:
        raise ConfigError(redact(f"{owner}.base_url={base_url!r}: {url} answered HTTP {resp.status_code}: "
                                 f"{resp.text[:200]}"))
    try:
        return [str(m["id"]) for m in resp.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(redact(f"{owner}.base_url={base_url!r}: {url} sent no model list: "
                                 f"{resp.text[:200]}")) from None


def check_served(base_url: str, api_key: str | None, model: str, owner: str) -> None:
    """ConfigError naming ``owner``.model when the endpoint does not list ``model``."""
    models = served_models(base_url, api_key, owner)
    if model not in models:
        raise ConfigError(f"{owner}.model={model!r}: {base_url} does not serve it (it lists {models[:20]})")
