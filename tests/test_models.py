"""Loading models from every place users keep them, and the architecture registry."""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml

from harden.data import TensorDataset, load_data
from harden.errors import ModelLoadError, UnsafeModelError
from harden import tracking
from harden.evaluation import evaluate
from harden.models import InputSpec, PixelModel, create_model, list_archs, load_model
from harden.publish import publish
from harden.runtime import reproducible, training_layout
from harden.training import TrainConfig, fit
from tests.conftest import CustomNet, train_quickly

DATA = Path(__file__).parent / "data"


def save_pt2(net: torch.nn.Module, example: torch.Tensor, path: Path) -> Path:
    """`net` as a pt2 archive with a dynamic batch, as MLflow 3 logs one."""
    torch.export.save(torch.export.export(net, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=2, max=512)},)), str(path))
    return path


def test_registry_builds_every_small_arch():
    names = {info.name for info in list_archs()}
    assert {"small_cnn", "resnet18_cifar", "preact_resnet18", "torchvision/resnet18"} <= names
    for name in ("small_cnn", "resnet18_cifar", "preact_resnet18"):
        out = create_model(name, num_classes=7)(torch.zeros(2, 3, 32, 32))
        assert out.shape == (2, 7)
    assert create_model("small_cnn", num_classes=4, in_channels=1)(torch.zeros(1, 1, 16, 16)).shape == (1, 4)
    assert create_model("lenet5", num_classes=7)(torch.zeros(2, 1, 28, 28)).shape == (2, 7)


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(Exception, match="unknown architecture 'nope'"):
        create_model("nope", num_classes=2)


def test_pt2_custom_architecture_matches_its_own_accuracy(custom_pt2, digits_arrays, tmp_path, run_cli):
    model, info = custom_pt2
    x, y = digits_arrays
    held_x, held_y = x[900:], y[900:]
    images = torch.from_numpy(held_x).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        own_accuracy = float((model(images).argmax(1).numpy() == held_y).mean())
    np.savez(tmp_path / "held.npz", x=held_x, y=held_y)

    loaded = load_model(f"models:/outsider-cnn/{info.registered_model_version}")
    assert loaded.format == "pt2" and loaded.arch is None
    assert loaded.input_spec == InputSpec(3, 32, 32) and loaded.num_classes == 10

    code, out, err = run_cli("evaluate", f"models:/outsider-cnn/{info.registered_model_version}", "--data", tmp_path / "held.npz", "--format", "json", "-q")
    assert code == 0, err
    import json
    report = json.loads(out)
    assert report["schema"] == "harden.evaluate/1"
    assert report["accuracy"] == pytest.approx(own_accuracy, abs=1e-9)
    assert report["n"] == len(held_y)
    assert own_accuracy > 0.5  # the model really learned something, so equality is meaningful


def test_pt2_gives_input_gradients(custom_pt2):
    _, info = custom_pt2
    loaded = load_model(info.model_uri)
    x = torch.rand(3, 3, 32, 32, requires_grad=True)
    loaded.module(x).logsumexp(1).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_batch_one_export_is_served_in_chunks(mlflow_home, tmp_path):
    """A pt2 exported from a batch-1 example only takes batch 1; harden still runs batches."""
    net = CustomNet().eval()
    with mlflow.start_run():
        info = mlflow.pytorch.log_model(net, name="b1", input_example=np.zeros((1, 3, 32, 32), np.float32))
    loaded = load_model(info.model_uri)
    assert loaded.module.static_batch == 1
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), net(x), atol=1e-5)


def test_bounded_dynamic_batch_is_served_in_chunks(tmp_path):
    """Exported with Dim("batch", max=8): larger batches fail the export's guard; harden splits them."""
    net = CustomNet().eval()
    program = torch.export.export(net, (torch.rand(4, 3, 32, 32),), dynamic_shapes=({0: torch.export.Dim("batch", min=2, max=8)},))
    torch.export.save(program, str(tmp_path / "bounded.pt2"))
    loaded = load_model(tmp_path / "bounded.pt2")
    assert loaded.module.max_batch == 8 and loaded.module.static_batch is None
    x = torch.rand(19, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), net(x), atol=1e-5)
        assert torch.allclose(loaded.trainable()(x), net(x), atol=1e-5)
    unbounded = torch.export.export(net, (torch.rand(4, 3, 32, 32),), dynamic_shapes=({0: torch.export.Dim("batch", min=2)},))
    torch.export.save(unbounded, str(tmp_path / "unbounded.pt2"))
    assert load_model(tmp_path / "unbounded.pt2").module.max_batch is None  # MLflow's Dim.AUTO batch: torch's int_oo


