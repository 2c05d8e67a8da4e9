"""Shared by the benchmark scripts: replace one marked section of BENCHMARKS.md, commit id."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = "# Benchmarks\n\nEvery figure here is written by a script in `benchmarks/`; each section names its command.\n"


def commit_id() -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()


def write_section(marker: str, body: str) -> str:
    """Put ``body`` between ``<!-- marker:begin -->`` and ``<!-- marker:end -->``; return it."""
    begin, end = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    section = f"{begin}\n{body.strip()}\n{end}"
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else HEADER
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)
    return section
