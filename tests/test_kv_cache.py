"""Generation with a key-value cache: exported tiny Llamas (one with per-layer head counts) served
by the agent give, token for token, what greedy decoding over the whole sequence gives in torch,
whether their cache is one shared buffer written in place or (older files) grows by concatenation."""
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_mosaic_onnx import composite_llama, torch_logits  # noqa: E402
from test_mosaic_structure import tiny_llama, token_ids  # noqa: E402

from agent.backends import BackendError  # noqa: E402
from agent.backends.onnx import OnnxRuntimeBackend  # noqa: E402
from agent.kv_cache import CachedLmSession, in_place, shared_cache, shared_inputs  # noqa: E402
from agent.manifest import KvCache  # noqa: E402
from agent.policy import PolicySettings  # noqa: E402
from agent.portfolio import (  # noqa: E402
    LanguageModel, Manifest, Portfolio, PortfolioError, TensorSpec, Variant, file_entry, save_samples, write_manifest,
)
from agent.profiles import load_profile  # noqa: E402
from agent.runtime import InferenceError, Runtime  # noqa: E402
from agent.service import Agent  # noqa: E402
from exporter.mosaic.onnx_export import cache_entry, export_causal_lm_onnx  # noqa: E402

CONTEXT = 40
PROMPT = token_ids(1, 6, seed=7)[0].tolist()


def build_cached_portfolio(root, models: dict) -> None:
    """A causal-lm portfolio of these models, each exported with its KV cache; ids only, no eos."""
    samples = token_ids(2, 8)
    variants = []
    for variant_id, model in models.items():
        relpath = f"variants/{variant_id}.onnx"
        entry = file_entry(root, relpath, export_causal_lm_onnx(model, root / relpath, samples))
        entry.kv_cache = cache_entry(model)
        params = sum(p.numel() for p in model.parameters())
        variants.append(Variant(id=variant_id, method="dense" if not variants else "mosaic-composite",
                                parent=None if not variants else variants[0].id, density=1.0, params=params,
                                params_nonzero=params, macs=params, metrics={"perplexity": 128.0 + len(variants)},
                                files={"onnx": entry}))
    save_samples(root, [samples.numpy()], {vid: torch_logits(model, samples) for vid, model in models.items()})
    write_manifest(root, Manifest(
        name="tiny-llama", task="causal-lm", inputs=[TensorSpec("input_ids", "int64", [-1, -1])],
        outputs=[TensorSpec("logits", "float32", [-1, -1, next(iter(models.values())).config.vocab_size])],
        variants=variants, default_variant="dense",
        language_model=LanguageModel(tokenizer=None, bos_token_id=None, eos_token_id=None, context_length=CONTEXT)))


