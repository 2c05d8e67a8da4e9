"""What ``aqexport diff`` does between parsing its flags and exiting: open, diff, gate, render.

Kept out of ``aqexport/cli.py`` so the command line stays a thin layer and the whole flow is
callable (and tested) without click. Exit status: 0 the policy passed (or none was given),
1 the policy was violated (every violation listed), 2 bad input (``AqexportError``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aqexport.errors import AqexportError

__all__ = ["DiffRequest", "describe_to", "run_diff"]


@dataclass
class DiffRequest:
    a: str
    b: str
    run: bool = False
    text: Path | None = None
    windows: int = 4
    seqlen: int = 256
    threshold_db: float = 20.0
    provider: str = "cpu"
    policy_file: Path | None = None
    policy_flags: dict[str, Any] | None = None
    output_format: str = "terminal"  # terminal | json | markdown
    output: Path | None = None
    verify: bool = True  # artifact directories checked against their manifest before reading


def run_diff(request: DiffRequest) -> int:
    from aqexport.diff import diff, open_side
    from aqexport.diff.policy import DiffPolicy, evaluate, load_policy

    policy = load_policy(request.policy_file) if request.policy_file else None
    flags = {k: v for k, v in (request.policy_flags or {}).items() if not _unset(v)}
    if flags:
        from_flags = DiffPolicy(**flags)
        policy = from_flags if policy is None else policy.merged(from_flags)
    if policy is not None and policy.needs_text() and request.text is None:
        raise AqexportError(
            "the policy sets max_ppl_increase, which needs perplexity windows", "pass --text FILE (e.g. test.txt)"
        )
    run = request.run or bool(request.text) or (policy is not None and policy.needs_run())
    start = time.perf_counter()
    if request.verify:
        from aqexport.integrity import check_artifact

        for spec in (request.a, request.b):
            if Path(spec).is_dir():
                check_artifact(Path(spec))
    side_a, side_b = open_side(request.a), open_side(request.b)
    if run and (side_a.is_description or side_b.is_description):
        raise AqexportError("--run needs two runnable models; a graph description holds no weights", "drop --run")
    report = diff(
        side_a,
        side_b,
        run=run,
        text=request.text,
        windows=request.windows,
        seqlen=request.seqlen,
        threshold_db=request.threshold_db,
        provider=request.provider,
    )
    report["seconds"] = round(time.perf_counter() - start, 3)
    if policy is not None:
        report["policy"] = evaluate(report, policy)
    _emit(report, request)
    return 1 if report["policy"] is not None and not report["policy"]["passed"] else 0


def _unset(value: Any) -> bool:
    """A flag the user did not give: None, an off switch, an empty repeatable option. Not 0:
    ``--max-ppl-increase 0`` is a limit (``0 in (False,)`` is true in Python, hence no ``in``)."""
    return value is None or value is False or (isinstance(value, (list, tuple)) and not value)


def _emit(report: dict[str, Any], request: DiffRequest) -> None:
    if request.output_format == "json":
        text = json.dumps(report, indent=2) + "\n"
    elif request.output_format == "markdown":
        from aqexport.diff.render import render_markdown

        text = render_markdown(report)
    else:
        text = None
    if text is None:
        from rich.console import Console

        from aqexport.diff.render import render_terminal

        if request.output is not None:
            with open(request.output, "w") as handle:
                render_terminal(report, Console(file=handle, width=140, force_terminal=False))
        else:
            render_terminal(report, Console())
        return
    if request.output is not None:
        _write_atomically(request.output, text)
    else:
        print(text, end="")


def describe_to(artifact: str, output: Path | None) -> None:
    """``aqexport diff --describe``: the golden description of one artifact."""
    from aqexport.diff.description import describe
    from aqexport.diff.opening import open_side

    text = json.dumps(describe(open_side(artifact)), indent=1, sort_keys=False) + "\n"
    if output is None:
        print(text, end="")
    else:
        _write_atomically(output, text)


def _write_atomically(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(text)
    staging.replace(path)
