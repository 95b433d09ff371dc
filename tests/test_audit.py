"""``corral audit verify``: chains, signatures, writers and anchors, with an exit code.

A log cut short or rewritten whole verifies entry by entry; its anchor (the
signed chain head stored apart when the task ended) is what gives it away.
CORRAL_EVENTS denies deleting and purging, so the attacks here go the only
way the JetStream API leaves: delete the whole stream and write it again.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import msgspec
import pytest

from bus import subjects
from bus.anchors import last_anchor
from bus.connection import Bus, connect
from bus.eventlog import EventLog, LogHead
from bus.provision import ensure_streams
from bus.server import EmbeddedServer
from corral import audit as audit_cmd
from corral import cli
from corral.audit import AuditReport, audit, format_report
from corral.client import Client
from schemas.events import (
    ActorRef,
    LlmResponded,
    TaskCanceled,
    TaskCompleted,
    TaskSubmitted,
    TurnStarted,
    encode_anchor,
    encode_event,
)
from schemas.identity import KeySet
from schemas.messages import Message, ModelResponse, TextPart, Wake
from tests.test_signed_events import connected, identities, key_set, signed_demo, signed_fleet

Raw = tuple[str, bytes, dict[str, str]]  # subject, data, headers


def _env(task_id: str, agent: str) -> dict[str, Any]:
    return {"task_id": task_id, "seq": 0, "time": 1.0,
            "actor": ActorRef(kind="agent", name=agent, instance=f"{agent}-1")}


async def finish(log: EventLog, task_id: str, answer: str, agent: str = "a", *,
                 anchored: bool = True) -> None:
    """A task of ``agent`` from submission to completion, written (and signed) through ``log``.

    ``anchored=False``: the completion is stored like an append but not anchored
    (a writer that died between the two).
    """
    env = _env(task_id, agent)
    head, _ = await log.append(LogHead(), TaskSubmitted(
        **env, agent=agent, message=Message(role="user", parts=[TextPart(text="q")])))
    head, _ = await log.append(head, TurnStarted(**env, agent=agent, turn=1))
    head, _ = await log.append(head, LlmResponded(
        **env, agent=agent, turn=1, response=ModelResponse(text=answer)))
    done = TaskCompleted(**env, agent=agent,
                         message=Message(role="agent", parts=[TextPart(text=answer)]))
    if anchored:
        await log.append(head, done)
        return
    raw = encode_event(msgspec.structs.replace(done, seq=head.seq + 1, prev_hash=head.hash))
    signer = log.bus.signer
    await log.bus.js_publish(subjects.events(task_id), raw,
                             expected_last_subject_seq=head.stream_seq,
                             headers=signer.headers(raw) if signer else None)


async def stored(bus: Bus) -> list[Raw]:
    """Every message of CORRAL_EVENTS, in order."""
    out: list[Raw] = []
    seq = 0
    while True:
        try:
            msg = await bus.js.get_msg(subjects.EVENTS_STREAM, seq=seq + 1, next=True,
                                       subject=subjects.EVENTS_ALL, direct=True)
        except Exception:  # NotFoundError: the end
            return out
        out.append((str(msg.subject), bytes(msg.data or b""),
                    {k: v for k, v in (msg.headers or {}).items() if not k.startswith("Nats-")}))
        seq = int(msg.seq or 0)


async def rewrite_events(bus: Bus, edit: Callable[[list[Raw]], list[Raw]]) -> None:
    """What an admin credential can do to an undeletable stream: drop it, write it again."""
    before = await stored(bus)
    await bus.js.delete_stream(subjects.EVENTS_STREAM)
    await ensure_streams(bus)
    for subject, data, headers in edit(before):
        await bus.js_publish(subject, data, headers=headers or None)


@contextlib.asynccontextmanager
async def signed(url: str) -> AsyncIterator[tuple[dict[str, Bus], KeySet]]:
    """Connections as agent.a, agent.b, client and admin, each signing, all verifying."""
    signers = identities(None, "agent.a", "agent.b")
    keys = key_set(signers)
    async with contextlib.AsyncExitStack() as stack:
        buses = {who: await stack.enter_async_context(connected(url, signers[who], keys))
                 for who in ("agent.a", "agent.b", "client", "admin")}
        yield buses, keys


def whats(report: AuditReport) -> list[tuple[str, str]]:
    return sorted((f.task_id, f.what) for f in report.findings)


async def run_cli(argv: list[str], url: str, keys: KeySet | None,
                  monkeypatch: pytest.MonkeyPatch) -> int:
    """``corral audit ...`` in this process, its connection given the fleet's key set."""
    monkeypatch.setenv("NATS_URL", url)
    real = audit_cmd.connect_command

    async def keyed(*args: Any, **kwargs: Any) -> Bus:
        bus = await real(*args, **kwargs)
        bus.keys = keys
        return bus

    monkeypatch.setattr(audit_cmd, "connect_command", keyed)
    args: argparse.Namespace = cli.build_parser().parse_args(argv)
    code: int = await args.func(args)
    return code


