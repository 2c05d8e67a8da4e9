"""The sections of ``report.html`` (``aqexport.report_html``), one function each.

Each takes the ``ArtifactFacts`` and returns the section's body; ``SECTIONS`` orders them and
gives each its stable ``id`` (what the page's tests look for). A record the artifact lacks is
one ``missing`` line, never a guess.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

from aqexport.report_markup import Markup, bar, details, esc, image, missing, note, num, table
from aqexport.report_plots import block_error_plot, loss_curves_plot, transform_health_plot

__all__ = ["SECTIONS", "headline"]

#: Tables longer than this are folded into a ``<details>``.
_FOLD_ROWS = 16


def _get(value: Any, *keys: str) -> Any:
    """``value[k1][k2]...``, ``None`` where any level is missing or not a dict."""
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _fold(summary: str, headers: list[str], rows: list[list[Any]]) -> str:
    body = table(headers, rows)
    return details(summary, body) if len(rows) > _FOLD_ROWS else body


def _verdict(value: Any) -> Markup:
    if value is None:
        return Markup("—")
    return Markup(f'<span class="{"ok" if value else "bad"}">{"yes" if value else "no"}</span>')


def headline(facts) -> tuple[str, str]:
    source = _get(facts.manifest, "source", "location") or "unknown model"
    if _get(facts.manifest, "source", "kind") != "hub":
        source = PurePosixPath(str(source)).name or source  # a local folder: its name
    quant = facts.report.get("quantization") or _get(facts.manifest, "quantization") or {}
    recipe = " ".join(str(v) for v in (quant.get("recipe"), quant.get("preset")) if v)
    title = f"aqexport build report: {source}" + (f" ({recipe})" if recipe else "")
    bits = [
        _get(facts.manifest, "source", "architecture"),
        quant.get("weight_format"),
        f"{facts.report['model_bytes'] / 2**20:.1f} MiB" if isinstance(facts.report.get("model_bytes"), int) else None,
        f"aqexport {facts.manifest['aqexport_version']}" if facts.manifest.get("aqexport_version") else None,
    ]
    return title, " · ".join(str(b) for b in bits if b)


# ------------------------------------------------------------------------------------------------


def summary(facts) -> str:
    manifest, report = facts.manifest, facts.report
    quant = report.get("quantization") or manifest.get("quantization") or {}
    source = manifest.get("source") or {}
    versions = manifest.get("versions") or {}
    rows = [
        ["source", f"{source.get('kind', '—')}: {source.get('location', '—')}"],
        ["architecture", source.get("architecture")],
        ["recipe", " ".join(str(quant[k]) for k in ("recipe", "preset") if quant.get(k)) or None],
        ["rounding", quant.get("rounding")],
        ["LM head / embedding", f"{quant.get('lm_head', '—')} / {quant.get('embedding', '—')}"],
        ["weight format", quant.get("weight_format")],
        ["MatMulNBits accuracy_level", quant.get("accuracy_level")],
        ["target profile", _get(manifest, "config", "target", "profile")],
        ["KV cache", _get(manifest, "kv_cache", "contract")],
        ["model bytes", report.get("model_bytes")],
        ["aqexport", manifest.get("aqexport_version")],
        ["torch / onnxruntime", f"{versions.get('torch', '—')} / {versions.get('onnxruntime', '—')}"],
    ]
    body = table(None, rows)
    gaps = "".join(note(text) for _, text in sorted(facts.notes.items()))
    return body + gaps


def stages(facts) -> str:
    timings = facts.report.get("timings")
    if not isinstance(timings, dict) or not timings:
        return missing("stage times")
    peaks = _get(facts.report, "memory", "peak_rss_mib") or {}
    largest = max((v for v in timings.values() if isinstance(v, int | float)), default=0)
    rows = [[name, seconds, bar(seconds, largest), peaks.get(name)] for name, seconds in timings.items()]
    rows.append(["total", round(sum(v for v in timings.values() if isinstance(v, int | float)), 3), "", None])
    body = table(["stage", "seconds", "", "peak RSS after it (MiB)"], rows)
    if peaks:
        body += note(_get(facts.report, "memory", "measure") or "the process's peak resident set size")
        budget = _get(facts.report, "memory", "budget")
        if isinstance(budget, dict) and "mib" in budget:
            body += note(f"memory budget {budget['mib']} MiB ({budget.get('from', 'build.max_memory')})")
    else:
        body += missing("peak memory")
    extra = [
        ("graph export", facts.report.get("export_seconds")),
        ("calibration", _get(facts.report, "calibration", "calibration_seconds")),
        ("LM head Hessian", _get(facts.report, "calibration", "lm_head", "hessian_seconds")),
    ]
    extra = [[name, seconds] for name, seconds in extra if seconds is not None]
    if extra:
        body += "<h3>Inside the stages</h3>" + table(["step", "seconds"], extra)
    return body


_RUNGS = {
    "exported_fp_vs_eager": "exported float graph vs PyTorch eager",
    "folded_fp_vs_eager": "graph with the transforms folded (float) vs PyTorch eager",
    "folded_fp_vs_exported_fp": "folded float graph vs exported float graph",
}


def _parity_row(label: str, record: Any) -> list[Any]:
    if not isinstance(record, dict):
        return [label, Markup(esc(record)), None, None]
    return [label, record.get("max_abs"), record.get("max_rel"), record.get("top1_agreement")]


def parity_ladder(facts) -> str:
    ladder = facts.report.get("parity_ladder")
    verification = facts.report.get("verification") or {}
    reference = "PyTorch fake-quant model" if "calibration" in facts.report else "PyTorch model"
    rows = []
    if isinstance(ladder, dict):
        rows += [_parity_row(_RUNGS.get(key, key), value) for key, value in ladder.items() if key != "prompt_tokens"]
    parity = verification.get("logits_parity") or {}
    for key, label in (("prefill", "prefill"), ("decode_step", "one cached decode step")):
        if key in parity:
            rows.append(_parity_row(f"artifact on ONNX Runtime vs {reference}: {label}", parity[key]))
    body = table(["rung", "max |Δ logit|", "max relative", "top-1 agreement"], rows) if rows else ""
    if not isinstance(ladder, dict):
        body += missing("float rungs (exported and folded float graphs)")
    elif ladder.get("prompt_tokens") is not None:
        body += note(f"float rungs: prefill logits of the {ladder['prompt_tokens']}-token evaluation prompt")
    if "skipped" in verification:
        body += note(f"verification skipped: {verification['skipped']}")
    elif not parity:
        body += missing("logits parity of the artifact")
    return body


def checks(facts) -> str:
    verification = facts.report.get("verification") or {}
    return _perplexity(facts, verification) + _accuracy_level(verification) + _greedy(verification)


def _perplexity(facts, verification: dict[str, Any]) -> str:
    section = verification.get("perplexity")
    fp = _get(facts.report, "calibration", "fp_perplexity")
    body = "<h3>Perplexity</h3>"
    if not isinstance(section, dict):
        return body + missing("perplexity (evaluation.text null, or verification skipped)")
    rows = []
    if fp is not None:
        rows.append(["float model (PyTorch)", fp, None, None, None])
    for key, label in (("pytorch", "PyTorch reference"), ("onnx", "artifact (ONNX Runtime)")):
        if isinstance(section.get(key), dict):
            run = section[key]
            shape = f"{run.get('windows', '—')} × {run.get('seqlen', '—')}"
            rows.append([label, run.get("perplexity"), run.get("mean_nll"), run.get("tokens"), shape])
    body += table(["model", "perplexity", "mean NLL", "tokens", "windows × seqlen"], rows)
    if section.get("relative_difference") is not None:
        body += note(f"artifact vs PyTorch reference: relative difference {num(section['relative_difference'])}")
    body += note(f"text: {section.get('text', '—')}; tokenizer: {section.get('tokenizer', '—')}")
    return body


def _accuracy_level(verification: dict[str, Any]) -> str:
    record = verification.get("accuracy_level")
    if not isinstance(record, dict):
        return ""
    rows = [[t.get("level"), t.get("perplexity"), t.get("vs_fake_quant")] for t in record.get("trials", [])]
    body = "<h3>MatMulNBits accuracy_level</h3>"
    if rows:
        body += table(["level", "perplexity", "vs fake-quant"], rows)
    body += note(
        f"chosen {num(record.get('chosen'))} (tolerance {num(record.get('tolerance'))}); "
        + (record.get("reason") or f"reference: {record.get('reference', '—')}")
    )
    return body


def _printable(text: str) -> str:
    """Control characters (bar newline and tab) shown as ``\\xNN``."""
    return "".join(c if c in "\n\t" or ord(c) >= 32 else f"\\x{ord(c):02x}" for c in text)


def _greedy(verification: dict[str, Any]) -> str:
    body = "<h3>Greedy text</h3>"
    greedy = verification.get("greedy")
    if not isinstance(greedy, dict):
        body += missing("greedy generation (evaluation.generate_tokens 0, or verification skipped)")
    else:
        body += table(
            ["prompt", "tokens", "identical to PyTorch", "first divergence", "prefill tok/s", "decode tok/s"],
            [
                [
                    verification.get("prompt"),
                    greedy.get("tokens"),
                    _verdict(greedy.get("identical_to_pytorch")),
                    greedy.get("first_divergence"),
                    greedy.get("prefill_tokens_per_second"),
                    greedy.get("decode_tokens_per_second"),
                ]
            ],
        )
        body += f"<pre>{esc(_printable(str(greedy.get('text', ''))))}</pre>"
    ort_format = verification.get("ort_format")
    if isinstance(ort_format, dict):
        xnnpack = ort_format.get("xnnpack") or {}
        body += "<h3>model.ort</h3>" + table(
            ["bytes", "loads on", "greedy identical to model.onnx", "XNNPACK"],
            [
                [
                    ort_format.get("bytes"),
                    ", ".join(ort_format.get("loads_on", [])),
                    _verdict(ort_format.get("greedy_identical_to_onnx")),
                    xnnpack.get("skipped") or _verdict(xnnpack.get("greedy_identical_to_onnx")),
                ]
            ],
        )
    return body


def _plan_blocks(facts) -> dict[int, dict[str, Any]]:
    blocks = (facts.plan or {}).get("blocks") or {}
    return {int(k): v for k, v in blocks.items() if isinstance(v, dict) and str(k).isdigit()}


def calibration(facts) -> str:
    record = facts.report.get("calibration")
    if not isinstance(record, dict):
        return missing("calibration (this build's recipe does not calibrate)")
    recipe = record.get("recipe") or {}
    weight = recipe.get("weight") or {}
    body = table(
        ["method", "weights", "epochs", "rounding", "windows", "Hessian tokens", "resumed from block"],
        [
            [
                recipe.get("method"),
                f"{weight.get('bits', '—')}-bit, group {weight.get('group_size', '—')}, "
                + ("symmetric" if weight.get("symmetric") else "asymmetric"),
                recipe.get("epochs"),
                _get(recipe, "rounding", "name"),
                f"{record.get('samples', '—')} × {record.get('seqlen', '—')}",
                record.get("hessian_tokens"),
                record.get("resumed_from_block"),
            ]
        ],
    )
    reported = {int(k): v for k, v in (record.get("blocks") or {}).items() if str(k).isdigit() and isinstance(v, dict)}
    planned = _plan_blocks(facts)
    if reported:
        blocks = sorted(reported)
        body += image(
            block_error_plot(blocks, [reported[b].get("output_mse") for b in blocks]),
            "output MSE of each calibrated block",
        )
    else:
        body += missing("per-block output error")
    curves = {b: v["loss_curve"] for b, v in planned.items() if v.get("loss_curve")}
    if curves:
        body += image(loss_curves_plot(curves), "training loss per epoch of each block")
    elif facts.plan is not None:
        body += note("per-epoch losses: none in the plan (this recipe does not train)")
    else:
        body += missing(f"per-epoch losses ({facts.notes.get('plan', 'no plan')})")
    rows = []
    for block in sorted(reported.keys() | planned.keys()):
        losses = planned.get(block, {}).get("loss_curve") or []
        rows.append(
            [
                block,
                reported.get(block, {}).get("output_mse"),
                reported.get(block, {}).get("seconds"),
                losses[0] if losses else None,
                losses[-1] if losses else None,
            ]
        )
    if rows:
        body += _fold(
            f"per-block table ({len(rows)} blocks)",
            ["block", "output MSE", "seconds", "first-epoch loss", "last-epoch loss"],
            rows,
        )
    return body


def transform_statistics(
    plan_blocks: dict[int, dict[str, Any]],
) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, float]], list[list[Any]]]:
    """Per transform name, its minimum dominance margin and condition number by block, and one
    table row per (block, transform), from the plan's ``matrix_reports``."""
    margins: dict[str, dict[int, float]] = {}
    conditions: dict[str, dict[int, float]] = {}
    rows = []
    for block, plan in sorted(plan_blocks.items()):
        for name, matrix in sorted((plan.get("matrix_reports") or {}).items()):
            if isinstance(matrix, dict):
                margins.setdefault(name, {})[block] = matrix.get("min_dominance_margin")
                conditions.setdefault(name, {})[block] = matrix.get("condition_number")
                rows.append(
                    [
                        block,
                        name,
                        matrix.get("min_dominance_margin"),
                        matrix.get("condition_number"),
                        matrix.get("inverse_error"),
                    ]
                )
    return margins, conditions, rows


