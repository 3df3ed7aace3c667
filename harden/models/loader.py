"""Load a model from any place a user keeps one, without executing untrusted code.

Accepted: `models:/name/version`, `models:/name@alias`, `runs:/id/path` (any MLflow
artifact URI), a local MLflow model directory, a `.pt2` ExportedProgram, TorchScript,
and a state-dict / safetensors file together with `arch=`.

Pickle-based formats (MLflow's `pickle` serialisation, `.pt/.pth/.ckpt/.pkl`) are
refused unless `allow_pickle=True`, and even then are opcode-scanned first.
"""

from __future__ import annotations

import copy
import inspect
import io
import itertools
import json
import logging
import math
import re
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from torch import nn

from harden import tracking
from harden.errors import ModelLoadError, UnsafeModelError
from harden.models.graph_modes import INFERENCE_FLAGS, set_training_flags
from harden.models.registry import create_model, get_arch
from harden.models.safety import pt2_pickled_members, scan_pickles
from harden.models.spec import InputSpec, RegisteredVersion
from harden.models.wrappers import PixelModel, network_logits, weights_device

_URI_SCHEME = re.compile(r"^[a-zA-Z][\w+.-]*:/")
_PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle", ".tar", ".joblib"}
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")


@dataclass
class LoadedModel:
    """A model ready for forward passes and input gradients in pixel space."""

    module: PixelModel
    uri: str
    format: str  # pt2 | torchscript | pickle | state_dict
    num_classes: int
    input_spec: InputSpec | None
    arch: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    output: str = "logits"  # what the network returns (wrappers.OUTPUTS); `module` always returns logits
    dtype: torch.dtype = torch.float32  # the weights' dtype as logged; `module` computes in float32
    input_dtype: torch.dtype = torch.float32  # the network's input as logged: uint8 images are fed as 0..255 floats
    training_ops: int = 0  # dropout/BatchNorm operators a pt2 graph had captured in training mode, now run for inference
    sample_shape: tuple[int, ...] | None = None  # the network's input per sample when not C×H×W; `input_spec` is the image reshaped to it
    channels_last: bool = False  # the network takes H×W×C: `input_spec` is the image permuted to `sample_shape`
    class_names: list[str] | None = None
    registered: RegisteredVersion | None = None
    local_path: Path | None = None
    _state_dict: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    _tmp: Any = field(default=None, repr=False)

    def trainable(self) -> PixelModel:
        """A trainable copy of the model, for methods that update weights.

        A known architecture is rebuilt as a plain `nn.Module` with these weights. An
        unknown one is trained as it was loaded: a pt2 GraphModule's parameters take
        gradients like any module's (its BatchNorm operators follow `.train()`/`.eval()` through
        their training flag, see `PixelModel.train`), and a pickled module (loaded only with
        --allow-pickle) is copied.
        """
        self.require_trainable()
        static_batch = None
        if self.arch is not None:
            net = create_model(self.arch, num_classes=self.num_classes, **self.arch_kwargs)
            _load_weights(net, self._state_dict if self._state_dict is not None else self.module.net.state_dict(), self.uri, self.arch)
        else:
            net, static_batch = copy.deepcopy(self.module.net), self.module.static_batch
        for param in net.parameters():
            param.requires_grad_(True)
        return PixelModel(net, self.mean, self.std, static_batch, self.output, sample_shape=self.sample_shape, max_batch=self.module.max_batch,
                          channels_last=self.channels_last, logits_element=self.module.logits_element)

    def require_trainable(self) -> None:
        """Refuse a model `trainable` cannot copy, before any work that would need it."""
        if self.arch is None and self.format not in ("pt2", "pickle"):
            raise ModelLoadError(f"{self.uri}: a {self.format} model cannot be trained; pass --arch (see `harden list archs`)")

    def harden_metadata(self) -> dict[str, Any]:
        """What harden records in the MLmodel metadata of models it writes."""
        return {
            "arch": self.arch,
            "arch_kwargs": self.arch_kwargs,
            "num_classes": self.num_classes,
            "input_shape": list(self.input_spec.shape) if self.input_spec else None,
            "mean": list(self.mean) if self.mean else None,
            "std": list(self.std) if self.std else None,
            "class_names": self.class_names,
            "logits_element": self.module.logits_element or None,
            "source_model_uri": self.registered.uri if self.registered else self.uri,
        }

    def describe(self) -> str:
        arch = self.arch or "unknown architecture"
        notes = [f"{str(self.dtype).removeprefix('torch.')} weights run in float32" if self.dtype != torch.float32 else "",
                 f"{str(self.input_dtype).removeprefix('torch.')} input fed as float pixels" if not self.input_dtype.is_floating_point else "",
                 f"logits: element {self.module.logits_element} of its output tuple" if self.module.logits_element else "",
                 f"exported in training mode: {self.training_ops} dropout/BatchNorm ops run for inference" if self.training_ops else ""]
        layout = " (channels-last)" if self.channels_last else ""
        reshaped = f" as {'x'.join(map(str, self.sample_shape))}{layout}" if self.sample_shape else ""
        outputs = f"{self.num_classes}-d embeddings" if self.output == "embedding" else f"{self.num_classes} classes"
        return f"{self.uri} ({self.format}, {arch}, {outputs}, input {self.input_spec or '?'}{reshaped}{''.join(', ' + n for n in notes if n)})"

    @property
    def network_input_shape(self) -> tuple[int, ...] | None:
        """One input of the network itself (not harden's image wrapper): C×H×W, or its own shape such as (C·H·W,)."""
        if self.input_spec is None:
            return None
        return self.sample_shape or self.input_spec.shape


