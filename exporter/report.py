"""The human report of a portfolio: report.md with a variant table, and pareto.png.

Reads only a Manifest, so it needs neither torch nor the model files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, PercentFormatter

from agent.portfolio import Manifest, PortfolioError, Variant

REPORT_FILE = "report.md"
PLOT_FILE = "pareto.png"
MISSING = "–"
_MARKERS = "osD^vP*Xh<>p"
DPI = 110
LABEL_FONT_SIZE = 7
FADED = 0.3  # alpha of the points off the Pareto front
LOG_SCALE_SPREAD = 4.0  # a cost axis turns logarithmic when its largest / smallest value exceeds this
ACCURACY_TOLERANCE = 0.02  # "within 2 accuracy points of dense"
PERPLEXITY_TOLERANCE = 0.05  # "within 5% of dense's perplexity"


@dataclass
class QualityMetric:
    """What ranks variants for a task: accuracy (higher is better) or perplexity (lower is better)."""

    key: str
    label: str
    higher_is_better: bool

    def value(self, variant: Variant) -> float | None:
        value = variant.metrics.get(self.key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def format(self, value: float | None) -> str:
        if value is None:
            return MISSING
        return f"{value:.1%}" if self.key == "accuracy" else f"{value:.2f}"

    def close_to(self, value: float, reference: float) -> bool:
        """Whether value is no worse than reference by more than the tolerance the report quotes."""
        if self.higher_is_better:
            return value >= reference - ACCURACY_TOLERANCE - 1e-9
        return value <= reference * (1 + PERPLEXITY_TOLERANCE) + 1e-9

    def tolerance_text(self) -> str:
        if self.higher_is_better:
            return f"{ACCURACY_TOLERANCE * 100:g} {self.key} points"
        return f"{PERPLEXITY_TOLERANCE:.0%} {self.key}"


def quality_metric(manifest: Manifest) -> QualityMetric:
    if manifest.task == "causal-lm":
        return QualityMetric("perplexity", "perplexity (lower is better)", higher_is_better=False)
    return QualityMetric("accuracy", "accuracy", higher_is_better=True)


def base_method(method: str) -> str:
    """The method without its transforms: "imp-structured+int8" -> "imp-structured"."""
    return method.split("+")[0]


def is_quantized(variant: Variant) -> bool:
    """Quantized: an int8 twin, or an LM's int4 or int8 weight-only twin (drawn alike, hollow)."""
    return bool({"int8", "int4"} & set(variant.method.split("+")[1:]))


def reference_variant(manifest: Manifest) -> Variant | None:
    """What "vs dense" compares with: the variant whose method is `dense`, else the default variant."""
    for variant in manifest.variants:
        if variant.method == "dense":
            return variant
    try:
        return manifest.variant(manifest.default_variant)
    except PortfolioError:
        return None


def _p50(variant: Variant) -> float | None:
    value = variant.host_latency_ms.get("p50")
    return float(value) if value is not None and value > 0 else None


def speedup(variant: Variant, reference: Variant | None) -> float | None:
    """reference p50 / variant p50: 3.0 means the variant answers three times faster; None when unmeasured."""
    if reference is None or _p50(reference) is None or _p50(variant) is None:
        return None
    return _p50(reference) / _p50(variant)


