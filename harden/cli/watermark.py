"""`harden watermark embed|verify`: a fine-tune-resistant ownership watermark keyed by a secret.

The key is read from --key or HARDEN_WATERMARK_KEY and never logged: runs and version
tags carry only a salted SHA-256 commitment to it.
"""

from __future__ import annotations

from pathlib import Path

import click

from harden import __version__, tracking
from harden.cli.options import CommandContext, common_options, data_options, model_options, open_model, report_options
from harden.cli.sophon import outer_options, outer_params, publish_options, source_uri_of
from harden.data import load_data, split
from harden.errors import EXIT_FINDINGS
from harden.publish import Publication, check_output_dir
from harden.report import Report, Table, emit
from harden.runtime import measure
from harden.sophon.data import TEST_LIMIT, in_memory
from harden.sophon.maml import OuterConfig
from harden.sophon.watermark import commitment, embed, verify
from harden.training import TrainConfig

_KEY = click.option("--key", envvar="HARDEN_WATERMARK_KEY", show_envvar=True, required=True,
                    help="Secret key (at least 8 characters); prefer the environment variable over the command line.")


@click.group("watermark")
def command() -> None:
    """Embed or verify an ownership watermark that survives fine-tuning."""


@command.command("embed")
@model_options
@data_options
@_KEY
@click.option("--finetune-data", default=None, help="Data the simulated downstream fine-tuning trains on (default: --data).")
@click.option("--poison-rate", type=click.FloatRange(0, 1, min_open=True), default=0.2, show_default=True,
              help="Share of each original-domain batch stamped with the key's trigger.")
@click.option("--decoy-rate", type=click.FloatRange(0, 1), default=0.2, show_default=True,
              help="Share stamped with random decoy patches that keep their label.")
@click.option("--pretrain-epochs", type=click.IntRange(0), default=5, show_default=True,
              help="Epochs of ordinary training on stamped batches before the MAML loop (stage 1).")
@click.option("--test-fraction", type=click.FloatRange(0.05, 0.95), default=0.2, show_default=True)
@outer_options
@publish_options
@report_options
@common_options
def embed_command(ctx: CommandContext, model, arch, num_classes, input_size, mean, std, allow_pickle, data, resize, key, finetune_data,
                  poison_rate, decoy_rate, pretrain_epochs, test_fraction, outer: OuterConfig, register_as, alias, save_model, fmt,
                  output: Path | None) -> int:
    """Embed the watermark of --key into MODEL and register the result as a new version.

    \b
    Examples:
      HARDEN_WATERMARK_KEY=... harden watermark embed models:/digits-cnn/1 --data digits --alias watermarked
    """
    check_output_dir(save_model)
    outer.seed = ctx.seed
    outer.validate()
    salt, digest = commitment(key)
    loaded = open_model(ctx, model, arch, num_classes, input_size, mean, std, allow_pickle)
    dataset = load_data(data, loaded.input_spec, num_classes=loaded.num_classes, resize=resize)
    train, test = split(dataset, [1 - test_fraction, test_fraction], seed=ctx.seed)
    simulated = load_data(finetune_data, loaded.input_spec, num_classes=loaded.num_classes, resize=resize) if finetune_data else train
    source_uri = source_uri_of(loaded)
    params = {"data": data, "finetune_data": finetune_data, "poison_rate": poison_rate, "decoy_rate": decoy_rate,
              "pretrain_epochs": pretrain_epochs, "key_commitment": digest, "key_salt": salt, **outer_params(outer),
              "device": str(ctx.device), "seed": ctx.seed}
    with Publication() as publication, tracking.command_run("watermark-embed", source_uri, params) as run:
        with measure(ctx.device) as cost:
            pretrain = TrainConfig(epochs=pretrain_epochs, lr=outer.lr, batch_size=outer.batch_size, optimizer=outer.optimizer, seed=ctx.seed)
            result = embed(loaded.trainable(), train, test, key, num_classes=loaded.num_classes, finetune_data=simulated, config=outer,
                           poison_rate=poison_rate, decoy_rate=decoy_rate, pretrain=pretrain, device=ctx.device)
        kept = result.acc_before - result.acc_after <= outer.max_acc_drop + 1e-9
        metrics = {"acc_before": result.acc_before, "acc_after": result.acc_after, "success_before": result.success_before,
                   "success_after": result.success_after, "duration_s": cost.duration_s}
        tracking.log_metrics(metrics)
        published = None
        if kept:
            tags = {"harden.method": "watermark", "harden.hardened_from": source_uri, "harden.watermark.commitment": digest,
                    "harden.watermark.salt": salt, "harden.watermark.run_id": run.info.run_id, "harden.version": __version__,
                    **{f"harden.watermark.{k}": f"{v:.4f}" for k, v in metrics.items() if k != "duration_s"}}
            published = publication.publish(result.model.net, loaded, tags=tags, register_as=register_as, alias=alias, output=save_model,
                                            metadata={"hardened_from": source_uri, "method": "watermark", "watermark_commitment": digest,
                                                      "watermark_salt": salt})
        payload = {"model_uri": source_uri, "output_model_uri": published.uri if published else None, "data": data,
                   **metrics, "key_commitment": digest, "key_salt": salt, "guard_kept_accuracy": kept,
                   "loops_done": result.outer.loops_done, "rollbacks": result.outer.rollbacks, "history": result.outer.history,
                   "run_id": run.info.run_id, "peak_memory_mb": cost.peak_memory_mb, "harden_version": __version__}
        report = Report("harden.watermark-embed/1", f"harden watermark embed {source_uri}", payload, [Table("Watermark", ["metric", "value"], [
            ["accuracy before", result.acc_before], ["accuracy after", result.acc_after], ["success before", result.success_before],
            ["success after", result.success_after], ["registered as", payload["output_model_uri"] or "nothing (guard)"],
            ["key commitment", digest], ["seconds", cost.duration_s]])])
        tracking.log_report(report, "watermark-embed")
    emit(report, fmt, output)
    return 0 if kept else EXIT_FINDINGS


