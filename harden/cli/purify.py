"""`harden purify`: remove a backdoor, check the guardrails (accuracy kept, backdoor gone), register the result."""

from __future__ import annotations

from pathlib import Path

import click

from harden import distributed, tracking
from harden.cli.options import CommandContext, common_options, data_options, model_options, open_model, report_options
from harden.errors import EXIT_OK, HardenError
from harden.publish import Publication, check_output_dir, target_name
from harden.purify import DEFAULT_METHOD, METHODS, purify
from harden.purify.base import parse_setting_pairs, split_settings
from harden.report import emit


def setting_pairs(_ctx, _param, values: tuple[str, ...]) -> dict[str, str]:
    """`--set KEY=VALUE` options as a dict (checked against the method's settings later)."""
    try:
        return parse_setting_pairs(values)
    except HardenError as error:
        raise click.BadParameter(str(error)) from None


@click.command("purify")
@model_options
@data_options
@click.option("--method", type=click.Choice(list(METHODS)), default=DEFAULT_METHOD, show_default=True)
@click.option("--task", type=click.Choice(["classifier", "encoder"]), default="classifier", show_default=True,
              help="encoder: a self-supervised encoder (trigger-unlearn with RECEIVE's loss; metrics through a kNN view of --data).")
@click.option("--train-data", default=None, help="The suspect training set (unlearn-relearn).")
@click.option("--separation", default=None,
              help="A saved separation (path or runs:/.../scan/separation.json from `harden scan --train-data`); computed when omitted.")
@click.option("--trigger", default=None, help="A known trigger spec, to report its ASR before/after (with --target).")
@click.option("--target", type=int, default=None, help="Target class of --trigger.")
@click.option("--test-data", default=None, help="Independent test data, only reported (never used to select or stop).")
@click.option("--validation-fraction", type=float, default=0.2, show_default=True,
              help="Share of --data held out for checkpoint selection and the before/after guardrail.")
@click.option("--max-acc-drop", type=float, default=2.0, show_default=True,
              help="Accuracy points the purified model may lose on the held-out split; more exits 1 and registers nothing.")
@click.option("--max-asr", type=float, default=0.2, show_default=True,
              help="Attack success the backdoor may keep on the held-out split (the known trigger's with --trigger, else the most "
                   "suspect class's reversed triggers'); more exits 1 and registers nothing.")
@click.option("--triggers", "trigger_count", type=int, default=2, show_default=True, help="Reversed triggers (smallest first) to unlearn.")
@click.option("--set", "settings", multiple=True, callback=setting_pairs, metavar="KEY=VALUE",
              help="Method setting, repeatable, e.g. --set lr=1e-4 (`harden list methods` shows every setting and default); "
                   "inversion.KEY=VALUE tunes the trigger reversal, e.g. --set inversion.max_steps=100.")
@click.option("--register-as", default=None, help="Register under this name (default: the source model's name).")
@click.option("--alias", default=None, help="Move this alias (e.g. hardened) onto the new version.")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path), default=None, help="Also write the purified MLflow model here.")
@report_options(flag="--report")
@common_options
def command(ctx: CommandContext, model, arch, num_classes, input_size, mean, std, allow_pickle, data, resize, method, task, train_data,
            separation, trigger, target, test_data, validation_fraction, max_acc_drop, max_asr, trigger_count, settings, register_as, alias,
            output: Path | None, fmt, report_file: Path | None) -> int:
    """Purify MODEL with clean --data; register it as a new version when the guardrails hold.

    Exit 0: purified and registered; 1: a guardrail tripped, the accuracy lost (--max-acc-drop) or the
    backdoor still working (--max-asr); nothing is registered then; 2: error.

    \b
    Examples:
      harden purify models:/harden-demo@candidate --data harden-demo-data/clean.npz --alias hardened
      harden purify models:/fraud-cnn/7 --data clean/ --method trigger-unlearn --set epochs=20 --format json
      harden purify models:/fraud-cnn/7 --data clean/ --method unlearn-relearn --train-data train.npz
      harden purify models:/simclr-encoder/3 --task encoder --data labelled-slice.npz
    """
    if trigger and target is None:
        raise HardenError("--trigger needs --target")
    check_output_dir(output)
    loaded = open_model(ctx, model, arch, num_classes, input_size, mean, std, allow_pickle, embedding=task == "encoder")
    if alias and target_name(loaded, register_as) is None:
        raise HardenError("--alias needs a registered model: purify a models:/ URI or pass --register-as")
    params = {"method": method, "task": task, "data": data, "train_data": train_data, "trigger": trigger, "target": target,
              "validation_fraction": validation_fraction, "max_acc_drop": max_acc_drop, "max_asr": max_asr,
              "triggers": trigger_count, "settings": settings, "device": str(ctx.device), "seed": ctx.seed}
    source_uri = loaded.registered.uri if loaded.registered else loaded.uri
    options = {"method": method, "task": task, "train_data": train_data, "separation": separation, "trigger": trigger, "target": target,
               "test_data": test_data, "validation_fraction": validation_fraction, "max_acc_drop": max_acc_drop,
               "max_asr": max_asr, "triggers": trigger_count, "options": split_settings(METHODS[method], settings), "resize": resize}
    with distributed.launched(ctx.device) as dist:
        # Under `torchrun` every rank trains its share of each batch; rank 0 alone logs, registers and reports,
        # and its exit code is the launch's: checkpoint selection runs on rank 0 only (`fit`'s on_epoch_end),
        # so another rank's final weights are not the kept model and its guardrails would judge the wrong one.
        if not dist.is_main:
            purify(loaded, data, device=dist.device, seed=ctx.seed, **options)
            return EXIT_OK
        with Publication() as publication, tracking.command_run("purify", source_uri, params) as run:
            result = purify(loaded, data, device=dist.device, seed=ctx.seed, **options)
            for stage, metrics in (("before", result.before), ("after", result.after)):
                tracking.log_metrics({f"{k}_{stage}": v for k, v in metrics.to_dict().items()})
            for step, scores in enumerate(result.history):
                tracking.log_metrics({f"validation_{k}": v for k, v in scores.items()}, step=step)
            tracking.log_metrics({"acc_drop_points": result.acc_drop, "residual_asr": result.residual.asr, "der": result.der,
                                  "duration_s": result.duration_s, "peak_memory_mb": result.peak_memory_mb, "world_size": dist.world_size})
            output_uri = None
            if result.passed:
                published = publication.publish(result.model.net, loaded, tags=result.version_tags(), register_as=register_as, alias=alias,
                                                output=output, metadata={"purified_from": source_uri, "method": method})
                output_uri = published.uri
            report = result.report(output_uri)
            report.payload["run_id"] = run.info.run_id
            tracking.log_report(report, "purify")
    emit(report, fmt, report_file)
    return result.exit_code