@dataclass
class _Raw:
    """What a format reader found before the common finishing steps."""

    net: nn.Module
    format: str
    input_spec: InputSpec | None = None
    static_batch: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    state_dict: dict[str, torch.Tensor] | None = None
    training_ops: int = 0
    sample_shape: tuple[int, ...] | None = None
    max_batch: int | None = None
    input_dtype: torch.dtype = torch.float32
    output_width: int | None = None  # the MLflow signature's (batch, width) output, when it declares one


@dataclass
class ModelArtifact:
    """A model's files on local disk, fetched but not loaded (so they can be scanned first)."""

    uri: str
    path: Path
    registered: RegisteredVersion | None = None
    _tmp: Any = field(default=None, repr=False)


def fetch_model(uri: str) -> ModelArtifact:
    """Resolve MODEL to local files; MLflow URIs are downloaded (nothing is executed)."""
    uri = str(uri).strip()
    if not uri:
        raise ModelLoadError("no model given")
    registered, tmp = None, None
    if uri.startswith("file://"):
        path = Path(uri[len("file://"):])
    elif _URI_SCHEME.match(uri):
        if uri.startswith(("models:/", "runs:/")):
            tracking.require_store(f"resolve {uri}")
        registered = tracking.resolve_registered_version(uri)
        path, tmp = tracking.download(uri)
    else:
        path = Path(uri).expanduser()
    if not path.exists():
        raise ModelLoadError(f"model not found: {uri} (not a file, a directory or an MLflow URI)")
    return ModelArtifact(uri, path, registered, tmp)


