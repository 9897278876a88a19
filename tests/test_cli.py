"""edgeshift-export end to end on digits, and every bad input answered with one clear line."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from agent.portfolio import Portfolio
from exporter import pipeline, writer
from exporter.cli import main
from exporter.errors import ExportError
from exporter.export import load_tflite_interpreter
from exporter.models import build_model
from exporter.selection import dominates

TRAIN_TINY = ["--model", "resnet20", "--width", "0.25", "--epochs", "1", "--rewind-iteration", "5", "--quiet"]
TINY = [*TRAIN_TINY, "--method", "dnnshifter", "--level-epochs", "1", "--quantize", "none"]


@pytest.fixture(scope="module")
def portfolio_dir(tmp_path_factory) -> Path:
    """Both classifier methods in one portfolio, with int8 twins; every variant kept, so each can be checked."""
    out = tmp_path_factory.mktemp("export") / "portfolio"
    assert main(["portfolio", "--out", str(out), *TRAIN_TINY, "--method", "dnnshifter,pai", "--level-epochs", "1",
                 "--imp-levels", "2", "--prune-fraction", "0.5", "--densities", "0.25", "--synflow-rounds", "5",
                 "--keep-dominated"]) == 0
    return out


def test_a_combined_portfolio_holds_both_methods_on_one_dense_parent(portfolio_dir):
    manifest = Portfolio.open(portfolio_dir).manifest
    by_id = {v.id: v for v in manifest.variants}

    assert manifest.exporter["method"] == "dnnshifter,reconvene"
    assert {"dense", "imp-l02-sparse", "pai-synflow-x4-structured"} <= set(by_id)
    assert by_id["imp-l02-sparse"].parent == "dense" and by_id["imp-l02-sparse"].density == pytest.approx(0.25, abs=0.01)
    assert by_id["imp-l02-sparse"].params_nonzero < by_id["dense"].params_nonzero
    assert by_id["pai-synflow-x4-structured"].params < by_id["dense"].params
    if "imp-l02-structured" in by_id:
        structured = by_id["imp-l02-structured"]
        assert structured.parent == "imp-l02-sparse" and structured.details["max_abs_diff_vs_parent"] <= 1e-4
        assert structured.params < by_id["imp-l02-sparse"].params
    else:  # nothing was empty at this depth: one variant, which says so
        assert by_id["imp-l02-sparse"].details["structured_step"] == "removed nothing"
    assert manifest.inputs[0].shape == [-1, 3, 32, 32] and manifest.labels == [str(d) for d in range(10)]
    assert (portfolio_dir / "report.md").read_text().count("imp-l02-") >= 2
    assert (portfolio_dir / "pareto.png").stat().st_size > 1000


def test_every_variant_is_a_distinct_model_timed_side_by_side(portfolio_dir):
    manifest = Portfolio.open(portfolio_dir).manifest
    digests = [v.files["onnx"].sha256 for v in manifest.variants]

    assert len(set(digests)) == len(digests)
    for variant in manifest.variants:
        assert 0 < variant.host_latency_ms["p50"] <= variant.host_latency_ms["p95"]


def test_every_float_variant_has_an_int8_twin_with_its_own_accuracy(portfolio_dir):
    manifest = Portfolio.open(portfolio_dir).manifest
    floats = [v for v in manifest.variants if not v.method.endswith("+int8")]
    twins = {v.parent: v for v in manifest.variants if v.method.endswith("+int8")}

    for float_variant in floats:
        twin = twins[float_variant.id]
        assert twin.id == f"{float_variant.id}-int8" and twin.method == f"{float_variant.method}+int8"
        assert 0 <= twin.metrics["accuracy"] <= 1 and twin.metrics["n"] == float_variant.metrics["n"]
        assert twin.files["onnx"].bytes < float_variant.files["onnx"].bytes


def test_the_agent_health_checks_every_variant_of_the_combined_portfolio(portfolio_dir, capsys):
    from agent.cli import main as agent_main

    count = len(Portfolio.open(portfolio_dir).manifest.variants)
    capsys.readouterr()
    assert agent_main(["check", str(portfolio_dir), "--threads", "1"]) == 0
    assert capsys.readouterr().out.count(" ok") == count


def test_the_portfolio_ships_labelled_evaluation_data(portfolio_dir):
    x, y = Portfolio.open(portfolio_dir).evaluation_data()

    assert x.shape[1:] == (3, 32, 32) and x.dtype == np.float32
    assert len(x) == len(y) and set(np.unique(y)) <= set(range(10))


def test_every_exported_float_file_answers_like_torch_did(portfolio_dir):
    portfolio = Portfolio.open(portfolio_dir)
    samples = portfolio.samples()
    x = samples.inputs[0]
    for variant in portfolio.manifest.variants:
        if variant.method.endswith("+int8"):
            continue
        expected = samples.expected[variant.id]
        session = ort.InferenceSession(str(portfolio.file_path(variant.id, "onnx")))
        assert np.abs(session.run(None, {"input": x})[0] - expected).max() <= 1e-4

        interpreter = load_tflite_interpreter(portfolio.file_path(variant.id, "tflite"))
        (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
        interpreter.set_tensor(inp["index"], x[:1])
        interpreter.invoke()
        assert np.abs(interpreter.get_tensor(out["index"]) - expected[:1]).max() <= 1e-4


def test_dominated_variants_are_dropped_unless_asked_for(tmp_path):
    out = tmp_path / "front"
    assert main(["portfolio", "--out", str(out), *TINY, "--imp-levels", "2", "--no-tflite", "--quantize", "int8"]) == 0
    manifest = Portfolio.open(out).manifest
    variants = manifest.variants

    assert variants[0].id == "dense"
    assert not any(dominates(a, b) for a in variants for b in variants if b.id != "dense")
    assert len({v.files["onnx"].sha256 for v in variants}) == len(variants)
    assert sorted(p.name for p in (out / "variants").iterdir()) == sorted(f"{v.id}.onnx" for v in variants)


def test_inspect_verifies_and_lists_the_variants(portfolio_dir, capsys):
    assert main(["inspect", str(portfolio_dir)]) == 0
    out = capsys.readouterr().out
    assert "imp-l02-sparse" in out and "pai-synflow-x4-structured" in out and "matching its checksum" in out


def test_inspect_refuses_a_tampered_portfolio(portfolio_dir, tmp_path, capsys):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(portfolio_dir, copy)
    with open(copy / "variants" / "dense.onnx", "ab") as f:
        f.write(b"\0")

    assert main(["inspect", str(copy)]) == 2
    assert "variants/dense.onnx" in capsys.readouterr().err


def test_train_then_build_from_the_checkpoint(tmp_path):
    checkpoint = tmp_path / "dense.pt"
    assert main(["train", "--out", str(checkpoint), *TRAIN_TINY]) == 0
    out = tmp_path / "portfolio"
    assert main(["portfolio", "--out", str(out), "--checkpoint", str(checkpoint), "--imp-levels", "1",
                 "--no-tflite", *TINY]) == 0
    manifest = Portfolio.open(out).manifest
    assert manifest.variant("dense").metrics["accuracy"] == torch.load(checkpoint, weights_only=True)["accuracy"]
    assert set(manifest.variant("dense").files) == {"onnx"}


def refused(argv: list[str], capsys) -> str:
    """Run the CLI, expect a refusal, and return its one-line message."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgeshift-export: error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize("extra, message", [
    (["--model", "resnet99"], "unknown model 'resnet99'"),
    (["--model", "nosuchpkg.models:factory"], "nosuchpkg"),
    (["--data", "/no/such/data"], "/no/such/data"),
    (["--levels", "0,5", "--imp-levels", "2"], "level 5 was not trained"),
    (["--prune-fraction", "1.5"], "--prune-fraction"),
    (["--densities", "0.5", "--method", "reconvene", "--scorer", "snap"], "unknown scorer 'snap'"),
])
def test_bad_input_is_one_clear_line_and_writes_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "portfolio"
    assert message in refused(["portfolio", "--out", str(out), *TINY, "--imp-levels", "1", *extra], capsys)
    assert list(tmp_path.iterdir()) == []


