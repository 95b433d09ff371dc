"""The policy gate as an agent uses it: the fleet's ``Gate``, decisions as event data.

Built once per agent process from the fleet file (``[policy]`` files read
here, tool argument schemas taken from the callables, as the model sees
them). ``decide`` turns ``schemas.policy.Decision`` into what the log keeps:
a ``PolicyDecision`` (effect, policy ids, reason, group, shadow verdict) and,
for an approval, its escalation levels. Shadow disagreements are counted
(``corral_policy_shadow_disagreements_total``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from actors.metrics import POLICY_DECISIONS, SHADOW_DISAGREEMENTS
from actors.tooling import tool_function, tool_schema
from schemas.config import FleetConfig
from schemas.errors import ConfigError
from schemas.events import ApprovalLevel, PolicyDecision
from schemas.policy import DEFAULT_APPROVAL_WITHIN_S, Gate, gate_for

__all__ = ["ToolGate"]

log = logging.getLogger("corral.gate")


class ToolGate:
    """Allow, deny or ask a person, for each tool call an agent's model makes.

    Raises (at construction):
        ConfigError: a policy file cannot be read or does not validate.
    """

    def __init__(self, fleet: FleetConfig) -> None:
        # Every tool's argument schema, so policies validate the same in every agent. A
        # tool that cannot be imported here is its own actor's problem (it fails there,
        # under its supervisor): this agent sees its declared parameters, or none.
        params: dict[str, dict[str, Any]] = {}
        for name, spec in fleet.tools.items():
            try:
                fn = tool_function(spec, name=name, source=fleet.source)
            except ConfigError as exc:
                log.warning("policy gate: tool %s: %s; its arguments are untyped here",
                            name, exc)
                fn = None
            params[name] = tool_schema(name, spec, fn).parameters
        self.gate: Gate = gate_for(fleet, lambda p: Path(p).read_text(), parameters=params)

    def decide(self, agent: str, version: str, tool: str, args: dict[str, Any],
               task_id: str, spend_usd: float, *, flagged: bool = False
               ) -> tuple[PolicyDecision, list[ApprovalLevel]]:
        """The gate's verdict for one call, and the escalation chain when it needs approval.

        ``flagged``: a result of the task was flagged by the injection screen.
        """
        d = self.gate.decide(agent, version, tool, args, task_id, spend_usd, flagged=flagged)
        POLICY_DECISIONS.labels(agent=agent, effect=d.effect).inc()
        if d.shadow_disagrees:
            SHADOW_DISAGREEMENTS.labels(agent=agent, live=d.effect,
                                        shadow=d.shadow_effect or "").inc()
        levels = [ApprovalLevel(group=lv.group, within_s=lv.within_s) for lv in d.levels]
        if d.effect == "approve" and not levels:
            levels = [ApprovalLevel(group=d.approver or "operators",
                                    within_s=DEFAULT_APPROVAL_WITHIN_S)]
        decision = PolicyDecision(
            effect=d.effect, policies=list(d.policies), reason=d.reason,
            group=levels[0].group if levels else "", shadow_effect=d.shadow_effect or "",
            spot_check=d.spot_check)
        return decision, levels
