"""`trigger-unlearn`: fine-tune on clean images stamped with the reversed triggers, true labels
(for encoders, RECEIVE's unlearning loss: see harden/purify/encoder.py).

The reversed trigger stands in for the unknown real one; training the model to ignore
it breaks the trigger → target shortcut. Every `refresh_epochs` the bounded additive
triggers are re-optimised against the model being trained (see `TriggerChaser`), so the
unlearning chases what is left of a full-image backdoor instead of one fixed δ. What is
validated after each epoch, and kept if best, is a running average of the weights
(`average`, see BestCheckpoint). With `retreat` > 0 the kept weights are then walked back toward
the source as long as a re-optimised reversed trigger finds no more to exploit and validation
accuracy holds (see harden/purify/retreat.py): fine-tuning on a few dozen images costs accuracy
that the first steps back recover. It is off by default because on some models it also let part
of the backdoor back, which no guardrail sees when the real trigger is unknown.

`distill` adds distillation toward the source model on the unstamped rows. It is off by
default: on the zoo's BatchNorm models it held the purified model close to the backdoored one
(small-CNN BadNets ASR 0.050 with it, 0.012 without). On a network without BatchNorm, where a
few dozen images retraining the whole network cost accuracy, `distill=0.5` with `lr=1e-3` is
the better setting, and what a tripped accuracy guardrail suggests: the README's outside model
(GroupNorm, GELU) lost 2.2 points of test accuracy with the defaults (ASR 0.033) and 0.4 with
it (ASR 0.004). As the default it met 44 of 48 zoo runs against 43, but lost 2.23 points on the
ResNet-18 Blend model, which the defaults purify for none (README: Purifying a model, Benchmark).
"""

from __future__ import annotations

import torch.nn.functional as F

from harden.data import make_loader
from harden.purify.base import BestCheckpoint, Method, MethodOutput, PurifyContext, distillation, frozen_teacher, register_method, snapshot
from harden.purify.encoder import receive_unlearning_loss
from harden.purify.retreat import retreat
from harden.purify.triggers import TriggerChaser, stamp_fraction
from harden.training import TrainConfig, fit


@register_method
class TriggerUnlearn(Method):
    name = "trigger-unlearn"
    description = "fine-tune on clean data stamped with the reversed trigger(s), true labels (optionally distilled toward the source)"
    accuracy_advice = ("Distil toward the source model with --set distill=0.5 --set lr=0.001 (it kept a network without BatchNorm "
                       "accurate), or walk back toward it with --set retreat=0.5 (it won accuracy back on BatchNorm CNNs).")
    defaults = {"epochs": 40, "lr": 5e-4, "batch_size": 64, "optimizer": "adam", "trigger_fraction": 0.3, "distill": 0.0,
                "bn_mode": "update", "beta": 1.0,  # beta: weight of RECEIVE's alignment term (encoders)
                "refresh_epochs": 4, "refresh_steps": 10,  # re-optimise the additive triggers every N epochs (0: never)
                "average": 0.9,  # per-step decay of the weight average that is validated and kept (0: the raw weights)
                "retreat": 0.0, "retreat_margin": 0.05}  # at most how far back toward the source, judged by a re-found trigger (0: off)

    def run(self, ctx: PurifyContext) -> MethodOutput:
        params = dict(ctx.settings)
        model = ctx.source.trainable().to(ctx.device)
        source_state = snapshot(model) if params["retreat"] > 0 else {}  # only the walk back reads it (a no-op at 0)
        teacher = frozen_teacher(ctx)
        generator = ctx.generator(1)
        interval = params["refresh_epochs"] * len(make_loader(ctx.train, params["batch_size"]))  # in optimiser steps
        chaser = TriggerChaser(ctx.triggers, model, ctx.train, seed=ctx.seed, interval=interval,
                               steps=params["refresh_steps"], device=ctx.device)

        def classifier_loss(net, images, labels):
            stamped, rows = stamp_fraction(images, chaser.triggers, params["trigger_fraction"], generator)
            logits = net(stamped)
            loss = F.cross_entropy(logits, labels)
            clean = ~rows
            if params["distill"] > 0 and clean.any():
                loss = loss + params["distill"] * distillation(logits[clean], teacher(images[clean]))
            return loss

        loss_fn = classifier_loss
        if ctx.task == "encoder":
            loss_fn = receive_unlearning_loss(ctx.triggers, params["trigger_fraction"], params["beta"], params["distill"], teacher, generator)
        checkpoint = BestCheckpoint(model, ctx, params["average"])

        def after_step() -> None:
            if ctx.task == "classifier":
                chaser.step()
            checkpoint.step()

        config = TrainConfig(epochs=params["epochs"], lr=params["lr"], batch_size=params["batch_size"],
                             optimizer=params["optimizer"], seed=ctx.seed, freeze_norm_stats=params["bn_mode"] == "freeze")
        fit(model, ctx.train, config, loss_fn=loss_fn, device=ctx.device, on_epoch_end=checkpoint.update,
            after_step=after_step, description="unlearning reversed trigger")
        checkpoint.restore()
        used = {**params, "triggers": [t.to_dict() for t in ctx.triggers]}
        if ctx.task == "classifier":
            used.update(retreat(model, source_state, ctx, limit=params["retreat"], margin=params["retreat_margin"]).to_dict())
        return MethodOutput(model, used, checkpoint.history)