def _count(value: int) -> str:
    """1234567 -> '1.23 M'; small counts stay exact."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {suffix}"
    return str(value)


def _kib(variant: Variant, fmt: str) -> str:
    entry = variant.files.get(fmt)
    return MISSING if entry is None else f"{entry.bytes / 1024:,.1f}"


def _max_diff(variant: Variant) -> str:
    parts = []
    for fmt in ("onnx", "tflite"):
        entry = variant.files.get(fmt)
        parts.append(MISSING if entry is None else f"{entry.max_abs_diff:.1e}")
    return " / ".join(parts)


def _latency(variant: Variant) -> str:
    p50 = variant.host_latency_ms.get("p50")
    p95 = variant.host_latency_ms.get("p95")
    if p50 is None and p95 is None:
        return MISSING
    return " / ".join(MISSING if value is None else f"{value:.2f}" for value in (p50, p95))


def _ratio(value: float | None) -> str:
    return MISSING if value is None else f"{value:.2f}x"


def variant_table(manifest: Manifest) -> str:
    """A Markdown table with one row per variant."""
    metric = quality_metric(manifest)
    reference = reference_variant(manifest)
    with_structured_ms = any("structured_ms" in variant.details for variant in manifest.variants)
    header = [
        "id", "method", "parent", "density", "params", "nonzero", "MACs (M)", metric.key,
        "ONNX (KiB)", "TFLite (KiB)", "max \\|diff\\| onnx / tflite", "host p50 / p95 (ms)", "vs dense",
    ]
    if with_structured_ms:
        header.append("structured step (ms)")
    rows = []
    for variant in manifest.variants:
        row = [
            f"**{variant.id}**" if variant.id == manifest.default_variant else variant.id,
            variant.method,
            variant.parent or MISSING,
            f"{variant.density:.1%}",
            _count(variant.params),
            _count(variant.params_nonzero),
            f"{variant.macs / 1e6:,.2f}",
            metric.format(metric.value(variant)),
            _kib(variant, "onnx"),
            _kib(variant, "tflite"),
            _max_diff(variant),
            _latency(variant),
            _ratio(speedup(variant, reference)),
        ]
        if with_structured_ms:
            value = variant.details.get("structured_ms")
            row.append(f"{value:.1f}" if isinstance(value, (int, float)) else MISSING)
        rows.append(row)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def cost_range_line(manifest: Manifest) -> str | None:
    """One sentence on how far apart the variants' host latencies are and what the cheapest
    near-dense variant buys; None without a measured dense (reference) variant."""
    metric = quality_metric(manifest)
    reference = reference_variant(manifest)
    if reference is None or _p50(reference) is None:
        return None
    timed = sorted((v for v in manifest.variants if _p50(v) is not None), key=_p50)
    fastest, slowest = timed[0], timed[-1]
    line = (
        f"Host p50 latency ranges from {_p50(fastest):.2f} ms (`{fastest.id}`) to {_p50(slowest):.2f} ms "
        f"(`{slowest.id}`), {_p50(slowest) / _p50(fastest):.2f}x apart."
    )
    reference_quality = metric.value(reference)
    if reference_quality is None:
        return line
    near = [v for v in timed if metric.value(v) is not None and metric.close_to(metric.value(v), reference_quality)]
    cheapest = near[0]  # the reference itself qualifies, so near is never empty
    within = f"within {metric.tolerance_text()} of `{reference.id}` ({metric.format(reference_quality)})"
    if cheapest is reference or _p50(cheapest) >= _p50(reference):
        return f"{line} No variant {within} is faster than `{reference.id}`."
    return (
        f"{line} Cheapest variant {within}: `{cheapest.id}` ({metric.format(metric.value(cheapest))}), "
        f"{speedup(cheapest, reference):.2f}x faster."
    )


def _datasets(manifest: Manifest) -> str:
    names = sorted({str(v.metrics["dataset"]) for v in manifest.variants if "dataset" in v.metrics})
    return ", ".join(names) or "not recorded"


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the points no other point beats: none is at most as costly (x, lower is better)
    and at least as good (y) while strictly better on one of the two. Sorted by cost."""

    def beats(a: tuple[float, float], b: tuple[float, float]) -> bool:
        better_or_equal = a[1] >= b[1] if higher_is_better else a[1] <= b[1]
        return a[0] <= b[0] and better_or_equal and a != b

    front = [i for i, point in enumerate(points) if not any(beats(other, point) for other in points)]
    return sorted(front, key=lambda i: points[i])