def transforms(facts) -> str:
    record = facts.report.get("calibration") or {}
    body = ""
    health = [
        ("min dominance margin", record.get("min_dominance_margin")),
        ("max condition number", record.get("max_condition_number")),
        ("max inverse error", record.get("max_inverse_error")),
    ]
    if any(v is not None for _, v in health):
        body += "<h3>Over all transforms</h3>" + table(None, [list(pair) for pair in health])
    else:
        body += missing("dominance margins and condition numbers")
    margins, conditions, rows = transform_statistics(_plan_blocks(facts))
    if rows:
        body += image(transform_health_plot(margins, conditions), "dominance margin and condition number per block")
        body += _fold(
            f"per-transform table ({len(rows)} transforms)",
            ["block", "transform", "min dominance margin", "condition number", "inverse error"],
            rows,
        )
    elif "calibration" in facts.report:
        body += missing(f"per-transform statistics ({facts.notes.get('plan', 'the plan has none')})")
    body += _run_time_cost(facts.report.get("transforms"))
    return body


def _run_time_cost(record: Any) -> str:
    if not isinstance(record, dict):
        return ""
    cost = record.get("run_time_cost") or {}
    per = record.get("per_transform") or {}
    forms = Counter(f"{v.get('form')} at {v.get('placement')}" for v in per.values() if isinstance(v, dict))
    body = "<h3>Norm-side transforms in the graph</h3>" + table(
        ["explicit at run time", "FLOPs per token", "bytes per token"],
        [[cost.get("transforms"), cost.get("flops_per_token"), cost.get("bytes_per_token")]],
    )
    if forms:
        body += table(["form and placement", "transforms"], [[k, v] for k, v in sorted(forms.items())])
    return body


