"""The link from a supervised process to its supervisor: a pipe, and fate-sharing.

A supervisor starts each child with the write end of a pipe
(``CORRAL_LINK_FD``) and its own pid (``CORRAL_PARENT_PID``). Over the pipe
the child says, one short line each:

    h             heartbeat (its event loop is alive)
    r             ready: serving (its mailbox is subscribed)
    p<subject>    its NATS connection's probe subject (``bus.liveness.open_probe``)
    +<ack subj>   a delivery arrived          -<ack subj>  it was settled
    s<json>       (a supervisor child) the state of its own children
    x<json>       (a supervisor child) why it gave up, just before exiting

so the supervisor knows, without asking NATS, whether the child is alive
and which messages it holds unacked when it dies (those are handed back at
once). Writes never block: a stopped supervisor must not stop its children.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys

__all__ = ["SupervisorLink", "die_with_parent", "orphaned"]

log = logging.getLogger("corral.link")

LINK_FD_ENV = "CORRAL_LINK_FD"
PARENT_PID_ENV = "CORRAL_PARENT_PID"
_MAX_PENDING = 1 << 20  # a supervisor this far behind is not reading: drop, don't grow


class SupervisorLink:
    """Lines to the supervisor over an inherited pipe; a no-op without one."""

    _process_link: SupervisorLink | None = None

    def __init__(self, fd: int | None) -> None:
        self.fd = fd
        self.dropped = 0
        self._pending = bytearray()
        if fd is not None:
            os.set_blocking(fd, False)

    @classmethod
    def from_env(cls) -> SupervisorLink:
        """This process's link (one per process; inactive when not supervised)."""
        if cls._process_link is None:
            raw = os.environ.get(LINK_FD_ENV, "")
            fd: int | None = None
            if raw.isdigit():
                try:
                    os.fstat(int(raw))
                    fd = int(raw)
                except OSError:
                    log.warning("%s=%s is not an open file descriptor", LINK_FD_ENV, raw)
            cls._process_link = cls(fd)
        return cls._process_link

    @property
    def active(self) -> bool:
        """Whether a supervisor is listening."""
        return self.fd is not None

    def _write(self, line: bytes) -> None:
        if self.fd is None:
            return
        if len(self._pending) > _MAX_PENDING:
            self.dropped += 1
            return
        self._pending += line
        try:
            n = os.write(self.fd, self._pending)
        except BlockingIOError:
            return  # the pipe is full: the rest goes with the next line
        except OSError:  # the supervisor is gone (EPIPE): nobody to tell any more
            self.fd = None
            return
        del self._pending[:n]

    def beat(self) -> None:
        """Heartbeat."""
        self._write(b"h\n")

    def ready(self) -> None:
        """Serving now."""
        self._write(b"r\n")

    def taken(self, reply: str) -> None:
        """A delivery with ack subject ``reply`` arrived."""
        self._write(b"+" + reply.encode() + b"\n")

    def settled(self, reply: str) -> None:
        """That delivery was settled."""
        self._write(b"-" + reply.encode() + b"\n")

    def probe(self, subject: str) -> None:
        """The subject that stops being routed once this process's connection is gone."""
        self._write(b"p" + subject.encode() + b"\n")

    def status(self, payload: bytes) -> None:
        """(A supervisor child) the state of its children, as JSON."""
        self._write(b"s" + payload + b"\n")

    def gave_up(self, payload: bytes) -> None:
        """(A supervisor child) why it gave up, as JSON; then flush what is pending."""
        self._write(b"x" + payload + b"\n")
        if self.fd is not None and self._pending:
            with contextlib.suppress(OSError):
                os.set_blocking(self.fd, True)
                os.write(self.fd, self._pending)


def orphaned() -> bool:
    """Whether the supervisor that started this process is gone."""
    parent = os.environ.get(PARENT_PID_ENV, "")
    return parent.isdigit() and os.getppid() != int(parent)


def die_with_parent() -> None:
    """Get SIGTERM when the supervising process dies, even by SIGKILL (Linux).

    ``CORRAL_PARENT_PID`` names the supervisor; if it is already gone by the
    time the signal is armed, exit at once rather than run as an orphan.
    """
    if not os.environ.get(PARENT_PID_ENV):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: an orphan is possible if the supervisor is killed
    if orphaned():
        sys.exit(0)
