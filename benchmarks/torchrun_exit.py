"""How often a two-process CPU torchrun launch exits non-zero after its work is done.

Each launch trains the small model of tests/mlops/ddp_fit.py data-parallel (gloo), leaves
the process group with `harden.distributed.shutdown()` right after the last all-reduce, and
exits. Before shutdown kept the last barrier's handle alive, 2 launches of 30 aborted at
interpreter exit (SIGABRT, "terminate called without an active exception"):
gloo's worker thread released the all-reduce's tensors after Python had begun to exit.

    .venv/bin/python benchmarks/torchrun_exit.py [--launches 30]
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harden.report import Report, Table, emit

ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import sys
sys.path.insert(0, {tests!r})
import ddp_fit
from harden import distributed

with distributed.launched("cpu") as ctx:
    ddp_fit.train()
    # the shape that reproduced the abort: a little output, then straight into shutdown
    print(f"rank {{ctx.rank}} trained", file=sys.stderr, flush=True)
"""


def launch(script: Path) -> tuple[int, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
                          env=env, capture_output=True, text=True, timeout=300)
    return done.returncode, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--launches", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "worker.py"
        script.write_text(WORKER.format(tests=str(ROOT / "tests" / "mlops")))
        results = [launch(script) for _ in range(args.launches)]
    by_code: dict[int, list[float]] = collections.defaultdict(list)
    for code, seconds in results:
        by_code[code].append(seconds)
    rows = [[str(code), len(times), f"{sum(times) / len(times):.1f}"] for code, times in sorted(by_code.items())]
    emit(Report("harden.bench.torchrun_exit/1", f"{args.launches} two-process CPU torchrun launches",
                {"exit_codes": {code: len(times) for code, times in by_code.items()}},
                [Table("exit codes", ["torchrun exit code", "launches", "mean s per launch"], rows)]), "text")


if __name__ == "__main__":
    main()
