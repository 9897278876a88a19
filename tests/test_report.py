from __future__ import annotations

from pathlib import Path

from agent.portfolio import Manifest, ModelFile, TensorSpec, Variant
from exporter.report import variant_table, write_report

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


def classification_manifest() -> Manifest:
    return Manifest(
        name="digits-cnn",
        task="classification",
        inputs=[TensorSpec("x", "float32", [-1, 1, 8, 8], "NCHW")],
        outputs=[TensorSpec("logits", "float32", [-1, 10])],
        variants=[
            make_variant("dense", "dense", 1.0, {"accuracy": 0.97, "dataset": "digits", "n": 450},
                         host_latency_ms={"p50": 0.8, "p95": 1.1}),
            make_variant("imp-30", "imp-sparse", 0.3, {"accuracy": 0.95, "dataset": "digits", "n": 450},
                         host_latency_ms={"p50": 0.7, "p95": 0.9}),
            # No latency and no TFLite file: the report must cope.
            make_variant("pai-s50", "pai-structured", 0.5, {"accuracy": 0.96, "dataset": "digits", "n": 450},
                         details={"structured_ms": 41.0}),
        ],
        default_variant="dense",
    )


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
    assert (tmp_path / "pareto.png").read_bytes().startswith(PNG_MAGIC)
