"""``aqexport.diff.render``: the pull-request comment leads with the verdict and summary, keeps
details folded, fits GitHub's limit whatever the report's size; the terminal view shows the
verdict and the key numbers."""

from __future__ import annotations

import copy
from typing import Any

from rich.console import Console

from aqexport.diff.policy import DiffPolicy, evaluate
from aqexport.diff.render import MARKDOWN_LIMIT, render_markdown, render_terminal
from tests.diff.test_policy import changed_report


def _identical_report() -> dict[str, Any]:
    report = changed_report()
    report["identical"] = True
    report["b"] = copy.deepcopy(report["a"])
    report["b"]["label"] = "head/artifact"
    report["structure"]["nodes"] = {"added": [], "removed": [], "changed": [], "unchanged": 12}
    report["structure"]["ops"]["b"] = dict(report["structure"]["ops"]["a"])
    report["structure"]["ops"]["delta"] = {}
    report["structure"]["sizes"] = {"a_bytes": 100_000, "b_bytes": 100_000, "ratio": 1.0}
    report["structure"]["io"] = {kind: {"added": [], "removed": [], "changed": []} for kind in ("inputs", "outputs")}
    report["structure"]["initializers"] = {"added": [], "removed": [], "changed": [], "unchanged": 21}
    for entry in report["linears"]["linears"]:
        entry.update(status="unchanged", changes=[], weights={"max_abs": 0.0, "rel_error": 0.0, "sqnr_db": "inf"})
    report["linears"]["summary"].update(changed=0, unchanged=3, min_sqnr_db="inf", min_sqnr_linear=None)
    report["alignment"]["renamed"] = []
    report["run"] = None
    return report


def _failed_report() -> dict[str, Any]:
    report = changed_report()
    report["policy"] = evaluate(report, DiffPolicy(max_ppl_increase=0.01, io_must_match=True).with_source("p.yaml"))
    return report


def _huge_report() -> dict[str, Any]:
    """Thousands of rows in every list, with long names: far beyond a comment's size."""
    report = _failed_report()
    long = "/model/layers.{i}/" + "very_long_scope/" * 8 + "MatMulNBits"
    nodes = report["structure"]["nodes"]
    nodes["added"] = [{"name": long.format(i=i), "op": "MatMulNBits", "domain": "com.microsoft"} for i in range(5000)]
    nodes["removed"] = [{"name": long.format(i=i) + "_old", "op": "MatMul", "domain": ""} for i in range(5000)]
    ops = {f"com.example::Op{i}": i for i in range(3000)}
    report["structure"]["ops"]["b"].update(ops)
    report["structure"]["ops"]["delta"].update(ops)
    entry = report["linears"]["linears"][1]
    report["linears"]["linears"] = [dict(entry, name=f"model.layers.{i}.mlp.down_proj" * 3) for i in range(5000)]
    report["alignment"]["renamed"] = [
        {"a": long.format(i=i), "b": long.format(i=i) + "_b", "op": "MatMulNBits", "rule": "structure"}
        for i in range(5000)
    ]
    report["policy"]["violations"] *= 500
    return report


def test_identical_markdown_is_short() -> None:
    text = render_markdown(_identical_report())
    assert text.startswith("### ✅ aqexport diff: identical: no difference")
    assert "`base/artifact` and `head/artifact` are identical (97.7 KiB)." in text
    assert "<details>" not in text and "|" not in text
    assert len(text) < 300


def test_markdown_summary_first_then_details() -> None:
    text = render_markdown(_failed_report())
    first_line = text.splitlines()[0]
    assert first_line.startswith("### ❌ aqexport diff:") and "policy FAILED (3 violations)" in first_line
    summary = text.index("| Size | 97.7 KiB → 107.4 KiB (×1.100, +10.00 %) |")
    assert summary < text.index("<details>")
    assert "- ❌ perplexity +3.20 % > max_ppl_increase 1.00 % (20.0000 -> 20.6400)" in text
    assert "| Perplexity | 20.0000 → 20.6400 (+3.20 %) over 4×256 tokens |" in text
    assert "| Min weight SQNR | 18.25 dB (model.layers.0.mlp.down_proj) |" in text
    assert "| Top-1 agreement | 97.50 % (text) |" in text
    assert text.count("<details>") == text.count("</details>") >= 6
    for title in ("Op histogram", "Linears (B against A)", "Graph inputs and outputs", "Run: lowest-SQNR"):
        assert f"<summary>{title}" in text


def test_markdown_escapes_table_cells() -> None:
    report = changed_report()
    report["structure"]["nodes"]["added"][0]["name"] = "/a|b<script>"
    text = render_markdown(report)
    assert "/a\\|b&lt;script>" in text
    assert "<script>" not in text


def test_markdown_is_deterministic() -> None:
    assert render_markdown(_failed_report()) == render_markdown(_failed_report())


def test_huge_report_fits_a_comment() -> None:
    text = render_markdown(_huge_report())
    assert len(text.encode("utf-8")) < MARKDOWN_LIMIT
    assert text.splitlines()[0].startswith("### ❌")
    assert "more rows not shown (comment size limit)" in text
    assert "… 1460 more violations" in text
    assert text.count("<details>") == text.count("</details>")


