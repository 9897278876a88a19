from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from agent.backends import BackendError, Session, available_backends, get_backend, known_backends, tflite
from agent.backends.tflite import TfliteBackend
from agent.cli import main
from agent.portfolio import Portfolio

# ai-edge-litert has no Python 3.8 wheels: there (the agent-only run, .ci/agent_py38) the agent reports
# TFLite unavailable and only its TFLite tests skip. On 3.10+ TFLite must be here.
OLD_PYTHON = sys.version_info < (3, 10)
needs_tflite = pytest.mark.skipif(OLD_PYTHON and "tflite" not in available_backends(),
                                  reason="no TFLite runtime for this Python (ai-edge-litert needs 3.10+)")
BACKENDS = ["onnxruntime", pytest.param("tflite", marks=needs_tflite)]
REPO_ROOT = Path(__file__).resolve().parent.parent


def open_variant(portfolio: Portfolio, backend_name: str, variant_id: str, threads: int | None = None) -> Session:
    """What the agent does: open a variant's file for this backend, telling it the manifest's layout."""
    backend = get_backend(backend_name)
    model_file = portfolio.manifest.variant(variant_id).files[backend.file_format]
    return backend.open(
        portfolio.file_path(variant_id, backend.file_format),
        variant_id,
        threads=threads,
        manifest_layout=portfolio.manifest.inputs[0].layout,
        file_input_shape=model_file.input_shape,
    )


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_every_variant_answers_like_the_samples_at_batch_1_and_8(small_portfolio, backend_name):
    portfolio = Portfolio.open(small_portfolio)
    samples = portfolio.samples()
    x = samples.inputs[0]
    assert len(x) == 8
    for variant in portfolio.manifest.variants:
        expected = samples.expected[variant.id]
        file_format = get_backend(backend_name).file_format
        # An int8 TFLite file answers like the int8 ONNX reference within what the exporter measured.
        atol = max(1e-4, 10 * variant.files[file_format].max_abs_diff)
        with open_variant(portfolio, backend_name, variant.id) as session:
            for rows in (slice(0, 1), slice(0, 8), slice(0, 1), slice(3, 8), slice(0, 8)):  # batch sizes change
                [logits] = session.run([x[rows]])
                np.testing.assert_allclose(logits, expected[rows], atol=atol, rtol=0)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_one_session_answers_8_threads_at_once(small_portfolio, backend_name):
    portfolio = Portfolio.open(small_portfolio)
    samples = portfolio.samples()
    x, expected = samples.inputs[0], samples.expected["dense"]
    right_answers: list[int] = []

    def client(number: int) -> None:
        rows = slice(number, number + 1) if number % 2 else slice(0, 8)  # batches of 1 and of 8 interleave
        for _ in range(10):
            [logits] = session.run([x[rows]])
            if np.allclose(logits, expected[rows], atol=1e-4, rtol=0):
                right_answers.append(number)

    with open_variant(portfolio, backend_name, "dense", threads=1) as session:
        threads = [threading.Thread(target=client, args=(number,)) for number in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(right_answers) == 8 * 10


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("damage", ["truncated", "random bytes", "empty"])
def test_a_corrupt_file_is_a_backend_error_naming_it(small_portfolio, tmp_path, backend_name, damage):
    backend = get_backend(backend_name)
    original = Portfolio.open(small_portfolio).file_path("dense", backend.file_format)
    corrupt = tmp_path / original.name
    data = original.read_bytes()
    damaged = {
        "truncated": data[: len(data) // 2],
        "random bytes": np.random.default_rng(0).bytes(len(data)),
        "empty": b"",
    }[damage]
    corrupt.write_bytes(damaged)
    with pytest.raises(BackendError, match=re.escape(str(corrupt))):
        backend.open(corrupt, "dense", threads=1)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_a_missing_file_is_a_backend_error_naming_it(tmp_path, backend_name):
    missing = tmp_path / "nowhere.model"
    with pytest.raises(BackendError, match=re.escape(str(missing))):
        get_backend(backend_name).open(missing, "dense")


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_wrong_inputs_and_closed_sessions_are_backend_errors(small_portfolio, backend_name):
    portfolio = Portfolio.open(small_portfolio)
    session = open_variant(portfolio, backend_name, "dense", threads=1)
    with pytest.raises(BackendError, match="dense"):
        session.run([np.zeros((1, 3, 16, 16), np.float32)])
    with pytest.raises(BackendError, match="input"):
        session.run([])
    session.close()
    with pytest.raises(BackendError, match="closed"):
        session.run([np.zeros((1, 3, 32, 32), np.float32)])


def test_unknown_backend_lists_the_known_ones():
    with pytest.raises(BackendError, match="known backends: onnxruntime, tflite"):
        get_backend("nope")


def test_a_known_backend_that_is_not_installed_names_the_package(monkeypatch):
    monkeypatch.setattr(TfliteBackend, "available", staticmethod(lambda: False))
    with pytest.raises(BackendError, match="pip install ai-edge-litert"):
        get_backend("tflite")
    assert "tflite" not in available_backends()
    assert "tflite" in known_backends()


def test_both_backends_are_available_here():
    if OLD_PYTHON and "tflite" not in available_backends():
        assert available_backends() == ["onnxruntime"]
        with pytest.raises(BackendError, match="pip install ai-edge-litert"):  # unavailable, and says so
            get_backend("tflite")
        pytest.skip("no TFLite runtime for this Python (ai-edge-litert needs 3.10+): onnxruntime only")
    assert available_backends() == ["onnxruntime", "tflite"]
    assert get_backend("onnxruntime").file_format == "onnx"
    assert get_backend("tflite").file_format == "tflite"


# ---------------------------------------------------------------- tflite-runtime in place of ai-edge-litert

# What tflite-runtime 2.14 (built against numpy 1) does under numpy 2: imports, then fails on every model.
FAILS_ON_EVERY_MODEL = """
import sys

class Interpreter:
    def __init__(self, model_path=None, num_threads=None):
        print("AttributeError: _ARRAY_API not found", file=sys.stderr)
        raise ImportError("numpy.core.multiarray failed to import")
"""
FAILS_TO_IMPORT = 'raise AttributeError("_ARRAY_API not found")\n'


@pytest.fixture
def only_tflite_runtime(tmp_path, monkeypatch):
    """No ai-edge-litert; install(version, source) puts a tflite_runtime package of that interpreter.py on the path."""

    def install(version: str, interpreter_source: str) -> None:
        package = tmp_path / "site-packages" / "tflite_runtime"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text(f"__version__ = {version!r}\n")
        (package / "interpreter.py").write_text(interpreter_source)
        monkeypatch.syspath_prepend(str(package.parent))

    monkeypatch.setitem(sys.modules, "ai_edge_litert", None)
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    tflite._runtime.cache_clear()
    yield install
    for name in ("tflite_runtime", "tflite_runtime.interpreter"):
        sys.modules.pop(name, None)
    tflite._runtime.cache_clear()


@pytest.mark.parametrize("interpreter_source", [FAILS_ON_EVERY_MODEL, FAILS_TO_IMPORT], ids=["imports", "no-import"])
def test_tflite_runtime_under_numpy_2_is_unavailable_and_says_how_to_fix_it(
    only_tflite_runtime, monkeypatch, interpreter_source, small_portfolio, capsys
):
    only_tflite_runtime("2.14.0", interpreter_source)
    monkeypatch.setattr(np, "__version__", "2.2.6")

    assert not TfliteBackend.available()
    assert available_backends() == ["onnxruntime"]
    with pytest.raises(BackendError, match=re.escape('pip install "numpy<2", or pip install ai-edge-litert')):
        get_backend("tflite")

    assert main(["check", str(small_portfolio), "--backend", "tflite"]) == 2
    err = capsys.readouterr().err.strip()
    assert "backend 'tflite' cannot run on this machine: tflite_runtime" in err and "numpy<2" in err
    assert "\n" not in err


def test_tflite_runtime_under_numpy_1_is_the_fallback(only_tflite_runtime, monkeypatch):
    only_tflite_runtime("2.14.0", FAILS_ON_EVERY_MODEL)
    monkeypatch.setattr(np, "__version__", "1.26.4")

    assert TfliteBackend.available()
    assert tflite._runtime().interpreter_class.__module__ == "tflite_runtime.interpreter"


def test_a_tflite_runtime_failing_on_numpy_anyway_names_the_fix_at_load(only_tflite_runtime, monkeypatch, tmp_path):
    only_tflite_runtime("2.20.0.dev20250409", FAILS_ON_EVERY_MODEL)  # a build that should take numpy 2, yet does not
    monkeypatch.setattr(np, "__version__", "2.2.6")

    assert TfliteBackend.available()
    with pytest.raises(BackendError, match=re.escape('model.tflite: the TFLite runtime needs numpy<2 (numpy.core.')):
        get_backend("tflite").open(tmp_path / "model.tflite", "dense")


@needs_tflite
def test_tflite_rejects_a_file_whose_input_shape_differs_from_the_manifest(small_portfolio):
    path = Portfolio.open(small_portfolio).file_path("dense", "tflite")
    with pytest.raises(BackendError, match=r"\[1, 3, 64, 64\]"):
        get_backend("tflite").open(path, "dense", file_input_shape=[1, 3, 64, 64])


def test_importing_backends_does_not_import_torch_or_a_runtime():
    check = (
        "import agent.backends, sys; "
        "agent.backends.known_backends(); "
        "assert 'torch' not in sys.modules; "
        "assert 'onnxruntime' not in sys.modules and 'ai_edge_litert' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", check], cwd=REPO_ROOT, check=True)


# ---------------------------------------------------------------- TFLite files unlike the exporter's


@pytest.fixture(scope="module")
def tiny_tflite_models(tmp_path_factory):
    """Two tiny TFLite files with their torch models: one taking NHWC input, one with batch 1 baked in."""
    torch = pytest.importorskip("torch")
    litert_torch = pytest.importorskip("litert_torch")

    class ChannelsLast(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x.permute(0, 3, 1, 2)).mean((2, 3))

    class BatchOfOne(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(3 * 8 * 8, 5)

        def forward(self, x):
            return self.linear(x.reshape(1, -1))

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_tflite")
    models = {}
    for name, model, example in [
        ("nhwc", ChannelsLast().eval(), torch.randn(1, 8, 8, 3)),
        ("batch-of-one", BatchOfOne().eval(), torch.randn(1, 3, 8, 8)),
    ]:
        path = folder / f"{name}.tflite"
        litert_torch.convert(model, (example,)).export(str(path))
        models[name] = (path, model)
    return models


def test_tflite_transposes_nchw_inputs_for_a_file_taking_nhwc(tiny_tflite_models):
    import torch

    path, model = tiny_tflite_models["nhwc"]
    x_nchw = np.random.default_rng(1).standard_normal((5, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x_nchw.transpose(0, 2, 3, 1))).numpy()
    with get_backend("tflite").open(path, "nhwc", manifest_layout="NCHW", file_input_shape=[1, 8, 8, 3]) as session:
        [out] = session.run([x_nchw])
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)


def test_tflite_runs_sample_by_sample_when_a_file_cannot_take_a_bigger_batch(tiny_tflite_models):
    import torch

    path, model = tiny_tflite_models["batch-of-one"]
    x = np.random.default_rng(2).standard_normal((4, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = np.concatenate([model(torch.from_numpy(sample[None])).numpy() for sample in x])
    with get_backend("tflite").open(path, "batch-of-one", manifest_layout="NCHW") as session:
        for batch in (x, x[:1], x):
            [out] = session.run([batch])
            np.testing.assert_allclose(out, expected[: len(batch)], atol=1e-5, rtol=0)


def test_onnxruntime_threads_that_spin_within_a_run_sleep_once_it_returns(small_portfolio):
    """Spinning keeps a run of many parallel sections fast (no wake-up at each); spinning on after it
    would burn a core between requests (onnxruntime's default spins on for tens of milliseconds)."""
    from agent.backends.onnx import OnnxRuntimeBackend

    def cpu_used_in_half_a_second() -> float:  # by every thread of this process
        started = time.process_time()
        time.sleep(0.5)
        return time.process_time() - started

    portfolio = Portfolio.open(small_portfolio)
    x = portfolio.samples().inputs[0]
    backend = OnnxRuntimeBackend()
    before = cpu_used_in_half_a_second()  # what other tests' threads may still use
    with backend.open(portfolio.file_path("dense", "onnx"), "dense", threads=2, spin=True) as session:
        for _ in range(50):
            session.run([x])
        after = cpu_used_in_half_a_second()
    assert after - before < 0.005, f"idle: {after * 1000:.1f} ms of CPU in 0.5 s, {before * 1000:.1f} before the session"
    assert backend.session_options(2, spin=True).get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert backend.session_options(2).get_session_config_entry("session.intra_op.allow_spinning") == "0"
