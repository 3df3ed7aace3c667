"""The BentoML service over the exported model: in process (ASGI) and through a real `harden serve`."""

from __future__ import annotations

import importlib
import io
import os
import sys
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from starlette.testclient import TestClient

from harden.cli.serve import find_bento, serve_in_background
from harden.data import load_data, to_uint8_arrays
from harden.errors import HardenError
from harden.models import InputSpec

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    """Eight digits as NHWC uint8 (what PNG files hold) and as NCHW floats in [0, 1] (what `pixels` holds)."""
    images, _ = to_uint8_arrays(load_data("digits", InputSpec(3, 32, 32)).subset(range(8)))
    return images, images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0


def encode(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def client(exported, monkeypatch_module):
    """The service class imported for the exported Bento model, served in process via `to_asgi()`."""
    monkeypatch_module.setenv("HARDEN_BENTO_MODEL", exported.report["bento_tag"])
    sys.modules.pop("serving.service", None)
    service = importlib.import_module("serving.service")
    with TestClient(service.HardenedClassifier.to_asgi()) as test_client:
        yield test_client
    sys.modules.pop("serving.service", None)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_predict_pixels_matches_onnx_runtime(client, exported, digits):
    _, pixels = digits
    response = client.post("/predict", json={"pixels": pixels.tolist()})
    assert response.status_code == 200, response.text
    body = response.json()
    logits = ort.InferenceSession(str(exported.onnx_file), providers=["CPUExecutionProvider"]).run(None, {"images": pixels})[0]
    assert body["indices"] == logits.argmax(1).tolist()
    assert body["labels"] == [str(i) for i in body["indices"]]
    probabilities = np.asarray(body["probabilities"])
    assert probabilities.shape == (8, 10)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-4)
    assert body["model"] == exported.report["bento_tag"]


def test_png_uploads_give_the_same_answer_as_pixels(client, digits):
    images, pixels = digits
    files = [("images", (f"{i}.png", encode(image), "image/png")) for i, image in enumerate(images)]
    from_files = client.post("/predict", files=files)
    from_pixels = client.post("/predict", json={"pixels": pixels.tolist()})
    assert from_files.status_code == 200, from_files.text
    assert from_files.json()["indices"] == from_pixels.json()["indices"]
    np.testing.assert_allclose(from_files.json()["probabilities"], from_pixels.json()["probabilities"], atol=1e-5)


def test_jpeg_and_other_sizes_are_resized(client, digits):
    images, _ = digits
    big = np.asarray(Image.fromarray(images[0]).resize((96, 96)))
    gray = np.asarray(Image.fromarray(images[1]).convert("L"))
    files = [("images", ("a.jpg", encode(big, "JPEG"), "image/jpeg")), ("images", ("b.png", encode(gray), "image/png"))]
    response = client.post("/predict", files=files)
    assert response.status_code == 200, response.text
    assert len(response.json()["labels"]) == 2


def test_metadata_and_health(client, exported, lineage_tags):
    meta = client.get("/metadata").json()
    assert meta["model"] == exported.report["bento_tag"]
    assert meta["labels"]["harden.scan.verdict"] == "backdoor"
    assert meta["metadata"]["lineage"]["harden.purified_from"] == lineage_tags["harden.purified_from"]
    assert meta["metadata"]["onnx_sha256"] == exported.report["sha256"]
    assert meta["input"]["max_images"] == 64
    assert client.get("/healthz").status_code == 200


def _bad_requests(pixels: np.ndarray, png: bytes) -> list[tuple[str, dict, str]]:
    return [
        ("wrong shape", {"json": {"pixels": pixels[:, :, :31].tolist()}}, "this model takes [N, 3, 32, 32]"),
        ("single image without batch axis", {"json": {"pixels": pixels[0].tolist()}}, "this model takes"),
        ("ragged", {"json": {"pixels": [[[[0.1, 0.2]], [[0.3]]]]}}, "rectangular"),
        ("not pixels", {"json": {"pixels": (pixels * 255).tolist()}}, "[0, 1]"),
        ("too many", {"json": {"pixels": np.zeros((65, 3, 32, 32)).tolist()}}, "too many images: 65"),
        ("too many files", {"files": [("images", ("a.png", png, "image/png"))] * 65}, "too many images: 65"),
        ("nothing", {"json": {}}, "send `images`"),
        ("both", {"files": [("images", ("a.png", png, "image/png"))], "data": {"pixels": "[]"}}, "not both"),
        ("not an image", {"files": [("images", ("a.png", b"hello", "image/png"))]}, "image 0 is not a readable PNG"),
        ("gif", {"files": [("images", ("a.gif", _gif(), "image/gif"))]}, "image 0 is GIF"),
        ("url instead of a file", {"files": [("images", (None, "http://127.0.0.1:9/x.png"))]}, "uploaded PNG/JPEG files"),
        ("not json", {"content": b"hello", "headers": {"content-type": "application/json"}}, "JSON object"),
    ]


def _gif() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, "GIF")
    return buffer.getvalue()


def test_bad_requests_get_400_with_a_clear_message(client, digits):
    images, pixels = digits
    for name, request, message in _bad_requests(pixels, encode(images[0])):
        response = client.post("/predict", **request)
        assert response.status_code == 400, (name, response.text)
        assert message in response.text, (name, response.text)


def test_find_bento_tells_tags_from_model_uris(exported):
    tag = exported.report["bento_tag"]
    assert find_bento(tag.split(":")[0]) == tag
    assert find_bento("models:/export-demo/1") is None
    with pytest.raises(HardenError, match="neither a Bento model"):
        find_bento("no-such-model")


@pytest.fixture(scope="module")
def served(exported, export_home, monkeypatch_module):
    """`harden serve MODEL` in a child process: exports models:/export-demo/1 again, then `bentoml serve`."""
    monkeypatch_module.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    # module fixtures are set up before the per-test store switch (conftest): the child gets this home's store itself
    monkeypatch_module.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{export_home / 'mlflow.db'}")
    monkeypatch_module.setenv("BENTOML_HOME", str(export_home / "bentoml"))
    with serve_in_background("models:/export-demo/1", "--bento", "served-demo", cwd=export_home) as url:
        yield url


def test_real_server_serves_the_exported_model(served, client, digits):
    images, pixels = digits
    meta = httpx.get(f"{served}/metadata", timeout=10).json()
    assert meta["model"].startswith("served-demo:")
    assert meta["labels"]["harden.scan.verdict"] == "backdoor"
    assert httpx.get(f"{served}/healthz", timeout=10).status_code == 200
    files = [("images", (f"{i}.png", encode(image), "image/png")) for i, image in enumerate(images)]
    remote = httpx.post(f"{served}/predict", files=files, timeout=30)
    assert remote.status_code == 200, remote.text
    assert remote.json()["indices"] == client.post("/predict", json={"pixels": pixels.tolist()}).json()["indices"]
    bad = httpx.post(f"{served}/predict", json={"pixels": [[1.0]]}, timeout=30)
    assert bad.status_code == 400 and "this model takes" in bad.text


def test_serve_unknown_tag_fails_before_starting(harden_cli):
    code, _, err = harden_cli("serve", "no-such-model", "--port", "1")
    assert code == 2 and "neither a Bento model" in err


def test_serve_refuses_bento_models_harden_did_not_store(export_home, harden_cli):
    import bentoml

    with bentoml.models.create("foreign-model", labels={"team": "other"}) as model:
        (Path(model.path_of("weights.bin"))).write_bytes(b"\0")
    code, _, err = harden_cli("serve", "foreign-model", "--port", "1")
    assert code == 2 and "not stored by `harden export`" in err
