"""Opcode-level pickle scanning before anything is unpickled.

Uses picklescan (MIT, maintained, used by Hugging Face's hub): it reads pickle opcodes
without executing them, understands PyTorch zip checkpoints, numpy and joblib files,
and grades each imported global as innocuous / suspicious / dangerous. harden fails
closed: a dangerous global *or* a file picklescan cannot parse counts as unsafe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from picklescan.scanner import SafetyLevel, scan_directory_path, scan_file_path


@dataclass(frozen=True)
class PickleGlobal:
    module: str
    name: str
    severity: str  # innocuous | suspicious | dangerous

    def __str__(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass
class PickleScan:
    path: str
    files_scanned: int
    globals: list[PickleGlobal] = field(default_factory=list)
    parse_error: bool = False

    @property
    def dangerous(self) -> list[PickleGlobal]:
        return [g for g in self.globals if g.severity == SafetyLevel.Dangerous.value]

    @property
    def suspicious(self) -> list[PickleGlobal]:
        return [g for g in self.globals if g.severity == SafetyLevel.Suspicious.value]

    @property
    def unsafe(self) -> bool:
        return bool(self.dangerous) or self.parse_error

    def summary(self) -> str:
        if self.parse_error:
            return f"{self.path}: pickle data could not be parsed (treated as unsafe)"
        if self.dangerous:
            names = ", ".join(sorted({str(g) for g in self.dangerous}))
            return f"{self.path}: dangerous pickle globals: {names}"
        return f"{self.path}: no dangerous pickle globals in {self.files_scanned} file(s)"


def scan_pickles(path: str | Path) -> PickleScan:
    """Scan a file or a directory tree for unsafe pickle globals without loading it."""
    path = Path(path)
    result = scan_directory_path(str(path)) if path.is_dir() else scan_file_path(str(path))
    found = [PickleGlobal(g.module, g.name, g.safety.value) for g in result.globals]
    return PickleScan(str(path), result.scanned_files, found, bool(result.scan_err))