# --- label placement, in display units (pixels) ------------------------------------------------------


@dataclass(frozen=True)
class Box:
    x0: float
    y0: float
    x1: float
    y1: float

    def overlap(self, other: Box) -> float:
        """The area this box shares with other (0 when they only touch or are apart)."""
        width = min(self.x1, other.x1) - max(self.x0, other.x0)
        height = min(self.y1, other.y1) - max(self.y0, other.y0)
        return width * height if width > 0 and height > 0 else 0.0

    def distance(self, x: float, y: float) -> float:
        """From (x, y) to the nearest point of the box."""
        return math.hypot(max(self.x0 - x, 0, x - self.x1), max(self.y0 - y, 0, y - self.y1))

    @property
    def area(self) -> float:
        return (self.x1 - self.x0) * (self.y1 - self.y0)


def place_labels(
    anchors: list[tuple[float, float]],
    sizes: list[tuple[float, float]],
    bounds: Box,
    marker_radius: float = 5.0,
) -> list[Box]:
    """A box per label, near its anchor, overlapping no other label, no marker and not leaving bounds.

    Greedy, in the order given: each label takes the nearest free spot among candidates around its
    anchor (right of the point first, then left, above, below, sliding along and moving out). When none is
    free it takes the one with the least overlap, so a hopelessly crowded plot still gets every label.
    """
    markers = [Box(x - marker_radius, y - marker_radius, x + marker_radius, y + marker_radius) for x, y in anchors]
    placed: list[Box] = []
    for (x, y), (width, height) in zip(anchors, sizes):
        candidates = []
        for ring in range(12):  # ever further out, a label height at a time
            gap = marker_radius + 2 + ring * height
            for k in range(-8, 9):  # slid along the side, half a label height at a time
                cy = y + k * height / 2
                candidates.append((0, Box(x + gap, cy - height / 2, x + gap + width, cy + height / 2)))
                candidates.append((1, Box(x - gap - width, cy - height / 2, x - gap, cy + height / 2)))
            for k in range(-6, 7):  # above and below, slid a quarter label width at a time
                cx = x + k * width / 4
                candidates.append((2, Box(cx - width / 2, y + gap, cx + width / 2, y + gap + height)))
                candidates.append((3, Box(cx - width / 2, y - gap - height, cx + width / 2, y - gap)))
        # Nearest first; at equal distance level with the point, then right, left, above, below.
        candidates.sort(key=lambda c: (round(c[1].distance(x, y)), abs((c[1].y0 + c[1].y1) / 2 - y), c[0]))
        best, best_cost = None, math.inf
        for _, box in candidates:
            distance = box.distance(x, y)
            inside = Box(max(box.x0, bounds.x0), max(box.y0, bounds.y0), min(box.x1, bounds.x1), min(box.y1, bounds.y1))
            outside = box.area - (inside.area if inside.x1 > inside.x0 and inside.y1 > inside.y0 else 0)
            clash = outside + sum(box.overlap(other) for other in placed + markers)
            if clash == 0:
                best = box
                break
            if clash + distance * 1e-3 < best_cost:
                best, best_cost = box, clash + distance * 1e-3
        placed.append(best)
    return placed


# --- the plot ------------------------------------------------------------------------------------


@dataclass
class _Point:
    variant: Variant
    x: float
    y: float
    on_front: bool = False


def _style(manifest: Manifest) -> dict[str, tuple[str, str]]:
    """Colour and marker per base method, the same in both panels; dense first."""
    bases = sorted({base_method(v.method) for v in manifest.variants}, key=lambda b: (b != "dense", b))
    return {base: (f"C{i % 10}", _MARKERS[i % len(_MARKERS)]) for i, base in enumerate(bases)}


