"""A causal LM, shrunk or not, exports to one ONNX file that gives torch's logits at any batch and length."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")

from test_mosaic_structure import input_sq_norms, smollm2, tiny_llama, token_ids  # noqa: E402

from exporter.errors import ExportError  # noqa: E402
from exporter.mosaic.onnx_export import LOGITS_ATOL, export_causal_lm_onnx  # noqa: E402
from exporter.mosaic.structure import shrink_layer  # noqa: E402


def onnx_logits(path, ids: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input_ids": ids.numpy()})[0]


def torch_logits(model, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.numpy()


def shrink_every_layer(model, ratios, calibration_ids: torch.Tensor) -> None:
    norms = input_sq_norms(model, calibration_ids)
    for layer, layer_norms, ratio in zip(model.model.layers, norms, ratios):
        shrink_layer(layer, layer_norms, ratio)


def test_exported_logits_match_torch_at_any_batch_and_length(tmp_path):
    model = tiny_llama(layers=1)
    path = tmp_path / "lm.onnx"

    difference = export_causal_lm_onnx(model, path, token_ids(2, 8))

    assert 0 <= difference <= LOGITS_ATOL
    assert [p.name for p in tmp_path.iterdir()] == ["lm.onnx"]  # weights inside, no external data
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inputs,), (outputs,) = session.get_inputs(), session.get_outputs()
    assert (inputs.name, inputs.type, outputs.name) == ("input_ids", "tensor(int64)", "logits")
    assert outputs.shape[2] == 128 and all(isinstance(size, str) for size in inputs.shape)
    for batch, seq in ((1, 1), (3, 40)):
        ids = token_ids(batch, seq, seed=batch)
        assert np.abs(onnx_logits(path, ids) - torch_logits(model, ids)).max() <= LOGITS_ATOL


def test_a_shrunk_model_with_different_layer_sizes_exports(tmp_path):
    model = tiny_llama(layers=3)
    shrink_every_layer(model, (0.5, 0.0, 0.3), token_ids(2, 16))
    sizes = [(layer.self_attn.q_proj.out_features, layer.mlp.up_proj.out_features) for layer in model.model.layers]
    assert len(set(sizes)) == 3

    model.train()

    difference = export_causal_lm_onnx(model, tmp_path / "shrunk.onnx", token_ids(1, 1))  # traced on [2, 4]

    assert difference <= LOGITS_ATOL and model.training  # exported in eval mode, handed back as it came
    model.eval()
    ids = token_ids(1, 11, seed=5)
    assert np.abs(onnx_logits(tmp_path / "shrunk.onnx", ids) - torch_logits(model, ids)).max() <= LOGITS_ATOL


def test_bad_check_ids_or_model_is_a_one_line_error(tmp_path):
    model = tiny_llama(layers=1)
    cases = {
        "not int64": token_ids(2, 8).float(),
        "at least one token": token_ids(2, 0),
        r"outside \[0, 128\)": token_ids(2, 8) + 128,
        "2-D long tensor": token_ids(2, 8)[0],
    }
    for message, ids in cases.items():
        with pytest.raises(ExportError, match=message):
            export_causal_lm_onnx(model, tmp_path / "lm.onnx", ids)
    with pytest.raises(ExportError, match="no config.vocab_size"):
        export_causal_lm_onnx(torch.nn.Linear(4, 4), tmp_path / "lm.onnx", token_ids(2, 8))
    assert not (tmp_path / "lm.onnx").exists()


@pytest.mark.slow
def test_shrunk_smollm2_exports_within_tolerance(tmp_path):
    model, _ = smollm2()
    random_text = torch.randint(0, model.config.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0))
    shrink_every_layer(model, [0.1] * 15 + [0.34] * 15, random_text)

    difference = export_causal_lm_onnx(model, tmp_path / "smollm2.onnx", random_text[:, :16])

    assert difference <= LOGITS_ATOL  # measured about 1.3e-4 on the dense model