@command.command("verify")
@model_options
@data_options
@_KEY
@click.option("--decoys", type=click.IntRange(0), default=8, show_default=True, help="Decoy patches that set the chance level.")
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True), default=1e-3, show_default=True, help="Significance level.")
@click.option("--min-success", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Success rate required besides significance.")
@report_options
@common_options
def verify_command(ctx: CommandContext, model, arch, num_classes, input_size, mean, std, allow_pickle, data, resize, key, decoys, alpha,
                   min_success, fmt, output: Path | None) -> int:
    """Check MODEL for the watermark of --key on --data; exit 0 present, 1 absent.

    \b
    Examples:
      HARDEN_WATERMARK_KEY=... harden watermark verify models:/suspect/3 --data digits
    """
    loaded = open_model(ctx, model, arch, num_classes, input_size, mean, std, allow_pickle)
    dataset = in_memory(load_data(data, loaded.input_spec, resize=resize), TEST_LIMIT, ctx.seed)
    source_uri = source_uri_of(loaded)
    registered_tags = tracking.version_tags(loaded.registered) if loaded.registered else {}
    salt = registered_tags.get("harden.watermark.salt")
    matches = commitment(key, salt)[1] == registered_tags.get("harden.watermark.commitment") if salt else None
    params = {"data": data, "decoys": decoys, "alpha": alpha, "min_success": min_success, "device": str(ctx.device), "seed": ctx.seed}
    with tracking.command_run("watermark-verify", source_uri, params) as run:
        result = verify(loaded, dataset, key, num_classes=loaded.num_classes, decoys=decoys, alpha=alpha, min_success=min_success,
                        device=ctx.device)
        payload = {"model_uri": source_uri, "data": data, **result.to_dict(), "key_matches_registered_commitment": matches,
                   "run_id": run.info.run_id, "harden_version": __version__}
        report = Report("harden.watermark-verify/1", f"harden watermark verify {source_uri}", payload, [Table("Watermark", ["metric", "value"], [
            ["watermark present", result.present], ["success rate", result.success_rate], ["chance level", result.chance],
            ["p-value", result.p_value], ["images", result.n], ["key matches registered commitment", matches]])])
        tracking.log_metrics({"success_rate": result.success_rate, "p_value": result.p_value, "present": float(result.present)})
        tracking.log_report(report, "watermark-verify")
    emit(report, fmt, output)
    return 0 if result.present else EXIT_FINDINGS
