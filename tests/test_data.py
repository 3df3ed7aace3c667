"""Data sources and the pipeline that fits them to a model's input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harden.data import load_data, open_source, split
from harden.data.sources import is_artifact_uri, is_local_path
from harden.errors import DataError, HardenError
from harden.models import InputSpec

SPEC = InputSpec(3, 16, 16)


def _images(n=6, h=16, w=16, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW", "NHW"])
def test_npz_layouts_give_the_same_pixels(tmp_path, layout):
    x = _images()
    y = np.arange(6) % 3
    if layout == "NCHW":
        stored = x.transpose(0, 3, 1, 2)
    elif layout == "NHW":
        stored = x[..., 0]
    else:
        stored = x
    np.savez(tmp_path / "d.npz", x=stored, y=y)
    data = load_data(str(tmp_path / "d.npz"), SPEC)
    image, label = data[4]
    expected = torch.from_numpy(x[4].transpose(2, 0, 1)).float() / 255
    if layout == "NHW":
        expected = expected[:1].expand(3, -1, -1)  # gray repeated to the model's 3 channels
    assert label == y[4]
    assert torch.allclose(image, expected)


def test_npz_from_other_code_common_names_and_one_hot_labels(tmp_path):
    x, y = _images(), np.array([0, 2, 1, 2, 0, 1])
    np.savez(tmp_path / "d.npz", images=x, labels=np.eye(3, dtype=np.float32)[y])
    data = load_data(str(tmp_path / "d.npz"), SPEC)
    assert data.labels.tolist() == y.tolist()
    assert torch.allclose(data[3][0], torch.from_numpy(x[3].transpose(2, 0, 1)).float() / 255)
    np.savez(tmp_path / "named.npz", pixels=x, classes=y)
    with pytest.raises(DataError, match=r"no image array; expected one named x, .* \(found: classes, pixels\)"):
        load_data(str(tmp_path / "named.npz"), SPEC)
    np.savez(tmp_path / "soft.npz", x=x, y=np.full((6, 3), 1 / 3))
    with pytest.raises(DataError, match="not one-hot"):
        load_data(str(tmp_path / "soft.npz"), SPEC)
    np.savez(tmp_path / "names.npz", x=x, y=np.array(["cat", "dog", "ant", "cat", "dog", "ant"]))
    with pytest.raises(DataError, match=r"labels are strings \(cat, dog, ant, ...\); harden needs the model's class indices"):
        load_data(str(tmp_path / "names.npz"), SPEC)
    np.savez(tmp_path / "digits.npz", x=x, y=y.astype(str))  # labels as a CSV export writes them: indices, as folder names are
    assert load_data(str(tmp_path / "digits.npz"), SPEC).labels.tolist() == y.tolist()


def test_uncompressed_npz_is_memory_mapped_not_loaded(tmp_path):
    np.savez(tmp_path / "d.npz", x=_images(), y=np.zeros(6, int))
    source = open_source(str(tmp_path / "d.npz"))
    assert isinstance(source._x, np.memmap)
    np.savez_compressed(tmp_path / "c.npz", x=_images(), y=np.zeros(6, int))
    assert torch.equal(open_source(str(tmp_path / "c.npz")).image(2), source.image(2))


def test_float_npz_outside_unit_range_is_rejected(tmp_path):
    np.savez(tmp_path / "d.npz", x=_images().astype(np.float32), y=np.zeros(6, int))
    with pytest.raises(DataError, match=r"expects 0..255 integers, 16-bit integers or floats in \[0, 1\]"):
        load_data(str(tmp_path / "d.npz"), SPEC)


def test_integer_npz_of_other_widths(tmp_path):
    """int64 pixels (arithmetic on uint8 promotes) read as 0..255, uint16 as 16-bit; wider values are an error."""
    images = _images()
    np.savez(tmp_path / "u8.npz", x=images, y=np.zeros(6, int))
    np.savez(tmp_path / "i64.npz", x=images.astype(np.int64), y=np.zeros(6, int))
    np.savez(tmp_path / "u16.npz", x=images.astype(np.uint16) * 257, y=np.zeros(6, int))
    expected = load_data(str(tmp_path / "u8.npz"), SPEC)[3][0]
    assert torch.equal(load_data(str(tmp_path / "i64.npz"), SPEC)[3][0], expected)
    assert torch.allclose(load_data(str(tmp_path / "u16.npz"), SPEC)[3][0], expected, atol=1e-6)
    np.savez(tmp_path / "i16.npz", x=images.astype(np.int16) * 16, y=np.zeros(6, int))  # 12-bit values
    with pytest.raises(DataError, match=r"pixel values span \[0, 16\]; harden expects 0..255 integers"):
        load_data(str(tmp_path / "i16.npz"), SPEC)


def test_array_size_mismatch_needs_resize(tmp_path):
    np.savez(tmp_path / "d.npz", x=_images(h=28, w=28), y=np.zeros(6, int))
    with pytest.raises(DataError, match="28x28 but the model takes 16x16; pass --resize"):
        load_data(str(tmp_path / "d.npz"), SPEC)
    resized = load_data(str(tmp_path / "d.npz"), SPEC, resize=True)
    assert resized[0][0].shape == (3, 16, 16)


def test_impossible_channel_conversion_is_rejected(tmp_path):
    np.savez(tmp_path / "d.npz", x=_images(c=3), y=np.zeros(6, int))
    with pytest.raises(DataError, match="3 channels but the model takes 2"):
        load_data(str(tmp_path / "d.npz"), InputSpec(2, 16, 16))


def test_labels_outside_model_classes_are_rejected(tmp_path):
    np.savez(tmp_path / "d.npz", x=_images(), y=np.array([0, 1, 2, 3, 9, 12]))
    with pytest.raises(DataError, match=r"labels \[12\] are outside the model's 10 classes"):
        load_data(str(tmp_path / "d.npz"), SPEC, num_classes=10)


def test_imagefolder_named_and_numeric_classes(tmp_path):
    for name in ("cat", "ant"):
        (tmp_path / "named" / name).mkdir(parents=True)
        Image.fromarray(_images(1, 20, 24)[0]).save(tmp_path / "named" / name / "a.png")
    data = load_data(str(tmp_path / "named"), SPEC)
    assert data.classes == ["ant", "cat"] and data.labels.tolist() == [0, 1]
    assert data[0][0].shape == (3, 16, 16)  # folders are resized to the model's input
    with pytest.raises(DataError, match=r"2 named classes \(ant, cat\) for a model of 3 classes; .* label them by class index \(0..2\)"):
        load_data(str(tmp_path / "named"), SPEC, num_classes=3)  # which of the 3 classes is "ant" is unknowable

    for name in ("7", "2"):
        (tmp_path / "numeric" / name).mkdir(parents=True)
        Image.fromarray(_images(1)[0, ..., 0]).save(tmp_path / "numeric" / name / "a.png")
    data = load_data(str(tmp_path / "numeric"), SPEC)
    assert sorted(data.labels.tolist()) == [2, 7]


def test_imagefolder_keeps_16_bit_and_float_pixels(tmp_path):
    """Scientific and medical images come as 16-bit or float greys; PIL's 8-bit conversion
    would turn a 16-bit ramp white and a float one black."""
    ramp = np.linspace(0, 1, 64).reshape(8, 8)
    for label, (name, array) in enumerate([("a.png", (ramp * 65535).astype(np.uint16)), ("b.tif", ramp.astype(np.float32)),
                                           ("c.tif", (ramp * 65535).astype(np.uint16)), ("d.png", (ramp * 255).astype(np.uint8))]):
        (tmp_path / "ok" / str(label)).mkdir(parents=True)
        Image.fromarray(array).save(tmp_path / "ok" / str(label) / name)
    data = load_data(str(tmp_path / "ok"), InputSpec(1, 8, 8))
    for index in range(4):
        image = data[index][0][0].numpy()
        np.testing.assert_allclose(image, ramp, atol=1 / 255 if index == 3 else 1e-4)
    (tmp_path / "wide" / "0").mkdir(parents=True)
    Image.fromarray((ramp * 1e6).astype(np.int32)).save(tmp_path / "wide" / "0" / "a.tif")
    with pytest.raises(DataError, match="harden reads 8- and 16-bit images"):
        load_data(str(tmp_path / "wide"), InputSpec(1, 8, 8))


def test_empty_folder_and_missing_data(tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        load_data(str(tmp_path / "empty"), SPEC)
    with pytest.raises(DataError, match="data not found"):
        load_data(str(tmp_path / "missing.npz"), SPEC)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported data file"):
        load_data(str(tmp_path / "notes.txt"), SPEC)


def test_data_kept_as_an_mlflow_artifact(mlflow_home, tmp_path):
    """`--data runs:/…` (any artifact URI): what a registry hook or a Ray worker without the
    user's disk reads; downloaded to a directory that lives as long as the source."""
    import gc

    import mlflow

    x, y = _images(8), np.arange(8) % 4
    np.savez(tmp_path / "clean.npz", x=x, y=y)
    folder = tmp_path / "folder"
    for label in (0, 3):
        (folder / str(label)).mkdir(parents=True)
        Image.fromarray(_images(1, seed=label)[0]).save(folder / str(label) / "a.png")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(tmp_path / "clean.npz"), artifact_path="eval")
        mlflow.log_artifact(str(tmp_path / "bad.npz"), artifact_path="eval")
        mlflow.log_artifacts(str(folder), artifact_path="eval/folder")
    base = f"runs:/{run.info.run_id}/eval"

    data = load_data(f"{base}/clean.npz", SPEC)
    assert data.labels.tolist() == y.tolist()
    assert torch.equal(data[5][0], load_data(str(tmp_path / "clean.npz"), SPEC)[5][0])
    folder_data = load_data(f"{base}/folder", SPEC)
    assert sorted(folder_data.labels.tolist()) == [0, 3]

    downloaded = Path(data.source.download.name)
    assert downloaded.is_dir()
    del data
    gc.collect()
    assert not downloaded.exists()  # the temporary copy goes with the source

    with pytest.raises(HardenError, match=r"^data runs:/.*/eval/missing.npz not found"):
        load_data(f"{base}/missing.npz", SPEC)
    with pytest.raises(DataError, match=rf"^{base}/bad.npz: not a readable .npz file"):
        load_data(f"{base}/bad.npz", SPEC)  # the message names the URI, not the temporary directory


