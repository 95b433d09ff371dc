"""The one exception tree of corral.

Every error corral raises is a ``CorralError``. Foreign errors (nats-py, the
provider SDKs, the OS) are translated at the edge with ``raise ... from exc``
so callers catch ours, never theirs. Whether a failure is worth retrying is a
field on the error (``retryable``), not a guess at the catch site.

    CorralError
    ├── ConfigError                 a fleet file is wrong: names file, table, key
    ├── SchemaError                 a value does not fit the wire contract
    │   └── DecodeError             bytes that are not a valid message
    ├── BusError                    talking to NATS failed
    │   ├── BusTimeout              (also a TimeoutError)
    │   ├── FencedWrite             a stale writer lost the append race
    │   └── NoResponders            nobody serves that subject
    ├── ActorError                  an actor could not do its job
    ├── ToolError                   a tool call failed
    │   ├── ToolDenied              policy refused the call
    │   ├── ToolArgumentsInvalid    arguments do not match the tool's schema
    │   ├── ToolTimeout             the tool ran past its timeout
    │   ├── ToolResultTooLarge      its result is over [limits] tool_result_bytes
    │   ├── ToolCrashed             its worker process died mid-call
    │   └── OutcomeUnknown          an interrupted side effect: not re-run
    ├── ModelError                  the model gateway failed
    │   ├── BudgetExceeded          a task, agent or team is over its budget
    │   ├── ProviderError           one provider call failed (status, retry_after_s)
    │   └── ProviderUnavailable     every entry of the route failed
    └── SupervisorError
        └── RestartIntensityExceeded
"""

from __future__ import annotations

__all__ = [
    "ActorError",
    "BudgetExceeded",
    "BusError",
    "BusTimeout",
    "ConfigError",
    "CorralError",
    "DecodeError",
    "FencedWrite",
    "ModelError",
    "NoResponders",
    "OutcomeUnknown",
    "ProviderError",
    "ProviderUnavailable",
    "RestartIntensityExceeded",
    "SchemaError",
    "SupervisorError",
    "ToolArgumentsInvalid",
    "ToolCrashed",
    "ToolDenied",
    "ToolError",
    "ToolResultTooLarge",
    "ToolTimeout",
]


class CorralError(Exception):
    """Root of every error corral raises.

    Attributes:
        retryable: whether doing the same thing again may succeed.
    """

    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retryable is not None:
            self.retryable = retryable


class ConfigError(CorralError):
    """A fleet configuration is invalid; says which file, table and key."""

    def __init__(self, message: str, *, file: str = "", table: str = "", key: str = "") -> None:
        parts = (file and f"file {file}", table and f"table [{table}]", key and f"key {key!r}")
        where = ", ".join(p for p in parts if p)
        super().__init__(f"{where}: {message}" if where else message)
        self.file = file
        self.table = table
        self.key = key


class SchemaError(CorralError):
    """A value does not fit the wire contract."""


class DecodeError(SchemaError):
    """Bytes that could not be decoded into the expected message type."""

    def __init__(self, message: str, *, subject: str = "") -> None:
        super().__init__(message)
        self.subject = subject


class BusError(CorralError):
    """Talking to NATS failed."""

    retryable = True

    def __init__(self, message: str, *, subject: str = "", retryable: bool | None = None,
                 code: int = 0) -> None:
        super().__init__(message, retryable=retryable)
        self.subject = subject
        self.code = code  # JetStream's error code when it refused (10058, ...); 0 otherwise


class BusTimeout(BusError, TimeoutError):
    """A bus operation did not finish within its timeout."""


class FencedWrite(BusError):
    """An append lost the race: the log moved on since the writer last read it.

    The writer must re-read the log and decide again; it never writes a second
    truth.
    """

    def __init__(self, message: str, *, subject: str = "", task_id: str = "",
                 expected_seq: int = 0) -> None:
        super().__init__(message, subject=subject, retryable=True)
        self.task_id = task_id
        self.expected_seq = expected_seq


class NoResponders(BusError):
    """No actor is subscribed to serve the subject."""


class ActorError(CorralError):
    """An actor could not do its job."""


class ToolError(CorralError):
    """A tool call failed."""

    def __init__(self, message: str, *, tool: str = "", retryable: bool | None = None) -> None:
        super().__init__(message, retryable=retryable)
        self.tool = tool


class ToolDenied(ToolError):
    """Policy refused the tool call."""


class ToolArgumentsInvalid(ToolError):
    """The arguments do not match the tool's JSON schema."""


class ToolTimeout(ToolError):
    """The tool ran past its timeout."""

    retryable = True


class ToolResultTooLarge(ToolError):
    """A tool's result, encoded as JSON, is larger than ``limits.tool_result_bytes``."""


class ToolCrashed(ToolError):
    """The worker process running a sync tool died mid-call (a segfault, ``os._exit``, OOM).

    The actor lives on and starts a fresh worker; whether the call took
    effect is unknown, as for a timeout.
    """


class OutcomeUnknown(ToolError):
    """A side-effecting call was interrupted after it started.

    It may or may not have taken effect, and the tool does not accept an
    idempotency key, so corral does not run it again.
    """


class ModelError(CorralError):
    """The model gateway failed."""


class BudgetExceeded(ModelError):
    """A task, agent or team is over its budget."""

    def __init__(self, message: str, *, scope: str = "", spent: float = 0.0,
                 limit: float = 0.0) -> None:
        super().__init__(message, retryable=False)
        self.scope = scope
        self.spent = spent
        self.limit = limit


class ProviderError(ModelError):
    """One call to one provider failed.

    ``status`` is the HTTP status (0 for a connection failure or timeout);
    ``retry_after_s`` is what the server asked for, if anything.
    """

    def __init__(self, message: str, *, provider: str = "", status: int = 0,
                 retry_after_s: float | None = None, retryable: bool = False) -> None:
        super().__init__(message, retryable=retryable)
        self.provider = provider
        self.status = status
        self.retry_after_s = retry_after_s


class ProviderUnavailable(ModelError):
    """No provider in the route could answer."""

    retryable = True


class SupervisorError(CorralError):
    """A supervisor could not keep its children running."""

    def __init__(self, message: str, *, supervisor: str = "", child: str = "",
                 retryable: bool | None = None) -> None:
        super().__init__(message, retryable=retryable)
        self.supervisor = supervisor
        self.child = child


class RestartIntensityExceeded(SupervisorError):
    """A child restarted more often than its supervisor allows; the supervisor gave up.

    Attributes:
        supervisor: the path of the supervisor that gave up ("root/agents").
        child: the child whose restart was one too many.
        restarts: how many restarts fell within ``within_s``.
        within_s: the intensity period.
        status: that child's last exit status (negative: killed by that signal).
        reason: why that child last exited.
    """

    def __init__(self, *, supervisor: str, child: str, restarts: int, within_s: float,
                 status: int | None = None, reason: str = "") -> None:
        super().__init__(
            f"supervisor {supervisor} gave up: child {child} needed restart number "
            f"{restarts} within {within_s:g}s; last exit: {reason or 'unknown'}",
            supervisor=supervisor, child=child)
        self.restarts = restarts
        self.within_s = within_s
        self.status = status
        self.reason = reason
