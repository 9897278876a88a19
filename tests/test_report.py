from __future__ import annotations

from pathlib import Path

import pytest

from agent.portfolio import Manifest, ModelFile, TensorSpec, Variant
from exporter.report import (
    Box, cost_range_line, pareto_front, place_labels, variant_table, write_pareto_plot, write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_file(name: str, size: int) -> ModelFile:
    return ModelFile(path=f"variants/{name}", sha256="0" * 64, bytes=size, max_abs_diff=1e-6)


def make_variant(variant_id: str, method: str, density: float, metrics: dict, **extra) -> Variant:
    return Variant(
        id=variant_id,
        method=method,
        parent=None if method == "dense" else "dense",
        density=density,
        params=120_000,
        params_nonzero=int(120_000 * density),
        macs=2_400_000,
        metrics=metrics,
        files={"onnx": fake_file(f"{variant_id}.onnx", int(480_000 * density))},
        **extra,
    )


def digits_manifest(variants: list[Variant]) -> Manifest:
    return Manifest(name="digits-cnn", task="classification", inputs=[TensorSpec("x", "float32", [-1, 1, 8, 8], "NCHW")],
                    outputs=[TensorSpec("logits", "float32", [-1, 10])], variants=variants, default_variant="dense")


def classification_manifest() -> Manifest:
    return digits_manifest([
            make_variant("dense", "dense", 1.0, {"accuracy": 0.97, "dataset": "digits", "n": 450},
                         host_latency_ms={"p50": 0.8, "p95": 1.1}),
            make_variant("imp-30", "imp-sparse", 0.3, {"accuracy": 0.95, "dataset": "digits", "n": 450},
                         host_latency_ms={"p50": 0.7, "p95": 0.9}),
            # No latency and no TFLite file: the report must cope.
            make_variant("pai-s50", "pai-structured", 0.5, {"accuracy": 0.96, "dataset": "digits", "n": 450},
                         details={"structured_ms": 41.0}),
    ])


def test_write_report_writes_markdown_and_a_png(tmp_path: Path):
    manifest = classification_manifest()
    manifest.variants[0].files["tflite"] = fake_file("dense.tflite", 470_000)

    write_report(tmp_path, manifest)

    report = (tmp_path / "report.md").read_text()
    assert "digits-cnn" in report and "classification" in report and "digits" in report
    for variant in manifest.variants:
        assert variant.id in report
    assert "![" in report and "pareto.png" in report
    png = (tmp_path / "pareto.png").read_bytes()
    assert png.startswith(PNG_MAGIC)
    assert len(png) > 10_000


def test_variant_table_has_a_row_per_variant_and_the_structured_step_time():
    table = variant_table(classification_manifest())

    lines = table.strip().splitlines()
    assert len(lines) == 2 + 3
    assert "structured step (ms)" in lines[0]
    assert "41.0" in table and "97.0%" in table and "120 k" in table


def test_a_language_model_report_ranks_by_perplexity(tmp_path: Path):
    manifest = classification_manifest()
    manifest.task = "causal-lm"
    for variant, perplexity in zip(manifest.variants, [12.3, 15.9, 13.4]):
        variant.metrics = {"perplexity": perplexity, "dataset": "wikitext-2", "n": 128}

    write_report(tmp_path, manifest)

    report = (tmp_path / "report.md").read_text()
    assert "perplexity" in report and "15.90" in report
    # imp-30 is faster than dense but 29% worse in perplexity, so nothing near dense is cheaper.
    assert "No variant within 5% perplexity of `dense` (12.30) is faster than `dense`." in report
    assert (tmp_path / "pareto.png").read_bytes().startswith(PNG_MAGIC)


def timed_variant(variant_id: str, method: str, parent: str | None, accuracy: float, p50: float | None,
                  kib: float) -> Variant:
    return Variant(
        id=variant_id, method=method, parent=parent, density=1.0, params=120_000, params_nonzero=120_000,
        macs=2_400_000, metrics={"accuracy": accuracy, "dataset": "digits", "n": 450},
        files={"onnx": fake_file(f"{variant_id}.onnx", int(kib * 1024))},
        host_latency_ms={} if p50 is None else {"p50": p50, "p95": p50 * 1.3},
    )


def mixed_manifest() -> Manifest:
    """A portfolio mixing dense, IMP and PAI variants with int8 twins; latencies cluster near 0.27, 0.5 and 0.65 ms."""
    return digits_manifest([
        timed_variant("dense", "dense", None, 0.970, 1.60, 470),
        timed_variant("dense-int8", "dense+int8", "dense", 0.968, 0.52, 120),
        timed_variant("imp-s50", "imp-structured", "dense", 0.955, 0.80, 235),
        timed_variant("imp-s70", "imp-structured", "imp-s50", 0.931, 0.50, 140),
        timed_variant("imp-s50-int8", "imp-structured+int8", "imp-s50", 0.953, 0.27, 60),
        timed_variant("imp-s70-int8", "imp-structured+int8", "imp-s70", 0.925, 0.21, 36),
        timed_variant("pai-s50", "pai-structured", "dense", 0.958, 0.81, 236),
        timed_variant("pai-s70", "pai-structured", "dense", 0.944, 0.51, 141),
        timed_variant("pai-s50-int8", "pai-structured+int8", "pai-s50", 0.956, 0.28, 61),
        timed_variant("pai-s60-int8", "pai-structured+int8", "pai-s50", 0.954, 0.275, 55),
        timed_variant("imp-s60", "imp-structured", "imp-s50", 0.950, 0.65, 190),
        timed_variant("pai-s60", "pai-structured", "pai-s50", 0.951, 0.66, 189),
        timed_variant("pai-s70-int8", "pai-structured+int8", "pai-s70", 0.940, 0.22, 37),
        timed_variant("imp-u90", "imp-sparse", "dense", 0.921, 1.59, 470),
        timed_variant("imp-u90-int8", "imp-sparse+int8", "imp-u90", 0.915, None, 120),  # not timed
    ])


def table_column(table: str, column: str) -> dict[str, str]:
    """{variant id: cell} for one column of a variant table."""
    lines = table.strip().splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split(" | ")]
    rows = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[2:]]
    index = header.index(column)
    return {row[0].strip("*"): row[index] for row in rows}


