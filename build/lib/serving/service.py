"""BentoML service for a model exported by `harden export`: ONNX Runtime behind /predict, /healthz and /metadata.

The Bento model (`HARDEN_BENTO_MODEL`, default `harden-demo:latest`) holds
`model.onnx`, which takes float32 pixels in [0, 1], N×C×H×W, with the model's
normalisation inside the graph, and metadata with the input shape, the class names
and the hardening lineage (scan verdict, purification, source MLflow version).

    harden serve harden-demo:latest --port 3000
    HARDEN_BENTO_MODEL=harden-demo:latest bentoml serve serving.service:HardenedClassifier

Routes: `POST /predict` (multipart `images`: PNG/JPEG files, resized to the model's
input; or JSON `{"pixels": [...]}`: an N×C×H×W array in [0, 1]); `GET /healthz`
(BentoML's liveness route, backed by `__is_alive__`); `GET /metadata`. Bad requests
get a 400 with one clear message. The service imports neither torch nor harden.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import bentoml
import numpy as np
from bentoml.exceptions import InvalidArgument
from fastapi import FastAPI
from pydantic import Field
from starlette.requests import Request

with bentoml.importing():
    import onnxruntime as ort
    from PIL import Image, UnidentifiedImageError

MODEL_TAG = os.environ.get("HARDEN_BENTO_MODEL", "harden-demo:latest")
MAX_IMAGES = int(os.environ.get("HARDEN_MAX_IMAGES", "64"))
MAX_IMAGE_PIXELS = 4096 * 4096  # checked from the header, before decoding
IMAGE_FORMATS = ("PNG", "JPEG")
_PIL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}

routes = FastAPI(title="harden model metadata")  # GET routes; BentoML itself serves POST /predict and GET /healthz


class PredictRequest(bentoml.IODescriptor):
    """The body of POST /predict. Refuses what BentoML would otherwise fetch from a URL on the client's behalf."""

    # An empty list, not None, means "absent": BentoML 1.4.39 cannot build an Optional[list[Path]] field.
    images: list[Path] = Field(default_factory=list, description="PNG/JPEG files (multipart/form-data)")
    pixels: list | None = Field(None, description="JSON array N×C×H×W of float pixels in [0, 1]")

    @classmethod
    async def from_http_request(cls, request: Request, serde: Any) -> PredictRequest:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form()
            if any(isinstance(value, str) for value in form.getlist("images")):
                raise InvalidArgument("`images` must be uploaded PNG/JPEG files, not text or URLs")
        elif not (await request.body()).lstrip().startswith(b"{"):
            raise InvalidArgument('send a JSON object such as {"pixels": [...]}, or `images` as multipart files')
        return await super().from_http_request(request, serde)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


@bentoml.service(traffic={"timeout": 30})
@bentoml.asgi_app(routes)
class HardenedClassifier:
    model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        stored = self.model
        self.tag = str(stored.tag)
        self.labels = dict(stored.info.labels)
        self.meta = dict(stored.info.metadata)
        self.shape = tuple(int(d) for d in self.meta["input_shape"])
        self.class_names = [str(c) for c in self.meta["class_names"]]
        self.input_name = self.meta.get("input_name", "images")
        self.output_name = self.meta.get("output_name", "logits")
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(stored.path_of(self.meta.get("onnx_file", "model.onnx")), providers=providers)

    def __is_alive__(self) -> bool:
        """Healthy when the model answers a one-image forward pass."""
        logits = self._logits(np.zeros((1, *self.shape), dtype=np.float32))
        return logits.shape == (1, len(self.class_names)) and bool(np.isfinite(logits).all())

    @bentoml.api(input_spec=PredictRequest)
    def predict(self, images: list[Path], pixels: list | None) -> dict[str, Any]:
        """Classify a batch: `images` as PNG/JPEG uploads, or `pixels` as an N×C×H×W JSON array in [0, 1]."""
        if images and pixels is not None:
            raise InvalidArgument("send either `images` or `pixels`, not both")
        batch = self._from_files(images) if images else self._from_pixels(pixels)
        probabilities = _softmax(self._logits(batch).astype(np.float64))
        top = probabilities.argmax(axis=1)
        return {
            "labels": [self.class_names[i] for i in top],
            "indices": top.tolist(),
            "probabilities": probabilities.round(6).tolist(),
            "class_names": self.class_names,
            "model": self.tag,
        }

    @routes.get("/metadata")
    def metadata(self) -> dict[str, Any]:
        """The stored model's tag, labels (scan verdict, lineage, preprocessing) and full metadata."""
        c, h, w = self.shape
        return {
            "model": self.tag,
            "labels": self.labels,
            "metadata": self.meta,
            "input": {"pixels": f"float32 [N, {c}, {h}, {w}] in [0, 1]", "images": "PNG or JPEG, resized to "
                      f"{w}x{h}", "max_images": MAX_IMAGES},
        }

    def _logits(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self.output_name], {self.input_name: batch})[0]

    def _check_count(self, count: int) -> None:
        if count == 0:
            raise InvalidArgument("the request holds no images")
        if count > MAX_IMAGES:
            raise InvalidArgument(f"too many images: {count} in one request (at most {MAX_IMAGES})")

    def _from_pixels(self, pixels: list | None) -> np.ndarray:
        if pixels is None:
            raise InvalidArgument("send `images` (PNG/JPEG files, multipart) or `pixels` (JSON array N×C×H×W in [0, 1])")
        self._check_count(len(pixels))
        try:
            array = np.asarray(pixels, dtype=np.float32)
        except (TypeError, ValueError):
            raise InvalidArgument("`pixels` must be a rectangular array of numbers (N×C×H×W)") from None
        if array.shape != (len(pixels), *self.shape):
            c, h, w = self.shape
            raise InvalidArgument(f"`pixels` has shape {list(array.shape)}; this model takes [N, {c}, {h}, {w}]")
        if not np.isfinite(array).all() or array.min() < 0.0 or array.max() > 1.0:
            raise InvalidArgument("`pixels` values must lie in [0, 1] (the model normalises internally)")
        return array

    def _from_files(self, images: list[Path]) -> np.ndarray:
        self._check_count(len(images))
        return np.stack([self._decode(path, index) for index, path in enumerate(images)])

    def _decode(self, path: Path, index: int) -> np.ndarray:
        c, h, w = self.shape
        if c not in _PIL_MODES:
            raise InvalidArgument(f"this model takes {c}-channel input; send `pixels` instead of image files")
        try:
            with Image.open(path) as image:
                if image.format not in IMAGE_FORMATS:
                    raise InvalidArgument(f"image {index} is {image.format}; send PNG or JPEG")
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise InvalidArgument(f"image {index} is {image.width}x{image.height}; at most {MAX_IMAGE_PIXELS} pixels")
                image = image.convert(_PIL_MODES[c])
                if image.size != (w, h):
                    image = image.resize((w, h), Image.Resampling.BILINEAR)
                array = np.asarray(image, dtype=np.float32) / 255.0
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError):
            raise InvalidArgument(f"image {index} is not a readable PNG or JPEG image") from None
        return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
