"""`harden sophon`: non-fine-tunable hardening (SOPHON), registered as a new model version."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any, Callable

import click

from harden import __version__, distributed, tracking
from harden.cli.finetune_test import result_tables
from harden.cli.options import CommandContext, common_options, model_options, open_model, report_options
from harden.data import load_data, split
from harden.errors import EXIT_FINDINGS, HardenError
from harden.models import LoadedModel
from harden.publish import Publication, check_output_dir
from harden.report import Report, Table, emit
from harden.runtime import measure
from harden.sophon import SUPPRESSION_LOSSES, harden_model
from harden.sophon.attack_suite import BUDGETS, finetune_test
from harden.sophon.data import attacker_split
from harden.sophon.maml import GUARDS, InnerLoop, OuterConfig
from harden.sophon.strategies import get_strategies
from harden.training import OPTIMIZERS


def _optimizer_lrs(_ctx, _param, value: str) -> tuple[tuple[str, float], ...]:
    pairs = []
    for item in filter(None, (v.strip() for v in value.split(","))):
        name, _, lr = item.partition(":")
        try:
            pairs.append((name, float(lr)))
        except ValueError:
            raise click.BadParameter(f"{item!r}: expected NAME:LR such as sgd:0.01") from None
        if name not in OPTIMIZERS:
            raise click.BadParameter(f"{name!r}: known optimisers are {', '.join(OPTIMIZERS)}")
    if not pairs:
        raise click.BadParameter("give at least one NAME:LR")
    return tuple(pairs)


def _strategies(_ctx, _param, value: str) -> tuple[str, ...]:
    try:
        return tuple(s.name for s in get_strategies(value))
    except HardenError as exc:
        raise click.BadParameter(str(exc)) from None


_OUTER_OPTIONS = ("strategies", "inner_optimizers", "inner_steps", "inner_batch_size", "query_fraction", "query_at_end",
                  "trajectories", "loops", "lr",
                  "alpha", "beta", "outer_optimizer", "clip", "ntr_steps", "batch_size", "max_acc_drop", "guard", "eval_every", "eval_size")


def outer_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The MAML loop's knobs (shared by `sophon` and `watermark embed`), passed on as `outer: OuterConfig`."""
    defaults, inner = OuterConfig(), InnerLoop()
    decorators = [
        click.option("--strategies", callback=_strategies, default=",".join(inner.strategies), show_default=True,
                     help="Simulated fine-tuning strategies, one sampled per trajectory."),
        click.option("--inner-optimizers", callback=_optimizer_lrs, show_default=True,
                     default=",".join(f"{n}:{lr:g}" for n, lr in inner.optimizers), help="Inner optimisers NAME:LR, one sampled per trajectory."),
        click.option("--inner-steps", type=click.IntRange(1), default=inner.steps, show_default=True, help="Simulated fine-tuning steps K."),
        click.option("--inner-batch-size", type=click.IntRange(2), default=inner.batch_size, show_default=True),
        click.option("--query-fraction", type=click.FloatRange(0.01, 0.99), default=inner.query_fraction, show_default=True,
                     help="Share of each inner batch held out as the query set."),
        click.option("--query-at-end", is_flag=True, help="Apply the query loss only after the last inner step (default: after every step)."),
        click.option("--trajectories", type=click.IntRange(1), default=inner.trajectories, show_default=True, help="Trajectories per outer step."),
        click.option("--loops", type=click.IntRange(1), default=defaults.loops, show_default=True, help="Outer loops."),
        click.option("--lr", type=float, default=defaults.lr, show_default=True, help="Base outer learning rate η."),
        click.option("--alpha", type=click.FloatRange(0), default=defaults.alpha, show_default=True, help="Simulated-fine-tuning step lr = α·η."),
        click.option("--beta", type=click.FloatRange(0), default=defaults.beta, show_default=True, help="Original-domain step lr = β·η."),
        click.option("--outer-optimizer", type=click.Choice(list(OPTIMIZERS)), default=defaults.optimizer, show_default=True),
        click.option("--clip", type=click.FloatRange(0, min_open=True), default=defaults.clip, show_default=True,
                     help="Max L2 norm of the simulated-fine-tuning gradient."),
        click.option("--ntr-steps", type=click.IntRange(0), default=defaults.ntr_steps, show_default=True, help="Original-domain steps per loop."),
        click.option("--batch-size", type=click.IntRange(1), default=defaults.batch_size, show_default=True, help="Original-domain batch size."),
        click.option("--max-acc-drop", type=click.FloatRange(0, 1), default=defaults.max_acc_drop, show_default=True,
                     help="Guard: allowed drop of original accuracy below its start (0.03 = 3 points)."),
        click.option("--guard", type=click.Choice(list(GUARDS)), default=defaults.guard, show_default=True,
                     help="; ".join(f"{k}: {v.description}" for k, v in GUARDS.items())),
        click.option("--eval-every", type=click.IntRange(1), default=defaults.eval_every, show_default=True, help="Guard check interval (loops)."),
        click.option("--eval-size", type=click.IntRange(1), default=defaults.eval_size, show_default=True,
                     help="Size of the cached original-domain subset the guard evaluates."),
    ]

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        o = {k: kwargs.pop(k) for k in _OUTER_OPTIONS}
        inner_loop = InnerLoop(o["inner_optimizers"], o["inner_steps"], o["inner_batch_size"], o["query_fraction"],
                               not o["query_at_end"], o["strategies"], o["trajectories"])
        outer = OuterConfig(inner_loop, o["loops"], o["lr"], o["alpha"], o["beta"], o["outer_optimizer"], o["clip"], o["ntr_steps"],
                            o["batch_size"], o["max_acc_drop"], o["guard"], eval_every=o["eval_every"], eval_size=o["eval_size"])
        return func(*args, outer=outer, **kwargs)

    for decorator in reversed(decorators):
        wrapper = decorator(wrapper)
    return wrapper