def _scheme(weight: Any) -> str:
    if not isinstance(weight, dict):
        return "—"
    group = weight.get("group_size")
    kind = "symmetric" if weight.get("symmetric") else "asymmetric"
    return f"int{weight.get('bits', '?')} " + (f"g{group} " if group else "per channel ") + kind


def linears(facts) -> str:
    schemes = _get(facts.manifest, "quantization", "linears")
    if not isinstance(schemes, dict) or not schemes:
        return missing("per-linear quantization (a float build, or no manifest)")
    integer = set((facts.report.get("quantization") or {}).get("integer_activation_linears") or [])
    blocks_path = (facts.plan or {}).get("blocks_path")
    planned = {
        f"{blocks_path}.{index}.{name}": entry
        for index, block in _plan_blocks(facts).items()
        for name, entry in (block.get("linears") or {}).items()
    }
    errors = _get(facts.report, "calibration", "linear_errors", "linears") or {}
    rows = []
    for path, entry in schemes.items():
        plan = planned.get(path) or {}
        activation = entry.get("activation")
        error = errors.get(path) or {}
        rows.append(
            [
                path,
                entry.get("role", "decoder"),
                _scheme(entry.get("weight")),
                "float"
                if not activation
                else f"int{activation.get('bits')} ({'static' if activation.get('static') else 'dynamic'})",
                "int8 per block (accuracy_level)" if path in integer else "float",
                entry.get("input_transform"),
                _get(plan, "outlier", "channels"),
                _get(plan, "stats", "tokens"),
                error.get("plan"),
                error.get("rtn"),
            ]
        )
    counts = Counter(f"{row[1]}: {row[2]}" for row in rows)
    body = table(["role and weight scheme", "linears"], [[k, v] for k, v in sorted(counts.items())])
    body += _output_errors(errors)
    body += _fold(
        f"every linear ({len(rows)})",
        [
            "linear",
            "role",
            "weight",
            "activations (plan)",
            "input at run time",
            "input transform",
            "outlier channels",
            "statistics tokens",
            "output error (plan)",
            "output error (RTN, no transform)",
        ],
        rows,
    )
    return body