@pytest.mark.parametrize("spec, uri", [
    ("runs:/abc/eval/clean.npz", True), ("mlflow-artifacts:/1/abc/artifacts/x.npz", True), ("s3://bucket/x.npz", True),
    ("file:///data/x.npz", True), ("digits", False), ("torchvision:CIFAR10:/data/cifar", False), ("/data/x.npz", False),
    ("data/x.npz", False), ("C:/data/x.npz", False),
])
def test_artifact_uris_are_told_from_paths_and_built_in_sources(spec, uri):
    assert is_artifact_uri(spec) is uri
    assert is_local_path(spec) is (not uri and spec.split(":")[0] not in ("digits", "torchvision"))


def test_digits_render_to_any_input():
    gray = load_data("digits", InputSpec(1, 8, 8))
    colour = load_data("digits", InputSpec(3, 32, 32), num_classes=10)
    assert len(gray) == len(colour) == 1797
    assert gray[0][0].shape == (1, 8, 8) and colour[0][0].shape == (3, 32, 32)
    assert 0.0 <= float(colour[5][0].min()) and float(colour[5][0].max()) <= 1.0


def test_torchvision_spec_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="expected torchvision:NAME:/path"):
        load_data("torchvision:CIFAR10", SPEC)
    with pytest.raises(DataError, match="cannot open CIFAR10"):
        load_data(f"torchvision:CIFAR10:{tmp_path}", SPEC)
    with pytest.raises(DataError, match="no dataset 'Nope'"):
        load_data(f"torchvision:Nope:{tmp_path}", SPEC)


