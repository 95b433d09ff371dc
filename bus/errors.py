"""The one place nats-py errors become corral's: ``nats_errors``.

Like httpx's ``map_exceptions``, every call into nats-py in ``bus/`` runs
inside ``with nats_errors(...)``; nothing else in ``bus/`` catches a
``nats.*`` exception, and nothing foreign leaves ``bus/``:

    nats.errors.NoRespondersError,
      NoStreamResponseError (a 503)         → NoResponders
    nats.js.errors.APIError 10071,
      KeyWrongLastSequenceError             → FencedWrite
    NotFoundError (404), KeyNotFoundError,
      BucketNotFoundError, NoKeysError      → NotFound     (not retryable)
    other JetStream APIError                → BusError     (description and code)
    nats.errors.TimeoutError, TimeoutError  → BusTimeout
    ConnectionClosedError, any other
      nats.errors.Error, OSError            → BusError

``NotFound`` is how the bus itself tells "nothing there" from "failed"
(an absent KV key reads as None, an absent stream as empty).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import nats.errors
import nats.js.errors

from schemas.errors import BusError, BusTimeout, FencedWrite, NoResponders

__all__ = ["WRONG_LAST_SEQUENCE", "NotFound", "nats_errors"]

WRONG_LAST_SEQUENCE = 10071  # JetStream: "wrong last sequence"
_NOT_FOUND = (nats.js.errors.NotFoundError, nats.js.errors.NoKeysError)


class NotFound(BusError):
    """The stream, consumer, bucket, key or message asked for does not exist."""

    retryable = False


@contextlib.contextmanager
def nats_errors(what: str, *, subject: str = "") -> Iterator[None]:
    """Translate nats-py and socket errors raised inside the block into corral's ``BusError`` tree.

    ``what`` says what was being done ("publish to corral.tasks.triage"); it
    starts the message of the error raised.

    Example:
        >>> with nats_errors(f"publish to {subject}", subject=subject):
        ...     await bus.nc.publish(subject, data)

    Raises:
        NoResponders, FencedWrite, NotFound, BusTimeout, BusError: see the module docstring.
    """
    try:
        yield
    except BusError:  # already ours (a nested translation; BusTimeout is an OSError too)
        raise
    except nats.errors.NoRespondersError as exc:
        raise NoResponders(f"{what}: nobody serves {subject or 'that subject'}",
                           subject=subject) from exc
    except nats.js.errors.NoStreamResponseError as exc:  # no stream, or it has no leader now
        raise NoResponders(f"{what}: no stream answered (none stores {subject or 'it'}, or "
                           "its replicas are electing a leader)", subject=subject) from exc
    except nats.js.errors.KeyWrongLastSequenceError as exc:
        raise FencedWrite(f"{what}: lost the race (wrong last sequence)",
                          subject=subject) from exc
    except _NOT_FOUND as exc:
        raise NotFound(f"{what}: not found ({exc})", subject=subject) from exc
    except nats.js.errors.APIError as exc:
        if exc.err_code == WRONG_LAST_SEQUENCE:
            raise FencedWrite(f"{what}: lost the race (wrong last sequence)",
                              subject=subject) from exc
        if exc.code == 404:
            raise NotFound(f"{what}: not found ({exc.description})", subject=subject) from exc
        raise BusError(f"{what}: JetStream refused: {exc.description} (code {exc.err_code})",
                       subject=subject, code=exc.err_code or 0) from exc
    except (nats.errors.TimeoutError, TimeoutError) as exc:
        raise BusTimeout(f"{what}: no answer in time", subject=subject) from exc
    except (nats.errors.Error, OSError) as exc:
        raise BusError(f"{what}: {type(exc).__name__}: {exc}", subject=subject) from exc