def load_model(
    uri: "str | Path | ModelArtifact",
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    input_size: str | InputSpec | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    allow_pickle: bool = False,
    device: str | torch.device = "cpu",
    embedding: bool = False,
) -> LoadedModel:
    """Load MODEL for harden. Raises `ModelLoadError` with a one-line reason.

    `embedding`: the model is an encoder (`--task encoder`), and whatever tensor it returns per image
    is its embedding (`wrappers.OUTPUTS`: a feature map averaged over its positions); `num_classes` is then its size."""
    artifact = uri if isinstance(uri, ModelArtifact) else fetch_model(str(uri))
    uri, path, registered, tmp = artifact.uri, artifact.path, artifact.registered, artifact._tmp
    spec = InputSpec.parse(input_size) if isinstance(input_size, str) else input_size
    try:
        raw = _read(path, arch=arch, num_classes=num_classes, spec=spec, allow_pickle=allow_pickle)
    except ModelLoadError as exc:
        if str(path) == uri:
            raise
        # the readers name the files they read; a fetched model's are in a temporary directory the user never saw
        raise type(exc)(str(exc).replace(str(path), uri)) from None
    meta = raw.metadata
    arch = arch or meta.get("arch")
    arch_kwargs = dict(meta.get("arch_kwargs") or {})
    declared = spec or (InputSpec.from_shape(meta["input_shape"]) if meta.get("input_shape") else None)
    input_spec, sample_shape, channels_last = declared or raw.input_spec, raw.sample_shape, False
    if sample_shape:
        input_spec = _image_of_sample_shape(sample_shape, input_spec, uri)
    elif raw.input_spec is not None and _takes_channels_last(raw.input_spec, declared):
        h, w, c = sample_shape = raw.input_spec.shape
        input_spec, channels_last = InputSpec(c, h, w), True
    mean = tuple(mean) if mean else (tuple(meta["mean"]) if meta.get("mean") else None)
    std = tuple(std) if std else (tuple(meta["std"]) if meta.get("std") else None)
    if mean is None and std is None and raw.input_dtype == torch.uint8:
        mean, std = (0.0,), (1 / 255,)  # uint8 images hold 0..255 values: no guessing needed
    if (mean is None) != (std is None):
        raise ModelLoadError("--mean and --std must be given together")
    if mean is not None and input_spec is not None and len(mean) not in (1, input_spec.channels):
        raise ModelLoadError(f"--mean has {len(mean)} values but the model takes {input_spec.channels} channels")

    net, dtype = _in_float32(raw.net)
    module = PixelModel(net, mean, std, raw.static_batch, sample_shape=sample_shape, max_batch=raw.max_batch, channels_last=channels_last).eval()
    if meta.get("logits_element") is not None:
        module.logits_element = int(meta["logits_element"])
    elif not embedding:
        module.logits_element = _logits_element(module, input_spec, raw.static_batch, raw.output_width)
    out_classes, output = _probe_outputs(module, input_spec, raw.static_batch, embedding)
    module.output = output
    if not embedding and num_classes is not None and out_classes is not None and num_classes != out_classes:
        raise ModelLoadError(f"--num-classes {num_classes} but the model outputs {out_classes} classes")
    classes = out_classes if embedding else num_classes or out_classes or meta.get("num_classes")
    if classes is None:
        raise ModelLoadError(f"{uri}: cannot tell the number of classes: the model records no input size (no signature, example "
                             f"or fixed image shape); pass --input-size CxHxW so harden can probe it")
    loaded = LoadedModel(
        module=module.to(torch.device(device)),
        uri=uri,
        format=raw.format,
        num_classes=int(classes),
        input_spec=input_spec,
        arch=arch,
        arch_kwargs=arch_kwargs,
        mean=mean,
        std=std,
        output=output,
        dtype=dtype,
        input_dtype=raw.input_dtype,
        training_ops=raw.training_ops,
        sample_shape=sample_shape,
        channels_last=channels_last,
        class_names=meta.get("class_names"),
        registered=registered,
        local_path=path,
        _state_dict=raw.state_dict,
        _tmp=tmp,
    )
    return loaded


def _takes_channels_last(taken: InputSpec, declared: InputSpec | None) -> bool:
    """Whether a network whose 4-D input reads as `taken` (C×H×W) takes (batch, H, W, C) images:
    the declared image (`--input-size`, harden's metadata) is `taken` with its last dimension
    first; with none declared, `taken` has more than 4 "channels" and a width of 1, 3 or 4,
    e.g. (batch, 32, 32, 3). `--input-size` equal to `taken` keeps the channels-first reading."""
    first, second, last = taken.shape
    if declared is not None:
        return declared.shape == (last, first, second) and declared.shape != taken.shape
    return first > 4 and last in (1, 3, 4)


def _image_of_sample_shape(sample_shape: tuple[int, ...], given: InputSpec | None, uri: str) -> InputSpec:
    """The image that a network of (batch, H, W) or (batch, features) inputs reads: `--input-size` (or
    harden's metadata) when given; else a grey H×W image, or a square grey or RGB image of that
    many values (784 → 1×28×28, 3072 → 3×32×32; no count is both)."""
    values = math.prod(sample_shape)
    taken = "x".join(map(str, sample_shape))
    if given is not None:
        if given.channels * given.height * given.width != values:
            raise ModelLoadError(f"{uri}: the model takes inputs of {taken} ({values} values), but an image of {given} has "
                                 f"{given.channels * given.height * given.width}")
        return given
    if len(sample_shape) == 2:
        return InputSpec(1, *sample_shape)
    for channels in (1, 3):
        side = math.isqrt(values // channels)
        if channels * side * side == values:
            return InputSpec(channels, side, side)
    raise ModelLoadError(f"{uri}: the model takes flat vectors of {values} features; pass --input-size CxHxW "
                         f"(C·H·W = {values}) to say which image they are")


def _in_float32(net: nn.Module) -> tuple[nn.Module, torch.dtype]:
    """`net` computing in float32, and the dtype its weights were logged in.

    A model logged in half (or double) precision refuses harden's float32 images. harden
    does not feed it half-precision ones instead: trigger inversion follows input gradients
    that float16 rounds away, and CPUs lack many float16 kernels. `publish` logs a changed
    model back in the original dtype.
    """
    tensors = itertools.chain(net.parameters(), net.buffers())
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)
    return (net if dtype == torch.float32 else net.to(torch.float32)), dtype


