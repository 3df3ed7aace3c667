"""One report model, rendered by pluggable renderers (text, JSON, Markdown, HTML, SARIF, JUnit).

Every command builds a `Report`: a versioned JSON payload (`schema: harden.<command>/1`)
plus human tables. The JSON payload is the stable, documented contract; text and
Markdown are views of the same data. HTML, SARIF 2.1.0 and JUnit XML render any
report generically from its tables, checks, findings and images. Files are written
atomically.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import os
import tempfile
import xml.etree.ElementTree as ET
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


@dataclass(frozen=True)
class RuleText:
    """How SARIF describes a finding's rule (GitHub shows it beside every alert)."""

    short: str
    full: str
    help: str


RULES: dict[str, RuleText] = {}


def register_rule(rule_id: str, short: str, full: str, guidance: str) -> None:
    """Checks describe their rule ids here; SARIF falls back to a generic text for unknown ids."""
    RULES[rule_id] = RuleText(short, full[:1000], guidance)


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


def _command(report: Report) -> str:
    """`harden.scan/1` -> `scan`."""
    return report.schema.split("/")[0].removeprefix("harden.") or "report"


# GitHub code scanning needs a repository file for every result; a model is not one.
# A model given as a relative local path is such a file; otherwise results point at
# the policy file a CI setup is expected to keep beside the workflow (--sarif-location).
DEFAULT_SARIF_LOCATION = "harden-policy.yaml"
_SARIF_LEVELS = ("error", "warning", "note")


def sarif_location(report: Report) -> str:
    if report.sarif_location:
        return report.sarif_location
    uri = str(report.payload.get("model_uri") or "")
    if uri and ":" not in uri and not uri.startswith(("/", "~")):
        return uri
    return DEFAULT_SARIF_LOCATION


def _sarif_rule(rule_id: str, findings: list[Finding]) -> dict[str, Any]:
    text = RULES.get(rule_id) or RuleText(rule_id.rsplit(".", 1)[-1].replace("-", " "), findings[0].message, findings[0].message)
    severity = max(f.security_severity for f in findings)
    return {
        "id": rule_id,
        "name": rule_id.replace(".", "/"),
        "shortDescription": {"text": text.short},
        "fullDescription": {"text": text.full},
        "help": {"text": text.help, "markdown": text.help},
        "defaultConfiguration": {"level": _sarif_level(findings[0].level)},
        "properties": {"tags": ["security", "machine-learning", "harden"], "precision": "medium", "security-severity": f"{severity:.1f}"},
    }


def _sarif_level(level: str) -> str:
    return level if level in _SARIF_LEVELS else "warning"


@register_renderer("sarif")
def render_sarif(report: Report) -> str:
    """SARIF 2.1.0: one rule per distinct rule id, one result per finding, all at one location."""
    from harden import __version__

    model_uri = report.payload.get("model_uri")
    location = sarif_location(report)
    by_rule: dict[str, list[Finding]] = {}
    results = []
    for check in report.checks:
        seen: dict[str, int] = {}
        for finding in check.findings:
            by_rule.setdefault(finding.rule_id, []).append(finding)
            ordinal = seen[finding.rule_id] = seen.get(finding.rule_id, -1) + 1
            identity = f"{finding.rule_id}|{model_uri}|{check.name}|{ordinal}"
            message = f"{finding.message} (model: {model_uri})" if model_uri else finding.message
            results.append({
                "ruleId": finding.rule_id,
                "level": _sarif_level(finding.level),
                "message": {"text": message},
                "locations": [{"physicalLocation": {"artifactLocation": {"uri": location}, "region": {"startLine": 1}}}],
                "partialFingerprints": {"hardenFinding/v1": hashlib.sha256(identity.encode()).hexdigest()[:32]},
                "properties": {**finding.properties, "model_uri": model_uri, "check": check.name, "security-severity": f"{finding.security_severity:.1f}"},
            })
    sarif = {
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {"name": "harden", "version": __version__, "semanticVersion": __version__,
                                "rules": [_sarif_rule(rule_id, found) for rule_id, found in by_rule.items()]}},
            "automationDetails": {"id": f"harden/{_command(report)}/"},
            "invocations": [{"executionSuccessful": all(c.status != "error" for c in report.checks)}],
            "results": results,
        }],
    }
    return json.dumps(sarif, indent=2, default=str) + "\n"


