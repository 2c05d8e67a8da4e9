"""The build report's plots: matplotlib figures as ``data:image/svg+xml`` URIs, the same bytes
for the same data.

Figures are made with ``matplotlib.figure.Figure`` directly (no ``pyplot``), so no GUI backend
is chosen and a caller's own matplotlib state is left alone; the SVG writer needs none. Each plot
is deterministic: ``svg.hashsalt`` is fixed (per plot, so ids never depend on a random salt),
the ``Date`` metadata is dropped and text stays text (``svg.fonttype: none``). The whole
``<metadata>`` element (the creator's web address) is cut, so a page holds no web address that
a reader could take for a resource. An image URI isolates the SVG's element ids from the page's.
"""

from __future__ import annotations

import base64
import io
import math
import re
from collections.abc import Callable, Mapping, Sequence

__all__ = ["block_error_plot", "loss_curves_plot", "transform_health_plot"]

_METADATA = re.compile(r"\s*<metadata>.*?</metadata>", re.DOTALL)
_RC = {"svg.fonttype": "none", "font.size": 9, "axes.grid": True, "grid.alpha": 0.3}
_WIDTH, _HEIGHT = 6.4, 3.0


def _render(name: str, draw: Callable[..., None], columns: int = 1, fmt: str = "svg") -> str | bytes:
    """Draw on a new figure of ``columns`` axes (``draw(*axes)``) and return its SVG as a
    ``data:`` URI (``name`` salts its element ids), or with ``fmt="png"`` the PNG's bytes (the
    benchmark plots under ``benchmarks/results/``)."""
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context({**_RC, "svg.hashsalt": f"aqexport-report-{name}"}):
        figure = Figure(figsize=(_WIDTH * (1 if columns == 1 else 1.4), _HEIGHT), layout="constrained")
        draw(*figure.subplots(1, columns, squeeze=False)[0])
        if fmt == "png":
            png = io.BytesIO()
            figure.savefig(png, format="png", dpi=120, metadata={"Software": None})
            return png.getvalue()
        buffer = io.StringIO()
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    svg = _METADATA.sub("", buffer.getvalue())
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode("ascii")


def _integer_ticks(axis, label: str) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_xlabel(label)


def _positive(values: Sequence[float]) -> bool:
    return bool(values) and all(v is not None and math.isfinite(v) and v > 0 for v in values)


def block_error_plot(
    blocks: Sequence[int], mse: Sequence[float], fmt: str = "svg", baseline: tuple[str, Sequence[float]] | None = None
) -> str | bytes:
    """Output MSE of each calibrated block against the float block's output; ``baseline``: a
    (label, MSE per block) series drawn beside it (the benchmark's RTN build)."""

    def draw(axis) -> None:
        axis.plot(blocks, mse, marker="o", markersize=3, color="#c0392b", label="this build")
        if baseline is not None:
            axis.plot(blocks, baseline[1], marker="s", markersize=3, color="#7f8c8d", label=baseline[0])
            axis.legend(fontsize=7)
        if _positive([*mse, *(baseline[1] if baseline else [])]):
            axis.set_yscale("log")
        _integer_ticks(axis, "decoder block")
        axis.set_ylabel("output MSE vs float")
        axis.set_title("Calibrated block output error")

    return _render("block-error", draw, fmt=fmt)


def loss_curves_plot(curves: Mapping[int, Sequence[float]], fmt: str = "svg") -> str | bytes:
    """Each block's training loss per epoch, coloured from the first block (dark) to the last."""

    def draw(axis) -> None:
        import matplotlib

        colours = matplotlib.colormaps["viridis"]
        last = max(len(curves) - 1, 1)
        for rank, (block, losses) in enumerate(sorted(curves.items())):
            axis.plot(
                range(1, len(losses) + 1), losses, color=colours(0.9 * rank / last), linewidth=1, label=str(block)
            )
        if _positive([v for losses in curves.values() for v in losses]):
            axis.set_yscale("log")
        _integer_ticks(axis, "epoch")
        axis.set_ylabel("training loss")
        axis.set_title(f"Calibration loss per epoch, {len(curves)} blocks (dark: first, light: last)")
        if len(curves) <= 8:
            axis.legend(title="block", fontsize=7)

    return _render("loss-curves", draw, fmt=fmt)


def transform_health_plot(
    margins: Mapping[str, Mapping[int, float]], conditions: Mapping[str, Mapping[int, float]], fmt: str = "svg"
) -> str | bytes:
    """Per block and transform: the minimum dominance margin and the condition number."""

    def draw(*axes) -> None:
        for axis, series, label in zip(
            axes, (margins, conditions), ("min dominance margin", "condition number"), strict=True
        ):
            for name, by_block in sorted(series.items()):
                blocks = sorted(by_block)
                axis.plot(blocks, [by_block[b] for b in blocks], marker="o", markersize=3, linewidth=1, label=name)
            _integer_ticks(axis, "decoder block")
            axis.set_ylabel(label)
            axis.set_title(label.capitalize() + " of each transform")
        axes[0].legend(fontsize=7)

    return _render("transform-health", draw, columns=2, fmt=fmt)
