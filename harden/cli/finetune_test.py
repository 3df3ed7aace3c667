"""`harden finetune-test`: the attacker's side; how far fine-tuning MODEL on --data gets."""

from __future__ import annotations

from pathlib import Path

import click

from harden import __version__, tracking
from harden.cli.options import CommandContext, common_options, data_options, model_options, open_model, report_options
from harden.data import load_data
from harden.models import load_model
from harden.report import Image, Report, Table, emit
from harden.runtime import measure
from harden.sophon.attack_suite import BUDGETS, FineTuneTestResult, curves_png, finetune_test
from harden.sophon.data import attacker_split, check_labels
from harden.sophon.strategies import STRATEGIES


def result_tables(result: FineTuneTestResult) -> list[Table]:
    """Best accuracy per strategy and subject, and the per-epoch curves of each best recipe."""
    subjects = [s for s in ("model", "baseline", "scratch") if any(r.subject == s for r in result.runs)]
    strategies = list(dict.fromkeys(r.strategy for r in result.runs))
    best = Table("Best restricted-domain accuracy (over recipes and epochs)", ["strategy", *subjects],
                 [[s, *[result.best_accuracy(subject, s) for subject in subjects]] for s in strategies])
    curves = [(subject, s, result.best_run(subject, s)) for subject in subjects for s in strategies if result.best_run(subject, s)]
    epochs = max(len(run.accuracy) for _, _, run in curves)
    per_epoch = Table("Restricted accuracy per epoch (best recipe of each)",
                      ["epoch", *[f"{subject}/{s} {run.optimizer} {run.lr:g}" for subject, s, run in curves]],
                      [[e + 1, *[run.accuracy[e] if e < len(run.accuracy) else None for _, _, run in curves]] for e in range(epochs)])
    return [best, per_epoch]


@click.command("finetune-test")
@model_options
@data_options
@click.option("--test-data", default=None, help="Restricted-domain test data (default: split off --data by --test-fraction).")
@click.option("--test-fraction", type=click.FloatRange(0.05, 0.95), default=0.3, show_default=True)
@click.option("--train-per-class", type=click.IntRange(1), default=None,
              help="Labelled images per class the attacker trains on (default: the whole training split).")
@click.option("--budget", type=click.Choice(list(BUDGETS)), default="standard", show_default=True,
              help="Grid of strategies x optimisers x learning rates and the epochs of each run.")
@click.option("--strategies", default=None, help=f"Comma-separated subset of {', '.join(STRATEGIES)} (default: the budget's).")
@click.option("--baseline", default=None, help="The unprotected source model, attacked with the same grid.")
@click.option("--no-scratch", is_flag=True, help="Skip the training-from-scratch baseline.")
@click.option("--tolerance", type=float, default=0.05, show_default=True,
              help="Exit 1 when the best attack beats training from scratch by more than this (fraction).")
@report_options
@common_options
def command(ctx: CommandContext, model, arch, num_classes, input_size, mean, std, allow_pickle, data, resize, test_data, test_fraction,
            train_per_class, budget, strategies, baseline, no_scratch, tolerance, fmt, output: Path | None) -> int:
    """Fine-tune MODEL on --data with every strategy, optimiser and lr of a budget; compare with
    the unprotected --baseline and with training from scratch. Exit 0, or 1 when the best attack
    beats scratch by more than --tolerance.

    \b
    Examples:
      harden finetune-test models:/digits-cnn@sophon --data digits-inverted --train-per-class 10 --baseline models:/digits-cnn/1
      harden finetune-test ./model.pt2 --data restricted/ --test-data restricted-test/ --budget thorough --format json
    """
    loaded = open_model(ctx, model, arch, num_classes, input_size, mean, std, allow_pickle)
    reference = load_model(baseline, input_size=input_size, allow_pickle=allow_pickle, device=ctx.device) if baseline else None
    dataset = load_data(data, loaded.input_spec, resize=resize)
    held_out = load_data(test_data, loaded.input_spec, resize=resize) if test_data else None
    train, test = attacker_split(dataset, held_out, test_fraction=test_fraction, train_per_class=train_per_class, seed=ctx.seed)
    check_labels(train, loaded.num_classes)
    source_uri = loaded.registered.uri if loaded.registered else loaded.uri
    params = {"data": data, "test_data": test_data, "budget": budget, "strategies": strategies, "baseline": baseline,
              "scratch": not no_scratch, "train_size": len(train), "test_size": len(test), "device": str(ctx.device), "seed": ctx.seed}
    with tracking.command_run("finetune-test", source_uri, params) as run:
        with measure(ctx.device) as cost:
            result = finetune_test(loaded.trainable(), train, test, budget=budget, baseline=reference.trainable() if reference else None,
                                   scratch=not no_scratch, strategies=tuple(strategies.split(",")) if strategies else None,
                                   device=ctx.device, seed=ctx.seed)
        gain = None if result.scratch_accuracy is None else result.best_attack_accuracy - result.scratch_accuracy
        payload = {
            "model_uri": source_uri, "baseline_uri": reference.registered.uri if reference and reference.registered else baseline,
            "data": data, "test_data": test_data, "train_size": len(train), "test_size": len(test), **result.to_dict(),
            "gain_over_scratch": gain, "tolerance": tolerance, "fine_tunable": None if gain is None else gain > tolerance,
            "run_id": run.info.run_id, "device": str(ctx.device), "duration_s": cost.duration_s,
            "peak_memory_mb": cost.peak_memory_mb, "harden_version": __version__,
        }
        report = Report("harden.finetune-test/1", f"harden finetune-test {source_uri}", payload, result_tables(result),
                        images=[Image("restricted accuracy per epoch", curves_png(result))])
        for epoch, values in enumerate(zip(*(r.accuracy for r in result.runs if r.subject == "model"))):
            tracking.log_metrics({"best_attack_accuracy_at_epoch": max(values)}, step=epoch + 1)
        tracking.log_metrics({"best_attack_accuracy": result.best_attack_accuracy, "scratch_accuracy": result.scratch_accuracy,
                              "baseline_accuracy": result.baseline_accuracy, "duration_s": cost.duration_s})
        tracking.log_report(report, "finetune-test")
        if loaded.registered is not None:
            tracking.set_version_tags(loaded.registered, {
                f"harden.finetune_test.{k}": "" if v is None else f"{v:.4f}"
                for k, v in (("best_attack_accuracy", result.best_attack_accuracy), ("scratch_accuracy", result.scratch_accuracy),
                             ("baseline_accuracy", result.baseline_accuracy))
            } | {"harden.finetune_test.run_id": run.info.run_id})
    emit(report, fmt, output)
    return 1 if payload["fine_tunable"] else 0