def test_data_file_in_a_wrong_format_is_refused(tmp_path, capsys):
    junk = tmp_path / "data.csv"
    junk.write_text("1,2,3\n")
    assert "data.csv" in refused(["portfolio", "--out", str(tmp_path / "p"), "--data", str(junk), *TINY], capsys)
    assert not (tmp_path / "p").exists()


def test_checkpoint_that_does_not_fit_the_model_is_refused(tmp_path, capsys):
    checkpoint = tmp_path / "wide.pt"
    torch.save(build_model("resnet20", width=0.5).state_dict(), checkpoint)
    message = refused(["portfolio", "--out", str(tmp_path / "p"), "--checkpoint", str(checkpoint), *TINY], capsys)
    assert "does not fit resnet20" in message
    assert not (tmp_path / "p").exists()


def test_non_empty_output_needs_force(tmp_path, capsys):
    out = tmp_path / "portfolio"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert "--force" in refused(["portfolio", "--out", str(out), *TINY], capsys)
    assert (out / "precious.txt").read_text() == "keep me"


def test_a_failure_half_way_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken_export(*args, **kwargs):
        raise ExportError("onnx export failed for a reason")
    monkeypatch.setattr(writer, "export_onnx", broken_export)
    out = tmp_path / "portfolio"

    with pytest.raises(ExportError):
        pipeline.build_portfolio(pipeline.PortfolioSpec(out=out, model="resnet20", width=0.25, methods=("dnnshifter",),
                                                        levels=[0], imp=pipeline.ImpConfig(levels=0), progress=False,
                                                        train=pipeline.TrainConfig(epochs=1)),
                                 log=lambda *_: None)
    assert list(tmp_path.iterdir()) == []