def _output_errors(errors: dict[str, Any]) -> str:
    """Relative output error per linear (``aqexport.calibrate.linear_error``), summarised: the
    plan's codes on the transformed input, beside plain RTN of the original weight on the raw one."""
    pairs = [(e["plan"], e["rtn"]) for e in errors.values() if isinstance(e, dict) and e.get("rtn")]
    if not pairs:
        return missing("per-linear quantization error (measured with the parity ladder, without LLM.int8 splits)")
    ratios = sorted(plan / rtn for plan, rtn in pairs)
    worst = max(errors.items(), key=lambda item: item[1]["plan"])
    tokens = next(iter(errors.values())).get("tokens")
    body = note(
        f"relative output error ‖x (W − Ŵ)ᵀ‖ / ‖x Wᵀ‖ per decoder linear on {tokens} calibration tokens: the "
        "plan's codes on the input the quantized model feeds them (after the transform), beside round-to-nearest "
        "of the untransformed weight in the same scheme on the input before the transform"
    )
    body += table(
        ["linears", "plan below RTN", "median plan / RTN", "range plan / RTN", "largest plan error"],
        [
            [
                len(pairs),
                sum(ratio < 1 for ratio in ratios),
                f"{ratios[len(ratios) // 2]:.3f}",
                f"{ratios[0]:.3f} – {ratios[-1]:.3f}",
                f"{worst[0]}: {worst[1]['plan']:.4f}",
            ]
        ],
    )
    return body