def test_terminal_shows_verdict_and_numbers() -> None:
    console = Console(record=True, width=120)
    render_terminal(_failed_report(), console)
    out = console.export_text()
    assert "A: base/artifact  →  B: head/artifact" in out
    assert "6 changes (3 nodes, 1 initializer, 2 IO); 2 linears changed · policy FAILED (3 violations)" in out
    assert "perplexity +3.20 % > max_ppl_increase 1.00 %" in out
    for number in ("20.0000 → 20.6400 (+3.20 %)", "18.25 dB", "97.50 %", "×1.100", "12.50"):
        assert number in out
    assert "/model/layers.0/mlp/down_proj/MatMulNBits (MatMulNBits, model.layers.0.mlp.down_proj) at 12.50 dB" in out
    assert "com.microsoft::GatherBlockQuantized" in out


def test_terminal_caps_long_tables_and_keeps_brackets() -> None:
    console = Console(record=True, width=120)
    render_terminal(_huge_report(), console)
    out = console.export_text()
    assert "… 4960 more" in out
    assert "['batch', 'seq', 49152]" in out  # shapes are text, not rich markup


def test_terminal_identical() -> None:
    console = Console(record=True, width=120)
    render_terminal(_identical_report(), console)
    out = console.export_text()
    assert "identical: no difference" in out
    assert "Op histogram" not in out


def _full_report() -> dict[str, Any]:
    """The optional parts filled in: scale drift, outliers, transforms, embedding, mobile."""
    report = changed_report()
    entry = report["linears"]["linears"][1]
    entry["scales"] = {"max_rel_change": 0.5, "mean_rel_change": 0.01, "zero_points_changed": 0.25}
    entry["outliers"] = {"added": [3, 7], "removed": [1]}
    entry["b"] = dict(entry["b"], format="qdq", bits=8, block_size=32)
    report["linears"]["transforms"] = {
        "folded": [
            {"norm": "model.layers.0.input_layernorm", "a": False, "b": True, "explicit_a": True, "explicit_b": False,
             "form": {"a": "dense", "b": "diagonal"}, "placement": {"a": "explicit", "b": "folded"},
             "values_changed": None},
            {"norm": "model.layers.1.input_layernorm", "a": True, "b": True, "explicit_a": False, "explicit_b": False,
             "form": {"a": "diagonal", "b": "diagonal"}, "placement": {"a": "folded", "b": "folded"},
             "values_changed": False},
        ],
        "affine_inverse_nodes": {"only_a": ["/model/layers.0/AffineInverse/MatMul"], "only_b": [], "common": 0},
        "form": {"a": None, "b": None},
    }  # fmt: skip
    report["linears"]["embedding"] = {
        "name": "model.embed_tokens", "status": "changed", "changes": ["format float -> gather_block_quantized"],
        "a": {"format": "float"}, "b": {"format": "gather_block_quantized", "bits": 4, "block_size": 32},
        "weights": {"max_abs": 0.02, "rel_error": 0.1, "sqnr_db": 21.0}, "scales": None,
    }  # fmt: skip
    verdict = {"nodes_taken": 10, "nodes": 12, "partitions": 2, "unsupported_ops": ["ai.onnx:Gather"]}
    report["mobile"] = {
        "a": {"nnapi": verdict},
        "b": {"nnapi": dict(verdict, nodes_taken=9, unsupported_ops=["ai.onnx:Gather", "com.microsoft:X"])},
        "newly_unsupported": {"nnapi": ["com.microsoft:X"]},
    }
    return report


def test_optional_sections_render() -> None:
    text = render_markdown(_full_report())
    assert "| model.layers.0.mlp.down_proj | ~ | matmul_nbits 4-bit g128 → qdq 8-bit g32 | 18.25 |" in text
    assert "max 50.00 %, mean 1.00 %, zp 25.00 %" in text and "| +2 −1 |" in text
    assert "| model.layers.0.input_layernorm | no → yes | yes → no | dense → diagonal |" in text
    assert "model.layers.1.input_layernorm" not in text  # the same on both sides
    assert "| AffineInverse | only in A |" in text
    assert "| embedding | model.embed_tokens | float → gather_block_quantized 4-bit g32 | changed | 21.00 |" in text
    assert "| nnapi | 10/12 nodes, 2 partitions | 9/12 nodes, 2 partitions | com.microsoft:X |" in text
    assert "| Mobile EPs | newly unsupported: nnapi: com.microsoft:X |" in text
    console = Console(record=True, width=120)
    render_terminal(_full_report(), console)
    assert "Mobile EP verdicts" in console.export_text()


def test_run_only_difference_is_named() -> None:
    report = _identical_report()
    report["identical"] = False
    report["run"] = changed_report()["run"]
    first_line = render_markdown(report).splitlines()[0]
    assert first_line == "### 🔍 aqexport diff: differs at run time only (prompt logits not identical)"
