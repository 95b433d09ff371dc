r"""Dead letters, bounded: the one way a ``DeadLetter`` is built.

A dead letter must always be publishable, whatever it carries: 200 kB of
control characters escape to 1.2 MB of JSON (``\u0001`` per byte), past a
server's ``max_payload``, and a dead letter that cannot be published is a
message that loops. So the original is kept as text cut to a fixed number of
*encoded* bytes (``dead_letter_payload_bytes``), with its length and SHA-256
to match it against a copy; the reason, subject and headers are cut too.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping

import msgspec

from schemas.messages import DeadLetter

__all__ = ["DEFAULT_PAYLOAD_BYTES", "MAX_PAYLOAD_BYTES", "bounded_dead_letter", "fit_text"]

DEFAULT_PAYLOAD_BYTES = 8 * 1024
MAX_PAYLOAD_BYTES = 256 * 1024  # whatever the config says: a letter stays far below 1 MiB
REASON_BYTES = 2 * 1024
SUBJECT_BYTES = 1024
HEADER_COUNT = 16
HEADER_KEY_BYTES = 128
HEADER_VALUE_BYTES = 512
_ELLIPSIS = "…"

_enc = msgspec.json.Encoder()


def _encoded_len(text: str) -> int:
    return len(_enc.encode(text)) - 2  # without the quotes


def fit_text(text: str, max_bytes: int) -> tuple[str, bool]:
    r"""``text`` cut so that its JSON-escaped UTF-8 form is at most ``max_bytes``.

    Returns the text and whether it was cut. Escaping can grow a character
    sixfold (a control character becomes ``\u0001``), so the cut is measured
    on the encoded form, not on the characters.

    Example:
        >>> fit_text("\x01" * 100, 12)
        ('\x01\x01', True)
    """
    max_bytes = max(0, max_bytes)
    if len(text) <= max_bytes // 6 or _encoded_len(text) <= max_bytes:
        return text, False  # a character is at most 6 bytes escaped
    cut = text[:max_bytes]  # a character is at least 1 byte: no more than this fits
    size = _encoded_len(cut)
    while size > max_bytes:
        keep = min(len(cut) - 1, len(cut) * max_bytes // size)
        cut = cut[:max(0, keep)]
        size = _encoded_len(cut)
    return cut, True


def _fit(text: str, max_bytes: int) -> str:
    cut, truncated = fit_text(text, max_bytes - len(_ELLIPSIS.encode()))
    return cut + _ELLIPSIS if truncated else text


def bounded_dead_letter(*, actor: str, subject: str, reason: str, data: bytes,
                        headers: Mapping[str, str] | None = None, deliveries: int = 0,
                        payload_bytes: int = DEFAULT_PAYLOAD_BYTES,
                        now: float | None = None) -> DeadLetter:
    """A ``DeadLetter`` for ``data`` whose encoded size is bounded, whatever ``data`` is.

    ``payload`` is ``data`` decoded as UTF-8 (invalid bytes replaced) and cut
    so its JSON form is at most ``payload_bytes`` (capped at
    ``MAX_PAYLOAD_BYTES``); ``payload_bytes``/``payload_sha256`` of the letter
    describe the original and ``truncated`` says whether it was cut. The
    reason, subject and headers are cut to fixed sizes (at most
    ``HEADER_COUNT`` headers).

    Example:
        >>> letter = bounded_dead_letter(actor="agent.triage", subject="corral.tasks.triage",
        ...                              reason="empty message", data=b"")
    """
    limit = max(0, min(payload_bytes, MAX_PAYLOAD_BYTES))
    # No byte of input encodes to less than one byte of JSON (an invalid one becomes
    # U+FFFD, three), so no more than ``limit`` bytes of the original can be kept.
    payload, cut = fit_text(data[:limit].decode("utf-8", errors="replace"), limit)
    truncated = cut or len(data) > limit
    kept: dict[str, str] = {}
    for key, value in list((headers or {}).items())[:HEADER_COUNT]:
        kept[_fit(str(key), HEADER_KEY_BYTES)] = _fit(str(value), HEADER_VALUE_BYTES)
    return DeadLetter(
        actor=_fit(actor, SUBJECT_BYTES), subject=_fit(subject, SUBJECT_BYTES),
        reason=_fit(reason, REASON_BYTES), payload=payload, headers=kept,
        deliveries=deliveries, time=time.time() if now is None else now,
        payload_bytes=len(data), payload_sha256=hashlib.sha256(data).hexdigest(),
        truncated=truncated,
    )