def graph(facts) -> str:
    summary = facts.graph
    if summary is None:
        return missing(f"the graph ({facts.notes.get('graph', 'not read')})")
    ops = summary.get("ops") or {}
    contrib = [[op, count] for op, count in ops.items() if "::" in op]
    body = table(
        ["nodes", "initializers", "inputs", "outputs", "opsets"],
        [
            [
                summary.get("nodes"),
                summary.get("initializers"),
                len(summary.get("inputs", [])),
                len(summary.get("outputs", [])),
                ", ".join(f"{k} {v}" for k, v in sorted((summary.get("opset") or {}).items())),
            ]
        ],
    )
    body += "<h3>Fused and contrib ops</h3>"
    body += table(["op", "count"], contrib) if contrib else note("no contrib (fused) ops: the graph is plain ONNX")
    body += _fusions(facts.manifest.get("fusions"))
    body += "<h3>Op types</h3>" + _fold(f"all {len(ops)} op types", ["op", "count"], [[k, v] for k, v in ops.items()])
    body += _passes(facts.manifest)
    return body


def _fusions(record: Any) -> str:
    if not isinstance(record, dict) or not record:
        return missing("fusions (target.fuse off, or no manifest)")
    rows = [[f"rewrite rule {k}", v] for k, v in sorted((record.get("onnxscript") or {}).items())]
    for key, label in (
        ("group_query_attention_layers", "layers with GroupQueryAttention"),
        ("rotary_embedding_layers", "layers with RotaryEmbedding"),
        ("packed_matmul_nbits", "packed MatMulNBits groups"),
    ):
        if isinstance(record.get(key), list):
            rows.append([label, len(record[key])])
    unfused = record.get("attention_left_unfused")
    rows.append(["attention left unfused", ", ".join(map(str, unfused)) if unfused else "none"])
    return "<h3>Fusions</h3>" + table(["fusion", "applied"], rows)


