from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.portfolio import (
    SCHEMA,
    LanguageModel,
    Manifest,
    ModelFile,
    Portfolio,
    PortfolioError,
    Preprocessing,
    TensorSpec,
    TokenizerFile,
    Variant,
    file_entry,
    save_evaluation,
    save_samples,
    sha256_file,
    tokenizer_entry,
    write_manifest,
)

REPO = Path(__file__).resolve().parents[1]


def make_variant(root: Path, variant_id: str, method: str = "dense", parent: str | None = None,
                 density: float = 1.0) -> Variant:
    """A variant whose 'model' is a few arbitrary bytes: the contract does not parse ONNX."""
    (root / "variants").mkdir(parents=True, exist_ok=True)
    relpath = f"variants/{variant_id}.onnx"
    (root / relpath).write_bytes(f"fake onnx model {variant_id}".encode())
    return Variant(
        id=variant_id,
        method=method,
        parent=parent,
        density=density,
        params=1000,
        params_nonzero=int(1000 * density),
        macs=50_000,
        metrics={"accuracy": 0.95, "dataset": "digits", "n": 450},
        files={"onnx": file_entry(root, relpath, max_abs_diff=1e-6)},
        host_latency_ms={"p50": 0.4, "p95": 0.6},
    )


def make_manifest(root: Path) -> Manifest:
    return Manifest(
        name="digits-mlp",
        task="classification",
        inputs=[TensorSpec(name="x", dtype="float32", shape=[-1, 1, 8, 8], layout="NCHW")],
        outputs=[TensorSpec(name="logits", dtype="float32", shape=[-1, 10])],
        variants=[
            make_variant(root, "dense"),
            make_variant(root, "imp-50", method="imp-sparse", parent="dense", density=0.5),
        ],
        default_variant="dense",
        labels=[str(digit) for digit in range(10)],
        preprocessing=Preprocessing(scale=1 / 16, mean=[0.5], std=[0.25]),
        exporter={"torch": "2.4.1"},
    )


def write_portfolio(root: Path) -> Manifest:
    manifest = make_manifest(root)
    write_manifest(root, manifest)
    return manifest


def edit_manifest(root: Path, edit) -> None:
    """Change manifest.json behind the writer's back, as a hand edit or a bad exporter would."""
    path = root / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_write_then_open_round_trips_the_manifest(tmp_path):
    manifest = write_portfolio(tmp_path)

    portfolio = Portfolio.open(tmp_path)

    assert portfolio.manifest == manifest
    assert portfolio.manifest.schema == SCHEMA
    assert portfolio.manifest.variant("imp-50").parent == "dense"
    assert portfolio.file_path("imp-50") == tmp_path / "variants" / "imp-50.onnx"
    assert portfolio.digest == sha256_file(tmp_path / "manifest.json")


def test_manifest_json_is_indented_and_has_the_schema_first(tmp_path):
    write_portfolio(tmp_path)

    text = (tmp_path / "manifest.json").read_text()

    assert text.startswith('{\n  "schema": "edgeshift.portfolio/1"')


def test_optional_details_and_tflite_entries_survive_the_round_trip(tmp_path):
    manifest = make_manifest(tmp_path)
    (tmp_path / "variants" / "dense.tflite").write_bytes(b"fake tflite")
    dense = manifest.variant("dense")
    dense.files["tflite"] = file_entry(tmp_path, "variants/dense.tflite", 2e-6, input_shape=[1, 8, 8, 1])
    dense.details = {"level": 0, "structured_ms": np.float32(12.5)}  # numpy scalars are converted
    write_manifest(tmp_path, manifest)

    reopened = Portfolio.open(tmp_path).manifest.variant("dense")

    assert reopened.files["tflite"].input_shape == [1, 8, 8, 1]
    assert reopened.details == {"level": 0, "structured_ms": 12.5}


def test_unknown_variant_lists_the_known_ones(tmp_path):
    write_portfolio(tmp_path)
    portfolio = Portfolio.open(tmp_path)

    with pytest.raises(PortfolioError, match="unknown variant 'nope'.*dense, imp-50"):
        portfolio.manifest.variant("nope")
    with pytest.raises(PortfolioError, match="no tflite file"):
        portfolio.file_path("dense", "tflite")


