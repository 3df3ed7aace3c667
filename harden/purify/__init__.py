"""`harden purify`: remove a backdoor from a classifier, guarded by held-out clean accuracy and by
the backdoor's attack success after purification.

Library use::

    from harden.purify import purify
    result = purify("models:/harden-demo@candidate", data="harden-demo-data/clean.npz")
    print(result.before, result.after, result.passed)
    # publish it yourself: harden.publish.publish(result.model.net, result.source, tags=result.version_tags())

Every method gets the same inputs (`PurifyContext`): a trainable copy of the model, the
user's clean data split into a training part and a held-out validation part (used for
checkpoint selection, early stopping and the before/after guardrail; never a test set),
and the reversed triggers of the model, found by the scan's inversion on the training part.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harden import __version__, tracking
from harden.attacks import Attack
from harden.data import load_data, split
from harden.data.pipeline import LabelledDataset
from harden.errors import EXIT_FINDINGS, EXIT_OK, HardenError
from harden.evaluation import MIN_FITTING_ACCURACY, der, evaluate, unfitting_data
from harden.models import LoadedModel, ModelArtifact, load_model
from harden.models.normalisation import choose_normalisation
from harden.models.wrappers import PixelModel
from harden.purify import nft as _nft  # noqa: F401  (each import registers a method)
from harden.purify import relearn as _relearn  # noqa: F401
from harden.purify import unlearn as _unlearn  # noqa: F401
from harden.purify.encoder import KnnView, encoder_trigger
from harden.purify.base import METHODS, PurifyContext, inversion_config, options_from_pairs, resolve_settings, reversed_asr
from harden.purify.triggers import Stamp, reverse_triggers
from harden.report import Report, Table
from harden.runtime import measure
from harden.scan.encoder import EncoderConfig

DEFAULT_METHOD = "trigger-unlearn"
SCHEMA = "harden.purify/1"


@dataclass
class Metrics:
    accuracy: float
    reversed_asr: float | None
    known_asr: float | None = None
    test_accuracy: float | None = None
    test_known_asr: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        return dict(vars(self))


@dataclass
class Residual:
    """What is left of the backdoor after purification, on the validation split: the known trigger's
    ASR when one is given, else the ASR of the most suspect class's reversed triggers (the class
    reachable with the smallest trigger). A purified model must bring it to `max_asr` or below.

    For trigger-unlearn and NFT, which train against the reversed triggers, this mostly confirms
    the training; for unlearn-relearn, which never sees them, it is the only check that the
    backdoor went (on a model without one, the suspect class's trigger is a natural feature that
    keeps working: such a model needs no purifying, or pass --max-asr 1)."""

    asr: float | None
    trigger: str  # which ASR: "known-trigger" or "reversed-trigger (class N)"
    max_asr: float

    @property
    def removed(self) -> bool:
        return self.asr is None or self.asr <= self.max_asr + 1e-9


@dataclass
class PurifyResult:
    method: str
    params: dict[str, Any]
    before: Metrics
    after: Metrics
    model: PixelModel
    source: LoadedModel
    triggers: list[Stamp]
    max_acc_drop: float  # points
    residual: Residual
    history: list[dict[str, float]] = field(default_factory=list)
    duration_s: float = 0.0
    peak_memory_mb: float = 0.0
    validation_images: int = 0  # what ACC before/after and the guardrails are measured on

    @property
    def acc_drop(self) -> float:
        """Held-out accuracy lost, in points."""
        return 100.0 * (self.before.accuracy - self.after.accuracy)

    @property
    def accuracy_kept(self) -> bool:
        return self.acc_drop <= self.max_acc_drop + 1e-9

    @property
    def passed(self) -> bool:
        return self.accuracy_kept and self.residual.removed

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.passed else EXIT_FINDINGS

    @property
    def der(self) -> float | None:
        """Defence effectiveness rate on the known trigger if given, else on the reversed one."""
        key = "known_asr" if self.before.known_asr is not None else "reversed_asr"
        before, after = getattr(self.before, key), getattr(self.after, key)
        return None if before is None or after is None else der(before, after, self.before.accuracy, self.after.accuracy)

    @property
    def source_uri(self) -> str:
        return self.source.registered.uri if self.source.registered else self.source.uri

    def version_tags(self) -> dict[str, str]:
        """Lineage and before/after metrics, as registry tags of the purified version."""
        tags = {"harden.purified_from": self.source_uri, "harden.method": self.method, "harden.version": __version__,
                "harden.purify.acc_drop": f"{self.acc_drop:.2f}"}
        for stage, metrics in (("before", self.before), ("after", self.after)):
            for name, value in metrics.to_dict().items():
                if value is not None:
                    tags[f"harden.purify.{_SHORT.get(name, name)}_{stage}"] = f"{value:.4f}"
        return tags

    def to_dict(self, output_model_uri: str | None) -> dict[str, Any]:
        return {
            "output_model_uri": output_model_uri,
            "source_model_uri": self.source_uri,
            "method": self.method,
            "params": self.params,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "acc_drop_points": self.acc_drop,
            "max_acc_drop_points": self.max_acc_drop,
            "guardrail_passed": self.passed,
            "residual_asr": self.residual.asr,
            "residual_trigger": self.residual.trigger,
            "max_asr": self.residual.max_asr,
            "der": self.der,
            "reversed_triggers": [t.to_dict() for t in self.triggers],
            "history": self.history,
            "validation_images": self.validation_images,
            "duration_s": self.duration_s,
            "peak_memory_mb": self.peak_memory_mb,
            "harden_version": __version__,
        }

    @property
    def coarse_guardrail(self) -> str | None:
        """Why the accuracy guardrail cannot resolve its bound, when one validation image weighs more than it."""
        if not self.validation_images or 100.0 / self.validation_images <= self.max_acc_drop:
            return None
        return (f"The accuracy guardrail judged {self.validation_images} validation images, where one image is "
                f"{100.0 / self.validation_images:.1f} points, more than --max-acc-drop {self.max_acc_drop:g}: a larger "
                f"loss can pass unseen. Give more clean data or a larger --validation-fraction.")

    @property
    def acc_change(self) -> str:
        """Accuracy change in points, signed: a gain reads +3.8 (not −-3.8), no change +0.0."""
        return f"{0.0 - self.acc_drop:+.1f}".replace("-", "−")

    @property
    def tripped(self) -> list[str]:
        """Each guardrail that refused the result, with its figure (empty when it passed)."""
        reasons = []
        if not self.accuracy_kept:
            reasons.append(f"ACC {self.acc_change} pt > {self.max_acc_drop:g} pt")
        if not self.residual.removed:
            reasons.append(f"{self.residual.trigger} ASR {self.residual.asr:.2f} > {self.residual.max_asr:g}")
        return reasons

    def report(self, output_model_uri: str | None) -> Report:
        rows = [[name, getattr(self.before, key), getattr(self.after, key)] for key, name in _ROWS
                if getattr(self.before, key) is not None]
        steps = []
        if not self.accuracy_kept:
            steps.append(" ".join(filter(None, [METHODS[self.method].accuracy_advice,
                                                "Give more clean data (the guardrail judges on its validation split), or try another --method."])))
        if not self.residual.removed:
            others = " or ".join(name for name in ("trigger-unlearn", "nft") if name != self.method)
            length = next((key for key in ("epochs", "steps") if key in METHODS[self.method].defaults), None)
            steps.append(f"The backdoor still works: try --method {others}" + (f", or a longer run (--set {length}=N)." if length else "."))
        if self.coarse_guardrail:
            steps.append(self.coarse_guardrail)
        verdict = (f"purified, ACC {self.acc_change} pt" if self.passed
                   else f"guardrail tripped: {'; '.join(self.tripped)}, nothing registered")
        return Report(SCHEMA, f"harden purify {self.source_uri} ({self.method}): {verdict}", self.to_dict(output_model_uri),
                      [Table(f"Before / after (held-out clean split, {self.validation_images} images)", ["metric", "before", "after"], rows),
                       Table("Result", ["field", "value"], [["method", self.method], ["output model", output_model_uri or "-"],
                                                           ["DER", self.der], ["seconds", self.duration_s],
                                                           ["peak memory (MB)", self.peak_memory_mb]])],
                      next_steps=steps)


_SHORT = {"accuracy": "acc", "test_accuracy": "test_acc"}
_ROWS = [("accuracy", "accuracy (ACC)"), ("reversed_asr", "reversed-trigger ASR"), ("known_asr", "known-trigger ASR"),
         ("test_accuracy", "test ACC (--test-data)"), ("test_known_asr", "test known-trigger ASR")]


def _measure_metrics(module: torch.nn.Module, validation: LabelledDataset, triggers: list[Stamp], attack: Attack | None,
                     test: LabelledDataset | None, device: torch.device) -> Metrics:
    kwargs = {"trigger": attack.trigger, "target": attack.target, "mode": attack.mode} if attack else {}
    held = evaluate(module, validation, device=device, **kwargs)
    metrics = Metrics(held.accuracy, reversed_asr(module, validation, triggers, device), held.asr)
    if test is not None:
        tested = evaluate(module, test, device=device, **kwargs)
        metrics.test_accuracy, metrics.test_known_asr = tested.accuracy, tested.asr
    return metrics


def _residual(module: torch.nn.Module, after: Metrics, validation: LabelledDataset, triggers: list[Stamp], max_asr: float,
              device: torch.device) -> Residual:
    if after.known_asr is not None:
        return Residual(after.known_asr, "known-trigger", max_asr)
    if not triggers:
        return Residual(None, "reversed-trigger", max_asr)
    suspect = triggers[0].target
    asr = reversed_asr(module, validation, [t for t in triggers if t.target == suspect], device)
    return Residual(asr, f"reversed-trigger (class {suspect})", max_asr)


def _knn_view(train: LabelledDataset, classes: int, device: torch.device):
    def view(encoder: torch.nn.Module) -> torch.nn.Module:
        return KnnView(encoder, train, classes, device=device)

    return view


def load_separation(source: "str | Path | None", loaded: LoadedModel, train_data: LabelledDataset | None, clean: LabelledDataset,
                    device: torch.device, seed: int) -> dict[str, Any] | None:
    """The D-BR separation of `train_data`: a saved one (path or MLflow URI, e.g. from `harden scan
    --train-data`), else computed now. A saved one must describe the same number of samples."""
    if train_data is None:
        return None
    if source:
        record = _read_separation(str(source))
        if record.get("num_samples") != len(train_data):
            raise HardenError(f"separation {source} covers {record.get('num_samples')} samples but --train-data has {len(train_data)}")
        return record
    from harden.scan.sensitivity import SensitivityConfig, separate

    config = SensitivityConfig()
    return separate(loaded.module, train_data, clean, config, seed, device).to_json(loaded.uri, config, seed)


def _read_separation(source: str) -> dict[str, Any]:
    """A saved separation: a local file, else an artifact URI that MLflow downloads (parsed as JSON only)."""
    path, download = (Path(source), None) if Path(source).exists() else tracking.download(source, "separation")
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise HardenError(f"cannot read separation {source}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    finally:
        if download is not None:
            download.cleanup()
    if record.get("schema") != "harden.separation/1":
        raise HardenError(f"{source} is not a harden.separation/1 record")
    return record


def _require_fitting_data(loaded: LoadedModel, clean: LabelledDataset, device: torch.device) -> None:
    """Refuse data the model gets mostly wrong: every method fine-tunes on its labels, and would
    teach the model those instead of removing a backdoor."""
    accuracy = evaluate(loaded.module, clean, device=device).accuracy
    if accuracy < MIN_FITTING_ACCURACY:
        raise HardenError(f"{unfitting_data(accuracy, loaded.num_classes, '--data')}; purifying would retrain it to these labels")


def purify(
    model: "str | ModelArtifact | LoadedModel",
    data: str,
    *,
    method: str = DEFAULT_METHOD,
    task: str = "classifier",
    train_data: str | None = None,
    separation: str | None = None,
    trigger: str | None = None,
    target: int | None = None,
    test_data: str | None = None,
    validation_fraction: float = 0.2,
    max_acc_drop: float = 2.0,
    max_asr: float = 0.2,
    triggers: int = 2,
    options: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    load_options: dict[str, Any] | None = None,
    resize: bool = False,
) -> PurifyResult:
    """Purify MODEL with `method` using the clean `data`; returns the purified model and before/after metrics.

    Nothing is registered here: `harden.publish.publish(result.model.net, result.source, ...)` does that
    (the CLI only when `result.passed`)."""
    if method not in METHODS:
        raise HardenError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    if task not in ("classifier", "encoder"):
        raise HardenError(f"--task {task!r}: expected classifier or encoder")
    if task == "encoder" and method != "trigger-unlearn":
        raise HardenError(f"--task encoder supports --method trigger-unlearn only (not {method})")
    settings = resolve_settings(METHODS[method], dict((options or {}).get(method, {})))
    inversion = inversion_config((options or {}).get("inversion", {}))
    if METHODS[method].needs_train_data and not train_data:
        raise HardenError(f"{method} needs the suspect training set: pass --train-data (and optionally --separation)")
    if not 0.0 < validation_fraction < 1.0:
        raise HardenError(f"--validation-fraction {validation_fraction}: expected a fraction between 0 and 1")
    if not 0.0 <= max_asr <= 1.0:
        raise HardenError(f"--max-asr {max_asr}: expected a fraction between 0 and 1")
    device = torch.device(device)
    with measure(device) as cost:
        loaded = model if isinstance(model, LoadedModel) else load_model(model, device=device, embedding=task == "encoder", **(load_options or {}))
        loaded.require_trainable()
        spec = loaded.input_spec
        clean = load_data(data, spec, num_classes=loaded.num_classes if task == "classifier" else None, resize=resize)
        classes = loaded.num_classes if task == "classifier" else int(np.max(clean.labels)) + 1
        attack = Attack(trigger, target if target is not None else 0, num_classes=classes) if trigger else None
        if len(clean) < 2 * classes:
            raise HardenError(f"--data has {len(clean)} images; purification needs at least two per class ({2 * classes})")
        scarce = np.flatnonzero(np.bincount(clean.labels, minlength=classes) < 2) if task == "classifier" else []
        if len(scarce):
            listed = ", ".join(map(str, scarce[:8])) + (", ..." if len(scarce) > 8 else "")
            raise HardenError(f"--data has fewer than two images of class(es) {listed}; purification fine-tunes on it, and "
                              f"the accuracy guardrail cannot see the model forget a class it has no images of: give every class two or more")
        normalisation = None
        if task == "classifier":
            normalisation = choose_normalisation(loaded, clean, device, seed)
            _require_fitting_data(loaded, clean, device)
        train, validation = split(clean, [1.0 - validation_fraction, validation_fraction], seed=seed)
        suspect = load_data(train_data, spec, num_classes=classes, resize=resize) if train_data else None
        test = load_data(test_data, spec, num_classes=classes, resize=resize) if test_data else None
        view = _knn_view(train, classes, device) if task == "encoder" else (lambda module: module)
        # before the trigger reversal, so that a separation that does not fit fails at once
        separated = load_separation(separation, loaded, suspect, clean, device, seed) if suspect is not None else None
        if task == "encoder":
            reversed_triggers = [encoder_trigger(loaded.module, train, classes, config=EncoderConfig.from_options(options or {}),
                                                 device=device, seed=seed)]
        else:
            reversed_triggers = reverse_triggers(loaded.module, train, classes, count=triggers, config=inversion, device=device, seed=seed)
        before = _measure_metrics(view(loaded.module), validation, reversed_triggers, attack, test, device)
        ctx = PurifyContext(loaded, train, validation, reversed_triggers, device, seed, settings, task=task, view=view, train_data=suspect,
                            separation=separated)
        output = METHODS[method].run(ctx)
        after = _measure_metrics(view(output.model), validation, reversed_triggers, attack, test, device)
        residual = _residual(view(output.model), after, validation, reversed_triggers, max_asr, device)
    params = {"validation_fraction": validation_fraction, "triggers": triggers, "seed": seed, **output.params}
    if normalisation:
        params["input_normalisation"] = normalisation.name  # the purified version's metadata records its mean/std
    return PurifyResult(method, params, before, after, output.model, loaded, reversed_triggers, max_acc_drop, residual, output.history,
                        cost.duration_s, cost.peak_memory_mb, len(validation))
