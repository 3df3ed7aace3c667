"""Non-fine-tunable learning (SOPHON), the fine-tuning attack suite that judges it, and a
fine-tune-resistant ownership watermark."""

from harden.sophon.losses import SUPPRESSION_LOSSES
from harden.sophon.maml import InnerLoop, OuterConfig
from harden.sophon.nontransfer import SophonResult, harden_model
from harden.sophon.strategies import STRATEGIES

__all__ = ["InnerLoop", "OuterConfig", "STRATEGIES", "SUPPRESSION_LOSSES", "SophonResult", "harden_model"]