def test_harden_written_model_rebuilds_as_trainable_module(demo):
    loaded = load_model(demo.model_uri)
    assert loaded.arch == "small_cnn"
    trainable = loaded.trainable()
    assert set(trainable.net.state_dict()) == set(loaded.module.net.state_dict())
    trainable.train()  # a GraphModule would refuse this
    x = torch.rand(4, 3, 32, 32)
    trainable.eval()
    with torch.no_grad():
        assert torch.allclose(trainable(x), loaded.module(x), atol=1e-5)


def test_state_dict_and_safetensors_need_arch(tmp_path):
    from safetensors.torch import save_file

    net = create_model("small_cnn", num_classes=5).eval()
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(ModelLoadError, match="--arch"):
        load_model(tmp_path / "w.safetensors")
    loaded = load_model(tmp_path / "w.safetensors", arch="small_cnn")
    assert loaded.num_classes == 5 and loaded.format == "state_dict" and loaded.input_spec == InputSpec(3, 32, 32)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), net(x))

    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "ckpt.pt")
    with pytest.raises(UnsafeModelError, match="--allow-pickle"):
        load_model(tmp_path / "ckpt.pt", arch="small_cnn")
    loaded = load_model(tmp_path / "ckpt.pt", arch="small_cnn", allow_pickle=True)
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), net(x))

    # a Lightning module keeping a torch.compile'd network as `self.model`
    save_file({f"model._orig_mod.{k}": v for k, v in net.state_dict().items()}, str(tmp_path / "nested.safetensors"))
    loaded = load_model(tmp_path / "nested.safetensors", arch="small_cnn")
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), net(x)) and torch.allclose(loaded.trainable().eval()(x), net(x))
    save_file({f"model.{k}": v for k, v in create_model("small_cnn", num_classes=5, width=8).state_dict().items()},
              str(tmp_path / "narrow.safetensors"))
    with pytest.raises(ModelLoadError, match=r"do not fit architecture 'small_cnn': Error\(s\) in loading"):
        load_model(tmp_path / "narrow.safetensors", arch="small_cnn")


def test_torchscript_and_pt2_files(tmp_path):
    net = CustomNet().eval()
    example = torch.rand(2, 3, 32, 32)
    torch.jit.trace(net, example).save(str(tmp_path / "m.ts"))
    loaded = load_model(tmp_path / "m.ts", input_size="3x32x32")
    assert loaded.format == "torchscript" and loaded.num_classes == 10
    with pytest.raises(ModelLoadError, match=r"does not accept input 1x32x32: .*to have 3 channels"):  # the interpreter's last line
        load_model(tmp_path / "m.ts", input_size="1x32x32")
    batch = torch.export.Dim("batch", min=2, max=512)
    torch.export.save(torch.export.export(net, (example,), dynamic_shapes=({0: batch},)), str(tmp_path / "m.pt2"))
    loaded = load_model(tmp_path / "m.pt2")
    assert loaded.module.static_batch is None
    with torch.no_grad():
        assert torch.allclose(loaded.module(example), net(example), atol=1e-5)


class _SoftmaxNet(CustomNet):
    def forward(self, x):
        return torch.softmax(super().forward(x), dim=1)


def test_a_softmax_output_is_read_as_log_probabilities(tmp_path):
    """A network that returns probabilities is detected at load time; harden works on their log,
    so cross-entropy has the gradient it would have on the logits, and the saved network is untouched."""
    example = torch.rand(4, 3, 32, 32)
    for net, expect_probabilities in ((_SoftmaxNet().eval(), True), (CustomNet().eval(), False)):
        loaded = load_model(save_pt2(net, example, tmp_path / "m.pt2"))
        assert loaded.output == ("probabilities" if expect_probabilities else "logits")
        assert loaded.trainable().output == loaded.output
        with torch.no_grad():
            raw = net(example)
            expected = torch.log(raw) if expect_probabilities else raw
            assert torch.allclose(loaded.module(example), expected, atol=1e-4)
    target = torch.zeros(4, dtype=torch.long)
    softmax_net = _SoftmaxNet().eval()
    softmax_net.load_state_dict(net.state_dict())  # `net` is now the plain CustomNet: the same weights, logits out
    save_pt2(softmax_net, example, tmp_path / "s.pt2")
    x = example.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(load_model(tmp_path / "s.pt2").module(x), target).backward()
    y = example.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(CustomNet.forward(net, y), target).backward()
    assert torch.allclose(x.grad, y.grad, atol=1e-5)  # the same input gradient as on the logits


