"""What can go wrong talking to the API server, as exceptions, and the messages that say what to fix.

Every failure of the Kubernetes source is a ``KubernetesSourceError``; its class says how the loops treat it
(``kind`` labels ``errors_total``). An HTTP refusal becomes an ``ApiStatusError`` subclass by its code, with
its Status reason and message and any Retry-After: 401 and 403 name the verb, the resource and the RBAC grant
to ask for, because an operator has to act on them; 410 Gone sends the watch back to a list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import aiohttp
import orjson


class KubernetesSourceError(Exception):
    """Base of the source's errors. ``kind`` labels ``errors_total``."""

    kind = "error"


class KubernetesConfigError(KubernetesSourceError):
    """No usable cluster configuration (no kubeconfig, not in a pod, or an invalid file)."""

    kind = "config"


class ApiConnectionError(KubernetesSourceError):
    """The API server could not be reached, or the connection broke before an answer."""

    kind = "connection"


class StreamInterruptedError(KubernetesSourceError):
    """A watch stream broke (or ended at once) before delivering anything."""

    kind = "stream"


class ApiProtocolError(KubernetesSourceError):
    """A list answer that is not a list (no items, no resourceVersion)."""

    kind = "protocol"


class ApiStatusError(KubernetesSourceError):
    """The API server refused a request: its HTTP code, Status reason and message, and any Retry-After."""

    kind = "request"

    def __init__(
        self, message: str, *, code: int, reason: str = "", retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.retry_after = retry_after


class ServerError(ApiStatusError):
    """5xx: the server (or etcd) is in trouble."""

    kind = "server"


class ThrottledError(ApiStatusError):
    """429 Too Many Requests (API priority and fairness)."""

    kind = "throttled"


class PermissionDeniedError(ApiStatusError):
    """401/403: aproxy's credentials or RBAC do not allow the request."""

    kind = "permission"


class ResourceExpiredError(ApiStatusError):
    """410 Gone: the resourceVersion (or continue token) is older than the server's history."""

    kind = "expired"


class NotFoundError(ApiStatusError):
    """404: the object (a Node) or the API does not exist."""

    kind = "not_found"


RETRYABLE: Final = (KubernetesSourceError,)


@dataclass(frozen=True, slots=True)
class Status:
    """The parts of a metav1.Status (or an HTTP error answer) the source acts on."""

    code: int
    reason: str = ""
    message: str = ""
    retry_after: float | None = None

    @classmethod
    def of(cls, body: object) -> Status:
        """From a decoded Status object; anything else gives empty fields."""
        status = body if isinstance(body, dict) else {}
        details = status.get("details")
        code = status.get("code")
        return cls(
            code=code if isinstance(code, int) else 0,
            reason=str(status.get("reason") or ""),
            message=str(status.get("message") or ""),
            retry_after=_seconds(details.get("retryAfterSeconds") if isinstance(details, dict) else None),
        )

    def error(self, verb: str, resource: str, grant: str = "list and watch") -> ApiStatusError:
        """The exception for this status on ``verb resource``; ``grant``: the RBAC verbs to ask for."""
        said = f" (server: {self.message})" if self.message else ""
        if self.code == 403:
            text = (
                f"RBAC: aproxy cannot {verb} {resource} at the cluster scope; grant {grant} on {resource} "
                f"to aproxy's service account{said}"
            )
        elif self.code == 401:
            text = (
                f"authentication failed: the API server rejected aproxy's credentials to {verb} {resource} "
                f"(401 Unauthorized); check the service account token or kubeconfig{said}"
            )
        else:
            text = f"{verb} {resource}: {self.code} {self.reason or 'refused'}{said}"
        return _error_class(self.code)(text, code=self.code, reason=self.reason, retry_after=self.retry_after)


def _error_class(code: int) -> type[ApiStatusError]:
    if code in (401, 403):
        return PermissionDeniedError
    if code >= 500:
        return ServerError
    return {410: ResourceExpiredError, 429: ThrottledError, 404: NotFoundError}.get(code, ApiStatusError)


async def raise_for_status(
    response: aiohttp.ClientResponse, verb: str, resource: str, grant: str = "list and watch"
) -> None:
    """Raise the ``ApiStatusError`` for a response that is not 200 (its body read as a Status)."""
    if response.status == 200:
        return
    body = await response.read()
    try:
        decoded = orjson.loads(body)
    except orjson.JSONDecodeError:
        decoded = None
    status = Status.of(decoded)
    header = _seconds(response.headers.get("Retry-After"))
    # The HTTP code wins over whatever the body says; the header over the body's retryAfterSeconds.
    status = Status(response.status, status.reason, status.message, header or status.retry_after)
    raise status.error(verb, resource, grant)


def _seconds(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float) and value >= 0:
        return float(value)
    if isinstance(value, str) and value.strip().isdigit():
        return float(value.strip())
    return None  # an HTTP-date Retry-After is not worth parsing: the backoff still applies


def describe(error: BaseException) -> str:
    """An exception as one log-friendly phrase: its class, and its text when it has one."""
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
