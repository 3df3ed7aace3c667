"""Attacks for evaluation, demos, benchmarks and tests: triggers, target rules, poisoning."""

from harden.attacks.poison import MODES, Attack, PoisonedDataset
from harden.attacks.triggers import Trigger, list_triggers, make_trigger, register_trigger

__all__ = ["MODES", "Attack", "PoisonedDataset", "Trigger", "list_triggers", "make_trigger", "register_trigger"]
