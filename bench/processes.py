"""The agent figures with the fleet as separate processes, against the same fleet in-process.

    python -m bench.processes            # the agent benchmark's scale (a couple of minutes)
    python -m bench.processes --quick    # a fifth of the work: a smoke run, noisier

One fresh embedded nats-server (``bench_server``, ``sync_interval: always``)
for both halves of one run:

1. **in-process**: ``bench.agent.run_agent``, as ``make bench`` runs it: the
   fleet of ``bench.agent.FLEET_TOML`` (model gateway ``zero``, tool ``noop``,
   agents ``echo`` and ``tooler``) in this process, one event loop, each actor
   on its own connection. Once it has stopped, every mailbox consumer must
   show no pull request waiting and nothing unacked (no actor of it is left
   to take a message meant for the processes);
2. **processes**: the same fleet file, written to a temp dir, run by the real
   supervision tree (``corral up --config FILE`` with ``NATS_URL`` set to the
   bench server, ``CORRAL_HOME`` a temp dir): the root, one supervisor process
   per domain (models, tools, agents), one process per actor. Ready once it
   printed "ready" and ``corral ps``'s records show every actor running; then
   the same workloads (``bench.agent.measure_fleet``: the same counts, the same
   client code on its own connection in this process, task ids of their own);
   then SIGTERM, and every process of the tree must be gone.

CPU per task covers the bursts (``tasks_inflight`` submitted at once,
``repeats`` times): utime + stime from ``/proc/<pid>/stat``, of this process
(the client; in-process also every actor), of the whole ``corral up`` tree
(summed over its live processes) and of nats-server.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

from actors.runtime import fleet_actors
from bench.agent import FLEET_TOML, Clocks, bench_fleet, measure_fleet, run_agent
from bench.common import BENCH_DIR_PARENT, Scale, bench_server, median
from bench.report import bench_args, machine, machine_line
from bus import subjects
from bus.connection import Bus, connect
from corral.ps import live_trees

__all__ = ["ROWS", "Outcome", "Proc", "UpFleet", "cpu_seconds", "measure", "proc", "run",
           "running", "running_up", "runq_seconds", "settle_mailboxes", "table"]

_TICKS = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0
MAILBOXES = (subjects.TASKS_STREAM, subjects.TOOLS_STREAM, subjects.MODELS_STREAM)


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (every thread of it) so far; 0.0 once it is gone."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / _TICKS if fields else 0.0


def runq_seconds(pid: int) -> float:
    """Time ``pid``'s live threads waited on a run queue, ready but without a CPU, so far.

    ``/proc/<pid>/task/<tid>/schedstat``: CPU time, run-queue wait, slices
    (nanoseconds). High while the CPU figures are low: the process was
    starved of a core (by the others of the run, or by the neighbours).
    """
    total = 0
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, IndexError, ValueError):
                total += int((task / "schedstat").read_text().split()[1])
    return total / 1e9


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


Proc = tuple[int, int]
"""A process: its pid and its start time (clock ticks after boot): a reused pid is another."""


def proc(pid: int) -> Proc | None:
    """``pid`` as a ``Proc``, or None when it is gone (or a zombie)."""
    fields = _stat(pid)
    return (pid, int(fields[19])) if fields and fields[0] != "Z" else None


def running(p: Proc) -> bool:
    """Whether that very process still runs (not a new one under its pid)."""
    return proc(p[0]) == p


def tree_pids(root: int) -> list[int]:
    """``root`` and every live process below it (by parent pid, whatever its session)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if alive(pid):
            out.append(pid)
            todo += children.get(pid, [])
    return out


