"""Human views of an ``aqexport diff`` report: the terminal (rich) and a pull-request comment.

Both views read only the report dict (``docs/diff-schema.md``), so what a reviewer sees is what
``--json`` holds. Both lead with a verdict and a short summary, because the question in review is
"is this change fine?", and keep the long per-node / per-linear lists behind it: capped at
``TERMINAL_ROWS`` rows in a terminal, folded into ``<details>`` in markdown and shortened until
the comment fits GitHub's 65 536-character limit. The detail tables are built once
(:func:`_sections`) and drawn by either renderer, so the two never disagree. Output is
deterministic (no times, no unordered iteration) so a CI comment only changes when the diff does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from aqexport.diff.policy import io_changes, top1_agreement

__all__ = ["MARKDOWN_LIMIT", "TERMINAL_ROWS", "render_markdown", "render_terminal"]

#: GitHub's comment limit (65 536 characters); we keep the UTF-8 size under it with a margin.
MARKDOWN_LIMIT = 65_536
_MARKDOWN_BUDGET = 60_000
#: Most rows of one detail table in the terminal.
TERMINAL_ROWS = 40
#: Row caps tried in turn until the markdown fits.
_MARKDOWN_CAPS = (200, 100, 50, 25, 10, 5)
_CELL_CHARS = 120
_UNWRAPPED_NAME = 48  # a terminal table's first column is kept on one line up to this width
_OPS_IN_SUMMARY = 6
_WORST_TENSORS = 40


@dataclass
class Section:
    """One detail table: the same rows in a terminal and in a ``<details>`` block."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# formatting


def _number(value: Any) -> float | None:
    if value is None:
        return None
    return float(value)  # "inf" strings included


def _db(value: Any) -> str:
    number = _number(value)
    if number is None:
        return "—"
    if math.isinf(number):
        return "∞" if number > 0 else "-∞"
    return f"{number:.2f}"


def _pct(fraction: Any, signed: bool = True) -> str:
    number = _number(fraction)
    if number is None:
        return "—"
    return f"{number * 100:+.2f} %" if signed else f"{number * 100:.2f} %"


def _bytes(count: Any) -> str:
    if count is None:
        return "—"
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _sci(value: Any) -> str:
    number = _number(value)
    return "—" if number is None else f"{number:.3g}"


def _op(key: str) -> str:
    """``::Add`` → ``Add``; contrib ops keep their domain."""
    return key[2:] if key.startswith("::") else key


def _cell(value: Any) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= _CELL_CHARS else text[: _CELL_CHARS - 1] + "…"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _get(report: dict[str, Any], *keys: str) -> Any:
    """``report[k1][k2]…`` where any level may be missing or None."""
    node: Any = report
    for key in keys:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


# --------------------------------------------------------------------------------------------
# verdict and summary


def _change_counts(report: dict[str, Any]) -> dict[str, int]:
    nodes = _get(report, "structure", "nodes") or {}
    inits = _get(report, "structure", "initializers") or {}
    opsets = _get(report, "structure", "opsets") or {}
    return {
        "node": sum(len(nodes.get(key) or []) for key in ("added", "removed", "changed")),
        "initializer": sum(len(inits.get(key) or []) for key in ("added", "removed", "renamed", "changed")),
        "IO": len(io_changes(report)),
        "opset": int((opsets.get("a") or {}) != (opsets.get("b") or {})),
    }


def _linears_changed(report: dict[str, Any]) -> int:
    summary = _get(report, "linears", "summary") or {}
    return sum(int(summary.get(key) or 0) for key in ("changed", "only_a", "only_b"))


def _policy_state(report: dict[str, Any]) -> str | None:
    """``"passed"`` / ``"failed"``, or None without a policy."""
    policy = report.get("policy")
    if not policy:
        return None
    return "passed" if policy.get("passed") else "failed"


def _verdict(report: dict[str, Any]) -> str:
    """One line: identical, or how many changes of which kind, then the policy's word."""
    if report.get("identical"):
        text = "identical: no difference"
    else:
        text = _difference_text(report)
    state = _policy_state(report)
    if state is not None:
        violations = len(report["policy"].get("violations") or [])
        text += " · policy PASSED" if state == "passed" else f" · policy FAILED ({_plural(violations, 'violation')})"
    return text