def test_samples_round_trip(tmp_path):
    write_portfolio(tmp_path)
    x = np.arange(2 * 64, dtype=np.float32).reshape(2, 1, 8, 8)
    mask = np.ones((2, 8), dtype=np.int64)
    expected = {"dense": np.eye(2, 10, dtype=np.float32), "imp-50": np.zeros((2, 10), np.float32)}
    save_samples(tmp_path, [x, mask], expected)

    samples = Portfolio.open(tmp_path).samples()

    assert len(samples.inputs) == 2
    np.testing.assert_array_equal(samples.inputs[0], x)
    np.testing.assert_array_equal(samples.inputs[1], mask)
    assert samples.expected.keys() == expected.keys()
    np.testing.assert_array_equal(samples.expected["dense"], expected["dense"])


def test_samples_without_a_variants_expected_output_are_refused(tmp_path):
    write_portfolio(tmp_path)
    save_samples(tmp_path, [np.zeros((1, 1, 8, 8), np.float32)], {"dense": np.zeros((1, 10), np.float32)})

    with pytest.raises(PortfolioError, match="samples.npz: .*'y_imp-50'"):
        Portfolio.open(tmp_path).samples()


def test_missing_samples_are_refused(tmp_path):
    write_portfolio(tmp_path)

    with pytest.raises(PortfolioError, match="samples.npz: missing"):
        Portfolio.open(tmp_path).samples()


def test_a_changed_file_is_refused_naming_the_file(tmp_path):
    write_portfolio(tmp_path)
    (tmp_path / "variants" / "imp-50.onnx").write_bytes(b"fake onnx model imp-5X")  # same size

    with pytest.raises(PortfolioError, match="variants/imp-50.onnx: sha256 differs from the manifest"):
        Portfolio.open(tmp_path)
    assert Portfolio.open(tmp_path, verify=False).manifest.name == "digits-mlp"


def test_a_truncated_file_is_refused_naming_the_file(tmp_path):
    write_portfolio(tmp_path)
    (tmp_path / "variants" / "dense.onnx").write_bytes(b"fake")

    with pytest.raises(PortfolioError, match="variants/dense.onnx: size 4 bytes differs"):
        Portfolio.open(tmp_path)


def test_a_missing_file_is_refused_naming_the_file(tmp_path):
    write_portfolio(tmp_path)
    (tmp_path / "variants" / "dense.onnx").unlink()

    with pytest.raises(PortfolioError, match="variants/dense.onnx: missing"):
        Portfolio.open(tmp_path)


@pytest.mark.parametrize(
    "path, reason",
    [
        ("../outside.onnx", "escapes the portfolio directory"),
        ("variants/../../outside.onnx", "escapes the portfolio directory"),
        ("/etc/passwd", "is absolute"),
        ("variants/./dense.onnx", "is not normalized"),
    ],
)
def test_paths_that_leave_the_portfolio_are_refused(tmp_path, path, reason):
    write_portfolio(tmp_path)
    edit_manifest(tmp_path, lambda data: data["variants"][1]["files"]["onnx"].update(path=path))

    with pytest.raises(PortfolioError, match=f"variant 'imp-50' onnx path '{path}' {reason}"):
        Portfolio.open(tmp_path)


def test_the_writer_refuses_escaping_paths_too(tmp_path):
    manifest = make_manifest(tmp_path)
    manifest.variants[0].files["onnx"].path = "../dense.onnx"

    with pytest.raises(PortfolioError, match="escapes the portfolio directory"):
        write_manifest(tmp_path, manifest)
    assert not (tmp_path / "manifest.json").exists()


def test_a_symlink_leading_outside_is_refused(tmp_path):
    root = tmp_path / "portfolio"
    manifest = make_manifest(root)
    outside = tmp_path / "secret.onnx"
    outside.write_bytes(b"fake onnx model dense")  # same bytes, so only the symlink check can catch it
    (root / "variants" / "dense.onnx").unlink()
    (root / "variants" / "dense.onnx").symlink_to(outside)
    (root / "manifest.json").write_text(json.dumps(manifest.to_dict()))

    with pytest.raises(PortfolioError, match="variants/dense.onnx: .* resolves outside the portfolio"):
        Portfolio.open(root)