def _logits_element(module: PixelModel, spec: InputSpec | None, static_batch: int | None, width: int | None) -> int:
    """Which element of a tuple output holds the logits: the first, as most training code returns
    (logits, features), unless the MLflow signature declares an output width that the first element
    lacks and a later one has: (features, logits). MLflow cannot infer a tuple-returning pt2 model's
    signature, so whoever logged one wrote its output down."""
    if width is None or spec is None:
        return 0
    probe = torch.zeros(static_batch or 2, *spec.shape, device=module.device)
    try:
        with torch.no_grad():
            out = module.net(module.network_input(probe))
    except Exception:  # noqa: BLE001 - _probe_outputs reports what does not run
        return 0
    if not isinstance(out, (tuple, list)):
        return 0
    widths = [t.shape[-1] if isinstance(t, torch.Tensor) and t.ndim == 2 else None for t in out]
    if not widths or widths[0] == width:
        return 0
    return next((i for i, w in enumerate(widths) if w == width), 0)


def _probe_outputs(module: PixelModel, spec: InputSpec | None, static_batch: int | None, embedding: bool = False) -> tuple[int | None, str]:
    """Forward passes on zeros, ones and noise: checks the model runs, and reads its number of
    classes and what it returns (`wrappers.OUTPUTS`): probabilities when every row is non-negative
    and sums to one; one column (or a 1-D output) is a binary classifier, read as a sigmoid probability when every
    value lies in [0, 1], else as a logit. An encoder's output (`embedding`) is its embedding, whatever its shape."""
    default = "embedding" if embedding else "logits"
    if spec is None:
        return None, default
    module.output = default
    batch = static_batch or 2
    probes = [torch.zeros(batch, *spec.shape), torch.ones(batch, *spec.shape),
              torch.rand(batch, *spec.shape, generator=torch.Generator().manual_seed(0))]
    try:
        with torch.no_grad():
            outputs = [module(probe.to(module.device)).cpu() for probe in probes]
    except ModelLoadError:
        raise  # the model ran, but its output holds no logits
    except Exception as exc:  # noqa: BLE001 - any failure here means "input does not fit"
        raise ModelLoadError(f"model does not accept input {spec}: {_one_line(exc)}") from None
    out = outputs[0]
    if embedding:
        if out.shape[1] < 2:
            raise ModelLoadError(f"encoder output {tuple(out.shape)}: an embedding needs at least 2 values per image")
        return int(out.shape[1]), default
    if out.ndim not in (1, 2) or (out.ndim == 1 and len(out) != batch):  # (classes,): a squeezed batch of 1
        raise ModelLoadError(f"model output {tuple(out.shape)} is not (batch, classes) or (batch,); harden expects a classifier's logits")
    if out.ndim == 1 or out.shape[1] == 1:
        return 2, "binary_probability" if all(bool(((o >= 0) & (o <= 1)).all()) for o in outputs) else "binary_logit"
    probabilities = all(bool((o >= 0).all()) and bool(torch.allclose(o.sum(1), torch.ones(len(o)), atol=1e-4)) for o in outputs)
    return int(out.shape[1]), "probabilities" if probabilities else "logits"


def _read(path: Path, *, arch: str | None, num_classes: int | None, spec: InputSpec | None, allow_pickle: bool) -> _Raw:
    if path.is_dir():
        if (path / "MLmodel").is_file():
            return _read_mlflow_dir(path, allow_pickle=allow_pickle)
        raise ModelLoadError(f"{path} is a directory without an MLmodel file (not an MLflow model)")
    suffix = path.suffix.lower()
    if suffix == ".pt2":
        return _read_pt2(path, allow_pickle)
    if suffix == ".safetensors":
        return _from_state_dict(_read_safetensors(path), path, arch, num_classes, spec)
    if _is_torchscript(path):
        return _read_torchscript(path)
    if suffix in _PICKLE_SUFFIXES or zipfile.is_zipfile(path):
        return _read_pickle_file(path, arch, num_classes, spec, allow_pickle)
    raise ModelLoadError(f"{path}: unrecognised model file (expected .pt2, TorchScript, .safetensors, .pt/.pth with --arch, or an MLflow model)")


