"""`harden scan-registry` on a real local Ray and a local process pool; second runs skip scanned versions."""

from __future__ import annotations

import json

import mlflow

from harden import __version__
from harden.fleet import is_current


def _copy(demo, name: str) -> str:
    client = mlflow.MlflowClient()
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    source = client.get_model_version(demo.version.name, demo.version.version)
    return client.create_model_version(name, source.source, run_id=source.run_id, model_id=source.source.removeprefix("models:/")).version


def _scan_runs() -> int:
    return len(mlflow.search_runs(search_all_experiments=True, filter_string="tags.`harden.command` = 'scan'"))


def test_scan_registry_ray_then_local_then_all_cached(demo, run_cli):
    client = mlflow.MlflowClient()
    fleet = [_copy(demo, "fleet-a") for _ in range(3)]
    other = _copy(demo, "fleet-b")
    # v1 was scanned before by this harden version: reported from its tags, not scanned again
    for key, value in {"harden.scan.verdict": "backdoor", "harden.scan.p_backdoor": "0.9100", "harden.scan.run_id": "r0",
                       "harden.scan.harden_version": __version__, "harden.scan.checks": "artifact"}.items():
        client.set_model_version_tag("fleet-a", fleet[0], key, value)
    runs = _scan_runs()
    code, out, err = run_cli("scan-registry", "--filter", "name = 'fleet-a'", "--checks", "artifact", "--executor", "ray",
                             "--workers", "2", "--format", "json", "-q")
    assert code == 1, err  # a flagged version in the fleet
    summary = json.loads(out)
    assert summary["schema"] == "harden.scan-registry/1" and (summary["versions"], summary["scanned"], summary["cached"]) == (3, 2, 1)
    assert summary["verdicts"] == {"backdoor": 1, "inconclusive": 2}
    assert all(i["cpu_s"] > 0 for i in summary["items"] if i["status"] == "scanned")
    assert _scan_runs() == runs + 2
    for version in fleet[1:]:
        tags = client.get_model_version("fleet-a", version).tags
        assert tags["harden.scan.harden_version"] == __version__ and tags["harden.scan.verdict"] == "inconclusive"
    assert "harden.scan.verdict" not in client.get_model_version("fleet-b", other).tags  # outside the filter

    code, out, err = run_cli("scan-registry", "--filter", "name = 'fleet-b'", "--checks", "artifact", "--executor", "local",
                             "--workers", "1", "--format", "json", "-q")
    assert code == 3, err  # an artifact check alone leaves the version inconclusive, as `harden scan` exits
    assert json.loads(out)["scanned"] == 1 and json.loads(out)["items"][0]["run_id"]

    code, out, err = run_cli("scan-registry", "--filter", "name LIKE 'fleet-%'", "--checks", "artifact", "--executor", "local",
                             "--workers", "2", "--format", "junit", "-q")
    assert code == 1 and _scan_runs() == runs + 3  # nothing scanned twice
    assert 'tests="4" failures="1" errors="0" skipped="3"' in out
    # a cached scan answers only for the checks it ran: the default checks need the trigger inversion too
    tags = client.get_model_version("fleet-b", other).tags
    assert tags["harden.scan.checks"] == "artifact" and is_current(tags, ["artifact"]) and not is_current(tags, None)
