"""Config errors that teach: did-you-mean, one place per setting, schemas checked at load."""

from __future__ import annotations

import msgspec
import pytest

from schemas.config import parse_fleet, supervision_tree
from schemas.errors import ConfigError
from schemas.messages import TaskSubmit, is_task_id
from tests.conftest import DEMO_CONFIG

DEMO = DEMO_CONFIG.read_text()


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_fleet(text, "fleet.toml")
    return str(info.value)


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("[agents.billing]\n", "[agents.billing]\nreplica = 2\n", "did you mean 'replicas'?"),
    ("[runtime]", "[runtme]", "did you mean 'runtime'?"),
    ('tools = ["lookup_order", "issue_refund"', 'tools = ["lookup_ordr", "issue_refund"',
     "did you mean 'lookup_order'?"),
    ('handoffs = ["billing", "support"]', 'handoffs = ["biling", "support"]',
     "did you mean 'billing'?"),
    ('[models.support-model]\n', '[models.support-model]\nbreaker_failure = 3\n',
     "did you mean 'breaker_failures'?"),
])
def test_unknown_names_get_a_did_you_mean(old: str, new: str, expected: str) -> None:
    assert old in DEMO
    message = error_of(DEMO.replace(old, new, 1))
    assert expected in message and "fleet.toml" in message


def test_replicas_set_in_two_places_is_a_conflict_naming_both() -> None:
    # The actor's table alone is enough: the demo's supervisor entry does not override it.
    fleet = parse_fleet(DEMO.replace("[agents.billing]\n", "[agents.billing]\nreplicas = 2\n"))
    tree = supervision_tree(fleet)
    billing = [c for sup in tree.supervisors.values() for c in sup.children
               if c.id == "agent.billing"]
    assert [c.replicas for c in billing] == [2]
    both = DEMO.replace('{ actor = "agent.billing", restart',
                        '{ actor = "agent.billing", replicas = 1, restart').replace(
        "[agents.billing]\n", "[agents.billing]\nreplicas = 2\n")
    message = error_of(both)
    assert "[supervisors.agents]" in message and "[agents.billing]" in message
    assert "replicas = 1" in message and "replicas = 2" in message


def test_a_tool_schema_is_checked_when_the_fleet_loads() -> None:
    bad = DEMO.replace("[tools.lookup_order]\n",
                       '[tools.lookup_order]\nparameters = { type = "object", '
                       'properties = { order_id = { type = "strng" } } }\n', 1)
    message = error_of(bad)
    assert "[tools.lookup_order]" in message and "'parameters'" in message
    assert "not a valid JSON schema" in message


def test_limits_and_tool_env_are_validated() -> None:
    assert "[limits]" in error_of(DEMO + "\n[limits]\nturns_per_task = 0\n")
    assert "did you mean 'turns_per_task'" in error_of(DEMO + "\n[limits]\nturn_per_task = 3\n")
    env = DEMO.replace("[tools.lookup_order]\n", '[tools.lookup_order]\nenv = ["NOT A NAME"]\n')
    assert "'env'" in error_of(env)


@pytest.mark.parametrize("bad", ["abc\n", "a b", "", "x" * 129, "ünïcode", "a.b", "a*"])
def test_task_ids_that_are_not_subject_tokens_are_refused(bad: str) -> None:
    assert not is_task_id(bad)
    payload = msgspec.json.encode({"id": bad, "message": {"role": "user", "parts": [
        {"kind": "text", "text": "x"}]}})
    if bad == "":  # an empty id is allowed on the wire: the agent names the task
        return
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(payload, type=TaskSubmit)


def test_plan_cut_of_a_first_turn_whose_tool_results_overflow_keeps_everything() -> None:
    from schemas.context import plan_cut
    from schemas.messages import ChatMessage, ToolCall

    calls = [ToolCall(id=f"c{i}", name="lookup_order", arguments={}) for i in range(2)]
    conversation = [
        ChatMessage(role="user", content="hi"),
        ChatMessage(role="assistant", content="", tool_calls=calls),
        *[ChatMessage(role="tool", content="x" * 50_000, tool_call_id=c.id, name=c.name)
          for c in calls],
    ]
    # It used to raise ValueError (max() of an empty sequence).
    assert plan_cut(conversation, system="", tools=[], window=1000) == 0