def test_torchvision_dataset_on_disk(tmp_path):
    """A real torchvision dataset read from files on disk (FakeData-free: MNIST's raw format)."""
    import gzip
    import struct

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    images = _images(5, 28, 28)[..., 0]
    for prefix in ("t10k", "train"):
        with gzip.open(raw / f"{prefix}-images-idx3-ubyte.gz", "wb") as handle:
            handle.write(struct.pack(">IIII", 2051, 5, 28, 28) + images.tobytes())
        with gzip.open(raw / f"{prefix}-labels-idx1-ubyte.gz", "wb") as handle:
            handle.write(struct.pack(">II", 2049, 5) + bytes([3, 1, 4, 1, 5]))
    for name in list(raw.iterdir()):
        with gzip.open(name) as src, open(raw / name.stem, "wb") as dst:
            dst.write(src.read())
    data = load_data(f"torchvision:MNIST:{tmp_path}", InputSpec(1, 28, 28))
    assert data.labels.tolist() == [3, 1, 4, 1, 5]
    assert torch.allclose(data[2][0][0], torch.from_numpy(images[2]).float() / 255)


def test_split_is_deterministic_stratified_and_disjoint():
    data = load_data("digits", InputSpec(1, 8, 8))
    a1, b1 = split(data, [0.8, 0.2], seed=3)
    a2, b2 = split(data, [0.8, 0.2], seed=3)
    _, b3 = split(data, [0.8, 0.2], seed=4)
    assert a1.indices.tolist() == a2.indices.tolist() and b1.indices.tolist() == b2.indices.tolist()
    assert b1.indices.tolist() != b3.indices.tolist()
    assert not set(a1.indices) & set(b1.indices) and len(a1) + len(b1) == len(data)
    assert set(b1.labels.tolist()) == set(range(10))