def _difference_text(report: dict[str, Any]) -> str:
    """``6 changes (3 nodes, 1 initializer, 2 IO); 2 linears changed``; a report that differs in
    nothing counted (the logits of one graph run on two builds) says so instead of "0 changes"."""
    counts = _change_counts(report)
    linears = _linears_changed(report)
    if not any(counts.values()) and not linears:
        return "differs at run time only (prompt logits not identical)" if report.get("run") else "differs"
    parts = [f"{count} IO" if kind == "IO" else _plural(count, kind) for kind, count in counts.items() if count]
    text = _plural(sum(counts.values()), "change") + (f" ({', '.join(parts)})" if parts else "")
    return text + (f"; {_plural(linears, 'linear')} changed" if report.get("linears") else "")


def _mark(report: dict[str, Any]) -> str:
    state = _policy_state(report)
    if state == "failed":
        return "❌"
    if state == "passed" or report.get("identical"):
        return "✅"
    return "🔍"


def _summary(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The summary table's rows (label, value); rows whose section is absent are left out."""
    rows: list[tuple[str, str]] = []
    for builder in (_summary_structure, _summary_linears, _summary_run, _summary_mobile):
        rows.extend(builder(report))
    return rows


def _summary_structure(report: dict[str, Any]) -> list[tuple[str, str]]:
    structure = report.get("structure") or {}
    rows = []
    sizes = structure.get("sizes") or {}
    if sizes:
        ratio = _number(sizes.get("ratio"))
        change = "" if ratio is None else f" (×{ratio:.3f}, {_pct(ratio - 1)})"
        rows.append(("Size", f"{_bytes(sizes.get('a_bytes'))} → {_bytes(sizes.get('b_bytes'))}{change}"))
    nodes = structure.get("nodes")
    if nodes:
        added, removed, changed = (len(nodes.get(key) or []) for key in ("added", "removed", "changed"))
        rows.append(("Nodes", f"+{added} −{removed} ~{changed} ({nodes.get('unchanged', 0)} unchanged)"))
    delta = {key: value for key, value in ((structure.get("ops") or {}).get("delta") or {}).items() if value}
    if structure.get("ops"):
        rows.append(("Ops Δ", _ops_delta_text(delta)))
    inits = structure.get("initializers")
    if inits:
        added, removed, changed = (len(inits.get(key) or []) for key in ("added", "removed", "changed"))
        renamed = f", {len(inits['renamed'])} renamed" if inits.get("renamed") else ""
        text = f"+{added} −{removed} ~{changed} ({inits.get('unchanged', 0)} unchanged{renamed})"
        rows.append(("Initializers", text))
    if structure.get("io") is not None:
        rows.append(("IO", _plural(len(io_changes(report)), "change") if io_changes(report) else "unchanged"))
    return rows


def _ops_delta_text(delta: dict[str, int]) -> str:
    if not delta:
        return "none"
    ordered = sorted(delta.items(), key=lambda item: (-abs(item[1]), item[0]))
    text = ", ".join(f"{_op(key)} {value:+d}" for key, value in ordered[:_OPS_IN_SUMMARY])
    more = len(ordered) - _OPS_IN_SUMMARY
    return text + (f", … {more} more" if more > 0 else "")


def _summary_linears(report: dict[str, Any]) -> list[tuple[str, str]]:
    summary = _get(report, "linears", "summary")
    if not summary:
        return []
    total = sum(int(summary.get(key) or 0) for key in ("changed", "unchanged", "only_a", "only_b"))
    text = f"{summary.get('changed', 0)} of {total} changed"
    if summary.get("only_a") or summary.get("only_b"):
        text += f", {summary.get('only_a', 0)} only in A, {summary.get('only_b', 0)} only in B"
    rows = [("Linears", text)]
    if summary.get("min_sqnr_db") is not None:
        where = f" ({summary['min_sqnr_linear']})" if summary.get("min_sqnr_linear") else ""
        rows.append(("Min weight SQNR", f"{_db(summary['min_sqnr_db'])} dB{where}"))
    return rows


def _summary_run(report: dict[str, Any]) -> list[tuple[str, str]]:
    run = report.get("run")
    if not run:
        return []
    rows = []
    ppl = run.get("perplexity")
    if ppl:
        over = f" over {ppl.get('windows')}×{ppl.get('seqlen')} tokens" if ppl.get("windows") else ""
        rows.append(("Perplexity", f"{ppl['a']:.4f} → {ppl['b']:.4f} ({_pct(ppl.get('change'))}){over}"))
    agreement, where = top1_agreement(run)
    rows.append(("Top-1 agreement", "not measured" if agreement is None else f"{_pct(agreement, False)} ({where})"))
    logits = run.get("logits") or {}
    if "skipped" in logits:
        rows.append(("Prompt logits", f"not compared: {logits['skipped']}"))
    elif logits:
        rows.append(("Prompt logits", f"SQNR {_db(_run_sqnr(logits))} dB, max-abs {_sci(logits.get('max_abs'))}"))
    rows.append(("First divergence", _divergence_text(run)))
    if "first_residual_divergence" in run:
        rows.append(("First divergence, residual stream", _divergence_text(run, "first_residual_divergence")))
    return rows


def _run_sqnr(metrics: dict[str, Any]) -> Any:
    """``execution``'s SQNR: null is +inf when ``identical``, else undefined."""
    if metrics.get("sqnr_db") is None and metrics.get("identical"):
        return "inf"
    return metrics.get("sqnr_db")


def _divergence_text(run: dict[str, Any], key: str = "first_divergence") -> str:
    first = run.get(key)
    threshold = run.get("threshold_db")
    if not first:
        return "none" + (f" (every compared tensor ≥ {threshold:g} dB)" if threshold is not None else "")
    module = f", {first['module']}" if first.get("module") else ""
    sqnr = "undefined" if first.get("sqnr_db") is None else f"{_db(first['sqnr_db'])} dB"
    return f"{first.get('a_node')} ({first.get('a_op')}{module}) at {sqnr}"


def _summary_mobile(report: dict[str, Any]) -> list[tuple[str, str]]:
    mobile = report.get("mobile")
    if not mobile:
        return []
    new = {ep: ops for ep, ops in (mobile.get("newly_unsupported") or {}).items() if ops}
    if not new:
        return [("Mobile EPs", "no newly unsupported ops")]
    return [("Mobile EPs", "newly unsupported: " + "; ".join(f"{ep}: {', '.join(ops)}" for ep, ops in new.items()))]


def _violations(report: dict[str, Any]) -> list[str]:
    """The violations' messages, capped like a table (a broken ``io_must_match`` may list many)."""
    messages = [item["message"] for item in _get(report, "policy", "violations") or []]
    more = len(messages) - TERMINAL_ROWS
    return messages[:TERMINAL_ROWS] + ([f"… {more} more violations"] if more > 0 else [])


# --------------------------------------------------------------------------------------------
# detail sections


def _sections(report: dict[str, Any]) -> list[Section]:
    """Every detail table that has rows, in reading order."""
    builders = (
        _section_policy,
        _section_ops,
        _section_opsets,
        _section_io,
        _section_nodes,
        _section_changed_nodes,
        _section_initializers,
        _section_renamed,
        _section_linears,
        _section_embedding,
        _section_transforms,
        _section_run,
        _section_mobile,
    )
    return [section for section in (builder(report) for builder in builders) if section is not None]


def _section_policy(report: dict[str, Any]) -> Section | None:
    policy = report.get("policy")
    if not policy:
        return None
    broken = {item["rule"] for item in policy.get("violations") or []}
    rules = policy.get("rules") or {}
    rows = [[rule, _cell(json.dumps(limit)), "FAILED" if rule in broken else "passed"] for rule, limit in rules.items()]
    return Section(f"Policy ({policy.get('source')})", ["rule", "limit", "result"], rows)


def _section_ops(report: dict[str, Any]) -> Section | None:
    ops = _get(report, "structure", "ops")
    if not ops:
        return None
    a, b = ops.get("a") or {}, ops.get("b") or {}
    keys = sorted(key for key in set(a) | set(b) if a.get(key, 0) != b.get(key, 0))
    if not keys:
        return None
    rows = [[_op(key), str(a.get(key, 0)), str(b.get(key, 0)), f"{b.get(key, 0) - a.get(key, 0):+d}"] for key in keys]
    return Section("Op histogram (rows that differ)", ["op", "A", "B", "Δ"], rows)


def _section_opsets(report: dict[str, Any]) -> Section | None:
    opsets = _get(report, "structure", "opsets") or {}
    a, b = opsets.get("a") or {}, opsets.get("b") or {}
    keys = sorted(key for key in set(a) | set(b) if a.get(key) != b.get(key))
    if not keys:
        return None
    rows = [[key or "ai.onnx", str(a.get(key, "—")), str(b.get(key, "—"))] for key in keys]
    return Section("Opsets", ["domain", "A", "B"], rows)


def _section_io(report: dict[str, Any]) -> Section | None:
    io = _get(report, "structure", "io") or {}
    rows = []
    for kind in ("inputs", "outputs"):
        section = io.get(kind) or {}
        rows += [[kind[:-1], _cell(i["name"]), "added", "—", _spec(i)] for i in section.get("added") or []]
        rows += [[kind[:-1], _cell(i["name"]), "removed", _spec(i), "—"] for i in section.get("removed") or []]
        rows += [[kind[:-1], _cell(f"{i['a']} → {i['b']}"), "renamed", "", ""] for i in section.get("renamed") or []]
        rows += [
            [kind[:-1], _cell(i["name"]), "changed", _spec(i.get("a")), _spec(i.get("b"))]
            for i in section.get("changed") or []
        ]
    return Section("Graph inputs and outputs", ["", "name", "change", "A", "B"], rows) if rows else None


def _spec(item: dict[str, Any] | None) -> str:
    if not item:
        return "—"
    return _cell(f"{item.get('dtype')} {item.get('shape')}")


def _section_nodes(report: dict[str, Any]) -> Section | None:
    nodes = _get(report, "structure", "nodes") or {}
    rows = [
        [word, _cell(n["name"]), _op(f"{n.get('domain', '')}::{n['op']}")]
        for word in ("added", "removed")
        for n in nodes.get(word) or []
    ]
    return Section("Nodes added / removed", ["", "node", "op"], rows) if rows else None


def _section_changed_nodes(report: dict[str, Any]) -> Section | None:
    changed = _get(report, "structure", "nodes", "changed") or []
    rows = [
        [_cell(n["a"]), _cell(n["b"]) if n["b"] != n["a"] else "=", n["op"], _cell("; ".join(n["changes"]))]
        for n in changed
    ]
    return Section("Nodes changed", ["A", "B", "op", "changes"], rows) if rows else None


def _section_initializers(report: dict[str, Any]) -> Section | None:
    inits = _get(report, "structure", "initializers") or {}
    rows = [[word, _cell(i["name"]), _spec(i)] for word in ("added", "removed") for i in inits.get(word) or []]
    rows += [["renamed", _cell(f"{i['a']} → {i['b']}"), "same content"] for i in inits.get("renamed") or []]
    changed = inits.get("changed") or []
    rows += [["changed", _cell(i["name"]), _cell("; ".join(i.get("changes") or []))] for i in changed]
    return Section("Initializers", ["", "name", "dtype shape / changes"], rows) if rows else None


def _section_renamed(report: dict[str, Any]) -> Section | None:
    alignment = report.get("alignment") or {}
    rows = [[_cell(r["a"]), _cell(r["b"]), r.get("op", ""), r.get("rule", "")] for r in alignment.get("renamed") or []]
    unmatched = alignment.get("unmatched") or {}
    rows += [[_cell(name), "—", "", "unmatched"] for name in unmatched.get("a") or []]
    rows += [["—", _cell(name), "", "unmatched"] for name in unmatched.get("b") or []]
    if not rows:
        return None
    by_rule = ", ".join(f"{rule} {count}" for rule, count in (alignment.get("by_rule") or {}).items())
    return Section("Renamed and unmatched nodes", ["A", "B", "op", "rule"], rows, [f"aligned by rule: {by_rule}"])


def _scheme(side: dict[str, Any] | None) -> str:
    """``matmul_nbits 4-bit g128 acc4`` from one side of a linear entry."""
    if not side:
        return "—"
    text = str(side.get("format"))
    if side.get("format") != "float" and side.get("bits"):
        text += f" {side['bits']}-bit"
    if side.get("block_size"):
        text += f" g{side['block_size']}"
    elif side.get("granularity") and side.get("format") != "float":
        text += f" {side['granularity']}"
    if side.get("accuracy_level"):
        text += f" acc{side['accuracy_level']}"
    return text + (" packed" if side.get("packed") else "")


def _arrow(a: str, b: str) -> str:
    return a if a == b else f"{a} → {b}"


def _drift(scales: dict[str, Any] | None) -> str:
    if not scales:
        return "—"
    return (
        f"max {_pct(scales.get('max_rel_change'), False)}, mean {_pct(scales.get('mean_rel_change'), False)}, "
        f"zp {_pct(scales.get('zero_points_changed'), False)}"
    )


def _outliers(delta: dict[str, Any] | None) -> str:
    if not delta:
        return "—"
    if delta.get("added") is None:
        return "dynamic"
    return f"+{len(delta['added'])} −{len(delta['removed'])}"


def _linear_row(entry: dict[str, Any]) -> list[str]:
    weights = entry.get("weights") or {}
    status = entry.get("status", "")
    return [
        _cell(entry["name"]),
        status if status != "changed" else "~",
        _arrow(_scheme(entry.get("a")), _scheme(entry.get("b"))),
        _db(weights.get("sqnr_db")) if weights else "—",
        _sci(weights.get("max_abs")) if weights else "—",
        _drift(entry.get("scales")),
        _outliers(entry.get("outliers")),
        _cell("; ".join([*(entry.get("changes") or []), *([entry["note"]] if entry.get("note") else [])])),
    ]


def _section_linears(report: dict[str, Any]) -> Section | None:
    entries = [e for e in _get(report, "linears", "linears") or [] if e.get("status") != "unchanged"]
    if not entries:
        return None
    unchanged = int(_get(report, "linears", "summary", "unchanged") or 0)
    headers = ["linear", "", "format A → B", "SQNR dB", "max-abs", "scale drift", "outliers ±", "changes"]
    notes = [f"{_plural(unchanged, 'unchanged linear')} not shown"] if unchanged else []
    return Section("Linears (B against A)", headers, [_linear_row(e) for e in entries], notes)


def _section_embedding(report: dict[str, Any]) -> Section | None:
    rows = []
    for part in ("embedding", "lm_head"):
        entry = _get(report, "linears", part) or {}
        if entry.get("name") is None:
            continue
        weights = entry.get("weights") or {}
        sqnr = _db(weights.get("sqnr_db")) if weights else "—"
        scheme = _arrow(_scheme(entry.get("a")), _scheme(entry.get("b")))
        rows.append([part, _cell(entry["name"]), scheme, str(entry.get("status")), sqnr])
    return Section("Embedding and LM head", ["", "name", "format A → B", "status", "SQNR dB"], rows) if rows else None


def _yes(flag: Any) -> str:
    return "—" if flag is None else ("yes" if flag else "no")


def _transform_row(norm: dict[str, Any]) -> list[str] | None:
    form = norm.get("form") or {}
    placement = norm.get("placement") or {}
    row = [
        _cell(norm["norm"]),
        _arrow(_yes(norm.get("a")), _yes(norm.get("b"))),
        _arrow(_yes(norm.get("explicit_a")), _yes(norm.get("explicit_b"))),
        _arrow(str(form.get("a") or "—"), str(form.get("b") or "—")),
        _arrow(str(placement.get("a") or "—"), str(placement.get("b") or "—")),
        _yes(norm.get("values_changed")),
    ]
    unchanged = all("→" not in cell for cell in row[1:5]) and not norm.get("values_changed")
    return None if unchanged else row


def _section_transforms(report: dict[str, Any]) -> Section | None:
    transforms = _get(report, "linears", "transforms") or {}
    rows = [row for row in map(_transform_row, transforms.get("folded") or []) if row is not None]
    inverse = transforms.get("affine_inverse_nodes") or {}
    rows += [["AffineInverse", "only in A", "", "", "", _cell(name)] for name in inverse.get("only_a") or []]
    rows += [["AffineInverse", "only in B", "", "", "", _cell(name)] for name in inverse.get("only_b") or []]
    if not rows:
        return None
    headers = ["norm", "folded", "explicit inverse", "form", "placement", "values changed / node"]
    notes = [f"{inverse.get('common', 0)} AffineInverse nodes in both"] if inverse.get("common") else []
    return Section("Transforms (norms that differ)", headers, rows, notes)


def _section_run(report: dict[str, Any]) -> Section | None:
    run = report.get("run")
    if not run:
        return None
    tensors = [(index, t) for index, t in enumerate(run.get("tensors") or []) if not t.get("identical")]
    worst = sorted(tensors, key=lambda it: (_sort_db(it[1].get("sqnr_db")), it[0]))[:_WORST_TENSORS]
    first = (run.get("first_divergence") or {}).get("index")
    if first is not None and all(index != first for index, _ in worst):  # always show where it starts
        worst += [(index, t) for index, t in tensors if index == first]
    rows = [
        [
            str(index) + (" ◀ first" if index == first else ""),
            _cell(t.get("node")),
            t.get("op", ""),
            _cell(t.get("module") or "—"),
            _db(t.get("sqnr_db")) if t.get("sqnr_db") is not None else "undefined",
            f"{t.get('cosine', 0):.6f}",
            _sci(t.get("max_abs")),
        ]
        for index, t in sorted(worst)
    ]
    return Section(
        "Run: lowest-SQNR intermediates (A's order)",
        ["#", "node", "op", "module", "SQNR dB", "cosine", "max-abs"],
        rows,
        _run_notes(run),
    )


def _sort_db(value: Any) -> float:
    number = _number(value)
    return -math.inf if number is None else number  # undefined sorts first: it counts as divergence


def _run_notes(run: dict[str, Any]) -> list[str]:
    inputs, coverage = run.get("inputs") or {}, run.get("coverage") or {}
    prompt = inputs.get("prompt")
    source = f"prompt {prompt!r}" if prompt is not None else str(inputs.get("token_source"))
    notes = [
        f"{source}, {inputs.get('tokens')} tokens, provider {inputs.get('provider')}",
        f"{coverage.get('compared', len(run.get('tensors') or []))} tensors compared, "
        f"{coverage.get('skipped', len(run.get('skipped') or []))} skipped; threshold {run.get('threshold_db')} dB",
    ]
    return notes + [str(note) for note in (inputs.get("notes") or []) + (coverage.get("notes") or [])]


def _ep_cell(verdict: dict[str, Any] | None) -> str:
    if not verdict:
        return "—"
    taken = verdict.get("nodes_taken", verdict.get("supported_nodes"))
    text = f"{taken}/{verdict.get('nodes')} nodes, {verdict.get('partitions')} partitions"
    return f"{verdict['verdict']}: {text}" if verdict.get("verdict") else text


def _section_mobile(report: dict[str, Any]) -> Section | None:
    mobile = report.get("mobile")
    if not mobile:
        return None
    a, b, new = mobile.get("a") or {}, mobile.get("b") or {}, mobile.get("newly_unsupported") or {}
    rows = [
        [ep, _ep_cell(a.get(ep)), _ep_cell(b.get(ep)), ", ".join(new.get(ep) or []) or "—"]
        for ep in sorted(set(a) | set(b))
    ]
    return Section("Mobile EP verdicts", ["EP", "A", "B", "newly unsupported"], rows) if rows else None


# --------------------------------------------------------------------------------------------
# terminal


def render_terminal(report: dict[str, Any], console: Console) -> None:
    """Verdict, violations, summary table, then the detail tables (``TERMINAL_ROWS`` rows each)."""
    label_a, label_b = _get(report, "a", "label") or "A", _get(report, "b", "label") or "B"
    style = {"❌": "bold red", "✅": "bold green"}.get(_mark(report), "bold yellow")
    console.print(Text(f"{_mark(report)} {_verdict(report)}", style=style))
    if report.get("identical"):
        console.print(Text(f"  {label_a} and {label_b} are identical{_identical_size(report)}", style="dim"))
    else:
        console.print(Text(f"  A: {label_a}  →  B: {label_b}", style="dim"))
    for message in _violations(report):
        console.print(Text(f"  ✗ {message}", style="red"))
    if report.get("identical"):
        return
    summary = Table(box=box.SIMPLE, show_header=False, pad_edge=False)
    summary.add_column(style="bold")
    summary.add_column()
    for label, value in _summary(report):
        summary.add_row(Text(label), Text(value))
    if summary.row_count:
        console.print(summary)
    for section in _sections(report):
        console.print(_rich_table(section))
        for note in section.notes:
            console.print(Text(f"  {note}", style="dim"))


def _rich_table(section: Section) -> Table:
    table = Table(title=section.title, title_justify="left", box=box.SIMPLE_HEAD)
    widest = max((len(row[0]) for row in section.rows[:TERMINAL_ROWS]), default=0)
    for index, header in enumerate(section.headers):
        keep = index == 0 and widest <= _UNWRAPPED_NAME  # names stay whole; the other columns wrap
        table.add_column(header, overflow="fold", no_wrap=keep)
    for row in section.rows[:TERMINAL_ROWS]:
        table.add_row(*(Text(cell) for cell in row))
    more = len(section.rows) - TERMINAL_ROWS
    if more > 0:
        table.add_row(Text(f"… {more} more", style="dim"), *([""] * (len(section.headers) - 1)))
    return table


# --------------------------------------------------------------------------------------------
# markdown


def render_markdown(report: dict[str, Any]) -> str:
    """A pull-request comment: verdict, summary table, then each detail in ``<details>``, with
    tables shortened until the comment fits GitHub's limit (the cut is noted in the comment)."""
    head = _markdown_head(report)
    if report.get("identical"):
        return head
    sections = _sections(report)
    for cap in _MARKDOWN_CAPS:
        blocks = [_markdown_section(section, cap) for section in sections]
        text = _join(head, blocks)
        if _fits(text):
            return text
    return _drop_sections(head, blocks)


def _markdown_head(report: dict[str, Any]) -> str:
    label_a, label_b = _get(report, "a", "label") or "A", _get(report, "b", "label") or "B"
    lines = [f"### {_mark(report)} aqexport diff: {_verdict(report)}", ""]
    if report.get("identical"):
        lines.append(f"`{_md(label_a)}` and `{_md(label_b)}` are identical{_identical_size(report)}.")
    else:
        lines.append(f"`{_md(label_a)}` → `{_md(label_b)}`")
    violations = _violations(report)
    if violations:
        lines += ["", "**Policy violations**", ""] + [f"- ❌ {_md(message)}" for message in violations]
    summary = [] if report.get("identical") else _summary(report)
    if summary:
        lines += ["", "| | |", "|---|---|"] + [f"| {label} | {_md(value)} |" for label, value in summary]
    return "\n".join(lines) + "\n"


def _identical_size(report: dict[str, Any]) -> str:
    size = _get(report, "structure", "sizes", "b_bytes") or _get(report, "b", "total_bytes")
    return "" if size is None else f" ({_bytes(size)})"


def _md(text: Any) -> str:
    """Table-safe markdown: pipes escaped, ``<`` neutralised (no HTML from node names), one line."""
    return _cell(text).replace("|", "\\|").replace("<", "&lt;")


def _markdown_section(section: Section, cap: int) -> str:
    shown = section.rows[:cap]
    lines = [f"<details><summary>{_md(section.title)} · {len(section.rows)}</summary>", ""]
    lines += ["| " + " | ".join(_md(h) or " " for h in section.headers) + " |"]
    lines += ["|" + "---|" * len(section.headers)]
    lines += ["| " + " | ".join(_md(cell) for cell in row) + " |" for row in shown]
    notes = [_md(note) for note in section.notes]
    if len(section.rows) > cap:
        notes.append(f"… {len(section.rows) - cap} more rows not shown (comment size limit); see `--json`")
    if notes:
        lines += [""] + [f"_{note}_  " for note in notes]
    return "\n".join(lines + ["", "</details>"])


def _join(head: str, blocks: Iterable[str]) -> str:
    return "\n".join([head, *blocks]).rstrip("\n") + "\n"


def _fits(text: str) -> bool:
    return len(text.encode("utf-8")) <= _MARKDOWN_BUDGET


def _drop_sections(head: str, blocks: list[str]) -> str:
    """Last resort: leave whole sections out from the end, saying how many."""
    kept = list(blocks)
    while kept:
        dropped = len(blocks) - len(kept)
        note = f"_… {_plural(dropped, 'detail section')} left out (comment size limit); see `--json`_"
        text = _join(head, [*kept, note] if dropped else kept)
        if _fits(text):
            return text
        kept.pop()
    return _join(head, [f"_{_plural(len(blocks), 'detail section')} left out (comment size limit); see `--json`_"])
