"""The tool gate's decision engine: Cedar policies, tiers, shadow mode, `corral policy`.

Pure and fast: no NATS. The fleet is built in code with declared tool
parameters; the demo's policy is checked through the CLI and with the tool
schemas derived from the demo's callables.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.cli import main
from corral.policy_cli import tool_schemas
from schemas.config import parse_fleet
from schemas.errors import ConfigError
from schemas.policy import Decision, Gate, PolicySource, gate_for
from tests.conftest import DEMO_CONFIG, DEMO_TEXT, REPO

FLEET = """
[agents.billing]
model = "m"
tools = ["lookup", "refund", "notify"]
handoffs = ["support"]

[agents.support]
model = "m"
tools = ["lookup"]

[tools.lookup]
function = "pkg.mod:lookup"
side_effect = "none"
parameters.type = "object"
parameters.required = ["order_id"]
parameters.properties.order_id = { type = "string" }

[tools.refund]
function = "pkg.mod:refund"
risk = "high"

[tools.refund.parameters]
type = "object"
required = ["order_id", "amount_usd"]

[tools.refund.parameters.properties]
order_id = { type = "string" }
amount_usd = { type = "number" }
count = { type = "integer" }
tags = { type = "array", items = { type = "string" } }
meta = { type = "object", properties = { channel = { type = "string" } } }

[tools.notify]
function = "pkg.mod:notify"
side_effect = "idempotent"
parameters = { type = "object" }

[models.m]
provider = "scripted"
model = "s"
"""

REFUNDS = """
@id("lookups")
permit(principal, action == Action::"lookup", resource);

@id("small-refunds")
permit(principal == Agent::"billing", action == Action::"refund", resource)
when { context.args.amount_usd.lessThanOrEqual(decimal("20.0")) };

@id("big-refunds")
@approval("billing-lead")
@reason("a refund above $20 needs a billing lead")
permit(principal == Agent::"billing", action == Action::"refund", resource)
when { context.args.amount_usd.greaterThan(decimal("20.0")) };
"""


def fleet_of(extra: str = "", base: str = FLEET) -> Any:
    return parse_fleet(base + extra, "fleet.toml")


def gate(policy: str | None = REFUNDS, extra: str = "", shadow: str | None = None) -> Gate:
    live = [PolicySource(name="p.cedar", path="p.cedar", text=policy)] if policy else []
    shadows = [PolicySource(name="s.cedar", path="s.cedar", text=shadow)] if shadow else []
    return Gate(fleet_of(extra), live=live, shadow=shadows)


def refund(g: Gate, amount: Any, agent: str = "billing", task: str = "t1",
           **more: Any) -> Decision:
    return g.decide(agent, "v1", "refund", {"order_id": "1234", "amount_usd": amount, **more},
                    task, 0.0)


def lookup(g: Gate, agent: str = "billing", task: str = "t1") -> Decision:
    return g.decide(agent, "v1", "lookup", {"order_id": "1234"}, task, 0.0)


def load_error(policy: str, extra: str = "") -> str:
    with pytest.raises(ConfigError) as caught:
        gate(policy, extra)
    return str(caught.value)


# --- allow, deny, approve -------------------------------------------------------------


def test_allow_deny_and_approve() -> None:
    g = gate()
    small = refund(g, 10.0)
    assert (small.effect, small.policies, small.approver) == ("allow", ("small-refunds",), "")
    big = refund(g, 42.5)
    assert (big.effect, big.policies, big.approver) == ("approve", ("big-refunds",),
                                                        "billing-lead")
    assert "a refund above $20 needs a billing lead" in big.reason
    assert [(lv.group, lv.within_s) for lv in big.levels] == [("billing-lead", 3600.0)]
    denied = refund(g, 5.0, agent="support")  # not one of support's tools
    assert denied.effect == "deny" and "support" in denied.reason


def test_forbid_beats_any_permit() -> None:
    g = gate(REFUNDS + """