def _walk(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [node, *(n for kid in node["children"] for n in _walk(kid))]


@dataclass
class UpFleet:
    """A running ``corral up``: its process, the tree's records and every pid seen in it."""

    process: anyio.abc.Process
    config: Path
    log: Path
    node: str
    children: dict[int, str] = field(default_factory=dict)  # pid → child id (`corral ps`)
    seen: set[Proc] = field(default_factory=set)

    def look(self) -> list[int]:
        """The tree's live pids now, each remembered in ``seen``."""
        pids = tree_pids(self.process.pid)
        self.seen.update(p for p in map(proc, pids) if p is not None)
        return pids

    def clocks(self) -> dict[str, float]:
        """The tree's CPU and run-queue seconds so far, summed; and each child's CPU by id."""
        pids = self.look()
        cpu = {pid: cpu_seconds(pid) for pid in pids}
        by_child = {f"child:{self.children.get(pid, f'pid {pid}')}_cpu": s
                    for pid, s in cpu.items()}
        return {"processes_cpu": sum(cpu.values()),
                "processes_runq": sum(runq_seconds(pid) for pid in pids), **by_child}


async def _tree_records(bus: Bus, node: str) -> list[dict[str, Any]]:
    """The node's supervisors and actors, as `corral ps --json` shows them."""
    trees = await live_trees(bus, unreadable=lambda _: None)
    return [n for t in trees if t["node"] == node for n in _walk(t["tree"])]


async def _until_ready(up: UpFleet, bus: Bus, actors: set[str]) -> None:
    """Until `corral up` printed "ready" and every actor of ``actors`` runs (`corral ps`)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    log = anyio.Path(up.log)
    while time.monotonic() < deadline:
        if up.process.returncode is not None:
            raise RuntimeError(f"corral up exited {up.process.returncode} before it was "
                               f"ready:\n{await log.read_text()}")
        if "  ready:" in await log.read_text():
            records = await _tree_records(bus, up.node)
            running = {n["id"].rsplit(".", 1)[0] for n in records
                       if n["kind"] == "actor" and n["state"] == "running"}
            if actors <= running:
                up.children = {int(n["pid"]): str(n["id"]) for n in records if n["pid"]}
                up.look()
                return
        await anyio.sleep(0.1)
    raise RuntimeError(f"corral up not ready within {READY_TIMEOUT_S:g}s:\n"
                       f"{await log.read_text()}")


def _child_env(url: str, home: Path) -> dict[str, str]:
    """This environment without corral's own settings, pointed at ``url`` and ``home``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CORRAL_", "OTEL_")) and k != "NATS_URL"}
    path = [str(BENCH_DIR_PARENT), *filter(None, [env.get("PYTHONPATH")])]
    return {**env, "NATS_URL": url, "CORRAL_HOME": str(home),
            "PYTHONPATH": os.pathsep.join(path)}  # the actors import bench.tools


@contextlib.asynccontextmanager
async def running_up(url: str, workdir: Path) -> AsyncIterator[UpFleet]:
    """``corral up`` of ``FLEET_TOML`` against ``url``, ready; stopped with SIGTERM on exit.

    Raises:
        RuntimeError: it did not get ready, did not stop cleanly (exit status
            not 0), or left a process of its tree behind (killed, then reported).
    """
    config, home, log_path = workdir / "fleet.toml", workdir / "home", workdir / "up.log"
    await anyio.Path(home).mkdir(parents=True)
    await anyio.Path(config).write_text(FLEET_TOML)
    node = f"bench-{uuid.uuid4().hex[:6]}"
    actors = {f"{kind}.{name}" for kind, name, _ in fleet_actors(bench_fleet())}
    with log_path.open("wb") as out:
        process = await anyio.open_process(
            [sys.executable, "-m", "corral", "up", "--config", str(config), "--node", node],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=BENCH_DIR_PARENT,
            env=_child_env(url, home))
    up = UpFleet(process, config, log_path, node)
    try:
        bus = await connect(url, name="bench-processes-ps")
        try:
            await _until_ready(up, bus, actors)
        finally:
            await bus.close()
        yield up
    finally:
        with anyio.CancelScope(shield=True):
            await _stop(up)


async def _stop(up: UpFleet) -> None:
    """SIGTERM `corral up`; every process seen in its tree must then be gone."""
    up.look()
    status: int | None = None
    if up.process.returncode is None:
        up.process.send_signal(signal.SIGTERM)
        with anyio.move_on_after(STOP_TIMEOUT_S):
            status = await up.process.wait()
    else:
        status = up.process.returncode
    with anyio.move_on_after(10):
        while any(map(running, up.seen)):  # noqa: ASYNC110 - other processes: no event
            await anyio.sleep(0.05)
    left = sorted(pid for pid, _ in filter(running, up.seen))
    for pid in left:  # only processes of the tree this bench started, still the same ones
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    await up.process.aclose()
    if status != 0 or left:
        raise RuntimeError(f"corral up did not stop cleanly: exit status {status}, still "
                           f"running after it: {left} (killed); its output: {up.log}")


async def settle_mailboxes(bus: Bus, timeout_s: float = 10.0) -> None:
    """Until no mailbox consumer has a pull request waiting or a delivery unacked.

    Between the halves: a pull request of the other half's actors still
    waiting (or a delivery they still hold) would take this half's messages.
    Nothing to wait for before the streams exist.

    Raises:
        RuntimeError: some consumer still shows one after ``timeout_s``.
    """
    js = bus.nc.jetstream(timeout=10.0)
    existing = {info.config.name for info in await js.streams_info()}
    deadline = time.monotonic() + timeout_s
    while True:
        busy = [f"{c.stream_name}/{c.name}: waiting {c.num_waiting}, unacked "
                f"{c.num_ack_pending}, pending {c.num_pending}"
                for stream in MAILBOXES if stream in existing
                for c in await js.consumers_info(stream)
                if c.num_waiting or c.num_ack_pending or c.num_pending]
        if not busy:
            return
        if time.monotonic() > deadline:
            raise RuntimeError("the other half's fleet still consumes: " + "; ".join(busy))
        await anyio.sleep(0.1)


@dataclass
class Outcome:
    """Every round of one run; each figure's median over them."""

    in_process: dict[str, float]  # median of the rounds
    processes: dict[str, float]
    rounds: list[tuple[dict[str, float], dict[str, float]]] = field(default_factory=list)
    procs: set[Proc] = field(default_factory=set)  # every process seen in a `corral up` tree
    configs: list[Path] = field(default_factory=list)  # the fleet files run (deleted now)
    logs: list[str] = field(default_factory=list)  # what each `corral up` printed


def _clocks(*pids: tuple[str, int], more: Clocks | None = None) -> Clocks:
    """CPU (``<name>_cpu``) and run-queue wait (``<name>_runq``) of each named pid, and more."""
    def read() -> dict[str, float]:
        out = {f"{name}_cpu": cpu_seconds(pid) for name, pid in pids}
        out.update({f"{name}_runq": runq_seconds(pid) for name, pid in pids})
        return {**out, **(more() if more else {})}
    return read


def _derived(figures: dict[str, float], scale: Scale) -> dict[str, float]:
    """``figures`` with Python's share summed (this process + the tree) and cores busy."""
    out = dict(figures)
    for clock in ("cpu", "runq"):
        out[f"python_{clock}_per_task_ms"] = (out.get(f"bench_{clock}_per_task_ms", 0.0)
                                              + out.get(f"processes_{clock}_per_task_ms", 0.0))
    tasks = scale.tasks_inflight * scale.repeats
    for who in ("python", "nats_server"):  # CPU seconds over wall seconds
        out[f"{who}_cores"] = (out.get(f"{who}_cpu_per_task_ms", 0.0) * tasks / 1000
                               / out.get("burst_window_s", float("inf")))
    return out


def _medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: median([r[k] for r in runs]) for k in runs[0] if all(k in r for r in runs)}


