"""Errors of the control API. Each carries the HTTP status the server answers with,
so one type means the same thing on both sides of the socket."""

from __future__ import annotations

from snapvisor.errors import SnapvisorError


def cut(text: str, limit: int = 80) -> str:
    """`text` cut to `limit` characters for an error message (a request may send
    64 KiB where a word was expected)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def shown(value: object, limit: int = 80) -> str:
    """`value` as an error message quotes it: its repr, cut to `limit` characters."""
    return cut(repr(value), limit)


class ControlError(SnapvisorError):
    """A control request was refused or failed; the VM is unaffected."""

    status: int = 500

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class BadRequest(ControlError):
    """The request is malformed: wrong JSON shape, type, unknown field, too big."""

    status = 400


class NotFound(ControlError):
    status = 404


class MethodNotAllowed(ControlError):
    status = 405


class Conflict(ControlError):
    """The request is valid but not in the VM's current state (paused, stopped)."""

    status = 409


class RequestTimeout(ControlError):
    """The client did not send its whole request in time; the connection is closed."""

    status = 408


class PayloadTooLarge(ControlError):
    status = 413


class TooManyConnections(ControlError):
    """More clients are connected than the server serves at once."""

    status = 429


class OperationFailed(ControlError):
    """The VM tried and failed (a store outage during a snapshot, a migration the
    receiver or the link let down): 502, since the failure is in something the
    VMM depends on, not in the request."""

    status = 502


class ApiUnreachable(SnapvisorError):
    """Nothing answers on the API socket."""

    exit_code = 4