@id("no-refunds-on-1234") @reason("order 1234 is under dispute")
forbid(principal, action == Action::"refund", resource) when { context.args.order_id == "1234" };
""")
    for amount in (10.0, 42.5):  # a plain permit and an approval permit both lose
        d = refund(g, amount)
        assert (d.effect, d.policies) == ("deny", ("no-refunds-on-1234",))
        assert "order 1234 is under dispute" in d.reason
    other = g.decide("billing", "v1", "refund", {"order_id": "99", "amount_usd": 10.0}, "t", 0)
    assert other.effect == "allow"


def test_default_deny_for_a_tool_no_policy_mentions() -> None:
    d = gate().decide("billing", "v1", "notify", {}, "t1", 0.0)
    assert (d.effect, d.policies) == ("deny", ())
    assert "no policy permits notify" in d.reason and "default deny" in d.reason


def test_default_allow_still_obeys_forbid_and_approval() -> None:
    g = gate(REFUNDS + '@id("no-notify") forbid(principal, action == Action::"notify", '
             'resource) when { principal.tier == 1 };', extra='\n[policy]\ndefault = "allow"\n')
    assert g.decide("billing", "v1", "notify", {}, "t1", 0.0).effect == "deny"
    assert refund(g, 42.5).effect == "approve"
    handoff = g.decide("billing", "v1", "handoff", {"to": "support"}, "t1", 0.0)
    assert handoff.effect == "allow" and "default allow" in handoff.reason


def test_an_approval_permit_wins_over_a_plain_permit_that_also_matches() -> None:
    g = gate(REFUNDS + '@id("all-refunds") permit(principal, action == Action::"refund", '
             'resource);')
    assert refund(g, 10.0).policies == ("small-refunds", "all-refunds")
    big = refund(g, 42.5)
    assert (big.effect, big.policies, big.approver) == ("approve", ("big-refunds",),
                                                        "billing-lead")


def test_context_risk_side_effect_spend_and_confidence_reach_the_policies() -> None:
    g = gate("""
@id("cheap-confident") permit(principal, action == Action::"refund", resource)
when { context.risk == "high" && context.side_effect == "side-effecting"
       && context.spend_usd.lessThan(decimal("1.0"))
       && context has confidence && context.confidence.greaterThanOrEqual(decimal("0.9")) };
