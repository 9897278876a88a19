"""int4 and int8 weight-only twins of every LM variant: smaller files, their own perplexity, served by the agent."""
from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from agent.portfolio import Portfolio
from exporter.cli import main as export_main
from exporter.quantize.common import QuantizationUnsupported
from exporter.quantize.lm_weights import quantize_weights
from tests.test_mosaic_portfolio import corpus, tiny_checkpoint


@pytest.fixture(scope="module")
def quantized_portfolio(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mosaic-quantized")
    out = root / "portfolio"
    assert export_main([
        "portfolio", "--method", "mosaic", "--model", str(tiny_checkpoint(root / "checkpoint")), "--out", str(out),
        "--calib", str(corpus(root / "calib.txt", 600, 1)), "--eval", str(corpus(root / "eval.txt", 300, 2)),
        "--sparsities", "0.5", "--composite-ratio", "0.5", "--context", "16", "--calib-windows", "8",
        "--eval-windows", "4", "--recovery-steps", "0", "--lm-quantize", "int4,int8", "--quiet",
    ]) == 0
    return out


def test_every_variant_gets_an_int4_and_an_int8_twin_with_its_own_perplexity(quantized_portfolio):
    variants = {v.id: v for v in Portfolio.open(quantized_portfolio).manifest.variants}
    floats = ["dense", "mosaic-unstructured-s50", "mosaic-composite-s50"]
    assert sorted(variants) == sorted(floats + [f"{v}-int{bits}" for v in floats for bits in (4, 8)])
    for parent_id in floats:
        parent = variants[parent_id]
        for bits in (4, 8):
            twin = variants[f"{parent_id}-int{bits}"]
            assert twin.method == f"{parent.method}+int{bits}" and twin.parent == parent_id
            assert twin.details["weight_bits"] == bits and twin.details["quantized_matmuls"] == 2 * 5 + 1
            assert twin.details["quantized_embedding"] == (bits == 4)  # GatherBlockQuantized takes 4-bit blocks
            assert twin.details["embedding_shares_head"] is False  # this model's head is not tied to its table
            assert twin.files["onnx"].bytes < parent.files["onnx"].bytes
            assert twin.files["onnx"].kv_cache == parent.files["onnx"].kv_cache
            assert twin.metrics["perplexity"] != parent.metrics["perplexity"]  # measured, not copied
            assert twin.metrics["perplexity"] == pytest.approx(parent.metrics["perplexity"], rel=0.25)
        assert variants[f"{parent_id}-int4"].files["onnx"].bytes < variants[f"{parent_id}-int8"].files["onnx"].bytes


def test_the_agent_health_checks_every_twin_and_generates_with_int4(quantized_portfolio, capsys):
    from agent.cli import main as agent_main

    assert agent_main(["check", str(quantized_portfolio), "--threads", "1"]) == 0
    assert capsys.readouterr().out.count(" ok") == 9
    assert agent_main(["generate", str(quantized_portfolio), "--prompt", "the cat sat", "--max-tokens", "4",
                       "--variant", "mosaic-composite-s50-int4"]) == 0
    assert "mosaic-composite-s50-int4:" in capsys.readouterr().err


def test_a_graph_without_weights_to_quantize_keeps_its_float_variant(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "no-matmul", [x], [y])
    source = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(source))
    with pytest.raises(QuantizationUnsupported, match="no MatMul with a constant weight"):
        quantize_weights(source, tmp_path / "relu-int4.onnx", 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["relu.onnx"]


def test_a_bad_lm_quantize_value_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit):
        export_main(["portfolio", "--method", "mosaic", "--out", str(tmp_path / "p"), "--lm-quantize", "int3"])
    assert "give int4, int8, int4,int8 or none" in capsys.readouterr().err