def _read_mlflow_dir(path: Path, *, allow_pickle: bool) -> _Raw:
    try:
        mlmodel = yaml.safe_load((path / "MLmodel").read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ModelLoadError(f"{path}/MLmodel is not readable: {exc}") from None
    flavors = (mlmodel or {}).get("flavors") or {}
    metadata = ((mlmodel or {}).get("metadata") or {}).get("harden") or {}
    signature_shape, signature_dtype = _signature_tensor(mlmodel or {}, "inputs")
    output_shape, _ = _signature_tensor(mlmodel or {}, "outputs")
    if "pytorch" not in flavors:
        raise ModelLoadError(f"{path}: MLflow model has flavors {sorted(flavors)}, harden needs the pytorch flavor")
    data_dir = path / (flavors["pytorch"].get("model_data") or "data")
    pt2 = data_dir / "model.pt2"
    if pt2.is_file():
        raw = _read_pt2(pt2, allow_pickle)
    elif (data_dir / "model.pth").is_file():
        _require_pickle_allowed(path, allow_pickle)
        import mlflow

        try:
            net = mlflow.pytorch.load_model(str(path), map_location="cpu")
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"{path}: pickled MLflow model failed to load: {_one_line(exc)}") from None
        raw = _Raw(net, "pickle")
        if signature_dtype == "uint8" and signature_shape:  # a pickled module holds no dtype: its signature tells
            _take_float_pixels(net.eval(), torch.uint8, tuple(signature_shape), 2, path)
            raw.input_dtype = torch.uint8
    else:
        raise ModelLoadError(f"{path}: no model.pt2 or model.pth under {data_dir.name}/")
    raw.metadata = metadata
    if output_shape is not None and len(output_shape) == 2 and isinstance(output_shape[1], int) and output_shape[1] > 0:
        raw.output_width = output_shape[1]
    if signature_shape is not None:
        raw.input_spec = raw.input_spec or InputSpec.from_shape(signature_shape)
        raw.sample_shape = raw.sample_shape or _non_image_sample_shape(signature_shape)
    return raw


def _signature_tensor(mlmodel: dict, side: str) -> tuple[list[Any] | None, str | None]:
    """The shape and dtype name of the tensor an MLflow signature's first input (`side` "inputs") or
    output ("outputs") declares, or Nones."""
    declared = ((mlmodel.get("signature") or {}).get(side)) or "[]"
    try:
        columns = yaml.safe_load(declared) if isinstance(declared, str) else declared
        spec = columns[0]["tensor-spec"]
        return list(spec["shape"]), spec.get("dtype")
    except (KeyError, IndexError, TypeError, yaml.YAMLError):
        return None, None


def _read_pt2(path: Path, allow_pickle: bool) -> _Raw:
    if not zipfile.is_zipfile(path):
        raise ModelLoadError(f"{path}: not a readable torch.export (.pt2) archive (not a zip file)")
    _require_plain_pt2(path, allow_pickle)
    causes = _LoggedErrors("torch.export")
    try:
        with tempfile.TemporaryDirectory(prefix="harden-pt2-") as scratch, causes:
            program = torch.export.load(str(_devices_this_machine_has(path, Path(scratch))))
    except Exception as exc:  # noqa: BLE001 - corrupt archives raise many types
        reason = _one_line(causes.errors[-1] if causes.errors else exc)
        if "TreeSpec" in reason:
            reason += " (its output type exists only where the model was exported: log one that returns a tensor, a tuple or a dict)"
        raise ModelLoadError(f"{path}: not a readable torch.export (.pt2) archive: {reason}") from None
    user_inputs = set(program.graph_signature.user_inputs)
    if len(user_inputs) != 1:
        raise ModelLoadError(f"{path}: the model takes {len(user_inputs)} inputs ({', '.join(program.graph_signature.user_inputs)}); "
                             f"harden feeds it one batch of images: log a model whose forward takes only the image tensor")
    shape, dtype = None, torch.float32
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs and "val" in node.meta:
            shape, dtype = tuple(node.meta["val"].shape), node.meta["val"].dtype
            break
    static_batch = shape[0] if shape and isinstance(shape[0], int) else None
    sizes = _with_example_sizes(shape, program)
    spec = InputSpec.from_shape(sizes) if sizes and len(sizes) == 4 else None
    net = program.module()
    training_ops = _for_inference(net)
    if not dtype.is_floating_point:
        _take_float_pixels(net, dtype, sizes, static_batch or 2, path)
    return _Raw(net, "pt2", spec, static_batch, state_dict=dict(program.state_dict), training_ops=training_ops,
                sample_shape=_non_image_sample_shape(sizes), max_batch=_batch_bound(program, shape), input_dtype=dtype)


