"""The one error type of the gateway: an OpenAI-shaped JSON error with its HTTP status.

Clients (the OpenAI SDKs, curl scripts) read ``{"error": {"message", "type", "param", "code"}}``
and decide from the status whether to retry: 401 and 400 are final, 429 and 5xx are retried.
``kind`` is the metrics name (gateway/errors/<kind>). Messages never hold an episode's key.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ApiError(Exception):
    status: int
    kind: str  # gateway/errors/<kind>
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None

    def __str__(self) -> str:
        return f"{self.status} {self.kind}: {self.message}"

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, "bad_request", message, param=param, code=code)
