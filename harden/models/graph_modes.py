"""Training flags that torch.export bakes into a pt2 graph, and switching them.

An exported GraphModule refuses `.train()`/`.eval()` (a copy of one ignores them): whether BatchNorm normalises by the batch
(and updates its running statistics) or by its running statistics, and whether dropout drops, is
an argument of each operator in the graph. harden sets those arguments itself: to inference when
a model was logged without `model.eval()` (models.loader), and BatchNorm's to follow
`PixelModel.train()` while a method fine-tunes the model, as a module's BatchNorm would.
"""

from __future__ import annotations

import torch

# BatchNorm operators whose training flag (at this position) also makes them update the running
# statistics in place; the functional variant returns new statistics that an eval-mode graph drops.
NORM_FLAGS = {
    torch.ops.aten.batch_norm.default: 5,
    torch.ops.aten._native_batch_norm_legit.default: 5,
}
INFERENCE_FLAGS = {
    **NORM_FLAGS,
    torch.ops.aten._native_batch_norm_legit_functional.default: 5,
    torch.ops.aten.dropout.default: 2,
    torch.ops.aten.native_dropout.default: 2,
    torch.ops.aten.feature_dropout.default: 2,
    torch.ops.aten.alpha_dropout.default: 2,
    torch.ops.aten.feature_alpha_dropout.default: 2,
}


def set_training_flags(net: torch.fx.GraphModule, mode: bool, flags: dict = NORM_FLAGS) -> int:
    """Set the training flag of every operator of `flags` in `net` to `mode`; returns how many changed."""
    changed = 0
    for node in net.graph.nodes:
        index = flags.get(node.target) if node.op == "call_function" else None
        if index is not None and len(node.args) > index and node.args[index] is not mode:
            node.args = (*node.args[:index], mode, *node.args[index + 1:])
            changed += 1
    if changed:
        net.recompile()
    return changed