def torch_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding that scores the whole sequence at every step, no cache."""
    ids = list(prompt)
    for _ in range(new_tokens):
        ids.append(int(torch_logits(model, torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.fixture(scope="module")
def models():
    return {"dense": tiny_llama(layers=2), "composite": composite_llama()}


@pytest.fixture(scope="module")
def cached_dir(tmp_path_factory, models):
    root = tmp_path_factory.mktemp("cached") / "portfolio"
    build_cached_portfolio(root, models)
    return root


def started(portfolio_dir, **kwargs) -> Agent:
    agent = Agent(Portfolio.open(portfolio_dir), load_profile("x86"), PolicySettings(latency_slo_ms=1000),
                  backend="onnxruntime", threads=1, bench_runs=3, **kwargs)
    agent.start()
    return agent


@pytest.fixture(scope="module")
def agent(cached_dir):
    agent = started(cached_dir)
    yield agent
    agent.close()


@pytest.mark.parametrize("variant", ["dense", "composite"])
def test_cached_generation_equals_whole_sequence_greedy_decoding(agent, models, variant):
    agent.switch(variant, "test")
    window = agent.runtime.windows[variant]
    before = window.total

    result = agent.generate(PROMPT, max_new_tokens=24)

    assert result.variant == variant and result.stop_reason == "max_tokens"
    assert result.new_ids == torch_greedy(models[variant], PROMPT, 24)
    assert window.total - before == 24  # the prefill and 23 one-token steps, each an inference of the variant


def test_generation_stops_with_length_when_the_context_is_full(agent, models):
    agent.switch("dense", "test")
    prompt = token_ids(1, CONTEXT - 3, seed=3)[0].tolist()

    result = agent.generate(prompt, max_new_tokens=10)

    # The cache holds at most CONTEXT tokens: the prompt and three new ones; the fourth came out of the last step.
    assert result.stop_reason == "length" and len(result.new_ids) == 4
    assert result.new_ids == torch_greedy(models["dense"], prompt, 4)
    with pytest.raises(InferenceError, match=f"the prompt has {CONTEXT + 1} tokens, more than the model's context"):
        agent.generate(prompt + [1, 2, 3, 4], max_new_tokens=1)


def test_infer_on_a_cached_variant_scores_the_whole_sequence(agent, models):
    agent.switch("composite", "test")
    ids = token_ids(3, 9, seed=11)

    result = agent.infer(ids.numpy())

    assert result.variant == "composite" and len(result.outputs) == 1
    np.testing.assert_allclose(result.outputs[0], torch_logits(models["composite"], ids), atol=1e-5)


def test_a_switch_mid_generation_leaves_it_on_its_variant(cached_dir, models):
    agent = started(cached_dir, preload="lazy")
    try:
        agent.switch("dense", "test")

        def switch_after_the_first_token(step: int, token: int) -> None:
            if step == 0:
                agent.switch("composite", "test: switch while a generation is in flight")

        result = agent.generate(PROMPT, max_new_tokens=8, on_step=switch_after_the_first_token)

        assert agent.active == "composite" and result.variant == "dense"
        assert result.new_ids == torch_greedy(models["dense"], PROMPT, 8)
    finally:
        agent.close()


def rewritten(cached_dir, tmp_path, edit) -> Portfolio:
    copy = shutil.copytree(cached_dir, tmp_path / "copy")
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_the_bench_times_a_cached_variant_on_a_decode_step_after_the_sample(cached_dir):
    from agent.bench import bench_sessions

    runtime = Runtime(Portfolio.open(cached_dir), OnnxRuntimeBackend(), threads=1)
    session = runtime.open_session("dense")
    bindings, calls = [], []

    def bound(into, fixed):
        bindings.append((into, fixed))
        run = CachedLmSession.bound(session, into, fixed)
        return lambda inputs: calls.append(inputs) or run(inputs)

    session.bound = bound
    sample = [token_ids(1, 8).numpy()]
    try:
        bench_sessions({"dense": session}, sample, runs=3, warmup=1)
    finally:
        session.close()
    # once: every layer's buffer, one more position than the prompt, as both its past and its present
    [(into, fixed)] = bindings
    assert into[1].shape == (1, 2, 8, 16) and all(fixed[index + 1] is buffer for index, buffer in into.items())
    prefill, *steps = calls
    assert [array.shape for array in prefill] == [(1, 7), (1, 7)]  # the sample's prompt
    assert [[array.shape for array in inputs] for inputs in steps] == [[(1, 1), (1, 8)]] * 4  # its last token


def test_a_generation_allocates_its_shared_buffers_once_sized_for_it(agent, models, monkeypatch):
    from agent import generate as generate_module

    allocated = []

    def recording(batch, cache, length):
        allocated.append(shared_cache(batch, cache, length))
        return allocated[-1]

    monkeypatch.setattr(generate_module, "shared_cache", recording)
    agent.switch("composite", "test")

    result = agent.generate(PROMPT, max_new_tokens=8)
    capped = agent.generate(token_ids(1, CONTEXT - 3, seed=3)[0].tolist(), max_new_tokens=10)

    assert result.new_ids == torch_greedy(models["composite"], PROMPT, 8) and capped.stop_reason == "length"
    assert len(allocated) == 2  # one set for each generation, its prefill and every step
    # the prompt and the 7 new tokens fed back (composite's first layer has one KV head), then the context
    assert [buffers[0].shape for buffers in allocated] == [(1, 1, len(PROMPT) + 7, 16), (1, 1, CONTEXT, 16)]
    # every layer's key and value of the last token fed back went into the buffer allocated for the generation
    assert all(np.count_nonzero(buffer[0, :, -1]) for buffers in allocated for buffer in buffers)


def test_decode_steps_write_their_logits_into_one_array_bound_once(agent, models, monkeypatch):
    from agent import runtime as runtime_module

    bindings = []

    def recording(session, buffers, logits=None):
        run, calls = in_place(session, buffers, logits), []
        bindings.append((logits, calls))
        return lambda inputs: calls.append(run(inputs)) or calls[-1]

    monkeypatch.setattr(runtime_module, "in_place", recording)
    agent.switch("dense", "test")

    result = agent.generate(PROMPT, max_new_tokens=8)

    assert result.new_ids == torch_greedy(models["dense"], PROMPT, 8)
    vocab = models["dense"].config.vocab_size
    (none, prompt_calls), (logits, step_calls) = bindings  # the prompt's binding, then the steps'
    assert none is None and [[out.shape for out in outputs] for outputs in prompt_calls] == [[(1, len(PROMPT), vocab)]]
    assert logits.shape == (1, 1, vocab) and step_calls == [[]] * 7  # each step wrote its logits there, no new array


def test_only_a_language_models_sessions_spin_within_their_runs(cached_dir, small_portfolio):
    from agent.backends.onnx import inference_session

    spinning = {}

    def recording(path, options, providers, provider_options):
        spinning[task] = options.get_session_config_entry("session.intra_op.allow_spinning")
        return inference_session(path, options, providers, provider_options)

    for root in (cached_dir, small_portfolio):
        portfolio = Portfolio.open(root)
        task = portfolio.manifest.task
        runtime = Runtime(portfolio, OnnxRuntimeBackend(create_session=recording), threads=2)
        runtime.open_session(portfolio.manifest.default_variant).close()
    assert spinning == {"causal-lm": "1", "classification": "0"}


def test_the_onnxruntime_session_writes_a_bound_buffer_in_place(cached_dir):
    runtime = Runtime(Portfolio.open(cached_dir), OnnxRuntimeBackend(), threads=1)
    session = runtime.open_session("dense")
    session.session.run = None  # bound calls go through onnxruntime's IOBinding, not run() and a copy
    try:
        buffers = shared_cache(1, session.cache, 9)
        run = in_place(session, buffers)
        first = run(shared_inputs(token_ids(1, 5).numpy(), 0))
        written = [buffer[:, :, :5].copy() for buffer in buffers]
        second = run(shared_inputs(token_ids(1, 1).numpy(), 5))
    finally:
        session.close()
    assert [output.shape for output in first + second] == [(1, 5, 128), (1, 1, 128)]  # the logits only
    assert all(np.array_equal(buffer[:, :, :5], before) for buffer, before in zip(buffers, written))
    assert all(buffer[:, :, 5].any() and not buffer[:, :, 6:].any() for buffer in buffers)


@pytest.mark.parametrize("written_before", ["an export whose attention does not fuse", "a manifest without buffer"])
def test_a_cache_not_described_as_shared_grows_by_concatenation_as_before(tmp_path, models, monkeypatch,
                                                                          written_before):
    from agent import generate as generate_module
    from exporter.mosaic import onnx_export

    if written_before == "an export whose attention does not fuse":
        monkeypatch.setattr(onnx_export, "FUSED_ATTENTION_CLASSES", ())
    build_cached_portfolio(tmp_path, {"dense": models["dense"]})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    buffer = manifest["variants"][0]["files"]["onnx"]["kv_cache"].pop("buffer")
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))  # as manifests were before the field
    monkeypatch.setattr(generate_module, "shared_cache", None)  # no buffer may be allocated
    agent = started(tmp_path)
    try:
        result = agent.generate(PROMPT, max_new_tokens=24)
        assert agent.runtime.kv_cache("dense") == KvCache(cache_entry(models["dense"]).layers, "concat")
    finally:
        agent.close()

    assert buffer == ("concat" if written_before.startswith("an export") else "shared")
    assert result.new_ids == torch_greedy(models["dense"], PROMPT, 24)


def test_a_file_that_appends_to_its_cache_is_refused_when_described_as_shared(tmp_path, models, monkeypatch):
    from exporter.mosaic import onnx_export

    monkeypatch.setattr(onnx_export, "FUSED_ATTENTION_CLASSES", ())
    build_cached_portfolio(tmp_path, {"dense": models["dense"]})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["variants"][0]["files"]["onnx"]["kv_cache"]["buffer"] = "shared"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    runtime = Runtime(Portfolio.open(tmp_path), OnnxRuntimeBackend(), threads=1)

    with pytest.raises(BackendError, match=r"variant 'dense' does not (take|give) the kv_cache its manifest entry "
                                           r"describes \(2 layers\)"):
        runtime.open_session("dense")


def test_the_export_fuses_each_layers_attention_and_norms(cached_dir, models):
    """Each layer's attention is one onnxruntime GroupQueryAttention with that layer's own head counts
    (rotary, the cache append and attention; it gives the layer's present key and value itself), fed
    q, k and v by one packed MatMul, the sequence lengths (from the mask, no attention bias) computed once
    for all layers; every residual Add and the RMSNorm after it are one SkipSimplifiedLayerNormalization,
    the first norm has no Reciprocal left (onnxruntime fuses its Div form); and the model keeps its own
    attention implementation after the export."""
    import onnx

    for variant_id, model in models.items():
        graph = onnx.load(str(cached_dir / f"variants/{variant_id}.onnx")).graph
        fused = [node for node in graph.node if node.op_type == "GroupQueryAttention"]
        assert len({tuple(node.input[5:7]) for node in fused}) == 1 and {len(node.input) for node in fused} == {9}
        skip_norms = [node for node in graph.node if node.op_type == "SkipSimplifiedLayerNormalization"]
        assert len(skip_norms) == 2 * len(model.model.layers) and not any(
            node.op_type == "Add" and node.domain == "" and len(node.input) == 2
            and all(name not in {i.name for i in graph.initializer} for name in node.input) for node in graph.node)
        producers = {output: node for node in graph.node for output in node.output}
        assert [node.domain for node in fused] == ["com.microsoft"] * len(model.model.layers), variant_id
        for index, (node, layer) in enumerate(zip(fused, model.model.layers)):
            attributes = {item.name: onnx.helper.get_attribute_value(item) for item in node.attribute}
            head_dim = layer.self_attn.head_dim
            assert (attributes["num_heads"], attributes["kv_num_heads"]) == (
                layer.self_attn.q_proj.out_features // head_dim, layer.self_attn.k_proj.out_features // head_dim)
            assert attributes["do_rotary"] == 1 and not node.input[1] and not node.input[2]  # q, k, v packed
            assert producers[node.input[0]].op_type == "MatMul"
            assert list(node.output[1:]) == [f"present.{index}.key", f"present.{index}.value"]
        assert not any(node.op_type in ("Reciprocal", "Softmax") for node in graph.node), variant_id
        assert model.config._attn_implementation != "edgeshift_grouped"
        assert not any("forward" in vars(layer.self_attn) for layer in model.model.layers)


def test_a_kv_cache_the_file_does_not_have_refuses_the_variant_at_load(cached_dir, tmp_path):
    def misdescribe(manifest):
        files = [variant["files"]["onnx"] for variant in manifest["variants"]]
        files[0]["kv_cache"] = {"layers": [[1, 16], [2, 16]]}  # the dense file has 2 KV heads in its first layer
        files[1]["kv_cache"] = {"layers": [[2, 16], [2, 16]]}  # and the composite file 3 layers

    runtime = Runtime(Portfolio.open(rewritten(cached_dir, tmp_path, misdescribe)), OnnxRuntimeBackend(), threads=1)

    with pytest.raises(BackendError, match=r"variant 'dense' does not take the kv_cache its manifest entry describes "
                                           r"\(2 layers\): .* invalid dimensions for input: past_key_values.0.value"):
        runtime.open_session("dense")
    with pytest.raises(BackendError, match=r"composite.onnx: variant 'composite' does not take the kv_cache its manifest "
                                           r"entry describes \(2 layers\): variant 'composite' takes 8 input\(s\), got 6"):
        runtime.open_session("composite")


def test_a_malformed_kv_cache_refuses_the_manifest(cached_dir, tmp_path):
    def break_layers(manifest):
        manifest["variants"][0]["files"]["onnx"]["kv_cache"] = {"layers": [[0, 16]]}

    def unknown_buffer(manifest):
        manifest["variants"][0]["files"]["onnx"]["kv_cache"]["buffer"] = "ring"

    with pytest.raises(PortfolioError, match=r"variants\[0\].files.onnx.kv_cache.layers must be a non-empty list of "
                                             r"\[kv_heads, head_dim\] pairs"):
        Portfolio.open(rewritten(cached_dir, tmp_path / "layers", break_layers), verify=False)
    with pytest.raises(PortfolioError, match=r"variants\[0\].files.onnx.kv_cache.buffer must be one of concat, "
                                             r"shared, got 'ring'"):
        Portfolio.open(rewritten(cached_dir, tmp_path / "buffer", unknown_buffer), verify=False)


@pytest.mark.slow
def test_smollm2_generates_with_its_cache_what_it_generates_without(tmp_path):
    from test_mosaic_structure import smollm2

    model, tokenizer = smollm2()
    build_cached_portfolio(tmp_path, {"dense": model})
    prompt = tokenizer("The capital of France is")["input_ids"]
    agent = started(tmp_path)
    try:
        result = agent.generate(prompt, max_new_tokens=32)
    finally:
        agent.close()

    assert result.new_ids == torch_greedy(model, prompt, 32)
