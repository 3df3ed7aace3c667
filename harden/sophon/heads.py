"""Find and reset a classifier's head generically, for any module harden can train.

Fine-tuning strategies (keep / re-initialise / train only the head) and the scratch
baseline need to know which parameters form the head without knowing the
architecture: it is the last `nn.Linear` of the module, or, for a torch.export
GraphModule (pt2 of unknown architecture, where layers are graph nodes rather than
submodules), the weight and bias of the last `linear`/`addmm` node of the graph.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from harden.errors import HardenError

_LINEAR_OPS = ("aten.linear.default", "aten.addmm.default", "aten.linear", "aten.addmm")


def _graph_head(net: nn.Module) -> list[nn.Parameter]:
    graph = getattr(net, "graph", None)
    if graph is None:
        return []
    head: list[nn.Parameter] = []
    for node in graph.nodes:
        if node.op == "call_function" and str(node.target) in _LINEAR_OPS:
            names = [arg.target for arg in node.args if getattr(arg, "op", None) == "get_attr"]
            params = [net.get_parameter(name) for name in names if _is_parameter(net, name)]
            head = params or head
    # addmm(bias, x, weight^T) lists the bias first; keep the weight (2-D) first either way.
    return sorted(head, key=lambda p: -p.ndim)


def _is_parameter(net: nn.Module, name: str) -> bool:
    try:
        net.get_parameter(name)
        return True
    except AttributeError:
        return False


def find_head(net: nn.Module) -> list[nn.Parameter]:
    """The head's parameters, weight first: of the last `nn.Linear`, else of the last linear graph node."""
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if linears:
        return [p for p in (linears[-1].weight, linears[-1].bias) if p is not None]
    head = _graph_head(net)
    if not head:
        raise HardenError("cannot find the model's classification head (no Linear layer or linear/addmm node)")
    return head


@torch.no_grad()
def reinit_head(net: nn.Module) -> list[nn.Parameter]:
    """Xavier-initialise the head's weight and zero its bias (as a downstream user would); returns the head."""
    head = find_head(net)
    weight, *bias = head
    fan_out, fan_in = weight.shape[0], weight.shape[1]
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    nn.init.uniform_(weight, -bound, bound)
    for b in bias:
        b.zero_()
    return head


@torch.no_grad()
def reinitialise(net: nn.Module) -> nn.Module:
    """Fresh weights in the same architecture: the "training from scratch" baseline.

    Modules with `reset_parameters` use their own initialisation; parameters of graph
    modules get PyTorch's default (Kaiming-uniform for ≥2-D, ones/zeros for norm
    weights/biases). Running statistics are reset too.
    """
    touched: set[int] = set()
    for module in net.modules():
        if hasattr(module, "reset_parameters") and module is not net:
            module.reset_parameters()
            touched.update(id(p) for p in module.parameters(recurse=False))
        if hasattr(module, "reset_running_stats"):
            module.reset_running_stats()
    for name, param in net.named_parameters():
        if id(param) in touched:
            continue
        if param.ndim >= 2:
            bound = 1.0 / math.sqrt(param[0].numel())
            nn.init.uniform_(param, -bound, bound)
        else:
            param.fill_(1.0 if name.endswith("weight") else 0.0)
    return net