async def _settled(url: str) -> None:
    bus = await connect(url, name="bench-processes-check")
    try:
        await settle_mailboxes(bus)
    finally:
        await bus.close()


async def measure(url: str, server_pid: int, scale: Scale, workdir: Path,
                  rounds: int = 1) -> Outcome:
    """In-process and as processes, ``rounds`` times, against the server at ``url``.

    The first round runs in-process first; the next ones alternate, so
    neither half always meets a younger store or a quieter neighbour.
    Before each half the mailboxes must be idle (``settle_mailboxes``): the
    other half's actors are all gone.
    """
    own, server = ("bench", os.getpid()), ("nats_server", server_pid)
    outcome = Outcome({}, {})

    async def in_process() -> dict[str, float]:
        await _settled(url)
        return await run_agent(url, scale, clocks=_clocks(own, server))

    async def processes(r: int) -> dict[str, float]:
        await _settled(url)
        async with running_up(url, workdir / f"round{r}") as up:
            figures = await measure_fleet(url, scale, clocks=_clocks(own, server,
                                                                      more=up.clocks))
        outcome.procs |= up.seen
        outcome.configs.append(up.config)
        outcome.logs.append(await anyio.Path(up.log).read_text())
        return figures

    for r in range(rounds):
        if r % 2 == 0:
            one = await in_process()
            many = await processes(r)
        else:
            many = await processes(r)
            one = await in_process()
        outcome.rounds.append((_derived(one, scale), _derived(many, scale)))
    outcome.in_process = _medians([one for one, _ in outcome.rounds])
    outcome.processes = _medians([many for _, many in outcome.rounds])
    return outcome


