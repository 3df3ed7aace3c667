"""One report model, rendered by pluggable renderers (text, JSON, Markdown; more register here).

Every command builds a `Report`: a versioned JSON payload (`schema: harden.<command>/1`)
plus human tables. The JSON payload is the stable, documented contract; text and
Markdown are views of the same data. Files are written atomically.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.table import Table as RichTable


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]]


@dataclass
class Finding:
    """One problem found, in the shape code-scanning tools (SARIF) and CI dashboards expect."""

    rule_id: str  # e.g. harden.backdoor.trigger-inversion, harden.artifact.unsafe-pickle
    level: str  # error | warning | note
    message: str
    security_severity: float = 5.0  # 0.0-10.0, GitHub's scale
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckOutcome:
    """One check of a command (a JUnit test case): passed | failed | skipped | error."""

    name: str
    status: str
    message: str = ""
    duration_s: float = 0.0
    findings: list[Finding] = field(default_factory=list)


@dataclass
class Image:
    """A PNG shown in HTML reports (e.g. a reversed trigger) and logged to MLflow."""

    title: str
    png: bytes


@dataclass
class Report:
    schema: str
    title: str
    payload: dict[str, Any]
    tables: list[Table] = field(default_factory=list)
    next_steps: list[str] = field(default_factory=list)
    checks: list[CheckOutcome] = field(default_factory=list)
    images: list[Image] = field(default_factory=list)
    # The repository file SARIF results point at (models are not source files).
    sarif_location: str | None = None

    @property
    def findings(self) -> list[Finding]:
        return [finding for check in self.checks for finding in check.findings]

    def to_dict(self) -> dict[str, Any]:
        return {"schema": self.schema, **self.payload}


Renderer = Callable[[Report], str]
RENDERERS: dict[str, Renderer] = {}


def register_renderer(name: str) -> Callable[[Renderer], Renderer]:
    def decorate(renderer: Renderer) -> Renderer:
        RENDERERS[name] = renderer
        return renderer

    return decorate


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}".rstrip("0").rstrip(".") if abs(value) < 1e6 else f"{value:.4g}"
    return str(value)


def _rich_tables(report: Report) -> list[RichTable]:
    tables = []
    for table in report.tables:
        rich = RichTable(title=table.title, title_justify="left")
        for column in table.columns:
            rich.add_column(column)
        for row in table.rows:
            rich.add_row(*(_cell(v) for v in row))
        tables.append(rich)
    return tables


def print_text(report: Report, console: Console) -> None:
    console.print(f"[bold]{report.title}[/bold]")
    for table in _rich_tables(report):
        console.print(table)
    if report.next_steps:
        console.print("\nNext:")
        for step in report.next_steps:
            console.print(f"  {step}", highlight=False, soft_wrap=True)


@register_renderer("text")
def render_text(report: Report) -> str:
    buffer = io.StringIO()
    print_text(report, Console(file=buffer, width=110, color_system=None))
    return buffer.getvalue()


@register_renderer("json")
def render_json(report: Report) -> str:
    return json.dumps(report.to_dict(), indent=2, sort_keys=False, default=str) + "\n"


@register_renderer("markdown")
def render_markdown(report: Report) -> str:
    lines = [f"# {report.title}", ""]
    for table in report.tables:
        lines += [f"## {table.title}", "", "| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
        lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table.rows]
        lines.append("")
    if report.next_steps:
        lines += ["## Next", "", *[f"    {step}" for step in report.next_steps], ""]
    return "\n".join(lines)


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write via a temporary file in the same directory, then rename: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; reports and models are meant to be read by others
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def emit(report: Report, fmt: str, output: Path | None = None, console: Console | None = None) -> None:
    """Write the report to `output`, or to stdout (text as a rich table on the terminal)."""
    if fmt not in RENDERERS:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(RENDERERS)}")
    if output is not None:
        write_atomic(output, RENDERERS[fmt](report))
    elif fmt == "text":
        print_text(report, console or Console())
    else:
        print(RENDERERS[fmt](report), end="")