""")
    args = {"order_id": "1", "amount_usd": 1.0}
    assert g.decide("billing", "v1", "refund", args, "t", 0.5, 0.95).effect == "allow"
    assert g.decide("billing", "v1", "refund", args, "t", 0.5).effect == "deny"
    assert g.decide("billing", "v1", "refund", args, "t", 0.5, 0.5).effect == "deny"
    assert g.decide("billing", "v1", "refund", args, "t", 2.0, 0.95).effect == "deny"


def test_agent_attributes_reach_the_policies() -> None:
    g = gate('@id("v2-only") permit(principal, action == Action::"lookup", resource) '
             'when { principal.version == "v2" && principal.team == "" && principal.tier == 1 };')
    assert lookup(g).effect == "deny"
    assert g.decide("billing", "v2", "lookup", {"order_id": "1"}, "t", 0.0).effect == "allow"


def test_an_evaluation_error_fails_closed() -> None:
    # Cedar skips a policy whose evaluation errors: this forbid would let the call through.
    g = gate(REFUNDS + '@id("overflow") forbid(principal, action == Action::"refund", resource)'
             ' when { context has args.count && context.args.count + 9223372036854775000 > 0 };')
    d = refund(g, 10.0, count=1000)
    assert d.effect == "deny" and "fail closed" in d.reason
    assert refund(g, 10.0, count=-10**18).effect == "deny"  # no overflow: the forbid matches
    assert refund(g, 10.0).effect == "allow"


# --- tiers ---------------------------------------------------------------------------


def tiered(tier: int, extra: str = "", policy: str | None = REFUNDS) -> Gate:
    text = FLEET.replace('handoffs = ["support"]\n',
                         f'handoffs = ["support"]\ntier = {tier}\n{extra}')
    live = [PolicySource(name="p.cedar", path="p.cedar", text=policy)] if policy else []
    return Gate(parse_fleet(text, "fleet.toml"), live=live)


def test_tier_1_allows_what_the_policies_permit() -> None:
    g = tiered(1)
    assert refund(g, 10.0).effect == "allow" and not refund(g, 10.0).spot_check


def test_tier_2_allows_and_marks_a_stable_sample_for_review() -> None:
    g = tiered(2, "spot_check = 0.25\n")
    sampled = [refund(g, 10.0, task=f"task-{i}").spot_check for i in range(400)]
    assert 50 < sum(sampled) < 150  # a quarter, give or take: the hash is fixed, not random
    assert sampled == [refund(g, 10.0, task=f"task-{i}").spot_check for i in range(400)]
    assert all(refund(g, 10.0, task=f"task-{i}").effect == "allow" for i in range(20))
    assert not any(refund(tiered(2, "spot_check = 0.0\n"), 10.0, task=f"t{i}").spot_check
                   for i in range(50))
    assert all(refund(tiered(2, "spot_check = 1.0\n"), 10.0, task=f"t{i}").spot_check
               for i in range(50))
    assert not refund(tiered(2, "spot_check = 1.0\n"), 42.5).spot_check  # an approval


def test_tier_3_needs_the_approver_for_side_effects_only() -> None:
    g = tiered(3, 'approver = "billing-ops"\n')
    d = refund(g, 10.0)
    assert (d.effect, d.approver, d.tier) == ("approve", "billing-ops", 3)
    assert d.policies == ("small-refunds", "tier3:billing") and "tier 3" in d.reason
    assert lookup(g).effect == "allow"  # side_effect = "none"
    assert g.decide("billing", "v1", "notify", {}, "t", 0).effect == "deny"  # still denied
    big = refund(g, 42.5)  # a policy's own approval keeps its group
    assert (big.effect, big.approver) == ("approve", "billing-lead")


def test_tier_4_needs_approval_for_every_call() -> None:
    g = tiered(4, 'approver = "billing-ops"\n')
    for d in (lookup(g), refund(g, 10.0)):
        assert (d.effect, d.approver) == ("approve", "billing-ops")
    assert lookup(g, agent="support").effect == "allow"  # support is tier 1
    assert g.decide("billing", "v1", "notify", {}, "t", 0).effect == "deny"


def test_tiers_apply_without_policy_files_too() -> None:
    g = tiered(3, 'approver = "billing-ops"\n', policy=None)
    assert g.decide("billing", "v1", "notify", {}, "t", 0).effect == "approve"
    assert lookup(g).effect == "allow"


# --- no [policy] table: today's behaviour -----------------------------------------------


def test_without_a_policy_every_listed_tool_is_allowed() -> None:
    g = gate(policy=None)
    for tool, args in (("lookup", {"order_id": "1"}), ("refund", {"x": float("nan")}),
                       ("notify", {}), ("handoff", {"to": "support"})):
        d = g.decide("billing", "v1", tool, args, "t1", 0.0)
        assert (d.effect, d.policies) == ("allow", ()), tool
        assert "no policy configured" in d.reason
    assert g.decide("support", "v1", "refund", {}, "t1", 0.0).effect == "deny"
    assert g.decide("billing", "v1", "handoff", {"to": "billing"}, "t1", 0.0).effect == "deny"


def test_the_demo_fleet_without_its_gate_allows_its_tools() -> None:
    fleet = parse_fleet(DEMO_TEXT, str(DEMO_CONFIG))
    assert fleet.policy is None and fleet.approvals == {}
    assert {a.tier for a in fleet.agents.values()} == {1}
    g = gate_for(fleet, lambda p: pytest.fail(f"read {p}"))
    d = g.decide("billing", "v", "issue_refund", {"order_id": "1", "amount_usd": 500.0}, "t", 0)
    assert d.effect == "allow" and "no policy configured" in d.reason


# --- shadow mode -----------------------------------------------------------------------

STRICTER = """
@id("lookups") permit(principal, action == Action::"lookup", resource);
@id("refunds-over-10") @approval("billing-lead")
permit(principal, action == Action::"refund", resource)
when { context.args.amount_usd.greaterThan(decimal("10.0")) };
"""


def test_shadow_disagreement_is_reported_without_changing_the_live_effect() -> None:
    g = gate(shadow=STRICTER)
    d = refund(g, 15.0)
    assert (d.effect, d.policies) == ("allow", ("small-refunds",))
    assert (d.shadow_effect, d.shadow_approver, d.shadow_disagrees) == (
        "approve", "billing-lead", True)
    assert d.shadow_policies == ("refunds-over-10",)
    low = refund(g, 5.0)
    assert (low.effect, low.shadow_effect, low.shadow_disagrees) == ("allow", "deny", True)
    agree = refund(g, 42.5)
    assert (agree.effect, agree.shadow_effect, agree.shadow_disagrees) == (
        "approve", "approve", False)
    assert gate().decide("billing", "v1", "lookup", {"order_id": "1"}, "t", 0).shadow_effect \
        is None


def test_a_shadow_set_can_be_tried_before_any_live_policy() -> None:
    g = gate(policy=None, shadow=STRICTER)
    d = g.decide("billing", "v1", "notify", {}, "t", 0.0)
    assert (d.effect, d.shadow_effect, d.shadow_disagrees) == ("allow", "deny", True)


# --- validation at load: file and line ---------------------------------------------------


def test_an_unknown_tool_names_the_file_and_line() -> None:
    message = load_error(REFUNDS + '\n// a comment; with a semicolon\n@id("typo")\n'
                         'permit(principal, action == Action::"refnd", resource);\n')
    assert message.startswith("file p.cedar:16:"), message
    assert "Action::\"refnd\"" in message and "did you mean 'refund'?" in message


def test_an_unknown_attribute_names_the_file_and_line() -> None:
    message = load_error('@id("x") permit(principal, action == Action::"lookup", resource)\n'
                         'when { context.args.order == "a;b" };\n\n'
                         'permit(principal, action, resource) when { principal.teem == "x" };')
    assert message.startswith("file p.cedar:1:") and "did you mean 'args.order_id'" in message
    message = load_error('permit(principal, action == Action::"lookup", resource);\n'
                         '\npermit(principal, action, resource) when { principal.teem == "" };')
    assert message.startswith("file p.cedar:3:") and "did you mean 'team'" in message


def test_a_syntax_error_names_the_file_and_line() -> None:
    message = load_error(REFUNDS + '\n@id("broken")\npermit(principal, action, resource) '
                         'when { context.args.x = 1 };\n')
    assert message.startswith("file p.cedar:15:") and "not valid Cedar" in message
    assert load_error('permit(principal, action, resource)').startswith("file p.cedar:1:")
    assert load_error('@id("s") permit(principal, action, resource) when { "x;\n };') \
        .startswith("file p.cedar:1:")


@pytest.mark.parametrize(("policy", "expected"), [
    ('@aproval("x") permit(principal, action, resource);', "did you mean 'approval'?"),
    ('@approval("x") forbid(principal, action, resource);', "belongs on a permit"),
    ('@approval("Billing Lead") permit(principal, action, resource);', "must match"),
    ('@id("a") permit(principal, action, resource);\n@id("a") permit(principal, action, '
     'resource);', "also used at p.cedar:1"),
    ('permit(principal == ?principal, action, resource);', "templates"),
])
def test_annotations_and_ids_are_checked(policy: str, expected: str) -> None:
    assert expected in load_error(policy)


def test_a_shadow_file_is_validated_too() -> None:
    with pytest.raises(ConfigError, match=r"s\.cedar:2"):
        gate(shadow='\npermit(principal, action == Action::"nope", resource);')


def test_an_unreadable_policy_file_names_the_fleet_table_and_key(tmp_path: Path) -> None:
    fleet = parse_fleet(FLEET + '[policy]\nfiles = ["missing.cedar"]\n',
                        str(tmp_path / "fleet.toml"))
    with pytest.raises(ConfigError, match=r"table \[policy\], key 'files'.*missing\.cedar"):
        gate_for(fleet, lambda p: Path(p).read_text())


@pytest.mark.parametrize(("extra", "expected"), [
    ("[policy]\nfile = []\n", "did you mean 'files'?"),
    ('[policy]\ndefault = "approve"\n', "default"),
    ('[policy]\nfiles = ["a.cedar", "a.cedar"]\n', "twice"),
    ("[approvals.lead]\nlevels = []\n", "at least one level"),
    ('[approvals.lead]\nlevels = [{ group = "ops", within_s = 60 }]\n', "the group itself"),
    ('[approvals.lead]\nlevels = [{ group = "lead", within_s = 0 }]\n', "levels[0]"),
    ('[approvals.lead]\nlevels = [{ group = "lead", within = 5 }]\n', "within_s"),
])
def test_policy_and_approvals_tables_are_checked(extra: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[")):
        fleet_of(extra)


@pytest.mark.parametrize(("agent_keys", "expected"), [
    ("tier = 5\n", "key 'tier'"),
    ("tier = 3\n", "key 'approver'"),
    ('tier = 4\napprover = "Ops Team"\n', "key 'approver'"),
    ("spot_check = 1.5\n", "key 'spot_check'"),
    ("teir = 2\n", "did you mean 'tier'?"),
])
def test_tier_keys_are_checked(agent_keys: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as caught:
        fleet_of(base=FLEET.replace('handoffs = ["support"]\n',
                                    'handoffs = ["support"]\n' + agent_keys))
    assert "[agents.billing]" in str(caught.value)


def test_the_new_keys_parse() -> None:
    fleet = fleet_of('[policy]\nfiles = ["a.cedar"]\nshadow = ["b.cedar"]\n'
                     '[approvals.billing-lead]\nlevels = [{ group = "billing-lead", within_s = '
                     '300 }, { group = "ops-oncall", within_s = 900 }]\n')
    assert fleet.policy is not None and fleet.policy.default == "deny"
    assert [lv.group for lv in fleet.approvals["billing-lead"].levels] == [
        "billing-lead", "ops-oncall"]
    assert fleet.tools["refund"].risk == "high" and fleet.tools["lookup"].risk is None
    d = refund(Gate(fleet, live=[PolicySource(name="p", path="p", text=REFUNDS)]), 42.5)
    assert [(lv.group, lv.within_s) for lv in d.levels] == [("billing-lead", 300.0),
                                                           ("ops-oncall", 900.0)]


# --- hostile arguments --------------------------------------------------------------------


def deep(n: int) -> Any:
    value: Any = "x"
    for _ in range(n):
        value = {"a": value}
    return value


HOSTILE: list[tuple[str, Any]] = [
    ("NaN amount", {"order_id": "1", "amount_usd": float("nan")}),
    ("infinite amount", {"order_id": "1", "amount_usd": math.inf}),
    ("huge amount", {"order_id": "1", "amount_usd": 10**30}),
    ("bool amount", {"order_id": "1", "amount_usd": True}),
    ("string amount", {"order_id": "1", "amount_usd": "42"}),
    ("missing amount", {"order_id": "1"}),
    ("deeply nested order id", {"order_id": deep(100_000), "amount_usd": 1.0}),
    ("deeply nested meta", {"order_id": "1", "amount_usd": 1.0, "meta": deep(100_000)}),
    ("huge string", {"order_id": "x" * 5_000_000, "amount_usd": 1.0}),
    ("non-string keys", {1: "x", "order_id": "1", "amount_usd": 1.0}),
    ("tuple keys", {("a",): 1, "order_id": "1", "amount_usd": 1.0}),
    ("huge integer count", {"order_id": "1", "amount_usd": 1.0, "count": 2**70}),
    ("tags not a list", {"order_id": "1", "amount_usd": 1.0, "tags": "abc"}),
    ("tags of numbers", {"order_id": "1", "amount_usd": 1.0, "tags": [1, 2]}),
    ("lone surrogate", {"order_id": "\ud800", "amount_usd": 1.0}),
    ("not an object", ["order_id", "1"]),
    ("None", None),
]


@pytest.mark.parametrize(("what", "args"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_arguments_are_denied_with_a_reason(what: str, args: Any) -> None:
    d = gate(REFUNDS + '@id("any") permit(principal, action, resource);').decide(
        "billing", "v1", "refund", args, "t1", 0.0)
    assert d.effect == "deny", what
    assert d.reason and len(d.reason) < 1000
    assert not d.reason.startswith("policy check failed"), d.reason  # refused by design


@pytest.mark.parametrize("call", [
    (None, "v1", "refund", {}, "t1", 0.0),
    ("nobody", "v1", "refund", {}, "t1", 0.0),
    ("billing", None, "lookup", {"order_id": "1"}, "t1", 0.0),
    ("billing", "v1", ["lookup"], {}, "t1", 0.0),
    ("billing", "v1", "lookup", {"order_id": "1"}, {"id": 1}, 0.0),
    ("billing", "v1", "lookup", {"order_id": "1"}, "t1", float("nan")),
    ("billing", "v1", "lookup", {"order_id": "1"}, "t1", "free"),
    ("billing", "v1", "handoff", {"to": ["support"]}, "t1", 0.0),
])
def test_hostile_calls_are_denied_with_a_reason(call: tuple[Any, ...]) -> None:
    d = gate().decide(*call)
    assert d.effect == "deny" and d.reason


GATE = gate(REFUNDS + '@id("no-tags") forbid(principal, action, resource) '
            'when { context.args has tags && context.args.tags.contains("x") };')
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.one_of(st.text(max_size=8), st.integers()), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(args=st.dictionaries(st.sampled_from(["order_id", "amount_usd", "count", "tags",
                                             "meta", "other"]), json_values, max_size=6)
       | json_values,
       spend=st.floats() | st.integers(), confidence=st.none() | st.floats())
def test_decide_never_raises(args: Any, spend: Any, confidence: Any) -> None:
    d = GATE.decide("billing", "v1", "refund", args, "t1", spend, confidence)
    assert d.effect in ("allow", "deny", "approve") and d.reason
    assert not d.reason.startswith("policy check failed"), d.reason



# --- the demo's policy --------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_gate() -> Gate:
    fleet = parse_fleet(DEMO_CONFIG.read_text(), str(DEMO_CONFIG))
    path = REPO / "config" / "policies" / "demo.cedar"
    return Gate(fleet, live=[PolicySource(name="demo.cedar", path=str(path),
                                          text=path.read_text())],
                parameters=tool_schemas(fleet))


def test_the_demo_policy(demo_gate: Gate) -> None:
    big = demo_gate.decide("billing", "v", "issue_refund",
                           {"order_id": "1234", "amount_usd": 42.5}, "t", 0.0)
    assert (big.effect, big.approver) == ("approve", "billing-lead")
    small = demo_gate.decide("billing", "v", "issue_refund",
                             {"order_id": "4242", "amount_usd": 10.0}, "t", 0.0)
    assert small.effect == "allow"
    for agent in ("billing", "support"):
        d = demo_gate.decide(agent, "v", "lookup_order", {"order_id": "1234"}, "t", 0.0)
        assert d.effect == "allow"


def test_the_demo_fleet_names_its_policy_and_escalation() -> None:
    fleet = parse_fleet(DEMO_CONFIG.read_text(), str(DEMO_CONFIG))
    assert fleet.policy is not None and fleet.policy.files == ["policies/demo.cedar",
                                                               "policies/demo_mcp.cedar"]
    levels = [(lv.group, lv.within_s) for lv in fleet.approvals["billing-lead"].levels]
    assert levels == [("billing-lead", 120), ("support-manager", 600)]


# --- corral policy test / check ----------------------------------------------------------


def test_policy_test_passes_the_demo_fixture(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "test", str(REPO / "config/policies/demo_cases.toml")]) == 0
    out = capsys.readouterr().out
    assert "pass  refund above $20 waits for a billing lead  approve by billing-lead" in out
    assert "FAIL" not in out and out.rstrip().endswith("0 failed")


def write_cases(tmp_path: Path, body: str) -> Path:
    (tmp_path / "p.cedar").write_text(REFUNDS)
    (tmp_path / "fleet.toml").write_text(FLEET)
    path = tmp_path / "cases.toml"
    path.write_text('config = "fleet.toml"\npolicies = ["p.cedar"]\n' + body)
    return path


CASES = """
[[case]]
name = "small"
agent = "billing"
tool = "refund"
args = { order_id = "1", amount_usd = 10.0 }
expect = "allow"