def _passes(manifest: dict[str, Any]) -> str:
    passes = manifest.get("passes")
    if not isinstance(passes, list) or not passes:
        return missing("lowering passes")
    seconds = _get(manifest, "not_reproducible", "pass_seconds") or []
    rows = []
    for index, record in enumerate(passes):
        timing = seconds[index].get("seconds") if index < len(seconds) and isinstance(seconds[index], dict) else None
        rows.append(
            [record.get("pass"), record.get("modified"), record.get("nodes_before"), record.get("nodes_after"), timing]
        )
    return "<h3>Lowering passes</h3>" + _fold(
        f"{len(rows)} passes", ["pass", "modified", "nodes before", "nodes after", "seconds"], rows
    )


def sizes(facts) -> str:
    body = ""
    by_dtype = (facts.graph or {}).get("weight_bytes_by_dtype")
    if isinstance(by_dtype, dict) and by_dtype:
        total = sum(by_dtype.values())
        rows = [
            [
                dtype,
                size,
                f"{size / total:.1%}" if total else None,
                bar(size, total),
            ]
            for dtype, size in sorted(by_dtype.items(), key=lambda item: -item[1])
        ]
        rows.append(["total", total, None, ""])
        body += "<h3>Initializers by dtype</h3>" + table(["dtype", "bytes", "share", ""], rows)
        body += note("packed int4 and int8 codes are stored as UINT8 (MatMulNBits, GatherBlockQuantized)")
    else:
        body += missing(f"initializer sizes ({facts.notes.get('graph', 'no graph')})")
    files = facts.report.get("model_files")
    if isinstance(files, dict) and files:
        body += "<h3>Model files</h3>" + table(["file", "bytes"], [[k, v] for k, v in files.items()])
    return body


def mobile(facts) -> str:
    record = facts.report.get("mobile")
    if not isinstance(record, dict):
        profile = _get(facts.manifest, "config", "target", "profile")
        return note(f"not a mobile build (target profile {profile or '—'}): no execution provider verdicts")
    body = note(f"contract: {record.get('contract', '—')}") + note(f"onnxruntime-genai: {record.get('genai', '—')}")
    eps = record.get("execution_providers") or {}
    rows = [
        [
            name,
            ep.get("verdict"),
            f"{num(ep.get('supported_nodes'))} / {num(ep.get('nodes'))}",
            ep.get("fraction"),
            ep.get("partitions"),
            ", ".join(ep.get("unsupported_ops") or []) or "none",
        ]
        for name, ep in eps.items()
        if isinstance(ep, dict) and "verdict" in ep
    ]
    operators = record.get("operator_config")
    if isinstance(operators, dict):  # the CPU-EP int4 mobile artifact: no EP verdicts to give
        body += note(f"ORT format: {record.get('ort_format', '—')}")
        body += note(f"accuracy_level: {record.get('accuracy_level', '—')}")
        body += note(f"reduced build: {record.get('reduced_build', '—')}")
        listed = operators.get("operators") or []
        body += f"<h3>{esc(operators.get('file', 'operator config'))}: {len(listed)} operators</h3>"
        body += table(["operator"], [[name] for name in listed])
    elif rows:
        body += table(
            ["execution provider", "verdict", "supported nodes", "fraction", "partitions", "unsupported ops"], rows
        )
    else:
        body += missing("execution provider verdicts")
    qnn = eps.get("qnn")
    if isinstance(qnn, dict):
        body += note(
            "QNN: "
            + str(qnn.get("how") or qnn.get("reason") or "—")
            + (f"; {qnn['error']}" if qnn.get("error") else "")
        )
    xnnpack = eps.get("xnnpack")
    if isinstance(xnnpack, dict):
        body += note(
            "XNNPACK: "
            + ("offered" if xnnpack.get("available") else "not offered")
            + " by the onnxruntime that built this artifact"
        )
    return body


SECTIONS: tuple[tuple[str, str, Callable[..., str]], ...] = (
    ("summary", "Summary", summary),
    ("stages", "Build stages", stages),
    ("parity-ladder", "Parity ladder", parity_ladder),
    ("checks", "Perplexity and greedy text", checks),
    ("calibration", "Per-block calibration", calibration),
    ("transforms", "Transform statistics", transforms),
    ("linears", "Per-linear quantization", linears),
    ("graph", "Graph: fused ops and op types", graph),
    ("sizes", "Sizes by dtype", sizes),
    ("mobile", "Mobile execution providers", mobile),
)
