"""Fine-tuning strategies, shared by SOPHON's simulated trajectories and the attack suite.

The defender must simulate exactly what the attacker will try, so both sides draw
from this one registry: keep the head and train everything, re-initialise the head
and train everything, or train only a fresh head on frozen features (linear probe).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from harden.errors import HardenError
from harden.sophon.heads import find_head, reinit_head


@dataclass(frozen=True)
class Strategy:
    name: str
    description: str
    reinit_head: bool
    head_only: bool

    def prepare(self, net: nn.Module) -> list[nn.Parameter]:
        """Apply the strategy to `net` in place; returns the parameters fine-tuning moves."""
        head = reinit_head(net) if self.reinit_head else find_head(net)
        return list(head) if self.head_only else list(net.parameters())


STRATEGIES: dict[str, Strategy] = {s.name: s for s in (
    Strategy("full", "all layers, original head kept", reinit_head=False, head_only=False),
    Strategy("reinit-head", "all layers, head re-initialised", reinit_head=True, head_only=False),
    Strategy("head-only", "fresh head on frozen features (linear probe)", reinit_head=True, head_only=True),
)}


def get_strategies(names: "str | tuple[str, ...] | list[str]") -> list[Strategy]:
    """Strategies by name (a comma-separated string or a sequence); unknown names are an error."""
    items = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    unknown = [n for n in items if n not in STRATEGIES]
    if unknown or not items:
        raise HardenError(f"unknown fine-tuning strategy {', '.join(unknown) or '(none)'}; known: {', '.join(STRATEGIES)}")
    return [STRATEGIES[n] for n in items]
