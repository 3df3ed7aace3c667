"""Serving benchmark: ONNX Runtime against torch eager on CPU, then the BentoML service under load.

    python benchmarks/serve.py                      # 30 s of load at concurrency 8
    python benchmarks/serve.py --duration 10 --concurrency 4

Part 1, throughput: the demo architecture (small_cnn, 3x32x32) and a ResNet-18
(resnet18_cifar, 3x32x32), random weights, exported by `harden.export` (parity-checked
on digits). Both engines run in this process on the same batches with the same number
of threads, interleaved over several rounds (best round kept, so that a noisy
neighbour hurts both alike). Target: ONNX Runtime at least as fast as eager torch.

Part 2, latency: the small CNN stored as a Bento model in a temporary BENTOML_HOME and
served by `harden serve` (`bentoml serve` underneath) on 127.0.0.1; a second process
sends `POST /predict` (one image as JSON pixels) at a fixed concurrency for a fixed
time, bounded by --max-requests. Target: zero errors.

Nothing is downloaded; everything runs on loopback and in temporary directories.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@dataclass
class Throughput:
    model: str
    batch: int
    eager: float  # images per second
    onnx: float

    @property
    def ratio(self) -> float:
        return self.onnx / self.eager


@dataclass
class Exported:
    """A benchmarked model and its parity-checked ONNX file, reused for the service part."""

    loaded: object  # harden.models.LoadedModel
    export: object  # harden.export.ExportResult (its temporary file is gone; use onnx_file)
    onnx_file: Path


def _rate(run, batch: int, seconds: float) -> float:
    """Images per second of `run()` over about `seconds`, after a short warm-up."""
    for _ in range(3):
        run()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run()
        count += 1
    return count * batch / (time.perf_counter() - start)


def measure_throughput(arch: str, workdir: Path, batch: int, rounds: int, seconds: float):
    """Export `arch` (random weights) through harden and time eager torch and ONNX Runtime on one batch."""
    import onnxruntime as ort
    import torch
    from safetensors.torch import save_file

    from harden.data import load_data
    from harden.export import export_onnx
    from harden.models import create_model, load_model

    torch.manual_seed(0)
    weights = workdir / f"{arch}.safetensors"
    save_file(create_model(arch, num_classes=10).state_dict(), str(weights))
    loaded = load_model(str(weights), arch=arch)
    data = load_data("digits", loaded.input_spec, num_classes=10)
    with export_onnx(loaded, data, samples=64, batch_size=32) as export:
        if not export.passed:
            raise SystemExit(f"{arch}: export failed parity (max |diff| {export.max_abs_diff:.2e})")
        onnx_file = workdir / f"{arch}.onnx"
        onnx_file.write_bytes(export.path.read_bytes())
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    images = torch.rand(batch, *loaded.input_spec.shape)
    feed = {"images": images.numpy()}
    module = loaded.module.eval()

    def eager() -> None:
        with torch.inference_mode():
            module(images)

    def onnx() -> None:
        session.run(None, feed)

    eager_best = onnx_best = 0.0
    for _ in range(rounds):
        eager_best = max(eager_best, _rate(eager, batch, seconds))
        onnx_best = max(onnx_best, _rate(onnx, batch, seconds))
    return Throughput(arch, batch, eager_best, onnx_best), Exported(loaded, export, onnx_file)


def generate_load(url: str, duration: float, concurrency: int, max_requests: int, shape: tuple[int, ...]) -> dict:
    """The load generator (runs in its own process): fixed concurrency, bounded time and request count."""
    import httpx
    import numpy as np

    payload = json.dumps({"pixels": np.random.default_rng(0).random((1, *shape)).round(4).tolist()})
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + duration

    def worker() -> None:
        with httpx.Client(timeout=30) as client:
            while time.monotonic() < stop_at:
                with lock:
                    if len(latencies) + len(errors) >= max_requests:
                        return
                start = time.perf_counter()
                try:
                    response = client.post(f"{url}/predict", content=payload, headers={"content-type": "application/json"})
                    failure = None if response.status_code == 200 else f"HTTP {response.status_code}"
                except httpx.HTTPError as exc:
                    failure = type(exc).__name__
                elapsed = (time.perf_counter() - start) * 1000
                with lock:
                    (errors.append(failure) if failure else latencies.append(elapsed))

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ordered = sorted(latencies)
    pick = (lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]) if ordered else (lambda q: float("nan"))
    return {"requests": len(latencies) + len(errors), "errors": len(errors), "error_kinds": sorted(set(errors)),
            "p50_ms": pick(0.50), "p99_ms": pick(0.99), "max_ms": ordered[-1] if ordered else float("nan"),
            "seconds": wall, "requests_per_s": (len(latencies) + len(errors)) / wall}


def measure_service(model: Exported, home: Path, args) -> dict:
    """Store the model as a Bento model, `harden serve` it, and load it from a second process."""
    from harden.cli.serve import serve_in_background
    from harden.export import describe, store_bento

    tag = store_bento("bench-small-cnn", model.onnx_file, describe(model.loaded, model.export, {}, run_id="benchmark")).tag
    with serve_in_background(tag, cwd=home) as url:
        shape = ",".join(map(str, model.loaded.input_spec.shape))
        client = subprocess.run([sys.executable, __file__, "--load", url, "--shape", shape, "--duration", str(args.duration),
                                 "--concurrency", str(args.concurrency), "--max-requests", str(args.max_requests)],
                                capture_output=True, text=True, timeout=args.duration + 120, check=True)
    return {"tag": tag, **json.loads(client.stdout)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="Batch size for the throughput comparison.")
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds per engine (best kept).")
    parser.add_argument("--seconds", type=float, default=3.0, help="Seconds per engine per round.")
    parser.add_argument("--duration", type=float, default=30.0, help="Seconds of load on the service.")
    parser.add_argument("--concurrency", type=int, default=8, help="Concurrent clients in the load generator.")
    parser.add_argument("--max-requests", type=int, default=50_000, help="Upper bound on requests sent.")
    parser.add_argument("--load", metavar="URL", help=argparse.SUPPRESS)  # internal: be the load-generator process
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        shape = tuple(int(d) for d in args.shape.split(","))
        print(json.dumps(generate_load(args.load, args.duration, args.concurrency, args.max_requests, shape)))
        return 0

    with tempfile.TemporaryDirectory(prefix="harden-bench-serve-") as tmp:
        home = Path(tmp)
        os.environ["BENTOML_HOME"] = str(home / "bentoml")  # before bentoml is imported
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])  # for the server
        import torch

        from harden.report import Report, Table, render_text

        results = [measure_throughput(arch, home, args.batch, args.rounds, args.seconds) for arch in ("small_cnn", "resnet18_cifar")]
        service = measure_service(results[0][1], home, args)

    rows = [[t.model, t.batch, round(t.eager), round(t.onnx), f"{t.ratio:.2f}x"] for t, _ in results]
    fast_enough = all(t.ratio >= 1.0 for t, _ in results)
    report = Report("harden.bench.serve/1", "Serving benchmark (CPU)", {}, [
        Table(f"Throughput, images/s ({torch.get_num_threads()} threads, CPU, best of {args.rounds} interleaved rounds)",
              ["model", "batch", "torch eager", "ONNX Runtime", "ORT / eager"], rows),
        Table(f"Service: harden serve {service['tag']} on 127.0.0.1, {args.concurrency} concurrent clients, "
              f"{args.duration:g} s, 1 image per request",
              ["requests", "req/s", "p50 ms", "p99 ms", "max ms", "errors"],
              [[service["requests"], round(service["requests_per_s"], 1), round(service["p50_ms"], 2),
                round(service["p99_ms"], 2), round(service["max_ms"], 2), service["errors"]]]),
    ])
    print(render_text(report), end="")
    print(f"targets: ONNX Runtime >= eager: {'met' if fast_enough else 'MISSED'}; "
          f"zero errors under load: {'met' if service['errors'] == 0 else 'MISSED ' + str(service['error_kinds'])}")
    return 0 if fast_enough and service["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