def run(scale: Scale, rounds: int = 1) -> Outcome:
    """One fresh server, both halves ``rounds`` times."""
    with bench_server() as srv, tempfile.TemporaryDirectory(prefix="corral-bench-procs-") as tmp:
        return anyio.run(measure, srv.url, srv.proc.pid if srv.proc else 0, scale, Path(tmp),
                         rounds)


# figure key, label, unit
ROWS = [
    ("agent_turn_p50_ms", "single-turn task, agent overhead p50", "ms"),
    ("agent_e2e_p50_ms", "submit → result seen p50", "ms"),
    ("agent_tool_task_p50_ms", "one-tool task p50", "ms"),
    ("agent_tasks_per_s", "tasks/s, {n} in flight", "tasks/s"),
    ("model_request_p50_ms", "model gateway request/reply p50", "ms"),
    ("eventlog_append_p50_ms", "fenced append p50 (no actor: the disk)", "ms"),
    ("bench_cpu_per_task_ms", "CPU/task in the burst: bench process", "ms"),
    ("processes_cpu_per_task_ms", "CPU/task in the burst: corral up tree", "ms"),
    ("python_cpu_per_task_ms", "CPU/task in the burst: all Python", "ms"),
    ("nats_server_cpu_per_task_ms", "CPU/task in the burst: nats-server", "ms"),
    ("python_cores", "cores busy in the bursts: all Python", "cores"),
    ("nats_server_cores", "cores busy in the bursts: nats-server", "cores"),
    ("python_runq_per_task_ms", "run-queue wait/task in the burst: all Python", "ms"),
    ("nats_server_runq_per_task_ms", "run-queue wait/task in the burst: nats-server", "ms"),
]


def _cell(figures: dict[str, float], key: str, unit: str) -> str:
    if key not in figures:
        return "-"
    fmt = "{:,.0f}" if unit.endswith("/s") else "{:.2f}"
    return f"{fmt.format(figures[key])} {unit}"


def table(outcome: Outcome, scale: Scale) -> str:
    """The markdown table: each figure in-process, as processes, and their ratio."""
    one, many = outcome.in_process, outcome.processes
    lines = ["| figure | in-process | processes | processes / in-process |",
             "|---|---:|---:|---:|"]
    for key, label, unit in ROWS:
        ratio = f"{many[key] / one[key]:.2f}x" if one.get(key) and key in many else "-"
        lines.append(f"| {label.format(n=scale.tasks_inflight)} | {_cell(one, key, unit)} | "
                     f"{_cell(many, key, unit)} | {ratio} |")
    return "\n".join(lines)


def breakdown(processes: dict[str, float]) -> str:
    """CPU per burst task of each process of the tree, highest first."""
    prefix, suffix = "child:", "_cpu_per_task_ms"
    rows = sorted(((k.removeprefix(prefix).removesuffix(suffix), v)
                   for k, v in processes.items() if k.startswith(prefix) and k.endswith(suffix)),
                  key=lambda r: -r[1])
    return ", ".join(f"{name} {ms:.2f}" for name, ms in rows)


def default_scale(quick: bool) -> Scale:
    """The agent benchmark's own counts (``python -m bench``), or a fifth of them."""
    return Scale().scaled(0.2) if quick else Scale()


def main(argv: list[str] | None = None) -> int:
    """Run both halves and print the comparison."""
    args = bench_args("python -m bench.processes", __doc__, "a fifth of the work (smoke run)",
                      argv, lambda p: p.add_argument(
                          "--rounds", type=int, default=1, metavar="N",
                          help="N rounds of both halves, alternating which goes first; the "
                          "table gives each figure's median (default: %(default)s)"))
    scale, rounds = default_scale(args.quick), max(1, args.rounds)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    where, started = machine(), time.perf_counter()
    print(f"the agent fleet in-process and as `corral up` processes, {rounds} round(s) "
          f"({scale.turns_sequential} sequential tasks, {scale.repeats} bursts of "
          f"{scale.tasks_inflight} each) …", flush=True)
    outcome = run(scale, rounds)
    print(f"\n{machine_line(where)} · whole run {time.perf_counter() - started:.0f}s\n")
    if rounds > 1:
        print(f"median of {rounds} rounds; tasks/s per round, in-process / processes: "
              + ", ".join(f"{one['agent_tasks_per_s']:.0f} / {many['agent_tasks_per_s']:.0f}"
                          for one, many in outcome.rounds) + "\n")
    print(table(outcome, scale))
    print(f"\nCPU/task in the burst, by process of the tree (ms): "
          f"{breakdown(outcome.processes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