def test_a_symlink_inside_the_portfolio_is_fine(tmp_path):
    write_portfolio(tmp_path)
    (tmp_path / "store").mkdir()
    (tmp_path / "variants" / "dense.onnx").rename(tmp_path / "store" / "dense.onnx")
    (tmp_path / "variants" / "dense.onnx").symlink_to(tmp_path / "store" / "dense.onnx")

    assert Portfolio.open(tmp_path).file_path("dense").read_bytes() == b"fake onnx model dense"


def test_an_unknown_schema_is_refused(tmp_path):
    write_portfolio(tmp_path)
    edit_manifest(tmp_path, lambda data: data.update(schema="edgeshift.portfolio/2"))

    with pytest.raises(PortfolioError) as error:
        Portfolio.open(tmp_path)
    assert str(error.value) == (
        "manifest.json: schema 'edgeshift.portfolio/2' is not supported "
        "(this agent reads edgeshift.portfolio/1); upgrade the agent or re-export"
    )


def test_an_unknown_method_is_refused(tmp_path):
    write_portfolio(tmp_path)
    edit_manifest(tmp_path, lambda data: data["variants"][1].update(method="magic"))

    with pytest.raises(PortfolioError, match=r"variants\[1\].method 'magic' is not known"):
        Portfolio.open(tmp_path)


@pytest.mark.parametrize("method, known", [
    ("imp-structured+int8", True), ("dense+int8", True), ("pai-structured+fp4", False), ("magic+int8", False),
])
def test_a_transform_suffix_names_a_quantized_twin(tmp_path, method, known):
    write_portfolio(tmp_path)
    edit_manifest(tmp_path, lambda data: data["variants"][1].update(method=method))

    if known:
        assert Portfolio.open(tmp_path).manifest.variants[1].method == method
    else:
        with pytest.raises(PortfolioError, match="is not known"):
            Portfolio.open(tmp_path)


def test_labelled_evaluation_data_is_verified_like_the_model_files(tmp_path):
    manifest = make_manifest(tmp_path)
    x, y = np.zeros((5, 1, 8, 8), np.float32), np.arange(5)
    manifest.evaluation = save_evaluation(tmp_path, x, y)
    write_manifest(tmp_path, manifest)

    loaded_x, loaded_y = Portfolio.open(tmp_path).evaluation_data()
    assert np.array_equal(loaded_x, x) and np.array_equal(loaded_y, y) and manifest.evaluation.count == 5
    with open(tmp_path / "evaluation.npz", "ab") as stream:
        stream.write(b"\0")
    with pytest.raises(PortfolioError, match="evaluation.npz: size"):
        Portfolio.open(tmp_path)


