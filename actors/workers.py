"""Sync tool callables in worker processes: a timeout stops them, a crash is a ``tool.failed``.

A thread cannot be stopped, so a hung sync tool on a thread holds it until
the process exits, and a segfault or ``os._exit`` in a tool ends the actor
with every call it holds. Here each sync call runs in a worker process of a
small pool (``[tools.X] workers``, per replica):

- **a timeout kills the worker** (SIGKILL, then reaped): nothing of the call
  runs on, and the next call gets a fresh worker;
- **a worker that dies mid-call** (segfault, ``os._exit``, killed by the
  OOM killer) is a ``ToolCrashed`` for that call; the actor lives on;
- a ``MemoryError`` is reported like any exception, and that worker is
  replaced (its heap may be in any state).

**Why ``subprocess`` and pipes, not ``multiprocessing``.** The pool is
driven from the actor's event loop: anyio's ``open_process`` gives async
pipe streams, so waiting for a call costs no thread, and a kill is
``Process.kill()``. Nothing is pickled: arguments, the ``ToolContext`` and
results cross as one JSON line each (they are JSON already: the model wrote
them and the log keeps them). No ``__main__`` is re-imported (as
``spawn`` does), nothing is forked from a process with threads and an event
loop (as ``fork`` does).

**Protocol.** The actor starts ``python -c _BOOT <actor pid>``; the child arms
``PR_SET_PDEATHSIG`` (SIGKILL: a worker never outlives its actor, even one
killed with -9), ignores SIGINT (the actor decides when it stops), reads a
hello line (``sys.path``, the callable, whether it takes ``ctx``, the result
limit), loads this file *by path* (not the ``actors`` package: a worker
starts in ~0.2 s, plus the tool's own imports) and answers ``ready``. Then,
per call: ``{"id", "kwargs", "ctx"}`` in, ``{"id", "ok", "result"}`` or
``{"id", "ok": false, "type", "error"}`` out. The tool's ``print()`` goes to
the actor's stderr, not into the replies. A result over ``result_bytes`` is
refused in the worker, so a huge value never crosses the pipe.

**Cost.** One call is two pipe writes and two JSON encodings more than a
call on a thread; ``python -m bench.workers`` measures both.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any, cast

import anyio
import anyio.abc
import msgspec
from anyio.streams.buffered import BufferedByteReceiveStream

from schemas.errors import ToolCrashed, ToolError, ToolResultTooLarge

__all__ = ["ToolRaised", "WorkerPool", "not_json", "result_too_large", "serve"]

log = logging.getLogger("corral.tool")

START_TIMEOUT_S = 60.0  # a worker that cannot import its tool in this long is given up
REAP_TIMEOUT_S = 5.0
_ENVELOPE_BYTES = 64 * 1024  # a reply's room beyond the result: id, flags, an error message
_ERROR_CHARS = 4000

# Runs in the child (``python -c``): arm the death signal before anything else, then
# load this file by path, so the worker does not import the whole actors package.
_BOOT = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG\n"
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(1)  # the actor died before the signal was armed\n"
    "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
    "import importlib.util, json\n"
    "hello = json.loads(sys.stdin.buffer.readline() or 'null')\n"
    "if hello is None:\n"
    "    os._exit(0)\n"
    "sys.path[:] = hello['path']\n"
    "spec = importlib.util.spec_from_file_location('corral_tool_worker', hello['worker'])\n"
    "module = importlib.util.module_from_spec(spec)\n"
    "sys.modules[spec.name] = module\n"
    "spec.loader.exec_module(module)\n"
    "module.serve(hello)\n"
)

_enc = msgspec.json.Encoder()
_HERE = os.path.abspath(__file__)  # what the worker loads (by path)


class _Reply(msgspec.Struct, frozen=True):
    """One line from a worker."""

    id: int = 0
    ready: bool = False
    ok: bool = False
    result: Any = None
    type: str = ""
    error: str = ""
    size: int = 0
    fatal: bool = False


_reply = msgspec.json.Decoder(_Reply)


def result_too_large(tool: str, size: int, limit: int) -> ToolResultTooLarge:
    """The error of a result over ``[limits] tool_result_bytes`` (in-process or from a worker)."""
    return ToolResultTooLarge(f"{tool} returned {size} bytes of JSON; the limit is {limit} "
                              f"bytes (limits.tool_result_bytes)", tool=tool)


def not_json(tool: str, reason: object) -> ToolError:
    """The error of a result that does not encode as JSON."""
    return ToolError(f"{tool} returned a value that is not JSON: {reason}", tool=tool)


class ToolRaised(Exception):
    """The callable raised in its worker.

    Re-raised in the actor as a subclass named like the original
    (``LookupError``...), so the ledger and the model see the same
    ``error_type`` and message as for a call on a thread.
    """


_raised: dict[str, type[ToolRaised]] = {}


def _raised_type(name: str) -> type[ToolRaised]:
    cls = _raised.get(name)
    if cls is None:
        if len(_raised) >= 256:
            _raised.clear()
        cls = _raised[name] = cast(type[ToolRaised],
                                   type(name, (ToolRaised,), {"__module__": __name__}))
    return cls


def _ended(returncode: int | None) -> str:
    """How a worker ended, in words."""
    if returncode is None:
        return "stopped answering"
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


class _Worker:
    """One worker process and its reply stream."""

    __slots__ = ("pid", "proc", "reader")

    def __init__(self, proc: anyio.abc.Process) -> None:
        assert proc.stdout is not None and proc.stdin is not None
        self.proc = proc
        self.pid = proc.pid
        self.reader = BufferedByteReceiveStream(proc.stdout)

    async def send(self, line: bytes) -> None:
        assert self.proc.stdin is not None
        await self.proc.stdin.send(line)

    async def receive(self, max_bytes: int) -> _Reply:
        line = await self.reader.receive_until(b"\n", max_bytes)
        try:
            return _reply.decode(line)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise anyio.BrokenResourceError(f"an unreadable reply: {exc}") from exc


# Whatever reading from or writing to a worker raises when it is gone or garbled.
_GONE = (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError,
         anyio.ClosedResourceError, anyio.DelimiterNotFound, OSError)


class _Lease:
    """A worker held for the current task's next call (``WorkerPool.reserved``)."""

    __slots__ = ("pool", "worker")

    def __init__(self, pool: WorkerPool, worker: _Worker) -> None:
        self.pool = pool
        self.worker: _Worker | None = worker


