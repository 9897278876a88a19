"""Loading a causal LM for Mosaic, and cutting a text corpus into token windows."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, PreTrainedTokenizerFast

from exporter.errors import ExportError
from exporter.mosaic.corpus import read_corpus, token_windows
from exporter.mosaic.load import PROJECTIONS, decoder_layers, load_causal_lm, projections

WORDS = "the cat sat on a mat and dog ran far".split()


def word_tokenizer() -> PreTrainedTokenizerFast:
    """One token per word of WORDS (ids 1..10), anything else [UNK] (id 0)."""
    vocab = {"[UNK]": 0, **{word: i + 1 for i, word in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=256, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_a_checkpoint_directory_loads_in_float32_eval_mode_with_its_tokenizer(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)

    loaded, tokenizer = load_causal_lm(tmp_path)

    assert not loaded.training
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert tokenizer("the dog ran", add_special_tokens=False)["input_ids"] == [1, 8, 9]
    assert len(decoder_layers(loaded)) == 2
    assert list(projections(decoder_layers(loaded)[1], 1)) == list(PROJECTIONS)


def test_a_checkpoint_without_tokenizer_files_loads_with_no_tokenizer(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    model, tokenizer = load_causal_lm(tmp_path)
    assert tokenizer is None
    assert model.config.num_hidden_layers == 2


def test_a_model_without_llama_projections_is_refused_at_load_naming_what_it_has(tmp_path):
    config = OPTConfig(hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2, vocab_size=50,
                       max_position_embeddings=32, word_embed_proj_dim=16)
    OPTForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(ExportError, match=r"layer 0 has no 'o_proj' \(found: .*out_proj, fc1, fc2\); "
                                          r"Mosaic needs LLaMA-style projections: q_proj, k_proj"):
        load_causal_lm(tmp_path)


def test_a_renamed_projection_is_named_with_its_layer():
    model = tiny_llama()
    mlp = decoder_layers(model)[1].mlp
    mlp.fc_gate = mlp.gate_proj
    del mlp.gate_proj
    with pytest.raises(ExportError, match=r"layer 1 has no 'gate_proj' \(found: q_proj, .*, fc_gate\)"):
        decoder_layers(model)


def test_missing_paths_and_non_gguf_files_are_refused(tmp_path):
    with pytest.raises(ExportError, match="does not exist: give a checkpoint directory or a .gguf file"):
        load_causal_lm(tmp_path / "nowhere")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ExportError, match="is a file but not a .gguf"):
        load_causal_lm(tmp_path / "weights.bin")
    with pytest.raises(ExportError, match="has no config.json"):
        load_causal_lm(tmp_path)


def test_a_garbage_gguf_file_gives_one_line_naming_the_file(tmp_path):
    garbage = tmp_path / "model.gguf"
    garbage.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(ExportError, match=f"cannot read GGUF file {garbage}: ") as caught:
        load_causal_lm(garbage)
    assert "\n" not in str(caught.value)


def test_a_pruned_model_directory_loads_back_at_its_own_sizes_with_its_tokenizer(tmp_path):
    from exporter.mosaic.checkpoint import save_pruned
    from exporter.mosaic.structure import layer_shapes, shrink_layer

    model = tiny_llama()
    norms = {name: torch.ones(linear.in_features) for name, linear in projections(decoder_layers(model)[0]).items()}
    shrink_layer(decoder_layers(model)[0], norms, 0.5)
    save_pruned(model, tmp_path)
    word_tokenizer().save_pretrained(tmp_path)

    loaded, tokenizer = load_causal_lm(tmp_path)

    assert layer_shapes(loaded) == layer_shapes(model) and tokenizer is not None
    ids = torch.randint(0, 256, (1, 9))
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_evaluation_windows_are_the_first_consecutive_ones():
    text = "the cat sat on a mat\nand dog ran far\n" * 3  # 10 tokens per repeat
    windows = token_windows(word_tokenizer(), text, context=4, count=None, seed=None)
    assert windows.dtype == torch.int64
    assert windows.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 1, 2], [3, 4, 5, 6], [7, 8, 9, 10],
                                [1, 2, 3, 4], [5, 6, 7, 8]]
    assert token_windows(word_tokenizer(), text, context=4, count=2, seed=None).tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]


def test_calibration_windows_are_random_reproducible_slices_of_the_text():
    text = " ".join(WORDS) + "\n"
    ids = list(range(1, 11))
    first = token_windows(word_tokenizer(), text, context=3, count=5, seed=7)
    again = token_windows(word_tokenizer(), text, context=3, count=5, seed=7)
    assert first.shape == (5, 3) and torch.equal(first, again)
    for window in first.tolist():
        start = ids.index(window[0])
        assert window == ids[start:start + 3]


def test_a_corpus_shorter_than_one_window_is_refused():
    with pytest.raises(ExportError, match="corpus tiny.txt has 3 tokens, fewer than the context length 8; "
                                          "give a longer file or a smaller --context"):
        token_windows(word_tokenizer(), "the cat sat", context=8, count=1, seed=0, name="tiny.txt")


def test_asking_for_more_evaluation_windows_than_the_corpus_holds_is_refused():
    with pytest.raises(ExportError, match="holds 2 windows of 4 tokens, not 3"):
        token_windows(word_tokenizer(), "the cat sat on a mat and dog ran", context=4, count=3, seed=None)


def test_corpus_files_must_exist_and_be_utf8(tmp_path):
    with pytest.raises(ExportError, match="does not exist or is not a file"):
        read_corpus(tmp_path / "missing.txt")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    with pytest.raises(ExportError, match=r"is not UTF-8 text \(bad byte at offset 3\)"):
        read_corpus(latin1)
    good = tmp_path / "good.txt"
    good.write_text("caf\u00e9\n", encoding="utf-8")
    assert read_corpus(good) == "caf\u00e9\n"