def test_a_variant_the_quantizer_cannot_take_keeps_its_float_form_with_a_warning(tmp_path, monkeypatch):
    from exporter.quantize import QuantizationUnsupported

    def refuse(root, parent, *args, **kwargs):
        raise QuantizationUnsupported("onnxruntime's int8 quantizer cannot handle op ConvTranspose", op="ConvTranspose")
    monkeypatch.setattr(writer, "quantize_variant", refuse)
    lines = []

    manifest = pipeline.build_portfolio(pipeline.PortfolioSpec(
        out=tmp_path / "p", model="resnet20", width=0.25, methods=("dnnshifter",), levels=[0],
        imp=pipeline.ImpConfig(levels=0), train=pipeline.TrainConfig(epochs=1), tflite=False, progress=False),
        log=lines.append)

    assert [v.id for v in manifest.variants] == ["dense"]
    assert ("warning: no int8 twin of dense, keeping the float variant only: onnxruntime's int8 quantizer "
            "cannot handle op ConvTranspose") in lines
    assert sorted(p.name for p in (tmp_path / "p" / "variants").iterdir()) == ["dense.onnx"]


def test_console_script_reports_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "exporter.cli", "portfolio", "--out", str(tmp_path / "p"),
                             "--model", "nosuch"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("edgeshift-export: error: unknown model 'nosuch'")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("methods, message", [
    ("dnnshifter,prune-it-all", "unknown method 'prune-it-all'"),
    ("pai,reconvene", "method 'reconvene' is named twice"),
    ("dnnshifter,mosaic", "mosaic prunes causal LMs and combines with no other method"),
])
def test_a_bad_method_list_is_refused_before_any_work(tmp_path, capsys, methods, message):
    with pytest.raises(SystemExit):
        main(["portfolio", "--out", str(tmp_path / "p"), "--method", methods])
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "p").exists()