def test_written_files_are_readable_by_an_agent_running_as_another_user(tmp_path):
    write_portfolio(tmp_path)
    save_samples(tmp_path, [np.zeros((1, 1, 8, 8), np.float32)], {"dense": np.zeros((1, 10), np.float32)})

    for name in ("manifest.json", "samples.npz"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644


def test_an_unknown_task_is_refused(tmp_path):
    write_portfolio(tmp_path)
    edit_manifest(tmp_path, lambda data: data.update(task="segmentation"))

    with pytest.raises(PortfolioError, match="task 'segmentation' is not known"):
        Portfolio.open(tmp_path)


def test_a_duplicate_variant_id_is_refused(tmp_path):
    manifest = make_manifest(tmp_path)
    manifest.variants[1].id = "dense"
    manifest.variants[1].parent = None

    with pytest.raises(PortfolioError, match=r"variants\[1\].id 'dense' is a duplicate"):
        write_manifest(tmp_path, manifest)


@pytest.mark.parametrize("bad_id", ["Dense", "-dense", "dense/50", ""])
def test_a_malformed_variant_id_is_refused(tmp_path, bad_id):
    write_portfolio(tmp_path)
    edit_manifest(tmp_path, lambda data: data["variants"][1].update(id=bad_id))

    with pytest.raises(PortfolioError, match=r"variants\[1\].id .* is malformed"):
        Portfolio.open(tmp_path)


def test_an_unknown_default_variant_is_refused(tmp_path):
    write_portfolio(tmp_path)
    edit_manifest(tmp_path, lambda data: data.update(default_variant="gone"))

    with pytest.raises(PortfolioError, match="default_variant 'gone' is not a variant id"):
        Portfolio.open(tmp_path)


def test_an_unknown_parent_is_refused(tmp_path):
    write_portfolio(tmp_path)
    edit_manifest(tmp_path, lambda data: data["variants"][1].update(parent="gone"))

    with pytest.raises(PortfolioError, match=r"variants\[1\].parent 'gone'"):
        Portfolio.open(tmp_path)


@pytest.mark.parametrize("density", [0, 1.5, -0.1])
def test_a_density_outside_zero_one_is_refused(tmp_path, density):
    write_portfolio(tmp_path)
    edit_manifest(tmp_path, lambda data: data["variants"][1].update(density=density))

    with pytest.raises(PortfolioError, match=r"variants\[1\].density must be in \(0, 1\]"):
        Portfolio.open(tmp_path)


def test_an_unknown_file_format_is_refused(tmp_path):
    write_portfolio(tmp_path)
    edit_manifest(tmp_path, lambda data: data["variants"][0]["files"].update(tensorrt={}))

    with pytest.raises(PortfolioError, match=r"variants\[0\].files.tensorrt is not a known format"):
        Portfolio.open(tmp_path)


def test_a_missing_field_is_named_by_its_path(tmp_path):
    write_portfolio(tmp_path)
    edit_manifest(tmp_path, lambda data: data["variants"][1]["files"]["onnx"].pop("sha256"))

    with pytest.raises(PortfolioError) as error:
        Portfolio.open(tmp_path)
    assert str(error.value) == "manifest.json: variants[1].files.onnx.sha256 is missing"


def test_an_ill_typed_field_is_named_by_its_path(tmp_path):
    write_portfolio(tmp_path)
    edit_manifest(tmp_path, lambda data: data["variants"][0].update(params="1000"))

    with pytest.raises(PortfolioError, match=r"variants\[0\].params must be an integer, got str"):
        Portfolio.open(tmp_path)


def test_unknown_extra_keys_are_tolerated(tmp_path):
    write_portfolio(tmp_path)
    def add_extras(data):
        data["signed_by"] = "ci"
        data["variants"][0]["energy_mj"] = 3.2

    edit_manifest(tmp_path, add_extras)

    assert Portfolio.open(tmp_path).manifest.name == "digits-mlp"


def test_a_missing_or_broken_manifest_is_refused(tmp_path):
    with pytest.raises(PortfolioError, match="not a directory"):
        Portfolio.open(tmp_path / "nowhere")
    with pytest.raises(PortfolioError, match="manifest.json: missing"):
        Portfolio.open(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(PortfolioError, match="manifest.json: not valid JSON"):
        Portfolio.open(tmp_path)


def test_file_entry_records_size_and_checksum(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"abc")

    entry = file_entry(tmp_path, "model.onnx", max_abs_diff=0.0)

    assert entry == ModelFile(
        path="model.onnx",
        sha256="ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        bytes=3,
        max_abs_diff=0.0,
    )


def test_the_agent_never_imports_torch():
    code = "import agent, agent.portfolio, sys; assert 'torch' not in sys.modules"

    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_the_agent_package_import_stays_light():
    code = "import agent, sys; assert 'onnxruntime' not in sys.modules and 'numpy' not in sys.modules"

    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# --------------------------------------------------------------------------- causal-lm portfolios


def make_lm_manifest(root: Path, tokenizer: bool = True) -> Manifest:
    """A causal-lm manifest over fake files: the contract reads neither ONNX nor tokenizer.json."""
    variant = make_variant(root, "dense")
    variant.metrics = {"perplexity": 17.5, "dataset": "test.txt", "n": 2048, "context": 256}
    if tokenizer:
        (root / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    return Manifest(
        name="smollm2-135m",
        task="causal-lm",
        inputs=[TensorSpec("input_ids", "int64", [-1, -1])],
        outputs=[TensorSpec("logits", "float32", [-1, -1, 49152])],
        variants=[variant],
        default_variant="dense",
        language_model=LanguageModel(
            tokenizer=tokenizer_entry(root, "tokenizer.json") if tokenizer else None,
            bos_token_id=1, eos_token_id=2, context_length=256,
        ),
    )


def test_a_causal_lm_manifest_round_trips_its_language_model(tmp_path):
    manifest = make_lm_manifest(tmp_path)
    write_manifest(tmp_path, manifest)

    portfolio = Portfolio.open(tmp_path)

    assert portfolio.manifest == manifest
    assert portfolio.tokenizer_path == tmp_path / "tokenizer.json"
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["language_model"]["tokenizer"]["path"] == "tokenizer.json"
    assert data["language_model"]["context_length"] == 256


def test_a_causal_lm_portfolio_may_ship_no_tokenizer(tmp_path):
    write_manifest(tmp_path, make_lm_manifest(tmp_path, tokenizer=False))

    portfolio = Portfolio.open(tmp_path)

    assert portfolio.manifest.language_model.tokenizer is None and portfolio.tokenizer_path is None


def test_a_classification_portfolio_has_a_null_language_model(tmp_path):
    write_portfolio(tmp_path)

    assert json.loads((tmp_path / "manifest.json").read_text())["language_model"] is None
    assert Portfolio.open(tmp_path).tokenizer_path is None


def test_tokenizer_entry_records_size_and_checksum(tmp_path):
    (tmp_path / "tokenizer.json").write_bytes(b"abc")

    entry = tokenizer_entry(tmp_path, "tokenizer.json")

    assert entry == TokenizerFile(
        path="tokenizer.json",
        sha256="ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        bytes=3,
    )


def test_a_changed_or_missing_tokenizer_is_refused(tmp_path):
    write_manifest(tmp_path, make_lm_manifest(tmp_path))
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPF"}}')
    with pytest.raises(PortfolioError, match="tokenizer.json: sha256 differs from the manifest"):
        Portfolio.open(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(PortfolioError, match="tokenizer.json: missing"):
        Portfolio.open(tmp_path)


@pytest.mark.parametrize("edit, message", [
    (lambda data: data.pop("language_model"), "language_model is missing; a causal-lm portfolio needs it"),
    (lambda data: data.update(language_model=None), "language_model is missing"),
    (lambda data: data["language_model"].pop("eos_token_id"), "language_model.eos_token_id is missing"),
    (lambda data: data["language_model"].update(context_length=0), "language_model.context_length must be at least 1"),
    (lambda data: data["language_model"].update(bos_token_id=-1), "language_model.bos_token_id must not be negative"),
    (lambda data: data["language_model"].update(eos_token_id=49152), "eos_token_id 49152 is outside the vocabulary"),
    (lambda data: data["language_model"].update(eos_token_id="2"), "language_model.eos_token_id must be an integer"),
    (lambda data: data["language_model"]["tokenizer"].update(path="../tokenizer.json"),
     "language_model.tokenizer.path '../tokenizer.json' escapes the portfolio directory"),
    (lambda data: data["language_model"]["tokenizer"].pop("sha256"), "language_model.tokenizer.sha256 is missing"),
    (lambda data: data["inputs"][0].update(dtype="float32"),
     "inputs[0] ('input_ids') must be int64 token ids for a causal-lm portfolio, got float32"),
])
def test_a_bad_language_model_is_refused_naming_the_field(tmp_path, edit, message):
    write_manifest(tmp_path, make_lm_manifest(tmp_path))
    edit_manifest(tmp_path, edit)

    with pytest.raises(PortfolioError) as error:
        Portfolio.open(tmp_path)
    assert str(error.value).startswith("manifest.json: ") and message in str(error.value)


def test_a_classification_portfolio_must_not_carry_a_language_model(tmp_path):
    write_portfolio(tmp_path)
    edit_manifest(tmp_path, lambda data: data.update(language_model={
        "tokenizer": None, "bos_token_id": None, "eos_token_id": None, "context_length": 8}))

    with pytest.raises(PortfolioError, match="language_model must be absent or null when task is 'classification'"):
        Portfolio.open(tmp_path)


def test_a_tokenizer_symlink_leading_outside_is_refused(tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_text('{"model": {"type": "BPE"}}')
    root = tmp_path / "portfolio"
    root.mkdir()
    write_manifest(root, make_lm_manifest(root))
    (root / "tokenizer.json").unlink()
    (root / "tokenizer.json").symlink_to(outside)

    with pytest.raises(PortfolioError, match="tokenizer.json: tokenizer file resolves outside the portfolio"):
        Portfolio.open(root)
