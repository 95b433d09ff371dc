"""One supervised OS process: started with a link pipe, listened to, stopped.

The child gets the write end of a pipe (``CORRAL_LINK_FD``); everything it
says arrives here (``actors.link`` describes the lines). End of file on the
pipe means the process is gone: its unsettled deliveries are handed back at
once, before anything else is decided.

A child runs in its own session: a terminal's Ctrl-C reaches only ``corral
up``, which drains the tree in order (as for SIGTERM); the child still dies
with its supervisor (PR_SET_PDEATHSIG, ``actors.link``). Its environment is
an allow-list of what any process needs to run plus the secrets of that one
child (``child_env``): provider keys only in model gateways, a tool's
declared ``env`` only in that tool, nothing secret in agents; and each child
its own NATS credential only (``creds_env``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path

import anyio
import anyio.abc
import msgspec

from actors.providers import key_env
from bus.auth import creds_path
from schemas.config import FleetConfig
from schemas.identity import supervisor_identity
from schemas.supervision import ChildSpec, SupervisionTree
from schemas.system import ChildRecord, ChildState

__all__ = ["CREDS_ENV", "SAFE_ENV", "SAFE_ENV_PREFIXES", "ChildProcess", "actor_secrets",
           "child_argv", "child_env", "creds_env", "describe_exit", "exit_line", "secrets_of"]

log = logging.getLogger("corral.supervisor")

_records = msgspec.json.Decoder(list[ChildRecord])
_gave_up = msgspec.json.Decoder(dict[str, object])


def child_argv(config: Path, spec: ChildSpec, node: str) -> list[str]:
    """The command line of a child: ``python -m actors`` or ``python -m supervisors``."""
    if spec.kind == "actor":
        kind, name = spec.id.split(".", 1)
        return [sys.executable, "-m", "actors", "--config", str(config), "--kind", kind,
                "--name", name]
    return [sys.executable, "-m", "supervisors", "--config", str(config), "--supervisor",
            spec.id, "--node", node]


# What every process needs to run, and nothing secret. A variable not listed
# here reaches a child only if its spec names it (``actor_secrets``).
SAFE_ENV = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "PWD", "TERM", "NO_COLOR", "LANG", "LANGUAGE",
    "TZ", "TMPDIR", "TEMP", "TMP", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "NATS_URL",
    "PROMETHEUS_MULTIPROC_DIR",  # corral up serves every process's metrics (actors.metrics)
})
SAFE_ENV_PREFIXES = ("LC_", "PYTHON", "CORRAL_", "OTEL_", "SSL_CERT_")
# A model gateway calls providers over HTTP: it also gets the proxy settings
# (which may carry credentials of their own, so not everyone does).
GATEWAY_ENV = frozenset({"HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy",
                         "https_proxy", "all_proxy", "no_proxy"})


def actor_secrets(fleet: FleetConfig) -> dict[str, frozenset[str]]:
    """The variables beyond ``SAFE_ENV`` each actor spec gets, by id (``model.<alias>``).

    A model gateway: the key variable of every entry of its route (what
    ``actors.providers.api_key`` reads) and the proxy settings. A tool: the
    variables its spec lists in ``env``. An agent: none.
    """
    out: dict[str, frozenset[str]] = {}
    for alias, route in fleet.models.items():
        keys = {v for v in (key_env(e) for e in route.entries()) if v}
        out[f"model.{alias}"] = frozenset(keys) | GATEWAY_ENV
    for name, tool in fleet.tools.items():
        if not tool.mcp and not tool.openapi:
            out[f"tool.{name}"] = frozenset(tool.env)
    for name, api in fleet.openapi.items():  # an HTTP API's actor reads its credential
        out[f"tool.{name}"] = frozenset(api.env)
    for name, server in fleet.mcp.items():  # an MCP server's actor passes them to the server
        out[f"tool.{name}"] = frozenset(server.env)
    return out


def secrets_of(spec: ChildSpec, tree: SupervisionTree,
               secrets: Mapping[str, Collection[str]]) -> frozenset[str]:
    """What one child needs: an actor its own; a supervisor those of every actor below it."""
    actors = [spec.id] if spec.kind == "actor" else tree.actors_under(spec.id)
    return frozenset(v for a in actors for v in secrets.get(a, ()))


# Never passed down as they are: each child gets its own credential (``creds_env``).
CREDS_ENV = frozenset({"CORRAL_CREDS", "CORRAL_CREDS_DIR"})


def child_env(base: Mapping[str, str], secrets: Iterable[str] = ()) -> dict[str, str]:
    """``base`` cut down to the safe variables, plus the ``secrets`` it holds.

    Example:
        >>> child_env({"PATH": "/bin", "OPENAI_API_KEY": "sk-…", "TOKEN": "t"}, ["TOKEN"])
        {'PATH': '/bin', 'TOKEN': 't'}
    """
    env = {k: v for k, v in base.items()
           if (k in SAFE_ENV or k.startswith(SAFE_ENV_PREFIXES)) and k not in CREDS_ENV}
    env.update({k: base[k] for k in secrets if k in base})
    return env


def creds_env(spec: ChildSpec, creds_dir: Path | None) -> dict[str, str]:
    """A child's own credential (ADR 0008): ``CORRAL_CREDS`` naming its file, nothing else.

    A supervisor child also gets ``CORRAL_CREDS_DIR``: it hands each of its own
    children theirs. Without ``creds_dir`` (an unauthenticated server) nothing.

    Example:
        >>> creds_env(ChildSpec(id="agent.triage", kind="actor", ...), Path("/h/creds"))
        {'CORRAL_CREDS': '/h/creds/agent.triage.creds'}
    """
    if creds_dir is None:
        return {}
    if spec.kind == "actor":
        return {"CORRAL_CREDS": str(creds_path(creds_dir, spec.id))}
    return {"CORRAL_CREDS": str(creds_path(creds_dir, supervisor_identity(spec.id))),
            "CORRAL_CREDS_DIR": str(creds_dir)}


_TAIL_BYTES = 16384
_REASON_CHARS = 300
_MARGIN = re.compile(r"^\s*\|\s?")  # an exception group's left margin: "    | "
_NOT_A_REASON = re.compile(r"^(\+-.*|and \d+ more exceptions?|\.\.\.)$")  # borders, elisions


def exit_line(text: str) -> str:
    r"""The line of a child's log that says why it died (the last one that says anything).

    For a traceback that is its exception line; for an exception group (whose
    traceback ends in ``+----`` borders) the innermost exception's line.

    Example:
        >>> exit_line("ExceptionGroup: x (1 sub-exception)\n+-+---- 1 ----\n"
        ...           "  | RecursionError: maximum recursion depth exceeded\n  +------")
        'RecursionError: maximum recursion depth exceeded'
    """
    for raw in reversed(text.splitlines()):
        line = _MARGIN.sub("", raw).strip()
        if line and not _NOT_A_REASON.match(line):
            return line if len(line) <= _REASON_CHARS else line[:_REASON_CHARS - 1] + "…"
    return ""


def _log_tail(path: Path) -> str:
    """Why the child died, from the end of its log (``exit_line``)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - _TAIL_BYTES))
            return exit_line(f.read().decode("utf-8", "replace"))
    except OSError:
        return ""