@register_renderer("junit")
def render_junit(report: Report) -> str:
    """JUnit XML: one test case per check; failed -> <failure>, error -> <error>, skipped -> <skipped/>."""
    model_uri = report.payload.get("model_uri")
    counts = {status: sum(c.status == status for c in report.checks) for status in ("failed", "error", "skipped")}
    attrs = {"tests": str(len(report.checks)), "failures": str(counts["failed"]), "errors": str(counts["error"]),
             "skipped": str(counts["skipped"]), "time": f"{sum(c.duration_s for c in report.checks):.3f}"}
    suites = ET.Element("testsuites", {"name": report.title, **attrs})
    suite = ET.SubElement(suites, "testsuite", {"name": "harden", **attrs})
    if model_uri:
        ET.SubElement(ET.SubElement(suite, "properties"), "property", {"name": "model_uri", "value": str(model_uri)})
    for check in report.checks:
        name = f"{check.name}[{model_uri}]" if model_uri else check.name
        case = ET.SubElement(suite, "testcase", {"classname": f"harden.{_command(report)}", "name": name, "time": f"{check.duration_s:.3f}"})
        body = "\n".join(f"[{f.level}] {f.rule_id}: {f.message}" for f in check.findings) or check.message
        if check.status == "failed":
            kind = check.findings[0].rule_id if check.findings else "CheckFailed"
            ET.SubElement(case, "failure", {"message": check.message, "type": kind}).text = body
        elif check.status == "error":
            ET.SubElement(case, "error", {"message": check.message, "type": "CheckError"}).text = body
        elif check.status == "skipped":
            ET.SubElement(case, "skipped", {"message": check.message})
        elif check.findings:
            ET.SubElement(case, "system-out").text = body
    ET.indent(suites)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"


_HTML_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:70rem;color:#222;padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0}th,td{border:1px solid #ddd;padding:.25rem .6rem;text-align:left}
th{background:#f4f4f4}.status{font-weight:600;padding:.1rem .4rem;border-radius:.2rem}
.passed{background:#dcfce7}.failed{background:#fee2e2}.error{background:#fde68a}.skipped{background:#e5e7eb}
.level-error{color:#b91c1c}.level-warning{color:#b45309}.level-note{color:#1d4ed8}
figure{display:inline-block;margin:.5rem}figure img{image-rendering:pixelated;width:160px;border:1px solid #ccc}
pre{background:#f6f8fa;padding:.5rem;overflow-x:auto}
"""


def _html_table(columns: list[str], rows: list[list[Any]], title: str = "") -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{esc(_cell(v))}</td>" for v in row) + "</tr>" for row in rows)
    caption = f"<h2>{esc(title)}</h2>" if title else ""
    return f"{caption}<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


@register_renderer("html")
def render_html(report: Report) -> str:
    """One self-contained page: inline CSS, images as data URIs, every string escaped."""
    esc = html.escape
    summary = [[k, v] for k, v in report.payload.items() if v is None or isinstance(v, (str, int, float, bool))]
    parts = [f"<h1>{esc(report.title)}</h1>", _html_table(["field", "value"], summary, "Summary") if summary else ""]
    parts += [_html_table(t.columns, t.rows, t.title) for t in report.tables]
    if report.checks:
        rows = "".join(
            f"<tr><td>{esc(c.name)}</td><td><span class=\"status {esc(c.status)}\">{esc(c.status)}</span></td>"
            f"<td>{c.duration_s:.2f}</td><td>{esc(c.message)}</td></tr>" for c in report.checks)
        parts.append(f"<h2>Checks</h2><table><thead><tr><th>check</th><th>status</th><th>seconds</th><th>message</th></tr></thead><tbody>{rows}</tbody></table>")
    if report.findings:
        items = "".join(
            f"<li><span class=\"level-{esc(f.level)}\">{esc(f.level)}</span> <code>{esc(f.rule_id)}</code> "
            f"(severity {f.security_severity:.1f}): {esc(f.message)}</li>" for f in report.findings)
        parts.append(f"<h2>Findings</h2><ul>{items}</ul>")
    if report.images:
        figures = "".join(
            f"<figure><img alt=\"{esc(i.title)}\" src=\"data:image/png;base64,{base64.b64encode(i.png).decode('ascii')}\">"
            f"<figcaption>{esc(i.title)}</figcaption></figure>" for i in report.images)
        parts.append(f"<h2>Images</h2>{figures}")
    if report.next_steps:
        parts.append("<h2>Next</h2><pre>" + esc("\n".join(report.next_steps)) + "</pre>")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(report.title)}</title>"
            f"<style>{_HTML_STYLE}</style></head><body>\n" + "\n".join(p for p in parts if p) + "\n</body></html>\n")


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
