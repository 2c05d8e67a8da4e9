"""PNG plots under ``benchmarks/results/`` (issue 18), from recorded results, linked from
BENCHMARKS.md ("plots" section):

* ``peers-ppl-vs-size.png``: perplexity against artifact size, one marker shape per tool
  (aqexport, ONNX Runtime's quantizers, the genai builder), the Pareto front drawn through the
  rows no other row beats on both; from ``benchmarks/out/peers.json``;
* ``peers-ppl-vs-decode.png``: perplexity against decode tok/s, same rows;
* ``calibration-loss.png``: the shipped default's training loss per epoch of every block, from
  its plan (``plan.json``);
* ``block-output-error.png``: each block's output MSE against the float block, the shipped
  default (AffineQuant + GPTQ) beside RTN (no transforms, nearest rounding), from the two
  builds' ``report.json``;
* ``transform-health.png``: the minimum dominance margin and the condition number of every
  dense transform per block, from the default's plan.

The last three are the plots ``report.html`` draws (``aqexport.report_plots``), as PNG.

    python benchmarks/plots.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import commit_id, write_section  # noqa: E402
from _smollm2_variants import artifact_dir  # noqa: E402

from aqexport.report_plots import block_error_plot, loss_curves_plot, transform_health_plot  # noqa: E402
from aqexport.report_sections import transform_statistics  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PEERS = ROOT / "benchmarks" / "out" / "peers.json"
TOOLS = {"aqexport": ("o", "#c0392b"), "ort": ("s", "#2c3e50"), "builder": ("^", "#27ae60")}


def _tool(row_name: str) -> str:
    return row_name.split()[0]


def pareto(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names of the points no other point beats on both axes (lower x and lower y are better),
    sorted by x."""
    front = [
        name
        for name, (x, y) in points.items()
        if not any((ox <= x and oy <= y) and (ox, oy) != (x, y) for ox, oy in points.values())
    ]
    return sorted(front, key=lambda name: points[name][0])


def peer_plot(rows: dict, x_key: str, x_label: str, lower_x_better: bool) -> bytes:
    import io

    import matplotlib
    from matplotlib.figure import Figure

    runnable = {name: row for name, row in rows.items() if row.get("directory")}
    x_of = {name: (row["bytes"] / 2**20 if x_key == "bytes" else row[x_key]) for name, row in runnable.items()}
    sign = 1 if lower_x_better else -1
    points = {name: (sign * x_of[name], row["perplexity"]) for name, row in runnable.items()}
    with matplotlib.rc_context({"font.size": 8, "axes.grid": True, "grid.alpha": 0.3}):
        figure = Figure(figsize=(7.0, 4.2), layout="constrained")
        axis = figure.subplots()
        for name, row in runnable.items():
            marker, colour = TOOLS.get(_tool(name), ("x", "#7f8c8d"))
            axis.scatter(x_of[name], row["perplexity"], marker=marker, color=colour, s=36)
            axis.annotate(name, (x_of[name], row["perplexity"]), fontsize=6, xytext=(4, 3), textcoords="offset points")
        front = pareto(points)
        axis.plot([x_of[n] for n in front], [runnable[n]["perplexity"] for n in front], "--", color="#95a5a6", lw=1)
        for tool, (marker, colour) in TOOLS.items():
            axis.scatter([], [], marker=marker, color=colour, label=tool)
        axis.legend(fontsize=7)
        axis.set_xlabel(x_label)
        axis.set_ylabel("WikiText-2 test perplexity (40 × 512)")
        axis.set_title(f"SmolLM2-135M: perplexity vs {x_label} (dashed: Pareto front)")
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=120, metadata={"Software": None})
    return buffer.getvalue()


def _plan_blocks(artifact: Path) -> dict[int, dict]:
    manifest = json.loads((artifact / "report.json").read_text())
    plan_dir = Path(manifest["calibration"]["plan_dir"])
    if not plan_dir.is_absolute():  # relative to the config's folder
        plan_dir = (artifact.parent / plan_dir).resolve()
    blocks = json.loads((plan_dir / "plan.json").read_text())["blocks"]
    return {int(k): v for k, v in blocks.items()}


def _block_mse(artifact: Path) -> dict[int, float]:
    blocks = json.loads((artifact / "report.json").read_text())["calibration"]["blocks"]
    return {int(k): v["output_mse"] for k, v in blocks.items()}


def main() -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    written: list[tuple[str, str]] = []
    if PEERS.is_file():
        rows = json.loads(PEERS.read_text())["rows"]
        (RESULTS / "peers-ppl-vs-size.png").write_bytes(peer_plot(rows, "bytes", "artifact size (MiB)", True))
        (RESULTS / "peers-ppl-vs-decode.png").write_bytes(peer_plot(rows, "decode", "decode tok/s", False))
        written += [
            ("peers-ppl-vs-size.png", "perplexity against size, every peer row; the dashed line is the Pareto front"),
            ("peers-ppl-vs-decode.png", "perplexity against decode speed (2 threads, after 512 tokens)"),
        ]
    default, rtn = artifact_dir("affinequant"), artifact_dir("rtn")
    plan = _plan_blocks(default)
    curves = {block: entry["loss_curve"] for block, entry in plan.items() if entry.get("loss_curve")}
    (RESULTS / "calibration-loss.png").write_bytes(loss_curves_plot(curves, fmt="png"))
    ours, baseline = _block_mse(default), _block_mse(rtn)
    blocks = sorted(ours)
    (RESULTS / "block-output-error.png").write_bytes(
        block_error_plot(blocks, [ours[b] for b in blocks], fmt="png", baseline=("RTN", [baseline[b] for b in blocks]))
    )
    margins, conditions, _ = transform_statistics(plan)
    (RESULTS / "transform-health.png").write_bytes(transform_health_plot(margins, conditions, fmt="png"))
    written += [
        ("calibration-loss.png", "the shipped default's training loss per epoch, every block"),
        ("block-output-error.png", "output MSE per block against the float block: the default vs RTN"),
        ("transform-health.png", "minimum dominance margin and condition number of every dense transform"),
    ]
    links = "\n".join(f"- [{name}](benchmarks/results/{name}): {what}" for name, what in written)
    body = (
        "## Plots\n\n"
        f"`python benchmarks/plots.py` at {commit_id()}, from `benchmarks/out/peers.json` and the shipped default's "
        f"and RTN's builds ({default.name}, {rtn.name}).\n\n{links}"
    )
    print(write_section("plots", body))


if __name__ == "__main__":
    main()
