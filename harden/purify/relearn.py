"""`unlearn-relearn`: D-BR's removal module, driven by the sensitivity separation.

Each epoch is one gradient-ascent pass over the training samples flagged as poisoned
(forget the trigger → target mapping) followed by one descent pass over the samples
flagged as clean (relearn the task). Unlike the reference, the ascent is bounded: it
stops for the epoch once the flagged samples' accuracy on their (poisoned) labels falls
below `ascent_floor`, and each ascent loss is capped; the epoch kept is the best on the
validation split (the reference picked it on the test set).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from harden.data.pipeline import Concatenated
from harden.errors import HardenError
from harden.evaluation import evaluate
from harden.purify.base import BestCheckpoint, Method, MethodOutput, PurifyContext, register_method
from harden.training import TrainConfig, fit


@register_method
class UnlearnRelearn(Method):
    name = "unlearn-relearn"
    description = "D-BR: gradient ascent on samples flagged poisoned, descent on samples flagged clean (needs --train-data)"
    defaults = {"epochs": 10, "lr": 1e-4, "batch_size": 64, "optimizer": "adam", "ascent_floor": 0.1, "ascent_cap": 5.0,
                "bn_mode": "freeze", "relearn_with_clean_split": True}
    needs_train_data = True

    def run(self, ctx: PurifyContext) -> MethodOutput:
        poisoned = np.asarray(ctx.separation["poisoned"], dtype=np.int64)
        clean = np.asarray(ctx.separation["clean"], dtype=np.int64)
        if len(poisoned) == 0:
            raise HardenError("the separation flags no training sample as poisoned: nothing to unlearn (try trigger-unlearn)")
        params = {**dict(ctx.settings), "flagged_poisoned": int(len(poisoned)), "flagged_clean": int(len(clean))}
        model = ctx.source.trainable().to(ctx.device)
        forget = ctx.train_data.subset(poisoned)
        relearn = ctx.train_data.subset(clean)
        if params["relearn_with_clean_split"]:
            relearn = Concatenated(relearn, ctx.train)
        cap = params["ascent_cap"]

        def ascent(net, images, labels):
            return -torch.clamp(F.cross_entropy(net(images), labels), max=cap)

        checkpoint = BestCheckpoint(model, ctx)
        step = TrainConfig(epochs=1, lr=params["lr"], batch_size=params["batch_size"], optimizer=params["optimizer"], seed=ctx.seed,
                           freeze_norm_stats=params["bn_mode"] == "freeze")
        for epoch in range(params["epochs"]):
            step.seed = ctx.seed + epoch
            if evaluate(model, forget, device=ctx.device).accuracy > params["ascent_floor"]:
                fit(model, forget, step, loss_fn=ascent, device=ctx.device, description=f"unlearn {epoch + 1}/{params['epochs']}")
            fit(model, relearn, step, device=ctx.device, description=f"relearn {epoch + 1}/{params['epochs']}")
            checkpoint.update()
        checkpoint.restore()
        return MethodOutput(model, params, checkpoint.history)
