"""The human report of a portfolio: report.md with a variant table, and pareto.png.

Reads only a Manifest, so it needs neither torch nor the model files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from agent.portfolio import Manifest, Variant

REPORT_FILE = "report.md"
PLOT_FILE = "pareto.png"
MISSING = "–"
_MARKERS = "osD^vP*Xh<>p"


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


def quality_metric(manifest: Manifest) -> QualityMetric:
    if manifest.task == "causal-lm":
        return QualityMetric("perplexity", "perplexity (lower is better)", higher_is_better=False)
    return QualityMetric("accuracy", "accuracy", higher_is_better=True)


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


def variant_table(manifest: Manifest) -> str:
    """A Markdown table with one row per variant."""
    metric = quality_metric(manifest)
    with_structured_ms = any("structured_ms" in variant.details for variant in manifest.variants)
    header = [
        "id", "method", "parent", "density", "params", "nonzero", "MACs (M)", metric.key,
        "ONNX (KiB)", "TFLite (KiB)", "max \\|diff\\| onnx / tflite", "host p50 / p95 (ms)",
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
        ]
        if with_structured_ms:
            value = variant.details.get("structured_ms")
            row.append(f"{value:.1f}" if isinstance(value, (int, float)) else MISSING)
        rows.append(row)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _datasets(manifest: Manifest) -> str:
    names = sorted({str(v.metrics["dataset"]) for v in manifest.variants if "dataset" in v.metrics})
    return ", ".join(names) or "not recorded"


def _pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[tuple[float, float]]:
    """Points that no other point beats on both cost (x, lower is better) and quality (y)."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1] if higher_is_better else p[1])):
        if not front or (y > front[-1][1] if higher_is_better else y < front[-1][1]):
            front.append((x, y))
    return front


def _plot_panel(axes, manifest: Manifest, metric: QualityMetric, cost, xlabel: str, empty_note: str) -> None:
    methods = sorted({variant.method for variant in manifest.variants})
    points = []
    for index, method in enumerate(methods):
        placed = [
            (cost(variant), metric.value(variant), variant.id)
            for variant in manifest.variants
            if variant.method == method
        ]
        placed = [(x, y, variant_id) for x, y, variant_id in placed if x is not None and y is not None]
        if not placed:
            continue
        xs, ys, ids = zip(*placed)
        marker = _MARKERS[index % len(_MARKERS)]
        axes.scatter(xs, ys, label=method, color=f"C{index % 10}", marker=marker, s=50)
        for x, y, variant_id in zip(xs, ys, ids):
            axes.annotate(variant_id, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        points += zip(xs, ys)
    if points:
        front = _pareto_front(points, metric.higher_is_better)
        axes.plot(
            *zip(*front), linestyle="--", color="grey", linewidth=1, zorder=0, drawstyle="steps-post",
            label="Pareto front",
        )
        axes.legend(fontsize=8)
    else:
        axes.text(0.5, 0.5, empty_note, ha="center", va="center", transform=axes.transAxes, color="grey")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(metric.label)
    if metric.key == "accuracy":
        axes.yaxis.set_major_formatter(PercentFormatter(1.0))
    axes.grid(True, alpha=0.3)


def _onnx_kib(variant: Variant) -> float | None:
    entry = variant.files.get("onnx")
    return None if entry is None else entry.bytes / 1024


def write_pareto_plot(path: Path, manifest: Manifest) -> None:
    metric = quality_metric(manifest)
    figure = Figure(figsize=(12, 5), layout="constrained")
    FigureCanvasAgg(figure)
    size_axes, latency_axes = figure.subplots(1, 2)
    _plot_panel(size_axes, manifest, metric, _onnx_kib, "ONNX file size (KiB, log scale)", "no ONNX files")
    if size_axes.has_data():
        size_axes.set_xscale("log")
    _plot_panel(
        latency_axes, manifest, metric, lambda variant: variant.host_latency_ms.get("p50"),
        "host latency p50 (ms)", "no host latency measured",
    )
    figure.suptitle(f"{manifest.name}: {metric.key} against size and latency")
    figure.savefig(path, dpi=110)


def write_report(root: Path, manifest: Manifest) -> None:
    """Write root/report.md and root/pareto.png."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    write_pareto_plot(root / PLOT_FILE, manifest)
    metric = quality_metric(manifest)
    direction = "higher" if metric.higher_is_better else "lower"
    versions = ", ".join(f"{name} {version}" for name, version in sorted(manifest.exporter.items()))
    text = f"""# {manifest.name}: portfolio report

- task: {manifest.task}
- dataset: {_datasets(manifest)}
- created: {manifest.created}
- default variant: {manifest.default_variant}
- exporter: {versions or "not recorded"}

{variant_table(manifest)}
## How to read this

Each row is one variant of the same model (the default one in bold); `parent` is the variant
it was pruned from and `density` the share of weights left. `{metric.key}` is measured on the dataset above
({direction} is better). `max |diff|` is the largest difference between the exported file's
outputs and the PyTorch model's, a check that export kept the numbers. Host latencies are
measured on the machine that exported, so compare them with each other, not with a device.
In the plot, variants on the dashed Pareto front are the ones worth deploying: no other
variant is both smaller (or faster) and better.

![Pareto plot]({PLOT_FILE})
"""
    (root / REPORT_FILE).write_text(text, encoding="utf-8")
