"""Wire contract, config validation and the fold (property tests)."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.config import parse_fleet
from schemas.errors import ConfigError
from schemas.events import (
    ActorRef,
    Event,
    LlmResponded,
    TaskCompleted,
    TaskSubmitted,
    ToolCompleted,
    ToolFailed,
    ToolRequested,
    TurnStarted,
    decode_event,
    encode_event,
)
from schemas.fold import apply, fold
from schemas.messages import Message, ModelResponse, TaskSubmit, TextPart, ToolCall
from tests.conftest import DEMO_CONFIG

# Payloads as a client in another language would send them (v1 of the contract).
OLD_SUBMIT = b'{"message":{"role":"user","parts":[{"kind":"text","text":"hi"}]}}'
OLD_SUBMIT_FULL = (b'{"id":"abc-1","context_id":"c1","message":{"role":"user","parts":'
                   b'[{"kind":"text","text":"hi"},{"kind":"data","data":{"x":1}}]},'
                   b'"metadata":{"k":"v"}}')
OLD_EVENT = (b'{"type":"task.submitted","task_id":"t","seq":1,"time":1.0,"actor":{"kind":"agent",'
             b'"name":"a"},"agent":"a","message":{"role":"user","parts":[{"kind":"text",'
             b'"text":"hi"}]}}')


def test_old_payloads_still_decode() -> None:
    t = msgspec.json.decode(OLD_SUBMIT, type=TaskSubmit)
    assert t.id == "" and t.message.text() == "hi"  # the agent names it task-<stream seq>
    full = msgspec.json.decode(OLD_SUBMIT_FULL, type=TaskSubmit)
    assert full.id == "abc-1" and full.metadata == {"k": "v"}
    ev = decode_event(OLD_EVENT)
    assert isinstance(ev, TaskSubmitted) and ev.agent == "a"


@pytest.mark.parametrize("payload", [
    b'{"message":{"role":"user","parts":[]}}',  # no parts
    b'{"id":"has spaces","message":{"role":"user","parts":[{"kind":"text","text":"x"}]}}',
    b'{"message":{"role":"robot","parts":[{"kind":"text","text":"x"}]}}',
    b'{"text":"no message"}',
])
def test_invalid_submissions_are_rejected(payload: bytes) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(payload, type=TaskSubmit)


def test_demo_config_parses() -> None:
    fleet = parse_fleet(DEMO_CONFIG.read_text(), str(DEMO_CONFIG))
    assert set(fleet.agents) == {"triage", "billing", "support"}


@pytest.mark.parametrize(("mutation", "table", "key"), [
    (("max_turns = 4", "max_turns = 'four'"), "agents.triage", "max_turns"),
    (("max_turns = 4", "max_turns = 4\nmax_turn = 5"), "agents.triage", "max_turn"),
    (('model = "support-model"\ndescription = "Front',
      'model = "nope"\ndescription = "Front'), "agents.triage", "model"),
    (('tools = ["lookup_order"]', 'tools = ["lookup_ordr"]'), "agents.support", "tools"),
    (('ack_wait_s = 10.0', 'ack_wait_s = -1.0'), "runtime", "ack_wait_s"),
    (('function = "corral.demo.tools:lookup_order"', 'function = "no_colon"'),
     "tools.lookup_order", "function"),
])
def test_config_errors_name_file_table_and_key(mutation: tuple[str, str], table: str,
                                               key: str) -> None:
    text = DEMO_CONFIG.read_text()
    assert mutation[0] in text
    with pytest.raises(ConfigError) as info:
        parse_fleet(text.replace(mutation[0], mutation[1], 1), "fleet.toml")
    err = info.value
    assert (err.file, err.table, err.key) == ("fleet.toml", table, key)
    assert "fleet.toml" in str(err) and key in str(err)


def test_config_error_for_broken_toml() -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_fleet("[agents\n", "broken.toml")


# -- fold ------------------------------------------------------------------

ACTOR = ActorRef(kind="agent", name="a")


def _env(seq: int) -> dict[str, object]:
    return {"task_id": "t", "seq": seq, "time": float(seq), "actor": ACTOR}


def scripted_log(n_calls: int, fail: set[int]) -> list[Event]:
    """A well-formed task log: submit, a turn with ``n_calls`` calls, outcomes, answer."""
    calls = [ToolCall(id=f"c{i}", name="t", arguments={"i": i}) for i in range(n_calls)]
    events: list[Event] = [
        TaskSubmitted(**_env(1), agent="a",  # type: ignore[arg-type]
                      message=Message(role="user", parts=[TextPart(text="go")])),
        TurnStarted(**_env(2), agent="a", turn=1),  # type: ignore[arg-type]
        LlmResponded(**_env(3), agent="a", turn=1,  # type: ignore[arg-type]
                     response=ModelResponse(tool_calls=calls)),
    ]
    for c in calls:
        events.append(ToolRequested(**_env(len(events) + 1), turn=1, call=c,  # type: ignore[arg-type]
                                    idempotency_key=f"t:1:{c.id}"))
    for i, c in enumerate(calls):
        if i in fail:
            events.append(ToolFailed(**_env(len(events) + 1), call_id=c.id,  # type: ignore[arg-type]
                                     tool="t", error="boom"))
        else:
            events.append(ToolCompleted(**_env(len(events) + 1), call_id=c.id,  # type: ignore[arg-type]
                                        tool="t", result={"i": i}))
    events.append(TurnStarted(**_env(len(events) + 1), agent="a", turn=2))  # type: ignore[arg-type]
    events.append(LlmResponded(**_env(len(events) + 1), agent="a", turn=2,  # type: ignore[arg-type]
                               response=ModelResponse(text="done")))
    events.append(TaskCompleted(**_env(len(events) + 1), agent="a",  # type: ignore[arg-type]
                                message=Message(role="agent", parts=[TextPart(text="done")])))
    return events


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 5), fail=st.sets(st.integers(0, 4)), split=st.integers(0, 20))
def test_fold_is_incremental_and_replayable(n: int, fail: set[int], split: int) -> None:
    events = scripted_log(n, fail)
    whole = fold(events)
    assert whole.status == "completed" and whole.answer == "done"
    # Folding a prefix, then applying the rest, is the same as folding it all.
    k = min(split, len(events))
    part = fold(events[:k])
    for e in events[k:]:
        apply(part, e)
    assert part == whole
    # Encoding to bytes and back changes nothing (what replay reads is what was written).
    again = fold(decode_event(encode_event(e)) for e in events)
    assert again == whole


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 5), data=st.data())
def test_duplicate_outcomes_do_not_change_the_state(n: int, data: st.DataObject) -> None:
    events = scripted_log(n, set())
    outcomes = [i for i, e in enumerate(events) if isinstance(e, ToolCompleted)]
    dup_at = data.draw(st.sampled_from(outcomes))
    insert_at = data.draw(st.integers(dup_at + 1, len(events) - 1))
    with_dup = [*events[:insert_at], events[dup_at], *events[insert_at:]]
    a, b = fold(events), fold(with_dup)
    assert (a.status, a.conversation, a.tool_calls, a.answer) == (
        b.status, b.conversation, b.tool_calls, b.answer)


def test_phases_follow_the_loop() -> None:
    events = scripted_log(2, {1})
    s = fold(events[:1])
    assert s.phase == "ready"
    s = fold(events[:2])
    assert s.phase == "thinking"
    s = fold(events[:3])
    assert s.phase == "acting" and len(s.unrequested_calls()) == 2
    s = fold(events[:6])  # one outcome in
    assert s.phase == "acting" and len(s.pending_calls()) == 1
    s = fold(events[:7])  # both outcomes in (one failed): the model takes the next turn
    assert s.phase == "ready"
    assert [m.is_error for m in s.conversation if m.role == "tool"] == [False, True]
    assert all(m.untrusted for m in s.conversation if m.role == "tool")


def test_model_failures_fold_by_attempt_and_an_answer_paid_while_paused_is_kept() -> None:
    from schemas.events import LlmFailed, TaskPaused, TaskResumed

    start = scripted_log(0, set())[:2]  # submitted, turn 1 claimed (attempt 1)
    waiting = LlmFailed(**_env(3), agent="a", turn=1, attempt=1,  # type: ignore[arg-type]
                        error="circuit open", error_type="ProviderUnavailable", retryable=True)
    s = fold([*start, waiting])
    assert s.phase == "thinking" and s.llm_failure is not None  # still waiting: retried
    stale = LlmFailed(**_env(4), agent="a", turn=1, attempt=2,  # type: ignore[arg-type]
                      error="x", retryable=False)
    assert fold([*start, waiting, stale]).phase == "thinking"  # another attempt's: ignored
    final = LlmFailed(**_env(4), agent="a", turn=1, attempt=1,  # type: ignore[arg-type]
                      error="401", retryable=False)
    assert fold([*start, waiting, final]).phase == "model_failed"
    again = TurnStarted(**_env(5), agent="a", turn=1, attempt=2)  # type: ignore[arg-type]
    s = fold([*start, waiting, final, again])
    assert s.phase == "thinking" and s.llm_failure is None
    # The gateway answered while an operator had paused the task: resuming does not pay again.
    paused = TaskPaused(**_env(3))  # type: ignore[arg-type]
    answer = LlmResponded(**_env(4), agent="a", turn=1, attempt=1,  # type: ignore[arg-type]
                          response=ModelResponse(text="done"))
    s = fold([*start, paused, answer, TaskResumed(**_env(5))])  # type: ignore[arg-type]
    assert s.phase == "answering" and s.last_response is not None
    late = LlmResponded(**_env(4), agent="a", turn=1, attempt=2,  # type: ignore[arg-type]
                        response=ModelResponse(text="late"))
    assert fold([*start, late]).phase == "thinking"  # an answer to another attempt: ignored
