"""BatchNorm folding for the scan's inference copy: same logits and input gradients, original untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harden.models import PixelModel, create_model, load_model
from harden.models.folding import folded_for_inference
from tests.conftest import CustomNet
from tests.test_models import save_pt2


def _randomise_batchnorms(net: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine terms, as a trained network has."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                for tensor, low, high in ((module.running_mean, -1, 1), (module.running_var, 0.3, 2), (module.weight, 0.5, 2), (module.bias, -1, 1)):
                    tensor.copy_(torch.empty(tensor.shape).uniform_(low, high, generator=generator))
    return net.eval()


def _images(count: int) -> torch.Tensor:
    return torch.rand(count, 3, 32, 32, generator=torch.Generator().manual_seed(count))


def _batchnorm_operators(graph_module: torch.fx.GraphModule) -> int:
    return sum(1 for node in graph_module.graph.nodes if node.op == "call_function" and "batch_norm" in str(node.target))


def _assert_same_function(model: nn.Module, folded: nn.Module, images: torch.Tensor) -> None:
    """Same logits, and the same input gradients the inversions follow. The gradients are compared as a
    whole: a rounding-level change can flip a ReLU or max-pool choice at an activation that sits at
    zero, which moves a few gradient entries by their own size (measured: 2% of the norm on one draw
    in float32, 1e-7 in float64, where the folding itself is exact)."""
    grads = []
    for m in (model, folded):
        x = images.clone().requires_grad_(True)
        logits = m(x)
        (gradient,) = torch.autograd.grad(logits.log_softmax(1)[:, 3].sum(), x)
        grads.append((logits.detach(), gradient))
    (logits, gradient), (folded_logits, folded_gradient) = grads
    assert torch.allclose(folded_logits, logits, atol=1e-4 * float(logits.abs().max()))
    assert float((folded_gradient - gradient).norm()) <= 0.05 * float(gradient.norm())


def test_a_registry_cnn_folds_into_a_copy_without_batchnorm_and_keeps_its_normalisation():
    model = PixelModel(_randomise_batchnorms(create_model("resnet8_narrow", num_classes=10)), mean=[0.5] * 3, std=[0.25] * 3).eval()
    images = _images(6)
    folded = folded_for_inference(model, images)
    assert folded is not model and folded.normalize
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) > 0  # the original keeps its layers
    _assert_same_function(model, folded, images)


def test_a_pt2_graph_from_mlflow_folds_its_batchnorm_operators(tmp_path):
    net = _randomise_batchnorms(create_model("small_cnn", num_classes=10))
    loaded = load_model(save_pt2(net, _images(2), tmp_path / "m.pt2")).module
    images = _images(6)
    folded = folded_for_inference(loaded, images)
    assert _batchnorm_operators(loaded.net) == 4 and _batchnorm_operators(folded.net) == 0
    _assert_same_function(loaded, folded, images)


def test_a_core_aten_pt2_graph_folds_too():
    """Core-aten graphs (`run_decompositions`, as older torch exported) hold `aten.convolution` and a
    BatchNorm that returns a tuple read through `[0]`."""
    net = _randomise_batchnorms(create_model("small_cnn", num_classes=10))
    program = torch.export.export(net, (_images(2),), dynamic_shapes=({0: torch.export.Dim("batch")},)).run_decompositions()
    loaded = PixelModel(program.module()).eval()
    images = _images(6)
    folded = folded_for_inference(loaded, images)
    assert _batchnorm_operators(loaded.net) == 4 and _batchnorm_operators(folded.net) == 0
    _assert_same_function(loaded, folded, images)


class _DataDependentNet(CustomNet):
    def forward(self, x):
        if x.mean() > 2:  # a branch on the data: torch.fx cannot trace it
            x = x.flip(3)
        return super().forward(x)


class _SharedConvOutputNet(nn.Module):
    """The convolution's output feeds the BatchNorm and a skip connection: folding would change the skip."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Linear(8, 10)

    def forward(self, x):
        y = self.conv(x)
        return self.head((self.norm(y) + y).mean((2, 3)))


def _no_batchnorm() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(10))


# torch.export cannot export the data-dependent branch either, so that network is only a module
@pytest.mark.parametrize("net, as_pt2", [(_DataDependentNet, False), (_SharedConvOutputNet, False), (_SharedConvOutputNet, True),
                                         (_no_batchnorm, False), (_no_batchnorm, True)],
                         ids=["untraceable", "conv-output-shared", "conv-output-shared-pt2", "no-batchnorm", "no-batchnorm-pt2"])
def test_a_network_that_cannot_fold_is_used_as_it_is(net, as_pt2, tmp_path):
    network = _randomise_batchnorms(net())
    images = _images(4)
    network(images)  # materialises the lazy layer
    model = load_model(save_pt2(network, images[:2], tmp_path / "m.pt2")).module if as_pt2 else PixelModel(network).eval()
    assert folded_for_inference(model, images) is model