def _plot_panel(axes, manifest: Manifest, metric: QualityMetric, cost, xlabel: str, empty_note: str) -> list[_Point]:
    style = _style(manifest)
    points = [_Point(v, cost(v), metric.value(v)) for v in manifest.variants]
    points = [p for p in points if p.x is not None and p.y is not None]
    for index in pareto_front([(p.x, p.y) for p in points], metric.higher_is_better):
        points[index].on_front = True
    for point in points:
        colour, marker = style[base_method(point.variant.method)]
        alpha = 1.0 if point.on_front else FADED
        if is_quantized(point.variant):
            axes.scatter([point.x], [point.y], marker=marker, s=55, facecolors="none", edgecolors=colour,
                         linewidths=1.6, alpha=alpha, zorder=3)
        else:
            axes.scatter([point.x], [point.y], marker=marker, s=55, color=colour, alpha=alpha, zorder=3,
                         edgecolors="white" if point.on_front else "none", linewidths=0.6)
    front = sorted((p for p in points if p.on_front), key=lambda p: p.x)
    if front:
        axes.plot([p.x for p in front], [p.y for p in front], color="0.25", linewidth=1.4, zorder=2)
    else:
        axes.text(0.5, 0.5, empty_note, ha="center", va="center", transform=axes.transAxes, color="grey")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(metric.label)
    if metric.key == "accuracy":
        axes.yaxis.set_major_formatter(PercentFormatter(1.0))
    axes.grid(True, alpha=0.3)
    axes.margins(x=0.12, y=0.12)
    return points


def _log_axis(axes) -> None:
    """A logarithmic x axis with plain-number ticks at 1, 2 and 5 of each decade."""
    axes.set_xscale("log")
    axes.set_xlabel(axes.get_xlabel().replace(")", ", log scale)"))
    axes.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axes.xaxis.set_minor_formatter(NullFormatter())


def _label_points(figure: Figure, axes, points: list[_Point]) -> None:
    """Write each variant's id next to its point, where it overlaps no other label or point."""
    if not points:
        return
    renderer = figure.canvas.get_renderer()
    pad = 0.2 * LABEL_FONT_SIZE * DPI / 72  # the white box around a label, in pixels
    # Front points first (they matter most and get the nearest spots), each group top to bottom.
    order = sorted(points, key=lambda p: (not p.on_front, -p.y, p.x))
    to_pixels = axes.transData.transform
    anchors = [tuple(to_pixels((p.x, p.y))) for p in order]
    sizes = []
    for point in order:
        probe = axes.text(0, 0, point.variant.id, fontsize=LABEL_FONT_SIZE)
        extent = probe.get_window_extent(renderer)
        probe.remove()
        sizes.append((extent.width + 2 * pad, extent.height + 2 * pad))
    frame = axes.get_window_extent(renderer)
    boxes = place_labels(anchors, sizes, Box(frame.x0, frame.y0, frame.x1, frame.y1), marker_radius=6)
    to_data = axes.transData.inverted().transform
    for point, (x, y), box in zip(order, anchors, boxes):
        far = box.distance(x, y) > 8
        axes.annotate(
            point.variant.id, (point.x, point.y), xytext=tuple(to_data((box.x0 + pad, box.y0 + pad))),
            textcoords="data", ha="left", va="bottom", fontsize=LABEL_FONT_SIZE, zorder=4,
            color="black" if point.on_front else "0.45",
            bbox={"boxstyle": "square,pad=0.2", "facecolor": "white", "edgecolor": "none", "alpha": 0.8},
            arrowprops={"arrowstyle": "-", "color": "0.55", "linewidth": 0.6, "shrinkA": 0, "shrinkB": 4}
            if far else None,
        )