def publish_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for decorator in reversed([
        click.option("--register-as", default=None, help="Registered model to add the version to (default: the source's name)."),
        click.option("--alias", default=None, help="Alias to move to the new version once it is registered."),
        click.option("--save-model", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="Also write the MLflow model to this new directory."),
    ]):
        func = decorator(func)
    return func


def outer_params(outer: OuterConfig) -> dict[str, Any]:
    """The loop's settings as flat run parameters."""
    inner = outer.inner
    return {"loops": outer.loops, "lr": outer.lr, "alpha": outer.alpha, "beta": outer.beta, "outer_optimizer": outer.optimizer,
            "clip": outer.clip, "ntr_steps": outer.ntr_steps, "batch_size": outer.batch_size, "max_acc_drop": outer.max_acc_drop,
            "guard": outer.guard, "eval_every": outer.eval_every, "eval_size": outer.eval_size,
            "inner": {"optimizers": ",".join(f"{n}:{lr:g}" for n, lr in inner.optimizers), "steps": inner.steps,
                      "batch_size": inner.batch_size, "query_fraction": inner.query_fraction, "query_every_step": inner.query_every_step,
                      "strategies": ",".join(inner.strategies), "trajectories": inner.trajectories}}


def _log_check(check: dict) -> None:
    tracking.log_metrics({"original_accuracy": check["original_accuracy"], "query_loss": check["query_loss"]}, step=check["loop"])


def source_uri_of(loaded: LoadedModel) -> str:
    return loaded.registered.uri if loaded.registered else loaded.uri


@click.command("sophon")
@model_options
@click.option("--original-data", required=True, help="Original-domain data the model must keep (ImageFolder, .npz, torchvision:..., digits).")
@click.option("--restricted-data", required=True, help="Restricted-domain data fine-tuning must not learn (e.g. digits-inverted).")
@click.option("--resize", is_flag=True, help="Rescale array data whose size differs from the model's input.")
@click.option("--loss", type=click.Choice(list(SUPPRESSION_LOSSES)), default="kl-uniform", show_default=True,
              help="Suppression loss on the restricted domain after simulated fine-tuning.")
@outer_options
@click.option("--test-fraction", type=click.FloatRange(0.05, 0.95), default=0.2, show_default=True,
              help="Share of each domain held out for before/after accuracy and the fine-tuning check.")
@click.option("--check", type=click.Choice(["none", *BUDGETS]), default="quick", show_default=True,
              help="Fine-tuning attack budget run on held-out restricted data after hardening.")
@click.option("--check-train-per-class", type=click.IntRange(1), default=10, show_default=True,
              help="Labelled restricted images per class the check's attacker trains on.")
