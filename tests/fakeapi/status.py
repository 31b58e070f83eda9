"""metav1.Status error bodies, shaped and worded like the API server's (apimachinery/pkg/api/errors)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tests.fakeapi.resources import Obj, ResourceType

DEFAULT_USER = "system:serviceaccount:kube-system:aproxy"

CONTINUE_EXPIRED = (
    "The provided continue parameter is too old to display a consistent list result. You can start a new "
    "list without the continue parameter, or use the continue token in this response to retrieve the "
    "remainder of the results. Continuing with the provided token results in an inconsistent list - objects "
    "that were created, modified, or deleted between the time the first chunk was returned and now may show "
    "up in the list."
)

# The reason the server puts in a Status for a status code (StatusReason*).
REASONS: dict[int, str] = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    406: "NotAcceptable",
    409: "Conflict",
    410: "Expired",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


@dataclass(frozen=True, slots=True)
class Status:
    """One failure: its HTTP code, reason, message, details, and the extra response headers it needs."""

    code: int
    message: str
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Obj:
        body: Obj = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": dict(self.metadata),
            "status": "Failure",
            "message": self.message,
            "reason": self.reason or REASONS.get(self.code, ""),
        }
        if self.details:
            body["details"] = dict(self.details)
        body["code"] = self.code
        return body


def _details(resource: ResourceType, name: str = "") -> dict[str, Any]:
    details: dict[str, Any] = {}
    if name:
        details["name"] = name
    if resource.group:
        details["group"] = resource.group
    details["kind"] = resource.plural
    return details


def not_found(resource: ResourceType, name: str) -> Status:
    return Status(404, f'{resource.qualified_name} "{name}" not found', details=_details(resource, name))


def path_not_found() -> Status:
    return Status(404, "the server could not find the requested resource", details={})


def method_not_allowed() -> Status:
    return Status(405, "the server does not allow this method on the requested resource")


def not_acceptable(accept: str) -> Status:
    return Status(406, f"only the following media types are accepted: application/json, not {accept}")


def bad_request(message: str) -> Status:
    return Status(400, message)


def invalid_list_options(errors: list[str]) -> Status:
    joined = ", ".join(errors)
    message = (
        f'ListOptions.meta.k8s.io "" is invalid: {joined}'
        if len(errors) == 1
        else (f'ListOptions.meta.k8s.io "" is invalid: [{joined}]')
    )
    return Status(422, message, details={"group": "meta.k8s.io", "kind": "ListOptions"})


def expired(message: str, continue_token: str = "") -> Status:
    metadata = {"continue": continue_token} if continue_token else {}
    return Status(410, message, reason="Expired", metadata=metadata)


def too_old_resource_version(requested: int, oldest: int) -> Status:
    return expired(f"too old resource version: {requested} ({oldest})")


def too_large_resource_version(requested: int, current: int) -> Status:
    return Status(
        504,
        f"Timeout: Too large resource version: {requested}, current: {current}",
        reason="Timeout",
        details={
            "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
            "retryAfterSeconds": 1,
        },
        headers={"Retry-After": "1"},
    )


def forbidden(resource: ResourceType, verb: str, namespace: str | None, name: str, user: str) -> Status:
    scope = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
    reason = (
        f'User "{user}" cannot {verb} resource "{resource.plural}" in API group "{resource.group}" {scope}'
    )
    subject = f'{resource.qualified_name} "{name}"' if name else resource.qualified_name
    return Status(403, f"{subject} is forbidden: {reason}", details=_details(resource, name))


def unauthorized() -> Status:
    """A request without an accepted bearer token: the server says no more than this."""
    return Status(401, "Unauthorized")


def injected(code: int, retry_after: int | None, message: str) -> Status:
    """A failure injected by a test, with the body the server sends for that code."""
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
    details: dict[str, Any] = {"retryAfterSeconds": retry_after} if retry_after is not None else {}
    if code == 500:
        return Status(
            code,
            f"Internal error occurred: {message}",
            details={"causes": [{"message": message}], **details},
            headers=headers,
        )
    if code == 429:
        return Status(code, "Too many requests, please try again later.", details=details, headers=headers)
    if code == 401:
        return Status(code, "Unauthorized", headers=headers)
    return Status(code, message, details=details, headers=headers)


class StatusError(Exception):
    """A request the server refuses with this Status."""

    def __init__(self, failure: Status) -> None:
        super().__init__(failure.message)
        self.status = failure