def _legend_handles(manifest: Manifest) -> list[Line2D]:
    handles = [
        Line2D([], [], linestyle="none", marker=marker, color=colour, markersize=7, label=base)
        for base, (colour, marker) in _style(manifest).items()
    ]
    if any(is_quantized(v) for v in manifest.variants):
        handles.append(Line2D([], [], linestyle="none", marker="o", markersize=7, markerfacecolor="none",
                              markeredgecolor="0.3", markeredgewidth=1.6, label="quantized (hollow)"))
    handles.append(Line2D([], [], color="0.25", linewidth=1.4, label="Pareto front"))
    handles.append(Line2D([], [], linestyle="none", marker="o", color="0.3", alpha=FADED, markersize=7,
                          label="off the front (faded)"))
    return handles


def _onnx_kib(variant: Variant) -> float | None:
    entry = variant.files.get("onnx")
    return None if entry is None else entry.bytes / 1024


def write_pareto_plot(path: Path, manifest: Manifest) -> Figure:
    """Quality against ONNX size and against host latency, one panel each; returns the figure."""
    metric = quality_metric(manifest)
    figure = Figure(figsize=(13, 6), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    size_axes, latency_axes = figure.subplots(1, 2)
    size_points = _plot_panel(size_axes, manifest, metric, _onnx_kib, "ONNX file size (KiB)", "no ONNX files")
    latency_points = _plot_panel(
        latency_axes, manifest, metric, _p50, "host latency p50 (ms)", "no host latency measured",
    )
    for axes, points in ((size_axes, size_points), (latency_axes, latency_points)):
        costs = [p.x for p in points]
        if costs and min(costs) > 0 and max(costs) / min(costs) > LOG_SCALE_SPREAD:
            _log_axis(axes)
    figure.legend(handles=_legend_handles(manifest), loc="outside lower center", ncols=8, fontsize=8,
                  frameon=False)
    figure.suptitle(f"{manifest.name}: {metric.key} against size and latency")
    # Lay the figure out once, then freeze it: labels are placed in pixels, so nothing may move after.
    figure.canvas.draw()
    figure.set_layout_engine("none")
    for axes, points in ((size_axes, size_points), (latency_axes, latency_points)):
        axes.set_xlim(axes.get_xlim())
        axes.set_ylim(axes.get_ylim())
        _label_points(figure, axes, points)
    figure.savefig(path, dpi=DPI)
    return figure


def write_report(root: Path, manifest: Manifest) -> None:
    """Write root/report.md and root/pareto.png."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    write_pareto_plot(root / PLOT_FILE, manifest)
    metric = quality_metric(manifest)
    direction = "higher" if metric.higher_is_better else "lower"
    versions = ", ".join(f"{name} {version}" for name, version in sorted(manifest.exporter.items()))
    reference = reference_variant(manifest)
    reference_id = reference.id if reference is not None else manifest.default_variant
    cost_range = cost_range_line(manifest)
    text = f"""# {manifest.name}: portfolio report

- task: {manifest.task}
- dataset: {_datasets(manifest)}
- created: {manifest.created}
- default variant: {manifest.default_variant}
- exporter: {versions or "not recorded"}

{variant_table(manifest)}
{cost_range + chr(10) if cost_range else ""}
## How to read this

Each row is one variant of the same model (the default one in bold); `parent` is the variant
it was pruned or quantized from and `density` the share of weights left. A method ending in
`+int8` (`+int4`) is an int8 (int4) quantized copy of its parent. `{metric.key}` is measured on the dataset above
({direction} is better). `max |diff|` is the largest difference between the exported file's
outputs and the PyTorch model's, a check that export kept the numbers. Host latencies are
measured on the machine that exported, so compare them with each other, not with a device.
`vs dense` is `{reference_id}`'s host p50 divided by the variant's: 3.00x answers three times
faster, below 1.00x slower.
In the plot, colour and marker shape give the base method and hollow markers the quantized (int8, int4) variants.
The solid line joins the Pareto front, the variants worth deploying: no other variant is both
smaller (or faster) and better. Variants off the front are faded.

![Pareto plot]({PLOT_FILE})
"""
    (root / REPORT_FILE).write_text(text, encoding="utf-8")