def _take_float_pixels(net: nn.Module, dtype: torch.dtype, sizes: tuple | None, batch: int, path: Path) -> None:
    """Let a network logged on integer images take the same values as floats, or refuse it.

    Serving code often exports its preprocessing with the network: uint8 images in, `.float() / 255`
    first. Trigger inversion follows input gradients, which integer inputs cannot carry, but the
    network's own cast passes them when its input is already float. A pt2 graph's dtype assertions
    are dropped; then the network must give the same outputs on the same pixels in either dtype, and
    have input gradients. One that computes on its input as integers (bitwise masks, rounding,
    lookups) fails one of the two and is refused.
    """
    name = str(dtype).removeprefix("torch.")

    def refusal(why: str) -> ModelLoadError:
        return ModelLoadError(f"{path}: the model takes {name} inputs{why}; harden follows input gradients, which need float "
                              f"ones: log a model whose forward takes float32 pixels (in 0..255 too: harden finds the scale)")

    if dtype in (torch.bool, torch.complex64, torch.complex128):
        raise refusal("")
    if sizes is None or not all(isinstance(d, int) for d in sizes[1:]):
        raise refusal(" of no recorded size, so harden cannot check that it reads them as floats")
    if isinstance(net, torch.fx.GraphModule):
        for node in list(net.graph.nodes):
            asserted = node.kwargs.get("dtype") if node.target is torch.ops.aten._assert_tensor_metadata.default else None
            if asserted is not None and not asserted.is_floating_point:
                net.graph.erase_node(node)
        net.recompile()
    generator = torch.Generator().manual_seed(0)
    device = weights_device(net)
    pixels = torch.randint(0, min(256, torch.iinfo(dtype).max + 1), (batch, *sizes[1:]), dtype=dtype, generator=generator).to(device)
    as_floats = pixels.float().requires_grad_(True)
    try:
        expected = network_logits(net(pixels)).float()
        got = network_logits(net(as_floats))
        direction = torch.randn(got.shape, generator=generator).to(device)
        (gradient,) = torch.autograd.grad((got * direction).sum(), as_floats)
    except Exception as exc:  # noqa: BLE001 - integer-only operators refuse floats in many ways
        raise refusal(f" and fails on float ones ({_one_line(exc)})") from None
    if not torch.allclose(got.detach(), expected, rtol=1e-4, atol=1e-4):
        raise refusal(" and computes on them as integers (the same pixels as floats give other outputs)")
    if not bool(gradient.abs().sum() > 0):
        raise refusal(" and rounds or casts them (its outputs have no gradient with respect to its input)")


class _LoggedErrors(logging.Handler):
    """Collects the exceptions a library logs (and does not raise) while in use as a context manager.

    `torch.export.load` logs why it cannot rebuild an archive (an output type registered in the
    exporting process only, such as a namedtuple or dataclass of tensors) and then raises "We ran
    into an error when deserializing the saved file. Please check the warnings above", warnings
    that harden's quiet logging hides. The logged cause is the error worth showing."""

    def __init__(self, logger: str):
        super().__init__(logging.WARNING)
        self.logger = logging.getLogger(logger)
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])

    def __enter__(self) -> "_LoggedErrors":
        self._saved = self.logger.level, self.logger.propagate, self.logger.handlers
        self.logger.setLevel(logging.WARNING)
        self.logger.propagate = False  # shown in harden's one-line error instead (torch gives the logger its own stderr handler)
        self.logger.handlers = [self]
        return self

    def __exit__(self, *_: Any) -> None:
        self.logger.setLevel(self._saved[0])
        self.logger.propagate, self.logger.handlers = self._saved[1], self._saved[2]