# -- a real fleet, through the CLI -----------------------------------------------------


async def test_a_clean_signed_run_audits_clean(
        bus: Bus, nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    fleet, signers, keys = signed_demo()
    url = nats_server.url
    async with (signed_fleet(url, fleet, signers, keys),
                connected(url, signers["client"], keys) as as_client):
        client = Client(as_client)
        ids = [await client.submit("triage", text) for text in
               ("Please refund order 1234", "Where is order 5678?")]
        for task_id in ids:
            assert (await client.wait(task_id, timeout_s=60)).status == "completed"
    capsys.readouterr()
    assert await run_cli(["audit", "verify"], url, keys, monkeypatch) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    assert out[0].startswith("2 tasks, ") and "2 anchors, 0 findings; signatures checked " \
        f"against {len(keys.identities)} identities of fleet 'demo'" in out[0]
    assert await run_cli(["audit", "verify", "--task", ids[0], "--json"], url, keys,
                         monkeypatch) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tasks"] == 1 and report["findings"] == [] and report["signatures_checked"]
    # The same run, read by an audit with no key set: it says what it could not check.
    assert await run_cli(["audit", "verify", "--since", "1h"], url, None, monkeypatch) == 0
    assert "signatures NOT checked" in capsys.readouterr().out
    assert await run_cli(["audit", "verify", "--task", "no-such-task"], url, keys,
                         monkeypatch) == 1
    assert "no log and no anchor for task no-such-task" in capsys.readouterr().err


async def test_usage_errors_exit_2(nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["audit", "verify", "--since", "yesterday"],
                 ["audit", "verify", "--task", "not.a.task"]):
        assert await run_cli(argv, nats_server.url, None, monkeypatch) == 2, argv
    assert "--since" in capsys.readouterr().err
    for argv in (["audit", "verify", "--task", "x", "--since", "1d"], ["audit"],
                 ["audit", "verfy"]):
        with pytest.raises(SystemExit) as exc:
            cli.build_parser().parse_args(argv)
        assert exc.value.code == 2, argv


# -- truncated, rewritten, deleted --------------------------------------------------------


async def test_a_truncated_log_is_found_through_its_anchor(
        bus: Bus, nats_server: EmbeddedServer) -> None:
    async with signed(nats_server.url) as (as_, keys):
        await finish(EventLog(as_["agent.a"]), "cut", "refund denied")
        await finish(EventLog(as_["agent.a"]), "kept", "fine")
        bus.keys = keys
        assert whats(await audit(bus)) == []
        # Drop the end of "cut" (its answer and completion): each remaining entry verifies.
        await rewrite_events(as_["admin"], lambda raws: [
            r for r in raws if r[0] != subjects.events("cut")] + [
            r for r in raws if r[0] == subjects.events("cut")][:2])
        entries, _ = await EventLog(bus).entries("cut")
        assert len(entries) == 2 and all(not hasattr(e, "reason_class") for e in entries)
        report = await audit(bus)
    assert whats(report) == [("cut", "truncated"), ("kept", "anchor-mismatch")]
    (cut,) = [f for f in report.findings if f.task_id == "cut"]
    assert "the log ends at seq 2 but its end was anchored at seq 4" in cut.detail
    # "kept" was copied byte for byte into the new stream: same events, new places.
    (kept,) = [f for f in report.findings if f.task_id == "kept"]
    assert "rewritten (copied)" in kept.detail


async def test_a_log_rewritten_whole_is_found(bus: Bus, nats_server: EmbeddedServer) -> None:
    """Even with the owner's own (stolen) key: every entry verifies, the anchor does not."""
    async with signed(nats_server.url) as (as_, keys):
        await finish(EventLog(as_["agent.a"]), "w", "refund denied")
        bus.keys = keys
        await rewrite_events(as_["admin"], lambda raws: [])
        await finish(EventLog(as_["agent.a"]), "w", "refund approved: $1,000,000",
                     anchored=False)
        entries, _ = await EventLog(bus).entries("w")
        assert [getattr(e, "reason_class", "") for e in entries] == [""] * 4
        report = await audit(bus, task_id="w")
    assert whats(report) == [("w", "anchor-mismatch")]
    assert "event 4 of the log is not the anchored task.completed" in report.findings[0].detail


async def test_a_deleted_log_is_found(bus: Bus, nats_server: EmbeddedServer) -> None:
    async with signed(nats_server.url) as (as_, keys):
        await finish(EventLog(as_["agent.a"]), "gone", "fine")
        await rewrite_events(as_["admin"], lambda raws: [])
        bus.keys = keys
        report = await audit(bus)
    assert whats(report) == [("gone", "log-missing")] and report.tasks == 1


# -- anchors: missing, forged, restored -------------------------------------------------------


async def test_a_missing_anchor_is_found_and_restored_by_its_writer_only(
        bus: Bus, nats_server: EmbeddedServer) -> None:
    async with signed(nats_server.url) as (as_, keys):
        await finish(EventLog(as_["agent.a"]), "m", "fine", anchored=False)
        bus.keys = keys
        report = await audit(bus)
        assert whats(report) == [("m", "anchor-missing")]
        assert "ended at seq 4 but its end was never anchored" in report.findings[0].detail
        assert not await EventLog(as_["client"]).ensure_anchor("m")  # not its event to anchor
        assert not await EventLog(as_["agent.b"]).ensure_anchor("m")
        assert await EventLog(as_["agent.a"]).ensure_anchor("m")
        assert not await EventLog(as_["agent.a"]).ensure_anchor("m")  # once
        assert whats(await audit(bus)) == []


async def test_forged_anchors_are_findings(bus: Bus, nats_server: EmbeddedServer) -> None:
    async with signed(nats_server.url) as (as_, keys):
        await finish(EventLog(as_["agent.a"]), "f", "fine")
        bus.keys = keys
        anchor = (await last_anchor(bus, "f"))
        assert anchor is not None and anchor.anchor is not None
        real = anchor.anchor
        forged = [
            (as_["client"], real, "signed by client, which may not write as agent/a"),
            (as_["agent.b"], real, "signed by agent.b, which may not write as agent/a"),
            (as_["agent.a"], msgspec.structs.replace(real, event_type="llm.responded"),
             "does not end a task"),
            (as_["agent.a"], msgspec.structs.replace(real, task_id="other"), "anchors task"),
            (None, real, "not signed"),
        ]
        for signer_bus, value, _ in forged:
            data = encode_anchor(value)
            signer = signer_bus.signer if signer_bus is not None else None
            await bus.js_publish(subjects.anchors("f"), data,
                                 headers=signer.headers(data) if signer else None)
        await bus.js_publish(subjects.anchors("f"), b"\x00 not json")
        report = await audit(bus)
    assert whats(report) == [("f", "anchor-invalid")] * (len(forged) + 1)
    details = " | ".join(f.detail for f in report.findings)
    for _, _, why in forged:
        assert why in details
    assert "not an anchor" in details


async def test_an_agent_restores_the_anchor_of_a_task_it_ended(
        bus: Bus, nats_server: EmbeddedServer) -> None:
    """A writer that died between the end and its anchor: the agent's next look anchors it."""
    fleet, signers, keys = signed_demo()
    url = nats_server.url
    async with connected(url, signers["agent.triage"], keys) as as_triage:
        await finish(EventLog(as_triage), "late", "fine", agent="triage", anchored=False)
    bus.keys = keys
    assert whats(await audit(bus)) == [("late", "anchor-missing")]
    async with signed_fleet(url, fleet, signers, keys):
        await bus.js_publish(subjects.wake("triage"),
                             msgspec.json.encode(Wake(task_id="late", reason="late tool")))
        with anyio.fail_after(20):
            while await last_anchor(bus, "late") is None:
                await anyio.sleep(0.05)
    assert whats(await audit(bus)) == []


async def test_corral_audit_anchor_restores_what_dead_writers_left_unanchored(
        bus: Bus, nats_server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A cancel whose CLI died before its anchor, an agent that died before its own: the
    command anchors the operator's end itself and wakes the agent, which anchors its own."""
    fleet, signers, keys = signed_demo()
    url = nats_server.url
    async with (connected(url, signers["agent.triage"], keys) as as_triage,
                connected(url, signers["operator"], keys) as as_operator):
        await finish(EventLog(as_triage), "late", "fine", agent="triage", anchored=False)
        head, _ = await EventLog(as_triage).append(LogHead(), TaskSubmitted(
            **_env("cut", "triage"), agent="triage",
            message=Message(role="user", parts=[TextPart(text="q")])))
        cancel = TaskCanceled(task_id="cut", seq=head.seq + 1, prev_hash=head.hash, time=2.0,
                              actor=ActorRef(kind="operator", name="operator"), by="operator")
        raw = encode_event(cancel)
        await as_operator.js_publish(subjects.events("cut"), raw,
                                     expected_last_subject_seq=head.stream_seq,
                                     headers=signers["operator"].headers(raw))
        bus.keys = keys
        assert whats(await audit(bus)) == [("cut", "anchor-missing"), ("late", "anchor-missing")]

        async def as_the_operator(role: str, *args: Any, **kwargs: Any) -> Bus:
            assert role == "operator"
            b = await connect(url, name="corral-audit")
            b.signer, b.keys = signers["operator"], keys
            return b

        monkeypatch.setattr(audit_cmd, "connect_command", as_the_operator)
        capsys.readouterr()
        args = cli.build_parser().parse_args(["audit", "anchor"])
        assert await args.func(args) == 0
        out = capsys.readouterr().out
        assert "task cut: anchored" in out
        assert "task late: its end was written by agent/triage, which alone may anchor it: " \
               "woke it" in out
        assert "2 tasks without an anchor, 2 anchored or asked to be" in out
        assert whats(await audit(bus)) == [("late", "anchor-missing")]  # the agent is not up
        async with signed_fleet(url, fleet, signers, keys):
            with anyio.fail_after(20):  # it is now: the wake waited for it
                while await last_anchor(bus, "late") is None:
                    await anyio.sleep(0.05)
        assert whats(await audit(bus)) == []
        # Nothing left to do, and a task with no end: said, and exit 1 for the latter.
        args = cli.build_parser().parse_args(["audit", "anchor", "--task", "cut"])
        assert await args.func(args) == 0
        assert "task cut: anchored already" in capsys.readouterr().out
        await EventLog(as_triage).append(LogHead(), TaskSubmitted(
            **_env("open", "triage"), agent="triage",
            message=Message(role="user", parts=[TextPart(text="q")])))
        args = cli.build_parser().parse_args(["audit", "anchor", "--task", "open"])
        assert await args.func(args) == 1
        assert "task open: not finished" in capsys.readouterr().out


async def test_since_audits_only_tasks_active_lately(bus: Bus, nats_server: EmbeddedServer
                                                     ) -> None:
    async with signed(nats_server.url) as (as_, keys):
        await finish(EventLog(as_["agent.a"]), "old", "fine", anchored=False)
        await anyio.sleep(0.05)
        cut = dt.datetime.now(dt.UTC)
        await anyio.sleep(0.05)
        await finish(EventLog(as_["agent.a"]), "new", "fine")
        bus.keys = keys
        assert whats(await audit(bus)) == [("old", "anchor-missing")]
        recent = await audit(bus, since=cut)
    assert recent.tasks == 1 and recent.findings == [] and recent.events == 4
    assert format_report(recent).startswith("1 task, 4 events, 1 anchor, 0 findings")


def test_the_report_reads_one_finding_per_line() -> None:
    report = AuditReport(tasks=2, events=9, anchors=1, findings=[
        audit_cmd.Finding(task_id="t1", what="truncated", detail="the log ends at seq 2 ..."),
        audit_cmd.Finding(task_id="t2", what="signature", detail="entry 5: not signed",
                          stream_seq=5)])
    assert format_report(report).splitlines() == [
        "task t1: truncated: the log ends at seq 2 ...",
        "task t2: signature: entry 5: not signed",
        "2 tasks, 9 events, 1 anchor, 2 findings; signatures NOT checked: no key set (an "
        "unauthenticated fleet); chains, writers and anchors were"]