def exported_tied_llama(path: Path, vocab: int):
    """A random 2-layer Llama whose head is its embedding table, exported with its cache; (model, sample ids)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from exporter.mosaic.onnx_export import export_causal_lm_onnx

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=96, vocab_size=vocab, max_position_embeddings=64, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(1))
    export_causal_lm_onnx(model, path, ids)
    return model, ids


@pytest.mark.parametrize("bits, embedding_op, tolerance", [(8, "Gather", 0.05), (4, "GatherBlockQuantized", 0.15)])
def test_a_head_tied_to_the_embedding_is_quantized_too_and_int4_gathers_the_table_from_4_bit_blocks(
        tmp_path, bits, embedding_op, tolerance):
    import numpy as np
    import onnxruntime as ort
    import torch

    from agent.kv_cache import cache_inputs, empty_cache
    from agent.manifest import KvCache
    from exporter.mosaic.onnx_export import cache_layers

    model, ids = exported_tied_llama(tmp_path / "tied.onnx", vocab=40)

    result = quantize_weights(tmp_path / "tied.onnx", tmp_path / f"tied-int{bits}.onnx", bits)

    assert result.quantized == 2 * 5 + 1  # five projections a layer (q, k, v packed) and the head
    assert result.embedding_quantized == result.embedding_shares_head == (bits == 4)
    graph = onnx.load(str(tmp_path / f"tied-int{bits}.onnx")).graph
    assert embedding_op in {node.op_type for node in graph.node if "input_ids" in node.input}
    session = ort.InferenceSession(str(tmp_path / f"tied-int{bits}.onnx"), providers=["CPUExecutionProvider"])
    names = [item.name for item in session.get_inputs()]
    feed = cache_inputs(ids.numpy(), empty_cache(2, KvCache(cache_layers(model))))
    logits = session.run(None, dict(zip(names, feed)))[0]
    with torch.no_grad():
        expected = model(input_ids=ids).logits.numpy()
    assert np.abs(logits - expected).max() < tolerance * np.abs(expected).max()


def test_an_int4_table_tied_to_the_head_gathers_from_the_heads_blocks_and_computes_the_same(tmp_path, monkeypatch):
    import numpy as np
    import onnxruntime as ort

    from agent.kv_cache import cache_inputs, empty_cache
    from agent.manifest import KvCache
    from exporter.mosaic.onnx_export import cache_layers
    from exporter.quantize import lm_weights

    model, ids = exported_tied_llama(tmp_path / "tied.onnx", vocab=512)
    shared = quantize_weights(tmp_path / "tied.onnx", tmp_path / "shared.onnx", 4)
    monkeypatch.setattr(lm_weights, "_share_tied_table", lambda model: False)
    own = quantize_weights(tmp_path / "tied.onnx", tmp_path / "own.onnx", 4)

    assert shared.embedding_shares_head and not own.embedding_shares_head
    graph = onnx.load(str(tmp_path / "shared.onnx")).graph
    producers = {output: node for node in graph.node for output in node.output}
    [gather] = [node for node in graph.node if node.op_type == "GatherBlockQuantized"]
    reshape = producers[gather.input[0]]
    [head] = [node for node in graph.node if node.op_type == "MatMulNBits" and node.input[1] == reshape.input[0]]
    assert reshape.op_type == "Reshape" and gather.input[2] == head.input[2]  # the head's blocks and scales
    # one 4-bit copy of the 512 x 64 table: 16 KiB less, less the Reshape's few bytes
    saved = (tmp_path / "own.onnx").stat().st_size - (tmp_path / "shared.onnx").stat().st_size
    assert 512 * 64 // 2 + 512 * 2 * 4 - 256 < saved
    feed = cache_inputs(ids.numpy(), empty_cache(2, KvCache(cache_layers(model))))

    def logits(name: str) -> np.ndarray:
        session = ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"])
        return session.run(None, dict(zip([item.name for item in session.get_inputs()], feed)))[0]

    np.testing.assert_array_equal(logits("shared.onnx"), logits("own.onnx"))