def test_variant_table_gives_each_variant_its_speedup_over_dense():
    speedups = table_column(variant_table(mixed_manifest()), "vs dense")

    assert speedups["dense"] == "1.00x"
    assert speedups["imp-s50"] == "2.00x"  # 1.60 / 0.80
    assert speedups["imp-s50-int8"] == "5.93x"  # 1.60 / 0.27
    assert speedups["imp-s70-int8"] == "7.62x"  # 1.60 / 0.21
    assert speedups["imp-u90"] == "1.01x"
    assert speedups["imp-u90-int8"] == "–"  # no latency measured


def test_without_a_dense_variant_the_default_variant_is_the_reference():
    manifest = mixed_manifest()
    manifest.variants = [v for v in manifest.variants if v.method != "dense"]
    for variant in manifest.variants:
        variant.parent = None
    manifest.default_variant = "imp-s50"

    speedups = table_column(variant_table(manifest), "vs dense")

    assert speedups["imp-s50"] == "1.00x"
    assert speedups["pai-s50"] == "0.99x"  # 0.80 / 0.81: a little slower
    assert speedups["imp-s50-int8"] == "2.96x"  # 0.80 / 0.27


def test_without_a_dense_latency_there_are_no_ratios_and_no_cost_range():
    manifest = mixed_manifest()
    manifest.variants[0].host_latency_ms = {}

    speedups = table_column(variant_table(manifest), "vs dense")

    assert set(speedups.values()) == {"–"}
    assert cost_range_line(manifest) is None


def test_report_states_the_cost_range_and_the_cheapest_variant_near_dense(tmp_path: Path):
    write_report(tmp_path, mixed_manifest())

    report = (tmp_path / "report.md").read_text()
    assert "Host p50 latency ranges from 0.21 ms (`imp-s70-int8`) to 1.60 ms (`dense`), 7.62x apart." in report
    # dense-int8 (96.8%), imp-s50-int8 (95.3%) and pai-s50-int8 (95.6%) are within 2 points of 97.0%;
    # imp-s50-int8 is the fastest of them. pai-s70-int8 is faster still but 3 points worse.
    assert (
        "Cheapest variant within 2 accuracy points of `dense` (97.0%): `imp-s50-int8` (95.3%), 5.93x faster."
        in report
    )
    assert "`vs dense`" in report and "hollow markers the quantized (int8, int4) variants" in report
    assert (tmp_path / "pareto.png").read_bytes().startswith(PNG_MAGIC)