class _BinaryNet(CustomNet):
    """One output for two classes, as binary classifiers are often written."""

    def __init__(self, ending: str):
        super().__init__()
        self.ending = ending
        self.head = torch.nn.Linear(24 * 16, 1)

    def forward(self, x):
        z = super().forward(x)
        return {"column": z, "flat": z.squeeze(1), "sigmoid": torch.sigmoid(z)}[self.ending]


@pytest.mark.parametrize("ending, output", [("column", "binary_logit"), ("flat", "binary_logit"), ("sigmoid", "binary_probability")])
def test_a_single_output_binary_classifier_is_read_as_two_classes(tmp_path, ending, output):
    """Column 1 is the positive class: softmax of harden's logits gives back the model's own σ(z)."""
    torch.manual_seed(0)
    net = _BinaryNet(ending).eval()
    example = torch.rand(4, 3, 32, 32)
    loaded = load_model(save_pt2(net, example, tmp_path / "b.pt2"))
    assert (loaded.num_classes, loaded.output) == (2, output)
    with torch.no_grad():
        positive = torch.sigmoid(CustomNet.forward(net, example)[:, 0])
        assert torch.allclose(torch.softmax(loaded.module(example), 1)[:, 1], positive, atol=1e-5)
    with pytest.raises(ModelLoadError, match="--num-classes 3 but the model outputs 2 classes"):
        load_model(tmp_path / "b.pt2", num_classes=3)


def test_a_half_precision_model_is_analysed_in_float32_and_published_back_in_half(tmp_path, mlflow_home):
    """A float16 model refuses float32 images; harden runs it in float32 (input gradients need the
    precision) and logs a changed model in float16 again, so it serves as its owner logged it."""
    torch.manual_seed(0)
    net = CustomNet().eval().half()
    example = torch.rand(4, 3, 32, 32)
    loaded = load_model(save_pt2(net, example.half(), tmp_path / "h.pt2"))
    assert loaded.dtype == torch.float16 and "float16 weights run in float32" in loaded.describe()
    with torch.no_grad():
        logits = loaded.module(example)
        assert logits.dtype == torch.float32
        assert torch.allclose(logits, net(example.half()).float(), atol=2e-2)
    with tracking.command_run("purify", str(tmp_path / "h.pt2")):
        published = publish(loaded.trainable().net, loaded, tags={}, output=tmp_path / "out")
    assert '"dtype": "float16"' in (tmp_path / "out" / "MLmodel").read_text()
    assert load_model(published.local_path).dtype == torch.float16
    assert next(loaded.module.parameters()).dtype == torch.float32  # publishing cast a copy


def test_a_model_of_flat_vectors_or_grey_planes_gets_reshaped_images_and_is_published_as_it_was(tmp_path, mlflow_home):
    """An MLP logged on (batch, 784) vectors, or a model of (batch, 28, 28) planes: harden reads the
    image they hold (1x28x28, or --input-size), feeds it images, and publishes the network with its own input again."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)).eval()
    path = save_pt2(net, torch.rand(4, 784), tmp_path / "mlp.pt2")
    loaded = load_model(path)
    assert loaded.input_spec == InputSpec(1, 28, 28) and loaded.describe().endswith("input 1x28x28 as 784)")
    images = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(loaded.module(images), net(images.flatten(1)))
    assert load_model(path, input_size="4x14x14").input_spec == InputSpec(4, 14, 14)
    with pytest.raises(ModelLoadError, match="inputs of 784 .784 values., but an image of 3x28x28 has 2352"):
        load_model(path, input_size="3x28x28")
    with pytest.raises(ModelLoadError, match="flat vectors of 50 features; pass --input-size"):
        load_model(save_pt2(torch.nn.Linear(50, 3), torch.rand(4, 50), tmp_path / "odd.pt2"))
    planes = load_model(save_pt2(net, torch.rand(4, 28, 28), tmp_path / "planes.pt2"))
    assert planes.input_spec == InputSpec(1, 28, 28) and planes.sample_shape == (28, 28)
    with torch.no_grad():
        assert torch.allclose(planes.module(images), net(images[:, 0]))
    with tracking.command_run("purify", str(path)):
        published = publish(loaded.trainable().net, loaded, tags={}, output=tmp_path / "out")
    assert '"shape": [-1, 784]' in (tmp_path / "out" / "MLmodel").read_text()
    again = load_model(published.local_path)
    assert again.sample_shape == (784,) and again.input_spec == InputSpec(1, 28, 28)


def test_an_encoder_returning_a_feature_map_loads_as_pooled_embeddings(tmp_path):
    """`--task encoder`: a backbone without pooling returns (batch, C, H, W); averaged over positions,
    that is its embedding, where for a classifier it is an error (a segmentation model is not one)."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.ReLU()).eval()
    path = save_pt2(net, torch.rand(4, 3, 16, 16), tmp_path / "maps.pt2")
    with pytest.raises(ModelLoadError, match=r"model output \(2, 8, 8, 8\) is not \(batch, classes\)"):
        load_model(path)
    encoder = load_model(path, embedding=True)
    assert encoder.num_classes == 8 and "8-d embeddings" in encoder.describe()
    images = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(encoder.module(images), net(images).mean(dim=(2, 3)))


