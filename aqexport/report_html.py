"""``report.html``: one self-contained page a person reads in a browser, made from an artifact.

The page is rendered from the artifact's own files: ``report.json`` (stages, verification,
calibration summary), ``manifest.json`` (config, passes, fusions, per-linear schemes; never its
``files`` or ``not_reproducible``, which are written after the page), the graph read without its
weights (``aqexport.inspect_artifact``: op counts, initializer bytes by dtype) and, where it is
still there, the calibration plan directory (``plan.json``: per-epoch losses, per-transform
dominance margins and condition numbers, per-linear records). So ``aqexport report --regenerate``
makes the same bytes the build wrote, as long as the plan directory is where it was.

No network resource: inline CSS, plots as ``data:`` URIs of SVG (``aqexport.report_plots``), no
script, and a Content-Security-Policy that forbids loading anything else. Every text from the
artifact goes through ``html.escape``. A missing file or section is one line saying it is not
recorded in this artifact; a section that cannot be rendered says so in its place (and logs a
warning) instead of failing the build that writes the page.

The page shows wall times (stages, blocks), so the manifest declares it ``not_reproducible``
like ``report.json``; its plots are deterministic all the same (``report_plots``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from aqexport.artifact import MODEL_FILE, record_file
from aqexport.atomic_files import write_atomically
from aqexport.integrity import MANIFEST_FILE
from aqexport.report_markup import esc
from aqexport.report_sections import SECTIONS, headline

__all__ = [
    "REPORT_FILE",
    "ArtifactFacts",
    "plan_dir_of",
    "read_facts",
    "regenerate_report",
    "render_report",
    "write_report",
]

logger = logging.getLogger(__name__)

REPORT_FILE = "report.html"


@dataclass(frozen=True)
class ArtifactFacts:
    """What the page is made of; ``notes`` says why a source is missing (``report``, ``manifest``,
    ``graph``, ``plan``)."""

    report: dict[str, Any]
    manifest: dict[str, Any]
    graph: dict[str, Any] | None
    plan: dict[str, Any] | None
    notes: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# reading the artifact


def _read_json(path: Path) -> tuple[dict[str, Any], str | None]:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return {}, f"no {path.name} in the artifact"
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return {}, f"{path.name} unreadable ({type(exc).__name__})"
    if not isinstance(value, dict):
        return {}, f"{path.name} is not a JSON object"
    return value, None


def plan_dir_of(directory: Path, manifest: dict[str, Any], report: dict[str, Any]) -> Path | None:
    """Where the build's plan directory is, from the artifact alone: ``report.json`` records it
    relative to the config's folder, and the manifest records the output (this directory)
    relative to that same folder, so the folder is this directory's ancestor that many levels
    up. ``None`` when the records do not say (no calibration, an output path with ``..``)."""
    recorded = (report.get("calibration") or {}).get("plan_dir")
    output = ((manifest.get("config") or {}).get("output") or {}).get("dir")
    if not isinstance(recorded, str):
        return None
    if PurePosixPath(recorded).is_absolute():
        return Path(recorded)
    parts = PurePosixPath(output).parts if isinstance(output, str) else ()
    if not parts or ".." in parts or PurePosixPath(output).is_absolute():
        return None
    config_dir = Path(directory).resolve()
    for _ in parts:
        config_dir = config_dir.parent
    return config_dir / recorded


def _read_plan(plan_dir: Path | None, report: dict[str, Any], manifest: dict[str, Any]):
    """``plan.json`` of ``plan_dir`` if it is the plan this artifact was lowered from (same
    recipe, same source weights); else ``None`` and why."""
    if "calibration" not in report:
        return None, "this build has no calibration plan (its recipe does not calibrate)"
    if plan_dir is None:
        return None, "the plan directory's location is not recorded"
    shown = report["calibration"].get("plan_dir", plan_dir.name)
    plan, problem = _read_json(plan_dir / "plan.json")
    if problem:
        return None, f"plan directory '{shown}' not found beside the artifact ({problem})"
    recipe = report["calibration"].get("recipe")
    source = (manifest.get("source") or {}).get("sha256")
    if recipe is not None and plan.get("recipe") != recipe:
        return None, f"plan directory '{shown}' now holds a plan of another recipe: not used"
    if source is not None and (plan.get("model") or {}).get("source_sha256") != source:
        return None, f"plan directory '{shown}' now holds a plan of other weights: not used"
    return plan, None


def read_facts(directory: Path, plan_dir: Path | None = None, manifest: dict[str, Any] | None = None) -> ArtifactFacts:
    """Everything the page shows. ``plan_dir``: the calibration plan (found from the records
    when ``None``); ``manifest``: the manifest being written (read from the directory if ``None``)."""
    from aqexport.inspect_artifact import inspect_artifact

    directory = Path(directory)
    notes: dict[str, str] = {}
    report, problem = _read_json(directory / "report.json")
    if problem:
        notes["report"] = problem
    if manifest is None:
        manifest, problem = _read_json(directory / MANIFEST_FILE)
        if problem:
            notes["manifest"] = problem
    graph = None
    if (directory / MODEL_FILE).is_file():
        try:
            graph = inspect_artifact(directory)
        except Exception as exc:  # a graph onnx cannot read: the page says so
            notes["graph"] = f"{MODEL_FILE} unreadable ({type(exc).__name__}: {str(exc)[:160]})"
    else:
        notes["graph"] = f"no {MODEL_FILE} in the artifact"
    if plan_dir is None:
        plan_dir = plan_dir_of(directory, manifest, report)
    plan, problem = _read_plan(plan_dir, report, manifest)
    if problem:
        notes["plan"] = problem
    return ArtifactFacts(report, manifest, graph, plan, notes)


# ------------------------------------------------------------------------------------------------
# the page

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2433;background:#f6f7f9}
header{background:#1d2433;color:#fff;padding:18px 28px}header h1{margin:0 0 4px;font-size:22px}
header p{margin:0;color:#c9d1e0}nav{padding:8px 28px;background:#e9ecf2;position:sticky;top:0}
nav a{margin-right:14px;color:#22508f;text-decoration:none;font-size:13px}
main{padding:8px 28px 40px;max-width:1200px}
section{background:#fff;border:1px solid #dde1e8;border-radius:6px;padding:4px 18px 14px;margin:16px 0}
h2{font-size:18px;border-bottom:1px solid #e4e7ed;padding-bottom:4px}h3{font-size:15px;margin:14px 0 6px}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
th,td{border:1px solid #e0e3e9;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f0f2f6}td{font-variant-numeric:tabular-nums}
.bar{display:inline-block;height:10px;background:#4a78c2;border-radius:2px;min-width:1px}
.barcell{width:220px}.missing{color:#9a5b00;font-style:italic}.note{color:#555}
.ok{color:#1e7b34;font-weight:600}.bad{color:#b3261e;font-weight:600}
pre{background:#f3f4f7;padding:8px;white-space:pre-wrap;word-break:break-word;border-radius:4px}
img.plot{max-width:100%;display:block;margin:8px 0}summary{cursor:pointer;color:#22508f;margin:6px 0}
.error{color:#b3261e}
"""
_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def render_report(facts: ArtifactFacts) -> str:
    """The whole page (text); each section is a ``<section>`` whose ``id`` is in ``SECTIONS``."""
    parts = []
    for section_id, title, render in SECTIONS:
        try:
            body = render(facts)
        except Exception as exc:  # a record shaped unlike this renderer expects: say so, go on
            logger.warning("report.html: section %s not rendered: %r", section_id, exc)
            body = f'<p class="error">This section could not be rendered: {esc(type(exc).__name__)}: {esc(exc)}</p>'
        parts.append(f'<section id="{section_id}"><h2>{esc(title)}</h2>{body}</section>')
    nav = "".join(f'<a href="#{section_id}">{esc(title)}</a>' for section_id, title, _ in SECTIONS)
    title, subtitle = headline(facts)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{_CSS}</style></head>\n"
        f"<body><header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header>\n"
        f"<nav>{nav}</nav>\n<main>\n" + "\n".join(parts) + "\n</main></body></html>\n"
    )


def write_report(directory: Path, plan_dir: Path | None = None, manifest: dict[str, Any] | None = None) -> Path:
    """Render ``directory``'s page and write it there (atomically); the manifest is not touched."""
    directory = Path(directory)
    page = render_report(read_facts(directory, plan_dir, manifest))
    path = directory / REPORT_FILE
    write_atomically(path, page.encode("utf-8"))
    return path


def regenerate_report(directory: Path) -> Path:
    """Re-render ``directory/report.html`` from the artifact's files and record its new sha256
    and size in ``manifest.json`` (declared ``not_reproducible``, like ``report.json``), so
    ``aqexport verify`` still passes. The caller checked the other files first."""
    manifest, _ = _read_json(Path(directory) / MANIFEST_FILE)
    path = write_report(directory, manifest=manifest or None)
    if manifest:
        record_file(Path(directory), REPORT_FILE, reproducible=False)
    return path