[[case]]
name = "big"
agent = "billing"
tool = "refund"
args = { order_id = "1", amount_usd = 42.5 }
expect = "{big}"
expect_group = "billing-lead"
"""


def test_policy_test_fails_a_wrong_expectation(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    ok = write_cases(tmp_path, CASES.replace("{big}", "approve"))
    assert main(["policy", "test", str(ok)]) == 0
    bad = write_cases(tmp_path, CASES.replace("{big}", "allow"))
    capsys.readouterr()
    assert main(["policy", "test", str(bad)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("pass  small") and out[1].startswith("FAIL  big")
    assert "expected allow" in out[2] and out[-1] == "2 cases: 1 passed, 1 failed"


def test_policy_test_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json
    path = write_cases(tmp_path, CASES.replace("{big}", "deny"))
    assert main(["policy", "test", str(path), "--json"]) == 1
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["ok"], r["effect"]) for r in rows] == [
        ("small", True, "allow"), ("big", False, "approve")]


@pytest.mark.parametrize(("body", "expected"), [
    (CASES.replace("{big}", "approve").replace('agent = "billing"', 'agent = "biling"', 1),
     "did you mean 'billing'?"),
    (CASES.replace("{big}", "maybe"), "case[1]"),
    (CASES.replace("{big}", "allow").replace("expect_group", "expect_grup"),
     "did you mean 'expect_group'?"),
    ("", "no cases"),
])
def test_policy_test_config_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          body: str, expected: str) -> None:
    assert main(["policy", "test", str(write_cases(tmp_path, body))]) == 2
    assert expected in capsys.readouterr().err


def test_policy_test_reports_a_bad_policy_with_its_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_cases(tmp_path, CASES.replace("{big}", "approve"))
    (tmp_path / "p.cedar").write_text(REFUNDS + "\npermit(principal, action, resource) "
                                      "when { context.nope };\n")
    assert main(["policy", "test", str(path)]) == 2
    assert "p.cedar:15:" in capsys.readouterr().err


def test_policy_test_help_teaches_with_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["policy", "test", "--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    assert "[[case]]" in out and 'expect = "approve"' in out and "exit 1" in out


def test_policy_check_lists_ids_and_tiers(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.cedar").write_text(REFUNDS)
    (tmp_path / "fleet.toml").write_text(FLEET.replace(
        '[agents.support]\nmodel = "m"\n',
        '[agents.support]\nmodel = "m"\ntier = 3\napprover = "support-leads"\n')
        + '[policy]\nfiles = ["policies/p.cedar"]\n')
    assert main(["policy", "check", "--config", str(tmp_path / "fleet.toml")]) == 0
    out = capsys.readouterr().out
    for expected in ("lookups", "small-refunds", "big-refunds", "by billing-lead",
                     "p.cedar:5", "tier 3: agent support, approver support-leads",
                     '@id("tier3:support")', "ok: every policy is valid"):
        assert expected in out, expected
    (tmp_path / "policies" / "p.cedar").write_text('permit(principal, action == '
                                                   'Action::"lookups", resource);')
    assert main(["policy", "check", "--config", str(tmp_path / "fleet.toml")]) == 2
    assert "p.cedar:1:" in capsys.readouterr().err


def test_the_policies_in_the_docs_are_valid_against_the_demo_fleet(demo_gate: Gate) -> None:
    import re
    text = (REPO / "docs" / "approvals.md").read_text()
    blocks = re.findall(r"```cedar\n(.*?)```", text, re.S)
    assert len(blocks) >= 2
    for i, block in enumerate(blocks):
        Gate(demo_gate.fleet, live=[PolicySource(name=f"docs-{i}", path=f"approvals.md#{i}",
                                                 text=block)],
             parameters=tool_schemas(demo_gate.fleet))
