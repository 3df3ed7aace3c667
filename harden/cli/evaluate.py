"""`harden evaluate`: clean accuracy and, with a trigger, ASR and robust accuracy."""

from __future__ import annotations

from pathlib import Path

import click

from harden import __version__, tracking
from harden.attacks import MODES, make_trigger
from harden.cli.options import CommandContext, common_options, data_options, model_options, open_model, report_options
from harden.data import load_data
from harden.errors import HardenError
from harden.evaluation import evaluate
from harden.models.normalisation import choose_normalisation
from harden.report import Report, Table, emit
from harden.runtime import measure


@click.command("evaluate")
@model_options
@data_options
@click.option("--trigger", default=None, help="Trigger spec to measure ASR, e.g. grid_paste or blend:alpha=0.1 (see `harden list triggers`).")
@click.option("--target", type=int, default=None, help="Target class of the trigger (all2one).")
@click.option("--mode", type=click.Choice(MODES), default="all2one", show_default=True, help="Target rule of the trigger.")
@click.option("--batch-size", type=int, default=256, show_default=True)
@report_options
@common_options
def command(ctx: CommandContext, model, arch, num_classes, input_size, mean, std, allow_pickle, data, resize,
            trigger, target, mode, batch_size, fmt, output: Path | None) -> int:
    """Measure accuracy (ACC), attack success (ASR) and robust accuracy (RA) of MODEL on --data.

    \b
    Examples:
      harden evaluate models:/harden-demo@candidate --data harden-demo-data/test.npz
      harden evaluate models:/harden-demo/1 --data harden-demo-data/test.npz --trigger grid_paste --target 0 --format json
      harden evaluate ./model.safetensors --arch resnet18_cifar --data torchvision:CIFAR10:/data/cifar
    """
    if trigger and mode == "all2one" and target is None:
        raise HardenError("--trigger needs --target for an all2one attack")
    attack_trigger = make_trigger(trigger) if trigger else None
    loaded = open_model(ctx, model, arch, num_classes, input_size, mean, std, allow_pickle)
    if target is not None and not 0 <= target < loaded.num_classes:
        raise HardenError(f"--target {target} is outside the model's {loaded.num_classes} classes")
    dataset = load_data(data, loaded.input_spec, num_classes=loaded.num_classes, resize=resize)
    normalisation = choose_normalisation(loaded, dataset, ctx.device, ctx.seed)
    params = {"data": data, "trigger": attack_trigger.spec if attack_trigger else None, "target": target, "mode": mode,
              "device": str(ctx.device), "seed": ctx.seed}
    source_uri = loaded.registered.uri if loaded.registered else loaded.uri
    with tracking.command_run("evaluate", source_uri, params) as run:
        with measure(ctx.device) as cost:
            result = evaluate(loaded, dataset, trigger=attack_trigger, target=target, mode=mode, batch_size=batch_size, device=ctx.device)
        payload = {
            "model_uri": source_uri,
            "data": data,
            **result.to_dict(),
            "trigger": attack_trigger.spec if attack_trigger else None,
            "target": target,
            "mode": mode if attack_trigger else None,
            "device": str(ctx.device),
            "run_id": run.info.run_id,
            "duration_s": cost.duration_s,
            "peak_memory_mb": cost.peak_memory_mb,
            "input_normalisation": vars(normalisation) if normalisation else None,
            "harden_version": __version__,
        }
        report = Report("harden.evaluate/1", f"harden evaluate {source_uri}", payload, [
            Table("Metrics", ["metric", "value"], [
                ["accuracy (ACC)", result.accuracy], ["attack success (ASR)", result.asr], ["robust accuracy (RA)", result.ra],
                ["samples", result.n], ["triggered samples", result.n_triggered or None], ["seconds", cost.duration_s],
            ]),
            *([normalisation.table()] if normalisation else []),
        ])
        tracking.log_metrics({"accuracy": result.accuracy, "asr": result.asr, "ra": result.ra, "duration_s": cost.duration_s})
        tracking.log_json(report.to_dict(), "reports/evaluate.json")
    emit(report, fmt, output)
    return 0