_lease: contextvars.ContextVar[_Lease | None] = contextvars.ContextVar("corral_worker_lease",
                                                                      default=None)


class WorkerPool:
    """Worker processes for one tool's sync callable, at most ``size`` at once, started on demand.

    ``may_take_effect``: the tool is not declared ``side_effect = "none"``, so
    a crash or a kill mid-call is reported as possibly having taken effect.

    Example:
        >>> pool = WorkerPool("lookup", "shop.tools:lookup", size=4, wants_ctx=False,
        ...                   result_bytes=65536)
        >>> await pool.run({"order_id": "1"}, None, timeout_s=5)
        {'status': 'delivered'}
        >>> await pool.aclose()
    """

    def __init__(self, tool: str, function: str, *, size: int, wants_ctx: bool,
                 result_bytes: int, may_take_effect: bool = True,
                 start_timeout_s: float = START_TIMEOUT_S) -> None:
        self.tool = tool
        self.function = function
        self.wants_ctx = wants_ctx
        self.result_bytes = result_bytes
        self.may_take_effect = may_take_effect
        self.start_timeout_s = start_timeout_s
        self._slots = anyio.CapacityLimiter(size)
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._held: set[_Worker] = set()  # reserved for a call that has not started yet
        self._ids = 0
        self.started = 0  # workers started
        self.killed = 0  # workers killed at a call's timeout
        self.crashed = 0  # workers that died mid-call

    @property
    def pids(self) -> set[int]:
        """The pids of the workers alive now (idle or busy)."""
        return {w.pid for w in (*self._idle, *self._busy, *self._held)}

    async def run(self, kwargs: dict[str, Any], ctx: dict[str, Any] | None, *,
                  timeout_s: float) -> Any:
        """Call the tool in a worker; its result (JSON values).

        ``timeout_s`` counts from when the call reaches a worker (a worker's
        start is not the call's time).

        Raises:
            TimeoutError: past ``timeout_s``; the worker was killed.
            ToolCrashed: the worker died mid-call.
            ToolResultTooLarge, ToolError: the result is too large, or not JSON,
                or no worker could start (the call did not run).
            ToolRaised: the callable raised (a subclass named like its exception).
        """
        lease = _lease.get()
        if lease is not None and lease.pool is self and lease.worker is not None:
            worker, lease.worker = lease.worker, None
            return await self._call(worker, kwargs, ctx, timeout_s, lease)
        async with self._slots:
            worker = self._idle.pop() if self._idle else await self._start()
            return await self._call(worker, kwargs, ctx, timeout_s, None)

    @contextlib.asynccontextmanager
    async def reserved(self) -> AsyncIterator[None]:
        """Hold a started worker for this task's next ``run``.

        Taken before a rate-limit turn, so a turn is never spent starting a
        process: the call starts when its turn comes.

        Raises:
            ToolError: no worker could start.
        """
        async with self._slots:
            worker = self._idle.pop() if self._idle else await self._start()
            lease = _Lease(self, worker)
            self._held.add(worker)
            token = _lease.set(lease)
            try:
                yield
            finally:
                _lease.reset(token)
                self._held.discard(worker)
                if lease.worker is not None:  # not used (or used and still fine)
                    self._idle.append(lease.worker)

    async def _call(self, worker: _Worker, kwargs: dict[str, Any], ctx: dict[str, Any] | None,
                    timeout_s: float, lease: _Lease | None) -> Any:
        """One call on ``worker``; afterwards it goes back (to the lease, or idle) or is stopped."""
        self._busy.add(worker)
        reusable = False
        try:
            self._ids += 1
            request = _enc.encode({"id": self._ids, "kwargs": kwargs, "ctx": ctx}) + b"\n"
            try:
                with anyio.fail_after(timeout_s):
                    await worker.send(request)
                    reply = await worker.receive(self.result_bytes + _ENVELOPE_BYTES)
            except TimeoutError:
                self.killed += 1
                raise
            except _GONE as exc:
                how = _ended(await self._reap(worker))
                self.crashed += 1
                maybe = "; it may have taken effect" if self.may_take_effect else ""
                raise ToolCrashed(f"{self.tool} crashed: its worker process {how} "
                                  f"mid-call{maybe}", tool=self.tool) from exc
            reusable = not reply.fatal
            return self._outcome(reply)
        finally:
            self._busy.discard(worker)
            if not reusable:
                await self._stop(worker)
            elif lease is not None:
                lease.worker = worker
            else:
                self._idle.append(worker)

    def _outcome(self, reply: _Reply) -> Any:
        if reply.ok:
            return reply.result
        if reply.type == "ToolResultTooLarge":
            raise result_too_large(self.tool, reply.size, self.result_bytes)
        if reply.type == "NotJSON":
            raise not_json(self.tool, reply.error)
        raise _raised_type(reply.type or "Exception")(reply.error)

    async def _start(self) -> _Worker:
        """A new worker, ready for calls."""
        hello = _enc.encode({"path": sys.path, "worker": _HERE,
                             "function": self.function, "ctx": self.wants_ctx,
                             "result_bytes": self.result_bytes}) + b"\n"
        worker: _Worker | None = None
        try:
            with anyio.fail_after(self.start_timeout_s):
                proc = await anyio.open_process(
                    [sys.executable, "-c", _BOOT, str(os.getpid())],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None)
                worker = _Worker(proc)
                await worker.send(hello)
                reply = await worker.receive(_ENVELOPE_BYTES)
        except (TimeoutError, *_GONE) as exc:
            how = "" if worker is None else f" (it {_ended(await self._reap(worker))})"
            raise ToolError(f"{self.tool} did not run: its worker process could not start: "
                            f"{type(exc).__name__}: {exc}{how}", tool=self.tool) from exc
        except BaseException:
            if worker is not None:
                await self._stop(worker)
            raise
        if not reply.ready:
            await self._stop(worker)
            raise ToolError(f"{self.tool} did not run: its worker process could not load "
                            f"{self.function}: {reply.error}", tool=self.tool)
        self.started += 1
        return worker

    async def _reap(self, worker: _Worker) -> int | None:
        """Wait for a worker that is going (killed if it takes too long); its return code."""
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(REAP_TIMEOUT_S):
                await worker.proc.wait()
            await self._stop(worker)
        return worker.proc.returncode

    async def _stop(self, worker: _Worker) -> None:
        """Kill a worker and reap it (never raises, never cancelled half-way)."""
        with anyio.CancelScope(shield=True):
            if worker.proc.returncode is None:
                try:
                    worker.proc.kill()
                except ProcessLookupError:
                    pass
            with anyio.move_on_after(REAP_TIMEOUT_S):
                await worker.proc.aclose()

    async def aclose(self) -> None:
        """Stop every worker: idle ones are asked to exit (end of input), busy ones killed."""
        idle, self._idle = self._idle, []
        with anyio.CancelScope(shield=True):
            for worker in idle:
                if worker.proc.stdin is not None:
                    try:
                        await worker.proc.stdin.aclose()
                    except _GONE:
                        pass
            with anyio.move_on_after(2):
                for worker in idle:
                    await worker.proc.wait()
            for worker in [*idle, *self._busy, *self._held]:
                await self._stop(worker)