def _with_example_sizes(shape: tuple | None, program: torch.export.ExportedProgram) -> tuple | None:
    """`shape` with its dynamic dimensions (an export with dynamic height and width: a network that
    pools to any size) read from the example the archive was exported with, when it kept one."""
    if not shape or all(isinstance(d, int) for d in shape[1:]):
        return shape
    try:
        example = tuple(program.example_inputs[0][0].shape)
    except (TypeError, IndexError, AttributeError):
        return shape
    if len(example) != len(shape):
        return shape
    return (shape[0], *(d if isinstance(d, int) else e for d, e in zip(shape[1:], example[1:])))


def _devices_this_machine_has(path: Path, scratch: Path) -> Path:
    """`path`, or, for an archive exported on a GPU read on a machine without CUDA, a copy in `scratch`
    whose tensors and operators are placed on the CPU.

    `torch.export.load` has no `map_location`: it puts every weight back on the device it was exported
    from, and fails without an NVIDIA driver. A model logged on a training GPU and scanned by a CPU CI
    runner is the common case. The archive's graph and weight configs are JSON; their device records
    ({"type": "cuda", "index": 0}) are rewritten to the CPU, the sample inputs re-saved from the CPU
    (`_require_plain_pt2` has checked they are tensors), and the weight data copied unchanged.
    """
    if torch.cuda.is_available():
        return path
    with zipfile.ZipFile(path) as archive:
        configs = [n for n in archive.namelist() if n.endswith(".json") and b'"cuda"' in archive.read(n)]
        if not configs:
            return path
        copy_path = scratch / path.name
        with zipfile.ZipFile(copy_path, "w") as target:
            for info in archive.infolist():
                data = archive.read(info)
                if info.filename in configs:
                    data = json.dumps(_on_cpu(json.loads(data))).encode()
                elif "/data/sample_inputs/" in info.filename:  # torch.save'd on the GPU too
                    buffer = io.BytesIO()
                    torch.save(torch.load(io.BytesIO(data), weights_only=True, map_location="cpu"), buffer)
                    data = buffer.getvalue()
                target.writestr(info, data)
    return copy_path


def _on_cpu(node: Any) -> Any:
    """A JSON tree with every device record ({"type": ..., "index": ...}) on the CPU."""
    if isinstance(node, dict):
        if node.get("type") in ("cuda", "mps", "xpu") and set(node) <= {"type", "index"}:
            return {"type": "cpu", "index": None}
        return {key: _on_cpu(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_on_cpu(value) for value in node]
    return node


def _batch_bound(program: torch.export.ExportedProgram, shape: tuple | None) -> int | None:
    """The upper bound of a dynamic batch dimension (`Dim("batch", max=64)`), None when unbounded or static."""
    if not shape or not isinstance(shape[0], torch.SymInt):
        return None
    upper = getattr(program.range_constraints.get(shape[0].node.expr), "upper", None)
    try:
        return int(upper)  # torch's int_oo (unbounded) refuses, whatever its is_finite says
    except (TypeError, ValueError, AttributeError, OverflowError):
        return None


def _non_image_sample_shape(shape: Sequence[Any] | None) -> tuple[int, ...] | None:
    """A network's input per sample when its input is (batch, features) or (batch, H, W), not (batch, C, H, W)."""
    if shape is not None and len(shape) in (2, 3) and all(isinstance(d, int) and d > 0 for d in shape[1:]):
        return tuple(shape[1:])
    return None


def _for_inference(net: torch.fx.GraphModule) -> int:
    """Switch dropout and BatchNorm captured in training mode to inference; returns how many.

    A model logged without `model.eval()` exports its training behaviour into the pt2 graph,
    where `.eval()` cannot reach it: dropout stays on and BatchNorm normalises each batch by
    its own statistics (and overwrites the running ones), so every output depends on what else
    is in the batch. Served that way it would be wrong too; harden runs it as its owner meant.
    """
    return set_training_flags(net, False, INFERENCE_FLAGS)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in archive.namelist())


def _read_torchscript(path: Path) -> _Raw:
    # TorchScript archives are unpickled by TorchScript's own restricted C++ unpickler,
    # which only rebuilds tensors and TorchScript classes: no arbitrary Python globals.
    try:
        net = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"{path}: not a readable TorchScript archive: {_one_line(exc)}") from None
    return _Raw(net, "torchscript")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not a readable safetensors file: {_one_line(exc)}") from None


