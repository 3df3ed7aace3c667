"""BatchNorm folded into the convolution before it: a frozen model's inference copy, faster to differentiate.

A model in eval mode applies each BatchNorm as a fixed per-channel affine map, which folds into the
weights and bias of the convolution (or linear layer) that feeds it. The folded copy computes the
same function up to float rounding and skips the normalisation's forward and backward passes: the
scan's trigger inversions, which take thousands of input-gradient steps through a frozen model,
run about a quarter faster on a BatchNorm CNN (benchmarks/scan.py, side by side). Nothing here
touches the model itself; fine-tuning methods keep the original.

Two kinds of network fold: a module network that torch.fx can trace (torch's own conv/linear–BN
fusion), and a pt2 graph from MLflow (its aten convolution → BatchNorm pairs, rewritten here).
Anything else (untraceable code, a BatchNorm whose input is used elsewhere, an output that moves
more than float rounding) keeps the original network.
"""

from __future__ import annotations

import copy
import operator

import torch
from torch import fx, nn
from torch.fx.experimental.optimization import fuse
from torch.nn.utils.fusion import fuse_conv_bn_weights

from harden.models.wrappers import PixelModel

# convolutions of a pt2 graph (weight, then bias, after the input); `aten.convolution`, which core-aten
# graphs (`run_decompositions`, older exports) hold, only when it is not transposed
_CONVOLUTIONS = {torch.ops.aten.conv1d.default, torch.ops.aten.conv2d.default, torch.ops.aten.conv3d.default,
                 torch.ops.aten.convolution.default}
_TRANSPOSED_AT = {torch.ops.aten.convolution.default: 6}
# inference BatchNorm operators of a pt2 graph → (index of the training flag or None, index of eps, returns a tuple)
_BATCH_NORMS = {
    torch.ops.aten.batch_norm.default: (5, 7, False),
    torch.ops.aten._native_batch_norm_legit_no_training.default: (None, 6, True),
}
_PARITY_RTOL = 1e-3  # largest change of any logit, relative to the largest logit, that still counts as rounding


def folded_for_inference(model: nn.Module, probe: torch.Tensor) -> nn.Module:
    """`model` (eval mode, frozen) with its BatchNorm folded into the preceding layers, or `model`
    itself when nothing folds or the copy's outputs on `probe` differ by more than rounding."""
    if isinstance(model, PixelModel):
        net = _folded_network(model.net)
        candidate = model if net is model.net else model.with_network(net)
    else:
        candidate = _folded_network(model)
    if candidate is model:
        return model
    with torch.no_grad():
        expected = model(probe)
        try:
            got = candidate(probe)
        except Exception:  # noqa: BLE001 — a traced copy that fails where the original runs is not used
            return model
    scale = float(expected.abs().max()) or 1.0
    if got.shape != expected.shape or float((got - expected).abs().max()) > _PARITY_RTOL * scale:
        return model
    return candidate


def _folded_network(net: nn.Module) -> nn.Module:
    """A folded copy of `net`, or `net` itself when nothing was folded."""
    try:
        if isinstance(net, fx.GraphModule):
            return _fold_graph(net)
        if not _batchnorm_count(net):
            return net
        folded = fuse(net)
    except Exception:  # noqa: BLE001 — user code torch.fx cannot trace: run the original
        return net
    return folded if _batchnorm_count(folded) < _batchnorm_count(net) else net


def _batchnorm_count(net: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def _fold_graph(graph_module: fx.GraphModule) -> fx.GraphModule:
    """Fold the inference BatchNorms of a pt2 graph whose input is a convolution used only by them."""
    folds = [node for node in graph_module.graph.nodes if _foldable(node)]
    if not folds:
        return graph_module
    folded = copy.deepcopy(graph_module)
    nodes = {node.name: node for node in folded.graph.nodes}
    for index, original in enumerate(folds):
        norm = nodes[original.name]
        conv = norm.args[0]
        _, eps_at, returns_tuple = _BATCH_NORMS[norm.target]
        weight, bias, mean, var = (_value(folded, a) for a in norm.args[1:5])
        conv_weight, conv_bias = _value(folded, conv.args[1]), _value(folded, conv.args[2] if len(conv.args) > 2 else None)
        new_weight, new_bias = fuse_conv_bn_weights(conv_weight, conv_bias, mean, var, norm.args[eps_at], weight, bias)
        folded.register_buffer(f"_folded_weight_{index}", new_weight.detach())
        folded.register_buffer(f"_folded_bias_{index}", new_bias.detach())
        with folded.graph.inserting_before(conv):
            weight_node = folded.graph.get_attr(f"_folded_weight_{index}")
            bias_node = folded.graph.get_attr(f"_folded_bias_{index}")
        conv.args = (conv.args[0], weight_node, bias_node, *conv.args[3:])
        outputs = list(norm.users) if returns_tuple else [norm]  # a tuple's uses are `[0]` lookups (`_foldable`)
        for output in outputs:
            output.replace_all_uses_with(conv)
            folded.graph.erase_node(output)
        if returns_tuple:
            folded.graph.erase_node(norm)
    folded.graph.eliminate_dead_code()
    folded.recompile()
    return folded


def _foldable(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in _BATCH_NORMS:
        return False
    training_at, _, returns_tuple = _BATCH_NORMS[node.target]
    conv = node.args[0]
    if training_at is not None and node.args[training_at] is not False:
        return False
    if returns_tuple and not all(u.target is operator.getitem and u.args[1] == 0 for u in node.users):
        return False
    if not (isinstance(conv, fx.Node) and conv.op == "call_function" and conv.target in _CONVOLUTIONS and len(conv.users) == 1):
        return False
    if conv.target in _TRANSPOSED_AT and conv.args[_TRANSPOSED_AT[conv.target]] is not False:
        return False
    required, optional = [conv.args[1], *node.args[3:5]], [conv.args[2] if len(conv.args) > 2 else None, *node.args[1:3]]
    return all(_is_constant(p) for p in required) and all(p is None or _is_constant(p) for p in optional)


def _is_constant(argument) -> bool:
    return isinstance(argument, fx.Node) and argument.op == "get_attr"


def _value(graph_module: fx.GraphModule, node: fx.Node | None) -> torch.Tensor | None:
    return None if node is None else operator.attrgetter(node.target)(graph_module)
