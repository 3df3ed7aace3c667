"""The `inversion` check: trigger inversion on a classifier, scored by the calibrated verdict."""

from __future__ import annotations

import io
import math
import time

import numpy as np
import torch

from harden.data.pipeline import stratified_sample
from harden.evaluation import MIN_FITTING_ACCURACY, batched_logits, unfitting_data
from harden.report import Finding, Image, register_rule
from harden.scan.base import FAILED, PASSED, SKIPPED, Check, CheckResult, ScanContext, register_check
from harden.scan.inversion import ClassTrigger, InversionConfig, invert_triggers
from harden.scan.verdict import REACHED, THRESHOLD, Calibration

# The share of the model's classes the clean data must cover for a verdict: a single class's images,
# or a 1000-class model's ten, leave the inversion measuring classes it has no source images for.
MIN_COVERED_CLASSES = 0.5

# Stripes send ≥ 0.9 of the images to the SIG target on 17 of the 20 SIG models, and to some class
# on 4 of the 60 clean models, of the zoos this was chosen on (benchmarks/scan.py, 137 models, when
# stripes were scored on 3 classes only). In a model already judged suspect, such a class ranks ahead
# of the smallest trigger.
STRIPE_SUSPECT = 0.9

# The anomaly index and the margin anomaly compare a class with the median of all classes (MAD);
# with two classes both are the same constant on every model, so the calibration, fitted on 10-
# and 20-class models, says nothing calibrated about a binary classifier (benchmarks/foreign.py,
# binary families: clean models flagged and backdoors missed). Its inversion still runs and is reported.
MIN_CALIBRATED_CLASSES = 3


RULE = "harden.backdoor.trigger-inversion"
register_rule(
    RULE, "Classifier behaves as if backdoored",
    "Trigger inversion found a class that a much smaller input patch or pattern reaches than any other class, an "
    "abnormally large reachable logit margin, or a class reached by a sub-pixel warp or a small full-image pattern; "
    "the calibrated probability of a backdoor is above the threshold.",
    "Do not promote this version. Inspect the reversed trigger in the HTML report, then run `harden purify` and re-scan.",
)


def _png(array: np.ndarray) -> bytes:
    from PIL import Image as PILImage

    buffer = io.BytesIO()
    PILImage.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def trigger_png(trigger: ClassTrigger, scale: int = 4) -> bytes:
    """mask | pattern | mask⊙pattern, side by side, upscaled for viewing."""
    mask = trigger.mask.expand_as(trigger.pattern)
    panels = [mask, trigger.pattern, mask * trigger.pattern]
    image = torch.cat([p for panel in panels for p in (panel, torch.ones_like(panel[:, :, :2]))][:-1], dim=2)
    image = image.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    array = (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return _png(array[..., 0] if array.shape[2] == 1 else array)


def anomaly_chart_png(classes: list[ClassTrigger], suspects: list[int]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3), dpi=90)
    labels = [str(c.target) for c in classes]
    colours = ["#c0392b" if c.target in suspects else "#7f8c8d" for c in classes]
    left.bar(labels, [c.norm for c in classes], color=colours)
    left.axhline(float(np.median([c.norm for c in classes])), color="black", linewidth=1, linestyle="--")
    left.set_title("reversed-trigger mask L1 norm (low = suspicious)")
    right.bar(labels, [c.margin for c in classes], color=colours)
    right.set_title("max logit margin (high = suspicious)")
    for axis in (left, right):
        axis.set_xlabel("class")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _warped(trigger: ClassTrigger) -> bool:
    return (trigger.warp_asr or 0.0) >= REACHED


def _striped(trigger: ClassTrigger) -> bool:
    return (trigger.stripe_asr or 0.0) >= STRIPE_SUSPECT


def _suspicion(trigger: ClassTrigger) -> tuple:
    """Sort key, most suspicious first: classes reached by a sub-pixel warp (a warp backdoor's target
    needs no small mask), then classes a stripe pattern sends nearly every image to (a SIG target),
    each by the family's settled loss; then the rest by trigger size."""
    if _warped(trigger):
        return (0, trigger.warp_loss or 0.0)
    if _striped(trigger):
        return (1, trigger.stripe_loss or 0.0)
    return (2, trigger.norm, -trigger.margin)