def test_a_pt2_of_dynamic_height_and_width_takes_its_example_size(tmp_path):
    """A network that pools to any size, exported with dynamic height and width: the graph holds no
    image size, the archive's example does; `--input-size` picks another."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 10)).eval()
    dynamic = {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    torch.export.save(torch.export.export(net, (torch.rand(2, 3, 24, 40),), dynamic_shapes=(dynamic,)), str(tmp_path / "any_size.pt2"))
    loaded = load_model(tmp_path / "any_size.pt2")
    assert loaded.input_spec == InputSpec(3, 24, 40) and loaded.num_classes == 10
    images = torch.rand(3, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(load_model(tmp_path / "any_size.pt2", input_size="3x48x48").module(images), net(images), atol=1e-5)


class _ServingNet(torch.nn.Module):
    """A network exported with its serving preprocessing: uint8 H×W×C images in, normalised floats inside."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net((x.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25)


def test_a_model_of_uint8_images_is_fed_float_pixels_and_published_on_uint8_again(tmp_path, mlflow_home):
    """Trigger inversion needs input gradients, which uint8 images cannot carry: harden feeds the same
    pixels as 0..255 floats through the graph's own cast, and a version it publishes takes uint8 again."""
    torch.manual_seed(0)
    net = _ServingNet(CustomNet()).eval()
    pixels = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    loaded = load_model(save_pt2(net, pixels, tmp_path / "u8.pt2"))
    assert loaded.input_dtype == torch.uint8 and loaded.channels_last and loaded.input_spec == InputSpec(3, 32, 32)
    assert (loaded.mean, loaded.std) == ((0.0,), (1 / 255,)) and "uint8 input fed as float pixels" in loaded.describe()
    images = (pixels.permute(0, 3, 1, 2).float() / 255).requires_grad_(True)
    logits = loaded.module(images)
    with torch.no_grad():
        assert torch.allclose(logits, net(pixels), atol=1e-4)
    logits.logsumexp(1).sum().backward()
    assert images.grad.abs().sum() > 0
    with tracking.command_run("purify", str(tmp_path / "u8.pt2")):
        published = publish(loaded.trainable().net, loaded, tags={}, output=tmp_path / "out")
    assert '"dtype": "uint8"' in (tmp_path / "out" / "MLmodel").read_text()
    served = mlflow.pyfunc.load_model(str(published.local_path)).predict(pixels.numpy())
    with torch.no_grad():
        assert np.allclose(served, net(pixels).numpy(), atol=1e-4)
    assert load_model(published.local_path).input_dtype == torch.uint8


def test_a_pickled_mlflow_model_signed_on_uint8_images_is_fed_float_pixels(tmp_path):
    """A pickled module carries no input dtype; its MLflow signature does, and the same checks apply."""
    torch.manual_seed(0)
    net = _ServingNet(CustomNet()).eval()
    pixels = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    mlflow.pytorch.save_model(net, str(tmp_path / "model"), serialization_format="pickle", input_example=pixels.numpy())
    loaded = load_model(tmp_path / "model", allow_pickle=True)
    assert loaded.format == "pickle" and loaded.input_dtype == torch.uint8 and loaded.std == (1 / 255,)
    with torch.no_grad():
        assert torch.allclose(loaded.module(pixels.permute(0, 3, 1, 2).float() / 255), net(pixels), atol=1e-4)