def test_the_pareto_front_is_what_nothing_beats_on_both_cost_and_quality():
    points = [(1.6, 0.97), (0.52, 0.968), (0.80, 0.955), (0.27, 0.953), (0.28, 0.956), (0.30, 0.953)]

    assert pareto_front(points, higher_is_better=True) == [3, 4, 1, 0]
    # With perplexity lower is better, so the cheapest point with the lowest value wins alone here.
    assert pareto_front(points, higher_is_better=False) == [3]


def test_pareto_plot_marks_int8_hollow_and_keeps_labels_apart(tmp_path: Path):
    manifest = mixed_manifest()

    figure = write_pareto_plot(tmp_path / "pareto.png", manifest)

    assert (tmp_path / "pareto.png").read_bytes().startswith(PNG_MAGIC)
    size_axes, latency_axes = figure.axes
    assert latency_axes.get_xscale() == "log"  # 1.60 / 0.21 ms is more than 4x
    assert size_axes.get_xscale() == "log"
    timed_int8 = sum(1 for v in manifest.variants if v.method.endswith("+int8") and v.host_latency_ms)
    hollow = [c for c in latency_axes.collections if len(c.get_facecolors()) == 0]
    assert len(hollow) == timed_int8 == 6
    legend = [text.get_text() for text in figure.legends[0].get_texts()]
    assert "quantized (hollow)" in legend and "Pareto front" in legend and "imp-structured" in legend
    assert "imp-structured+int8" not in legend  # colours are per base method
    renderer = figure.canvas.get_renderer()
    for axes in (size_axes, latency_axes):
        labels = {text.get_text(): text.get_window_extent(renderer) for text in axes.texts}
        assert len(labels) == sum(1 for v in manifest.variants if v.host_latency_ms) + (axes is size_axes)
        boxes = list(labels.values())
        for i, first in enumerate(boxes):
            assert axes.get_window_extent(renderer).contains(first.x0, first.y0)
            for second in boxes[i + 1:]:
                assert not first.overlaps(second), (first, second)


def test_a_narrow_latency_range_keeps_a_linear_axis(tmp_path: Path):
    manifest = mixed_manifest()
    manifest.variants = [v for v in manifest.variants if v.host_latency_ms and v.host_latency_ms["p50"] > 0.4]

    figure = write_pareto_plot(tmp_path / "pareto.png", manifest)

    assert figure.axes[1].get_xscale() == "linear"  # 1.60 / 0.50 ms is under 4x


def test_place_labels_keeps_clustered_labels_off_each_other_and_off_the_points():
    # Twelve points within 12 x 8 pixels, as variants with nearly equal latency and accuracy land.
    anchors = [(300 + (i % 4) * 4, 200 + (i // 4) * 4) for i in range(12)]
    sizes = [(40 + 5 * (i % 3), 12) for i in range(12)]
    bounds = Box(0, 0, 600, 400)

    boxes = place_labels(anchors, sizes, bounds, marker_radius=5)

    markers = [Box(x - 5, y - 5, x + 5, y + 5) for x, y in anchors]
    for i, box in enumerate(boxes):
        assert (box.x1 - box.x0, box.y1 - box.y0) == pytest.approx(sizes[i])
        assert bounds.x0 <= box.x0 and box.x1 <= bounds.x1 and bounds.y0 <= box.y0 and box.y1 <= bounds.y1
        assert all(box.overlap(marker) == 0 for marker in markers)
        assert all(box.overlap(other) == 0 for other in boxes[i + 1:])
        assert box.distance(*anchors[i]) < 80  # still near its point


def test_place_labels_puts_a_lone_label_beside_its_point_and_inside_the_frame():
    (beside,) = place_labels([(100, 100)], [(50, 10)], Box(0, 0, 400, 300), marker_radius=5)
    (at_edge,) = place_labels([(395, 100)], [(50, 10)], Box(0, 0, 400, 300), marker_radius=5)

    assert beside == Box(107, 95, 157, 105)  # right of the point, level with it
    assert at_edge.x1 <= 400 and at_edge.x1 < 395  # no room on the right: it goes left
