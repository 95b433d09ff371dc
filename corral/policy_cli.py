"""``corral policy``: validate a fleet's Cedar policies, and run fixture cases against them.

    corral policy check --config fleet.toml
    corral policy test config/policies/demo_cases.toml [--config fleet.toml] [--json]

Both are offline: no NATS, no fleet running. The decision engine is
``schemas.policy.Gate``, the same one the agent loop asks before a tool runs.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import msgspec

from actors.runtime import load_fleet
from actors.tooling import tool_function, tool_parameters
from schemas.config import FleetConfig, did_you_mean
from schemas.errors import ConfigError
from schemas.fold import DELEGATE_TOOL, HANDOFF_TOOL
from schemas.policy import Decision, Gate, PolicyInfo, PolicySource, gate_for, policy_path

__all__ = ["Case", "CaseResult", "add_parser", "load_cases", "run_cases", "tool_schemas"]

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "demo.toml"

TEST_HELP = """\
Run fixture cases against a fleet's policies: one line per case (pass or FAIL,
the effect, the policies that decided it), exit 1 if any case fails, 2 on a
config or usage error. Nothing runs: only the decision is checked.

FILE is TOML. Optional top-level keys, paths relative to FILE:
  config   = "../demo.toml"      the fleet (else --config, else config/demo.toml)
  policies = ["demo.cedar"]      the live policy files (else the fleet's [policy] files)
  shadow   = ["next.cedar"]      the shadow set (else the fleet's [policy] shadow)
Then one [[case]] table per call:

  policies = ["demo.cedar"]

  [[case]]
  name = "a refund above $20 waits for a billing lead"
  agent = "billing"
  tool = "issue_refund"
  args = { order_id = "1234", amount_usd = 42.5 }
  spend_usd = 0.12                # optional: spend of the task so far
  confidence = 0.9                # optional: the model's stated confidence
  expect = "approve"              # allow | deny | approve
  expect_group = "billing-lead"   # optional: the approver group asked first
  expect_policies = ["refund-needs-lead"]   # optional: each among the deciding ids
  expect_shadow = "approve"       # optional: the shadow set's effect

Example:
  corral policy test config/policies/demo_cases.toml
"""


class Case(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One ``[[case]]``: a call, and what the policies should decide about it."""

    name: str
    agent: str
    tool: str
    expect: Literal["allow", "deny", "approve"]
    args: dict[str, Any] = msgspec.field(default_factory=dict)
    spend_usd: float = 0.0
    confidence: float | None = None
    task: str = "policy-test"
    version: str = "policy-test"
    expect_group: str = ""
    expect_policies: list[str] = msgspec.field(default_factory=list)
    expect_shadow: Literal["allow", "deny", "approve"] | None = None


class CasesFile(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A fixture file: where the fleet and the policies are, and the cases."""

    case: list[Case]
    config: str = ""
    policies: list[str] | None = None
    shadow: list[str] | None = None


class CaseResult(msgspec.Struct, frozen=True, kw_only=True):
    """A case and the decision it got; ``failures`` empty when it passed."""

    case: Case
    decision: Decision
    failures: list[str]


def load_cases(path: Path) -> CasesFile:
    """Parse a fixture file.

    Raises:
        ConfigError: naming the file, the case and the key.
    """
    source = str(path)
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", file=source) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", file=source) from exc
    cases = raw.get("case")
    if not isinstance(cases, list) or not cases:
        raise ConfigError("no cases: add [[case]] tables (corral policy test --help)",
                          file=source)
    for i, case in enumerate(cases):  # per case, so an error names the case
        try:
            msgspec.convert(case, Case)
        except msgspec.ValidationError as exc:
            text = str(exc).split(" - at `$")[0]
            unknown = text.split("unknown field `")[1].split("`")[0] if "unknown field" in \
                text else ""
            name = case.get("name", "") if isinstance(case, dict) else ""
            raise ConfigError(text + (did_you_mean(unknown, Case.__struct_fields__)
                                      if unknown else ""),
                              file=source, table=f"case[{i}]" + (f" {name!r}" if name else ""),
                              key=unknown) from exc
    try:
        return msgspec.convert(raw, CasesFile)
    except msgspec.ValidationError as exc:
        raise ConfigError(str(exc), file=source) from exc


def tool_schemas(fleet: FleetConfig) -> dict[str, dict[str, Any]]:
    """Each tool's arguments schema, as the model sees it (declared, else derived).

    A tool is imported only when its schema is not declared in the config.
    """
    return {name: tool_parameters(spec, None if spec.parameters is not None else
                                  tool_function(spec, name=name, source=fleet.source))
            for name, spec in fleet.tools.items()}


def _sources(names: list[str], resolve: Callable[[str], str], *, file: str, table: str,
             key: str) -> list[PolicySource]:
    out = []
    for name in names:
        path = resolve(name)
        try:
            out.append(PolicySource(name=name, path=path, text=Path(path).read_text()))
        except OSError as exc:
            raise ConfigError(f"cannot read policy file {path}: {exc.strerror or exc}",
                              file=file, table=table, key=key) from exc
    return out


def _read(path: str) -> str:
    return Path(path).read_text()


def cases_gate(cases: CasesFile, cases_path: Path, config: str | None) -> Gate:
    """The gate a fixture file is run against."""
    base = cases_path.parent
    fleet_path = Path(config) if config else base / cases.config if cases.config \
        else DEFAULT_CONFIG
    fleet = load_fleet(fleet_path)
    sets: dict[str, list[PolicySource]] = {}
    for key, given, configured in (
            ("policies", cases.policies, fleet.policy.files if fleet.policy else []),
            ("shadow", cases.shadow, fleet.policy.shadow if fleet.policy else [])):
        if given is not None:
            sets[key] = _sources(given, lambda n: str(base / n), file=str(cases_path),
                                 table="", key=key)
        else:
            sets[key] = _sources(configured, lambda n: policy_path(fleet, n),
                                 file=fleet.source, table="policy",
                                 key="files" if key == "policies" else key)
    for i, case in enumerate(cases.case):  # a typo in a case would pass as a denial
        table = f"case[{i}] {case.name!r}"
        if case.agent not in fleet.agents:
            raise ConfigError(f"unknown agent {case.agent!r}"
                              f"{did_you_mean(case.agent, fleet.agents)}",
                              file=str(cases_path), table=table, key="agent")
        if case.tool not in (HANDOFF_TOOL, DELEGATE_TOOL) and case.tool not in fleet.tools:
            raise ConfigError(f"unknown tool {case.tool!r}{did_you_mean(case.tool, fleet.tools)}",
                              file=str(cases_path), table=table, key="tool")
    return Gate(fleet, live=sets["policies"], shadow=sets["shadow"],
                parameters=tool_schemas(fleet))


def run_cases(gate: Gate, cases: CasesFile) -> list[CaseResult]:
    """Decide every case and compare with what it expects."""
    results = []
    for case in cases.case:
        d = gate.decide(case.agent, case.version, case.tool, case.args, case.task,
                        case.spend_usd, case.confidence)
        failures = []
        if d.effect != case.expect:
            failures.append(f"expected {case.expect}")
        if case.expect_group and d.approver != case.expect_group:
            failures.append(f"expected approval by {case.expect_group}, got "
                            f"{d.approver or 'none'}")
        missing = [p for p in case.expect_policies if p not in d.policies]
        if missing:
            failures.append(f"expected policies {', '.join(missing)}")
        if case.expect_shadow is not None and d.shadow_effect != case.expect_shadow:
            failures.append(f"expected shadow {case.expect_shadow}, got {d.shadow_effect}")
        results.append(CaseResult(case=case, decision=d, failures=failures))
    return results


def _effect(d: Decision) -> str:
    return f"approve by {d.approver}" if d.effect == "approve" else d.effect


def format_results(results: list[CaseResult], shadow: bool) -> list[str]:
    """One line per case, then the tally."""
    width = max(len(r.case.name) for r in results)
    lines = []
    for r in results:
        d = r.decision
        status = "FAIL" if r.failures else "pass"
        line = f"{status}  {r.case.name:<{width}}  {_effect(d):<24} [{', '.join(d.policies)}]"
        if shadow:
            line += f"  shadow: {d.shadow_effect}" + (" (disagrees)" if d.shadow_disagrees
                                                      else "")
        if r.failures:
            line += f"\n      {'; '.join(r.failures)}: {d.reason}"
        lines.append(line)
    failed = sum(bool(r.failures) for r in results)
    lines.append(f"{len(results)} cases: {len(results) - failed} passed, {failed} failed")
    return lines


async def cmd_policy_test(args: argparse.Namespace) -> int:
    """``corral policy test FILE``: exit 0 when every case passes, 1 when one fails."""
    path = Path(args.file)
    cases = load_cases(path)
    gate = cases_gate(cases, path, args.config)
    results = run_cases(gate, cases)
    if args.json:
        print(json.dumps([{
            "name": r.case.name, "ok": not r.failures, "failures": r.failures,
            "expect": r.case.expect, **msgspec.to_builtins(r.decision)} for r in results],
            indent=2))
    else:
        print("\n".join(format_results(results, gate.has_shadow)))
    return 1 if any(r.failures for r in results) else 0


def _policy_lines(title: str, infos: list[PolicyInfo]) -> list[str]:
    if not infos:
        return [f"{title}: none"]
    lines = [f"{title}: {len(infos)} policies"]
    width = max(len(p.id) for p in infos)
    for p in infos:
        kind = "approve" if p.approval else p.effect
        who = f" by {p.approval}" if p.approval else ""
        lines.append(f"  {kind:<7} {p.id:<{width}}  {p.file}:{p.line}{who}"
                     + (f"  ({p.reason})" if p.reason else ""))
    return lines


async def cmd_policy_check(args: argparse.Namespace) -> int:
    """``corral policy check``: load and validate the fleet's policies, list them."""
    fleet = load_fleet(Path(args.config))
    gate = gate_for(fleet, _read, parameters=tool_schemas(fleet))
    if fleet.policy is None or not fleet.policy.files:
        print(f"fleet {fleet.name} ({args.config}): no policy configured: each agent may call "
              "the tools its [agents.*] table lists")
    else:
        print(f"fleet {fleet.name} ({args.config}): default {gate.default}")
    lines = _policy_lines("live", gate.policies) if gate.policies else []
    if gate.has_shadow:
        lines += _policy_lines("shadow (reported, not enforced)", gate.shadow_policies)
    for name, spec in sorted(fleet.agents.items()):
        if spec.tier != 1:
            extra = (f", approver {spec.approver}" if spec.tier >= 3
                     else f", spot check {spec.spot_check:.0%}")
            lines.append(f"tier {spec.tier}: agent {name}{extra}")
    if gate.tier_text:
        lines.append("tier policies (generated):")
        lines += ["  " + line for line in gate.tier_text.rstrip().splitlines()]
    lines.append("ok: every policy is valid against the fleet's schema" if lines
                 else "all agents tier 1 (auto): nothing to validate")
    print("\n".join(lines))
    return 0


def add_parser(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``corral policy check`` and ``corral policy test`` to the CLI."""
    p = sub.add_parser("policy", help="check the fleet's Cedar policies; run fixture cases",
                       description="The tool gate's policies (docs/approvals.md): `check` "
                       "validates them against the fleet, `test` runs fixture cases.")
    psub = p.add_subparsers(dest="policy_command", required=True, metavar="SUBCOMMAND")
    test = psub.add_parser("test", help="run fixture cases (exit 1 on a failure)",
                           description=TEST_HELP,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    test.add_argument("file", metavar="FILE", help="TOML fixture file of [[case]] tables")
    test.add_argument("--config", default=None,
                      help="fleet TOML file (default: the file's `config`, else "
                      f"{DEFAULT_CONFIG})")
    test.add_argument("--json", action="store_true", help="a JSON list of case results")
    test.set_defaults(func=cmd_policy_test)
    check = psub.add_parser("check", help="validate the policies and list them",
                            description="Load the fleet's [policy] files (and shadow set), "
                            "validate them against the schema generated from the fleet, and "
                            "print each policy's id, effect and place, and the agents' tiers. "
                            "Exit 2 on an error, naming the file and line.")
    check.add_argument("--config", default=str(DEFAULT_CONFIG),
                       help="fleet TOML file (default: %(default)s)")
    check.set_defaults(func=cmd_policy_check)