class _MaskedBytesNet(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d((x & 0xF0).float(), 1).flatten(1)


class _RoundedBytesNet(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(torch.floor(x.float() / 64), 1).flatten(1)


@pytest.mark.parametrize("net, reason", [(_MaskedBytesNet(), "fails on float ones"), (_RoundedBytesNet(), "no gradient")])
def test_a_model_that_computes_on_its_integer_inputs_is_a_clear_error(tmp_path, net, reason):
    """Bitwise masks refuse floats; rounding runs on them but leaves no input gradient to follow."""
    path = save_pt2(net, torch.zeros(4, 3, 8, 8, dtype=torch.uint8), tmp_path / "u8.pt2")
    with pytest.raises(ModelLoadError, match=f"takes uint8 inputs and .*{reason}.*; harden follows input gradients.* float32 pixels"):
        load_model(path)


class _ScaledNet(torch.nn.Module):
    def forward(self, x, scale):
        return x.flatten(1)[:, :3] * scale


def test_a_model_of_two_inputs_is_a_clear_error(tmp_path):
    torch.export.save(torch.export.export(_ScaledNet(), (torch.rand(2, 3, 4, 4), torch.rand(2, 1))), str(tmp_path / "two.pt2"))
    with pytest.raises(ModelLoadError, match=r"takes 2 inputs \(x, scale\); harden feeds it one batch of images"):
        load_model(tmp_path / "two.pt2")


class _MoreThanLogitsNet(CustomNet):
    """Returns its logits wrapped, as much training code does: with features, in a dict, or as a
    fully convolutional head's (batch, classes, 1, 1)."""

    def __init__(self, returns: str):
        super().__init__()
        self.returns = returns

    def forward(self, x):
        logits = super().forward(x)
        features = logits.detach().mean(1, keepdim=True)
        return {"tuple": lambda: (logits, features), "dict": lambda: {"features": features, "logits": logits},
                "unnamed": lambda: {"a": logits, "b": features}, "conv_head": lambda: logits[:, :, None, None]}[self.returns]()


@pytest.mark.parametrize("returns", ["tuple", "dict", "conv_head"])
def test_a_model_whose_output_wraps_its_logits_is_read_and_published_as_it_was(tmp_path, mlflow_home, returns):
    torch.manual_seed(0)
    net = _MoreThanLogitsNet(returns).eval()
    example = torch.rand(4, 3, 32, 32)
    loaded = load_model(save_pt2(net, example, tmp_path / "m.pt2"))
    with torch.no_grad():
        assert loaded.num_classes == 10 and torch.allclose(loaded.module(example), CustomNet.forward(net, example), atol=1e-5)
    with tracking.command_run("purify", str(tmp_path / "m.pt2")):
        published = publish(loaded.trainable().net, loaded, tags={}, output=tmp_path / "out")  # MLflow cannot infer this signature itself
    republished = load_model(published.local_path)
    assert type(republished.module.net(example)) is type(net(example))  # the owner's output, not harden's logits
    with torch.no_grad():
        assert torch.allclose(republished.module(example), loaded.module(example), atol=1e-5)


class _FeaturesFirstNet(CustomNet):
    """Returns (features, logits), in that order."""

    def forward(self, x):
        return torch.relu(self.squash(torch.relu(self.norm(self.stem(x))))).flatten(1), super().forward(x)


def test_a_features_first_tuple_is_read_by_the_width_its_mlflow_signature_declares(tmp_path, mlflow_home):
    """MLflow cannot infer the signature of a tuple-returning model: its owner writes the output down,
    and that width says which element is the logits. harden's own versions record the element."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    torch.manual_seed(0)
    net = _FeaturesFirstNet().eval()
    example = torch.rand(4, 3, 32, 32)
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, 32, 32))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 10))]))
    mlflow.pytorch.save_model(net, str(tmp_path / "model"), input_example=example.numpy(), signature=signature)
    loaded = load_model(tmp_path / "model")
    assert loaded.num_classes == 10 and "logits: element 1 of its output tuple" in loaded.describe()
    with torch.no_grad():
        assert torch.allclose(loaded.module(example), CustomNet.forward(net, example), atol=1e-5)
    with tracking.command_run("purify", str(tmp_path / "model")):
        published = publish(loaded.trainable().net, loaded, tags={}, output=tmp_path / "out")
    republished = load_model(published.local_path)
    with torch.no_grad():
        assert republished.num_classes == 10 and torch.allclose(republished.module(example), loaded.module(example), atol=1e-5)


_NAMEDTUPLE_EXPORT = """
import collections, sys, torch
import torch.utils._pytree as pytree
Out = collections.namedtuple("Out", ["logits", "features"])
pytree._register_namedtuple(Out, serialized_type_name="owner.Out")
class Net(torch.nn.Module):
    def forward(self, x):
        return Out(x.flatten(1)[:, :10], x.flatten(1))
torch.export.save(torch.export.export(Net(), (torch.rand(2, 3, 8, 8),)), sys.argv[1])
"""


def test_an_output_type_registered_only_where_the_model_was_exported_is_named_in_the_error(tmp_path):
    """torch.export.load only logs why it cannot rebuild such an archive; harden's error says it."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-c", _NAMEDTUPLE_EXPORT, str(tmp_path / "m.pt2")], check=True)
    with pytest.raises(ModelLoadError, match=r"namedtuple class owner.Out .*: log one that returns a tensor, a tuple or a dict"):
        load_model(tmp_path / "m.pt2")


def test_a_dict_output_without_logits_is_a_clear_error(tmp_path):
    example = torch.rand(4, 3, 32, 32)
    save_pt2(_MoreThanLogitsNet("unnamed").eval(), example, tmp_path / "m.pt2")
    with pytest.raises(ModelLoadError, match=r"dict with keys \['a', 'b'\]; harden reads its 'logits' entry"):
        load_model(tmp_path / "m.pt2")


class _ExpectsNormalised(torch.nn.Module):
    """The custom CNN behind a model that takes `(pixels - mean) / std`, as most training code feeds it."""

    def __init__(self, net: torch.nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, z):
        return self.net(z * self.std + self.mean)


@pytest.mark.parametrize("expects, chosen", [("imagenet", {"imagenet", "cifar10"}), ("bytes", {"bytes"}), ("none", {None})])
def test_the_normalisation_a_model_was_trained_with_is_found_from_clean_data(custom_pt2, digits_arrays, tmp_path, expects, chosen):
    """Chosen by cross-entropy on clean images (ImageNet and CIFAR-10 statistics are nearly the same); a model
    that takes [0, 1] pixels keeps them, and --mean/--std given by the user are never second-guessed."""
    from harden.models.normalisation import CONVENTIONS, choose_normalisation

    x, y = digits_arrays
    data = TensorDataset(torch.from_numpy(x[900:1200]).permute(0, 3, 1, 2).float() / 255, y[900:1200])
    net = _ExpectsNormalised(custom_pt2[0], *CONVENTIONS[expects]).eval()
    loaded = load_model(save_pt2(net, torch.rand(4, 3, 32, 32), tmp_path / "m.pt2"))
    choice = choose_normalisation(loaded, data)
    assert (choice.name if choice else None) in chosen
    own = evaluate(PixelModel(custom_pt2[0]).eval(), data).accuracy  # the network on the pixels it was trained on
    assert abs(evaluate(loaded, data).accuracy - own) <= 0.02
    assert choose_normalisation(load_model(tmp_path / "m.pt2", mean=[0.0], std=[1.0]), data) is None


class _ChannelsLastNet(CustomNet):
    def forward(self, x):
        return super().forward(x.permute(0, 3, 1, 2))


def test_a_model_exported_in_training_mode_runs_for_inference(tmp_path):
    """Logged without model.eval(): the pt2 graph keeps dropout on and BatchNorm on batch statistics,
    so outputs would depend on the batch. harden switches those operators to inference."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Dropout(0.5),
                              torch.nn.Flatten(), torch.nn.Linear(8 * 14 * 14, 5))
    net[1].running_mean.uniform_(-0.5, 0.5)
    loaded = load_model(save_pt2(net.train(), torch.rand(4, 3, 16, 16), tmp_path / "train_mode.pt2"))
    assert loaded.training_ops == 2 and "2 dropout/BatchNorm ops run for inference" in loaded.describe()
    images = torch.rand(6, 3, 16, 16)
    with torch.no_grad():
        expected = net.eval()(images)
        assert torch.allclose(loaded.module(images), expected, atol=1e-5)
        assert torch.allclose(loaded.module(images[:2]), expected[:2], atol=1e-5)
    assert load_model(save_pt2(net, torch.rand(4, 3, 16, 16), tmp_path / "eval_mode.pt2")).training_ops == 0


def test_a_pt2_models_batchnorm_follows_train_and_eval_while_it_is_fine_tuned(tmp_path):
    """An exported graph refuses .train(): harden flips its BatchNorm operators' training flag instead, so
    fine-tuning a pt2 model normalises by the batch and updates the running statistics as a module would,
    `freeze_norm_stats` keeps them, and eval() (what is validated and published) runs on the running ones."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 14 * 14, 5)).eval()
    model = load_model(save_pt2(net, torch.rand(4, 3, 16, 16), tmp_path / "bn.pt2")).trainable()
    running_mean = next(v for k, v in model.net.state_dict().items() if k.endswith("running_mean"))
    images = torch.rand(64, 3, 16, 16) * 0.5 + 0.5  # brighter than anything the statistics were taken on
    data = TensorDataset(images, torch.randint(0, 5, (64,)))
    fit(model, data, TrainConfig(epochs=1, lr=1e-6, batch_size=32, freeze_norm_stats=True))
    assert torch.equal(running_mean, torch.zeros(8))
    fit(model, data, TrainConfig(epochs=1, lr=1e-6, batch_size=32))
    assert float(running_mean.abs().max()) > 0.01  # updated in place, momentum 0.1 per batch
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(images[:2]), model(images)[:2], atol=1e-5)  # inference again: no batch dependence
        model.train()
        assert not torch.allclose(model(images[:2]), model(images)[:2], atol=1e-3)
    model.eval()


def test_a_channels_last_model_gets_permuted_images_and_is_published_as_it_was(tmp_path, mlflow_home):
    """A network of (batch, 32, 32, 3) images (ported from Keras, or fed HWC arrays): harden reads the
    3x32x32 image, permutes its images to the network's layout, and publishes the network with its own input."""
    torch.manual_seed(0)
    net = _ChannelsLastNet().eval()
    path = save_pt2(net, torch.rand(4, 32, 32, 3), tmp_path / "nhwc.pt2")
    loaded = load_model(path)
    assert loaded.input_spec == InputSpec(3, 32, 32) and loaded.describe().endswith("input 3x32x32 as 32x32x3 (channels-last))")
    images = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.module(images), net(images.permute(0, 2, 3, 1)), atol=1e-5)
        assert torch.allclose(loaded.trainable()(images), net(images.permute(0, 2, 3, 1)), atol=1e-5)
    literal = load_model(path, input_size="32x32x3")  # the user's word keeps the channels-first reading
    assert literal.input_spec == InputSpec(32, 32, 3) and not literal.channels_last
    assert load_model(path, input_size="3x32x32").channels_last
    with tracking.command_run("purify", str(path)):
        published = publish(loaded.trainable().net, loaded, tags={}, output=tmp_path / "out")
    signature = yaml.safe_load((tmp_path / "out" / "MLmodel").read_text())["signature"]["inputs"]
    assert json.loads(signature)[0]["tensor-spec"]["shape"] == [-1, 32, 32, 3]
    again = load_model(published.local_path)
    assert again.channels_last and again.input_spec == InputSpec(3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(again.module(images), loaded.module(images), atol=1e-5)


def test_mean_std_are_applied_inside_the_wrapper(tmp_path):
    net = CustomNet().eval()
    torch.jit.trace(net, torch.rand(2, 3, 32, 32)).save(str(tmp_path / "m.ts"))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    loaded = load_model(tmp_path / "m.ts", input_size="3x32x32", mean=mean, std=std)
    x = torch.rand(2, 3, 32, 32)
    expected = net((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    with torch.no_grad():
        assert torch.allclose(loaded.module(x), expected, atol=1e-5)


class _Boom:
    """Unpickling this runs `os.system`: the scanner must stop it before it executes."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_never_executes(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump(_Boom(marker), handle)
    with pytest.raises(UnsafeModelError):
        load_model(path)
    with pytest.raises(UnsafeModelError, match="dangerous pickle globals"):
        load_model(path, allow_pickle=True)
    assert not marker.exists()


def test_malicious_pickle_inside_torch_zip_never_executes(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"weights": torch.zeros(2), "payload": _Boom(marker)}, path)
    assert zipfile.is_zipfile(path)
    with pytest.raises(UnsafeModelError, match="posix.system|os.system|dangerous"):
        load_model(path, arch="small_cnn", allow_pickle=True)
    assert not marker.exists()


def _tampered_pt2(tmp_path: Path, member_suffix: str, payload: bytes, pickled_weight: bool) -> Path:
    """A plain pt2 with one member replaced, as an attacker could write it by hand."""
    plain = save_pt2(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)), torch.rand(4, 3, 2, 2), tmp_path / "plain.pt2")
    path = tmp_path / f"tampered-{member_suffix.replace('/', '_')}.pt2"
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(path, "w") as target:
        for name in source.namelist():
            data = source.read(name)
            if pickled_weight and name.endswith("model_weights_config.json"):
                data = data.replace(b'"use_pickle": false', b'"use_pickle": true', 1)
            target.writestr(name, payload if name.endswith(member_suffix) else data)
    return path


@pytest.mark.parametrize("member, pickled_weight", [("data/weights/weight_0", True), ("data/sample_inputs/model.pt", False)])
def test_a_pt2_whose_weights_or_sample_inputs_are_pickles_never_executes(tmp_path, member, pickled_weight):
    """torch.export.load unpickles weights flagged use_pickle, and sample inputs the restricted unpickler
    refuses, without restriction: such an archive is pickle-based (--allow-pickle, then the opcode scan)."""
    marker = tmp_path / "pwned"
    path = _tampered_pt2(tmp_path, member, pickle.dumps(_Boom(marker), protocol=2), pickled_weight)
    with pytest.raises(UnsafeModelError, match="holds pickled objects that torch.export.load unpickles"):
        load_model(path)
    with pytest.raises(UnsafeModelError, match="dangerous pickle globals"):
        load_model(path, allow_pickle=True)
    assert not marker.exists()
    assert load_model(tmp_path / "plain.pt2").num_classes == 3  # a plain export needs no flag


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_a_pt2_exported_on_a_gpu_loads_anywhere(device):
    """A real archive exported on an H100 (tests/data/make_gpu_export.py). torch.export.load puts the
    weights back on the export's device and has no map_location: without CUDA, harden reads it with every
    device record moved to the CPU (a model logged on a training GPU, scanned by a CPU CI runner); with
    CUDA, the weights load onto the GPU and are probed there."""
    archive, recorded = DATA / "gpu_export.pt2", np.load(DATA / "gpu_export_io.npz")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError):
            torch.export.load(str(archive))
    loaded = load_model(archive, device=device)
    assert (loaded.num_classes, str(loaded.input_spec), loaded.module.max_batch) == (10, "3x32x32", 64)
    with torch.no_grad():
        outputs = loaded.module(torch.from_numpy(recorded["x"]).to(device)).cpu()
    assert torch.allclose(outputs, torch.from_numpy(recorded["y"]), atol=1e-5)


def test_only_cuda_runs_switch_to_deterministic_kernels():
    """Deterministic CUDA kernels make a GPU scan repeat (benchmarks/devices.py). CPU kernels already
    repeat, and the switch would only cost there (torch then fills every new tensor with NaN)."""
    reproducible(torch.device("cpu"))
    assert not torch.are_deterministic_algorithms_enabled()
    if torch.cuda.is_available():
        reproducible(torch.device("cuda"))
        try:
            assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
            assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        finally:
            torch.use_deterministic_algorithms(False)


def test_corrupted_pt2_is_a_load_error(tmp_path):
    (tmp_path / "bad.pt2").write_bytes(b"this is not a zip archive")
    with pytest.raises(ModelLoadError, match="not a readable torch.export"):
        load_model(tmp_path / "bad.pt2")


def test_pixel_model_tolerates_frozen_graph_modules():
    class Frozen(torch.nn.Module):
        def train(self, mode=True):
            raise NotImplementedError

        def forward(self, x):
            return x.flatten(1)

    wrapped = PixelModel(Frozen()).eval()
    assert wrapped.training is False
    assert wrapped(torch.ones(1, 1, 2, 2)).shape == (1, 4)


def test_evaluate_library_api_on_loaded_model(demo):
    loaded = load_model(demo.model_uri)
    data = load_data(str(demo.data_dir / "test.npz"), loaded.input_spec, num_classes=10)
    result = evaluate(loaded, data, trigger="grid_paste", target=0)
    assert result.accuracy == pytest.approx(demo.clean.accuracy)
    assert result.asr == pytest.approx(demo.clean.asr)
    tiny = TensorDataset(torch.zeros(3, 3, 32, 32), [0, 1, 2])
    assert evaluate(loaded, tiny).n == 3


class _ViewNet(torch.nn.Module):
    """Common user code that only works on contiguous activations: `.view` after a conv."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(4)
        self.fc = torch.nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.norm(self.conv(x))).view(x.shape[0], -1))


def test_training_layout_is_channels_last_only_where_the_model_takes_it():
    images = torch.rand(6, 3, 8, 8)
    view_net = _ViewNet()
    with pytest.raises(RuntimeError):  # what an unconditional channels-last batch would do
        view_net(images.contiguous(memory_format=torch.channels_last))
    tracked = int(view_net.norm.num_batches_tracked)
    assert training_layout(view_net, images).is_contiguous()
    assert view_net.training and int(view_net.norm.num_batches_tracked) == tracked  # probed in eval mode, mode restored
    history = fit(view_net, TensorDataset(images, [0, 1, 2, 0, 1, 2]), TrainConfig(epochs=2, batch_size=3))
    assert len(history) == 2 and all(np.isfinite(history))

    cnn = create_model("small_cnn", num_classes=3, in_channels=3)
    assert training_layout(cnn, images).is_contiguous(memory_format=torch.channels_last)
    flat = torch.rand(6, 64)
    assert training_layout(cnn, flat) is flat  # not an image batch: unchanged