# -- the worker's side ----------------------------------------------------------------------


def _load(function: str) -> Any:
    module_name, _, attr = function.partition(":")
    return getattr(importlib.import_module(module_name), attr)


def _answer(fn: Any, ctx_type: Any, line: bytes, limit: int) -> tuple[bytes, bool]:
    """One call: the reply line and whether this worker must exit after sending it."""
    request = msgspec.json.decode(line)
    call_id = request.get("id", 0)
    kwargs = dict(request.get("kwargs") or {})
    if request.get("ctx") is not None and ctx_type is not None:
        kwargs["ctx"] = ctx_type(**request["ctx"])
    try:
        result = fn(**kwargs)
    except MemoryError as exc:  # report it, then make room: a fresh worker takes the next call
        return _enc.encode({"id": call_id, "type": "MemoryError", "error": str(exc)[:_ERROR_CHARS],
                            "fatal": True}), True
    except BaseException as exc:  # SystemExit and KeyboardInterrupt too: the tool's, not ours
        return _enc.encode({"id": call_id, "type": type(exc).__name__,
                            "error": str(exc)[:_ERROR_CHARS]}), False
    try:
        body = _enc.encode(result)
    except (TypeError, msgspec.EncodeError) as exc:
        return _enc.encode({"id": call_id, "type": "NotJSON",
                            "error": str(exc)[:_ERROR_CHARS]}), False
    if len(body) > limit:
        return _enc.encode({"id": call_id, "type": "ToolResultTooLarge", "size": len(body)}), False
    return b'{"id":%d,"ok":true,"result":%s}' % (int(call_id), body), False


def serve(hello: dict[str, Any]) -> None:
    """The worker's loop (in the child process): load the callable, answer calls until EOF."""
    replies = os.dup(1)
    os.dup2(2, 1)  # the tool's print() goes to stderr, never into the replies

    def send(line: bytes) -> None:
        view = memoryview(line + b"\n")
        while view:
            view = view[os.write(replies, view):]

    try:
        fn = _load(str(hello["function"]))
        ctx_type = None
        if hello.get("ctx"):
            from actors.tooling import ToolContext  # only for a tool that takes ctx
            ctx_type = ToolContext
    except BaseException as exc:  # an import that fails in any way: say so, then exit
        send(_enc.encode({"error": f"{type(exc).__name__}: {exc}"[:_ERROR_CHARS]}))
        return
    send(_enc.encode({"ready": True}))
    limit = int(hello.get("result_bytes") or 64 * 1024)
    stdin = sys.stdin.buffer
    while line := stdin.readline():
        reply, fatal = _answer(fn, ctx_type, line, limit)
        send(reply)
        if fatal:
            os._exit(70)