def describe_exit(status: int | None, *, killed_for: str = "", gave_up: str = "",
                  log_tail: str = "") -> str:
    """Why a child ended, for humans: the first thing an operator reads."""
    if killed_for:
        return f"killed: {killed_for}"
    if gave_up:
        return f"gave up: {gave_up}"
    if status is None:
        return "unknown"
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"killed by {name}"
    if status == 0:
        return "exited normally"
    return f"exit status {status}" + (f": {log_tail}" if log_tail else "")


def _restarted(old: list[ChildRecord], new: list[ChildRecord], path: str
               ) -> list[tuple[str, ChildRecord]]:
    """The records of ``new`` restarted since ``old``, with the path of their supervisor."""
    before = {r.id: r for r in old}
    out: list[tuple[str, ChildRecord]] = []
    for record in new:
        prev = before.get(record.id)
        if prev is not None and record.restarts > prev.restarts:
            out.append((path, record))
        if record.kind == "supervisor":
            out += _restarted(prev.children if prev else [], record.children,
                              f"{path}/{record.id}")
    return out


class ChildProcess:
    """One process of the tree (an actor replica or a supervisor) and what is known of it."""

    def __init__(self, spec: ChildSpec, replica: int, argv: list[str], *, key: str,
                 log_path: Path) -> None:
        self.spec = spec
        self.replica = replica
        self.id = f"{spec.id}.{replica}" if spec.kind == "actor" else spec.id
        self.argv = argv
        self.key = key
        self.log_path = log_path
        self.process: anyio.abc.Process | None = None
        self.generation = 0
        self.state: ChildState = "starting"
        self.restarts = 0
        self.started_at = 0.0  # wall clock
        self.started_mono = 0.0
        self.last_beat = 0.0  # monotonic
        self.ready = anyio.Event()
        self.exited = anyio.Event()
        self.last_exit: int | None = None
        self.reason = ""
        self.killed_for = ""  # set just before the supervisor kills it
        self.stopping = False  # the supervisor is stopping it: its exit is expected
        self.unsettled: set[str] = set()  # ack subjects of deliveries it holds
        self.probe = ""  # a subject routed to its NATS connection while that lives
        self.subtree: list[ChildRecord] = []  # a supervisor child's own children
        # Called for each restart its status lines show below it: (the path, relative to
        # this child's supervisor, of the supervisor that restarted it; its record).
        self.on_restart: Callable[[str, ChildRecord], None] | None = None
        self.gave_up = ""

    @property
    def pid(self) -> int | None:
        """The live process id."""
        if self.process is None or self.exited.is_set():
            return None
        return self.process.pid

    @property
    def abnormal(self) -> bool:
        """Whether its last exit counts as a failure (for ``transient``)."""
        return bool(self.killed_for) or self.last_exit != 0

    def record(self) -> ChildRecord:
        """Its row in the supervisor's record (``corral ps``)."""
        return ChildRecord(
            id=self.id, kind=self.spec.kind, spec=self.spec.id, replica=self.replica,
            replicas=self.spec.replicas, state=self.state, pid=self.pid or 0,
            restarts=self.restarts, started_at=self.started_at, last_exit=self.last_exit,
            reason=self.reason, heartbeat_key=self.key if self.spec.kind == "actor" else "",
            children=self.subtree)

    async def spawn(self, env: Mapping[str, str]) -> int:
        """Start the process; returns the read end of its link (the caller watches it).

        Raises:
            OSError: the process could not be started.
        """
        r, w = os.pipe()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self.log_path.open("ab") as out:
                # Its own session: only the supervisor decides when it stops (a terminal's
                # SIGINT goes to `corral up` alone, which drains the tree in order).
                self.process = await anyio.open_process(
                    self.argv, env={**env, "CORRAL_LINK_FD": str(w), "CORRAL_CHILD_KEY": self.key},
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    pass_fds=(w,), start_new_session=True)
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        self.generation += 1
        self.state, self.stopping, self.killed_for, self.gave_up = "starting", False, "", ""
        self.ready, self.exited = anyio.Event(), anyio.Event()
        self.started_at, self.started_mono = time.time(), time.monotonic()
        self.last_beat = self.started_mono
        self.unsettled.clear()
        self.probe = ""
        self.subtree = []  # a new process: its children are yet to be reported
        return r

    def on_line(self, line: bytes, on_change: Callable[[], None]) -> None:
        """Take one line the child sent."""
        tag = line[:1]
        if tag == b"h":
            self.last_beat = time.monotonic()
        elif tag == b"+":
            self.unsettled.add(line[1:].decode())
        elif tag == b"-":
            self.unsettled.discard(line[1:].decode())
        elif tag == b"p":
            self.probe = line[1:].decode()
        elif tag == b"r":
            self.last_beat = time.monotonic()
            if not self.stopping:
                self.state = "running"
            self.ready.set()
            on_change()
        elif tag == b"s":
            try:
                subtree = _records.decode(line[1:])
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                log.warning("%s: bad status line: %s", self.id, exc)
            else:
                if self.on_restart is not None:
                    for under, record in _restarted(self.subtree, subtree, self.id):
                        self.on_restart(under, record)
                self.subtree = subtree
            on_change()
        elif tag == b"x":
            try:
                self.gave_up = str(_gave_up.decode(line[1:]).get("message", ""))
            except (msgspec.ValidationError, msgspec.DecodeError):
                self.gave_up = line[1:].decode("utf-8", "replace")

    async def read_link(self, fd: int, on_change: Callable[[], None]) -> None:
        """Read the link until end of file (the process is gone); closes ``fd``."""
        os.set_blocking(fd, False)
        buf = b""
        try:
            while True:
                await anyio.wait_readable(fd)
                try:
                    data = os.read(fd, 65536)
                except BlockingIOError:
                    continue
                if not data:
                    return
                *lines, buf = (buf + data).split(b"\n")
                for line in lines:
                    self.on_line(line, on_change)
        finally:
            os.close(fd)

    def kill(self, why: str) -> None:
        """SIGKILL now (it is hung, stopped, or did not stop in time)."""
        if self.pid is None or self.process is None:
            return
        self.killed_for = self.killed_for or why
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()

    def exit_reason(self) -> str:
        """Why the current process ended."""
        tail = _log_tail(self.log_path) if self.last_exit not in (0, None) else ""
        return describe_exit(self.last_exit, killed_for=self.killed_for, gave_up=self.gave_up,
                             log_tail=tail)

    async def stop(self, timeout_s: float) -> None:
        """SIGTERM, up to ``timeout_s`` to drain, then SIGKILL. Idempotent."""
        if self.process is None or self.exited.is_set():
            return
        self.stopping, self.state = True, "stopping"
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        with anyio.move_on_after(timeout_s):
            await self.exited.wait()
        if not self.exited.is_set():
            log.warning("%s (pid %s) did not stop within %.1fs: SIGKILL", self.id,
                        self.process.pid, timeout_s)
            self.kill(f"did not stop within {timeout_s:g}s")
            with anyio.move_on_after(10):
                await self.exited.wait()
