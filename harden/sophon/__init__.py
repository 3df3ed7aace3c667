"""Non-fine-tunable learning (SOPHON), the fine-tuning attack suite that judges it, and a
fine-tune-resistant ownership watermark.

    from harden.sophon import harden_model, finetune_test, embed, verify
"""

from harden.sophon.attack_suite import BUDGETS, FineTuneTestResult, finetune_test
from harden.sophon.losses import SUPPRESSION_LOSSES
from harden.sophon.maml import GUARDS, InnerLoop, OuterConfig
from harden.sophon.nontransfer import SophonResult, harden_model
from harden.sophon.strategies import STRATEGIES
from harden.sophon.watermark import Verification, WatermarkResult, embed, verify

__all__ = [
    "BUDGETS", "FineTuneTestResult", "GUARDS", "InnerLoop", "OuterConfig", "STRATEGIES", "SUPPRESSION_LOSSES", "SophonResult",
    "Verification", "WatermarkResult", "embed", "finetune_test", "harden_model", "verify",
]