def _require_pickle_allowed(path: Path, allow_pickle: bool) -> None:
    if not allow_pickle:
        raise UnsafeModelError(f"{path} is pickle-based; loading it can run code. Re-run with --allow-pickle if you trust it")
    scan = scan_pickles(path)
    if scan.unsafe:
        raise UnsafeModelError(f"refusing to load: {scan.summary()}")


def _require_plain_pt2(path: Path, allow_pickle: bool) -> None:
    """pt2 archives need no --allow-pickle only when `torch.export.load` unpickles nothing but tensors."""
    try:
        pickled = pt2_pickled_members(path)
    except (zipfile.BadZipFile, OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"{path}: not a readable torch.export (.pt2) archive: {_one_line(exc)}") from None
    if pickled:
        if not allow_pickle:
            raise UnsafeModelError(f"{path} holds pickled objects that torch.export.load unpickles without restriction "
                                   f"({', '.join(pickled[:3])}); loading it can run code. Re-run with --allow-pickle if you trust it")
        scan = scan_pickles(path)
        if scan.unsafe:
            raise UnsafeModelError(f"refusing to load: {scan.summary()}")


def _read_pickle_file(path: Path, arch: str | None, num_classes: int | None, spec: InputSpec | None, allow_pickle: bool) -> _Raw:
    _require_pickle_allowed(path, allow_pickle)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - not a plain state dict: a pickled module
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001
            raise ModelLoadError(f"{path}: cannot read model file: {_one_line(exc)}") from None
    if isinstance(obj, nn.Module):
        return _Raw(obj, "pickle")
    if isinstance(obj, dict):
        for key in _STATE_DICT_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return _from_state_dict(obj, path, arch, num_classes, spec)
    raise ModelLoadError(f"{path}: holds a {type(obj).__name__}, not a model or a state dict")


def _load_weights(net: nn.Module, state: dict[str, torch.Tensor], source: object, arch: str) -> dict[str, torch.Tensor]:
    """Load `state` into `net`, also when every key sits under extra prefixes: wrappers add
    `module.` (DataParallel, DDP) and `_orig_mod.` (torch.compile), and training frameworks keep
    the network as an attribute (a Lightning module's `model.` or `net.`). Returns the keys that fitted."""
    candidates = [state]
    while all("." in k for k in candidates[-1]) and len({k.split(".", 1)[0] for k in candidates[-1]}) == 1:
        candidates.append({k.split(".", 1)[1]: v for k, v in candidates[-1].items()})
    errors = []
    for candidate in candidates:
        try:
            net.load_state_dict(candidate, strict=True)
            return candidate
        except RuntimeError as exc:
            errors.append(exc)
    raise ModelLoadError(f"{source}: weights do not fit architecture {arch!r}: {str(errors[0]).splitlines()[0]}") from None  # the keys as given


def _from_state_dict(state: dict[str, torch.Tensor], path: Path, arch: str | None, num_classes: int | None, spec: InputSpec | None) -> _Raw:
    if not arch:
        raise ModelLoadError(f"{path} holds only weights; pass --arch (see `harden list archs`) to rebuild the model")
    info = get_arch(arch)
    matrices = [v for v in state.values() if v.ndim == 2]
    classes = num_classes or (int(matrices[-1].shape[0]) if matrices else None)
    if classes is None:
        raise ModelLoadError(f"{path}: cannot infer the number of classes; pass --num-classes")
    kwargs: dict[str, Any] = {}
    convs = [v for v in state.values() if v.ndim == 4]
    if convs and "in_channels" in inspect.signature(info.factory).parameters:
        kwargs["in_channels"] = int(convs[0].shape[1])
    net = create_model(arch, num_classes=classes, **kwargs)
    state = _load_weights(net, state, path, arch)
    default = InputSpec(kwargs.get("in_channels", info.default_input[0]), *info.default_input[1:])
    meta = {"arch": arch, "arch_kwargs": kwargs, "num_classes": classes}
    return _Raw(net, "state_dict", spec or default, metadata=meta, state_dict=state)


def _one_line(exc: BaseException) -> str:
    """An error's first line; for TorchScript's interpreter, whose first line only says that an
    operation failed, its last (the operation's own error, such as a shape mismatch)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return (lines[-1] if "TorchScript interpreter" in lines[0] else lines[0])[:300]