def suspect_classes(classes: list[ClassTrigger], p_backdoor: float) -> list[int]:
    """Classes ranked by how easy they are to reach (`_suspicion`), when the model is suspect."""
    if p_backdoor < THRESHOLD:
        return []
    ranked = sorted(classes, key=_suspicion)
    flagged = [c.target for c in ranked if c.anomaly_index > 2.0 or _warped(c) or _striped(c)]
    return [ranked[0].target] + [t for t in flagged if t != ranked[0].target]


@register_check
class TriggerInversionCheck(Check):
    name = "inversion"
    description = "Neural Cleanse / MOTH-style trigger inversion toward every class, calibrated p_backdoor"
    tasks = ("classifier",)

    def run(self, ctx: ScanContext) -> CheckResult:
        start = time.perf_counter()
        config = InversionConfig(**ctx.options.get("inversion", {}))
        model = ctx.model
        images, labels = stratified_sample(ctx.data, config.probe_per_class, ctx.seed)
        covered = int(len(torch.unique(labels)))
        if covered < max(2, math.ceil(MIN_COVERED_CLASSES * model.num_classes)):
            message = (f"the clean data holds images of {covered} of the model's {model.num_classes} classes; trigger inversion "
                       f"measures how easily images of the other classes reach each class, and its calibration saw every class "
                       f"represented: no verdict below {MIN_COVERED_CLASSES:.0%} of them")
            return CheckResult(self.name, SKIPPED, message, round(time.perf_counter() - start, 3),
                               details={"probe_classes": covered, "probe_images": int(len(labels))})
        accuracy = float((batched_logits(model.module.eval(), images, ctx.device).argmax(1) == labels).float().mean())
        if accuracy < MIN_FITTING_ACCURACY:  # the inversion would only find the class the model defaults to
            message = (f"{unfitting_data(accuracy, model.num_classes, f'{len(labels)} clean probe images')}, and trigger inversion would "
                       f"only find the class it defaults to; no verdict below {MIN_FITTING_ACCURACY:.0%}")
            return CheckResult(self.name, SKIPPED, message, round(time.perf_counter() - start, 3),
                               details={"probe_accuracy": accuracy, "probe_images": int(len(labels))})
        result = invert_triggers(model.module, images, labels, model.num_classes, config, device=ctx.device, seed=ctx.seed)
        common = {"statistics": result.statistics, "per_class": [c.to_dict() for c in result.classes], "probe_images": int(len(labels)), "probe_accuracy": accuracy,
                  "optimisation_steps": result.total_steps, "strategy": result.strategy, "config": vars(config)}
        if model.num_classes < MIN_CALIBRATED_CLASSES:
            easiest = min(result.classes, key=lambda c: c.norm)
            message = (f"no calibrated verdict for a {model.num_classes}-class model (needs {MIN_CALIBRATED_CLASSES}+ classes): "
                       f"the smallest trigger reaches class {easiest.target}, norm gap {result.statistics['norm_gap']:.2f}")
            return CheckResult(self.name, SKIPPED, message, round(time.perf_counter() - start, 3), details=common,
                               images=[Image("anomaly chart", anomaly_chart_png(result.classes, []))])
        p_backdoor = Calibration.load().probability(result.statistics)
        suspects = suspect_classes(result.classes, p_backdoor)
        findings = []
        if suspects:
            top = result.classes[suspects[0]]
            findings.append(Finding(
                RULE, "error",
                f"backdoor suspected (p_backdoor {p_backdoor:.2f}): class {top.target} is reachable with a trigger of "
                f"L1 norm {top.norm:.1f} (reversed-trigger ASR {top.asr:.2f})",
                security_severity=8.8,
                properties={"p_backdoor": p_backdoor, "suspect_classes": suspects, "model_uri": ctx.artifact.uri},
            ))
        images_out = [Image(f"reversed trigger toward class {t} (mask | pattern | mask*pattern)", trigger_png(result.classes[t])) for t in suspects[:3]]
        images_out.insert(0, Image("anomaly chart", anomaly_chart_png(result.classes, suspects)))
        details = {"p_backdoor": p_backdoor, "suspect_classes": suspects, **common}
        message = (f"p_backdoor {p_backdoor:.2f}; suspect classes {suspects}" if suspects
                   else f"p_backdoor {p_backdoor:.2f}; no class stands out")
        return CheckResult(self.name, FAILED if suspects else PASSED, message, round(time.perf_counter() - start, 3),
                           findings, details=details, images=images_out)