@publish_options
@report_options
@common_options
def command(ctx: CommandContext, model, arch, num_classes, input_size, mean, std, allow_pickle, original_data, restricted_data, resize,
            loss, outer: OuterConfig, test_fraction, check, check_train_per_class, register_as, alias, save_model, fmt,
            output: Path | None) -> int:
    """Make MODEL non-fine-tunable on --restricted-data while keeping its accuracy on --original-data.

    Registers the result as a new version (tags harden.sophon.*); exit 0, or 1 when the guard
    could not keep original accuracy within --max-acc-drop (nothing is registered then).

    \b
    Examples:
      harden sophon models:/digits-cnn/1 --original-data digits --restricted-data digits-inverted --alias sophon
      harden sophon models:/cnn@prod --original-data orig.npz --restricted-data svhn/ --loss inverse-ce --loops 500 --format json
      torchrun --nproc-per-node 4 -m harden sophon models:/cnn@prod --original-data orig.npz --restricted-data svhn/
    """
    check_output_dir(save_model)
    outer.seed = ctx.seed
    outer.validate()
    loaded = open_model(ctx, model, arch, num_classes, input_size, mean, std, allow_pickle)
    original = load_data(original_data, loaded.input_spec, num_classes=loaded.num_classes, resize=resize)
    restricted = load_data(restricted_data, loaded.input_spec, resize=resize)
    original_train, original_test = split(original, [1 - test_fraction, test_fraction], seed=ctx.seed)
    restricted_train, restricted_test = split(restricted, [1 - test_fraction, test_fraction], seed=ctx.seed)
    source_uri = source_uri_of(loaded)
    params = {"original_data": original_data, "restricted_data": restricted_data, "loss": loss, **outer_params(outer),
              "test_fraction": test_fraction, "check": check, "device": str(ctx.device), "seed": ctx.seed}
    # Under `torchrun` every rank runs the outer loop data-parallel; rank 0 alone logs, checks and registers.
    main = distributed.is_main_process()
    with Publication() as publication, (tracking.command_run("sophon", source_uri, params) if main else contextlib.nullcontext()) as run:
        with distributed.launched(ctx.device) as dist, measure(dist.device) as cost:
            result = harden_model(loaded.trainable(), original_train, original_test, restricted_train,
                                  loss=loss, config=outer, device=dist.device, on_check=_log_check if main else None)
        kept = result.acc_drop <= outer.max_acc_drop + 1e-9
        if not main:
            return 0 if kept else EXIT_FINDINGS
        attack = None
        if check != "none":
            train, test = attacker_split(restricted_test, test_fraction=0.5, train_per_class=check_train_per_class, seed=ctx.seed)
            attack = finetune_test(result.model, train, test, budget=check, baseline=loaded.trainable(), device=ctx.device, seed=ctx.seed)
        metrics = {"acc_before": result.acc_before, "acc_after": result.acc_after, "duration_s": cost.duration_s,
                   "peak_memory_mb": cost.peak_memory_mb, "loops_done": result.outer.loops_done, "rollbacks": result.outer.rollbacks}
        if attack is not None:
            metrics |= {"best_attack_accuracy": attack.best_attack_accuracy, "scratch_accuracy": attack.scratch_accuracy,
                        "baseline_accuracy": attack.baseline_accuracy}
        tracking.log_metrics(metrics)
        published = None
        if kept:
            tags = {"harden.method": "sophon", "harden.hardened_from": source_uri, "harden.sophon.loss": loss,
                    "harden.sophon.run_id": run.info.run_id, "harden.version": __version__,
                    **{f"harden.sophon.{k}": f"{v:.4f}" for k, v in metrics.items()
                       if v is not None and k.endswith(("acc_before", "acc_after", "accuracy"))}}
            published = publication.publish(result.model.net, loaded, tags=tags, register_as=register_as, alias=alias, output=save_model,
                                            metadata={"hardened_from": source_uri, "method": "sophon"})
        payload = {
            "model_uri": source_uri, "output_model_uri": published.uri if published else None,
            "logged_model_uri": published.logged_uri if published else None, "original_data": original_data,
            "restricted_data": restricted_data, "loss": loss, "acc_before": result.acc_before, "acc_after": result.acc_after,
            "acc_drop": result.acc_drop, "max_acc_drop": outer.max_acc_drop, "guard_kept_accuracy": kept,
            "loops_done": result.outer.loops_done, "rollbacks": result.outer.rollbacks, "stopped_by_guard": result.outer.stopped_by_guard,
            "history": result.outer.history, "finetune_check": attack.to_dict() if attack else None, "settings": params,
            "run_id": run.info.run_id, "device": str(ctx.device), "duration_s": cost.duration_s, "peak_memory_mb": cost.peak_memory_mb,
            "harden_version": __version__,
        }
        tables = [Table("Original domain", ["metric", "value"], [
            ["accuracy before", result.acc_before], ["accuracy after", result.acc_after], ["outer loops", result.outer.loops_done],
            ["guard rollbacks", result.outer.rollbacks], ["registered as", payload["output_model_uri"] or "nothing (guard)"],
            ["seconds", cost.duration_s], ["peak memory (MB)", cost.peak_memory_mb]])]
        report = Report("harden.sophon/1", f"harden sophon {source_uri}", payload, tables + (result_tables(attack) if attack else []))
        tracking.log_report(report, "sophon")
    emit(report, fmt, output)
    return 0 if kept else EXIT_FINDINGS
