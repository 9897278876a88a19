"""Serving a causal-lm portfolio: greedy generation (Python API, HTTP, CLI), int64 token ids, LM policy."""
import http.client
import json
import threading
import time

import numpy as np
import pytest

from agent.backends import BackendError, Session
from agent.backends.onnx import OnnxRuntimeBackend
from agent.backends.providers import CPU
from agent.bench import save_bench, store_path
from agent.cli import main
from agent.http_api import InferenceServer
from agent.policy import PolicySettings
from agent.portfolio import Portfolio, PortfolioError, tokenizer_entry, write_manifest
from agent.profiles import load_profile
from agent.runtime import InferenceError, Runtime
from agent.service import Agent
from agent.stats import LatencySummary

pytest.importorskip("onnx", reason="the test portfolio's ONNX files are written with onnx.helper")
pytest.importorskip("tokenizers", reason="the test portfolio's tokenizer.json is written with tokenizers")

from lm_portfolio import EOS_ID, SAMPLE_IDS, VOCAB, build_lm_portfolio, ids_of, logits_of  # noqa: E402


@pytest.fixture(scope="module")
def ids_only_dir(tmp_path_factory):
    return build_lm_portfolio(tmp_path_factory.mktemp("lm-ids") / "portfolio", tokenizer=False)


def started(portfolio_dir, preload: str = "all", slo_ms: float = 1000, backend=None, **kwargs) -> Agent:
    agent = Agent(Portfolio.open(portfolio_dir), load_profile("x86"), PolicySettings(latency_slo_ms=slo_ms),
                  backend="onnxruntime", threads=1, preload=preload, bench_runs=3, **kwargs)
    if backend is not None:
        agent.backend = backend
    agent.start()
    return agent


# ----------------------------------------------------------------------------- Python API


def test_generation_follows_the_models_chain_up_to_max_new_tokens(lm_agent):
    result = lm_agent.generate(ids_of("one two"), max_new_tokens=3)

    assert result.new_ids == ids_of("three four five")
    assert result.ids == ids_of("one two three four five")
    assert result.stop_reason == "max_tokens" and result.variant == lm_agent.active
    assert result.tokens_per_s > 0 and result.seconds > 0


def test_generation_stops_after_the_eos_token(lm_agent):
    result = lm_agent.generate(ids_of("seven"), max_new_tokens=10)

    assert result.new_ids == ids_of("eight nine") + [EOS_ID]
    assert result.stop_reason == "eos"


def test_text_in_text_out(lm_agent):
    assert lm_agent.generate("one two", max_new_tokens=3).text == "three four five"
    assert lm_agent.generate("seven", max_new_tokens=10).text == "eight nine"  # eos is special: not shown


def test_generation_stops_when_the_sequence_fills_the_context(lm_agent):
    context = lm_agent.manifest.language_model.context_length
    prompt = ids_of("one two three four five six")
    assert len(prompt) == context - 2

    result = lm_agent.generate(prompt, max_new_tokens=5)

    # The model saw at most `context` tokens: the prompt, "seven" and "eight"; "nine" came out of the last step.
    assert result.new_ids == ids_of("seven eight nine") and result.stop_reason == "length"


def test_a_prompt_longer_than_the_context_is_refused(lm_agent):
    context = lm_agent.manifest.language_model.context_length
    prompt = ids_of("one two three four five six seven eight nine")
    assert len(prompt) == context + 1

    with pytest.raises(InferenceError, match=f"the prompt has 9 tokens, more than the model's context of {context}"):
        lm_agent.generate(prompt, max_new_tokens=1)
    with pytest.raises(InferenceError, match=f"more than the model's context of {context}"):
        lm_agent.infer(np.array([prompt], dtype=np.int64))
    assert lm_agent.generate(prompt[1:], max_new_tokens=2).new_ids == [EOS_ID]  # a full context: one token


def test_each_step_counts_as_an_inference_of_the_variant(lm_agent):
    window = lm_agent.runtime.windows[lm_agent.active]
    before = window.total

    result = lm_agent.generate("one", max_new_tokens=4)

    assert window.total - before == len(result.new_ids) == 4


def test_infer_takes_int64_token_ids_and_answers_logits(lm_agent):
    result = lm_agent.infer(SAMPLE_IDS)

    assert result.outputs[0].shape == (2, 5, VOCAB)
    density = lm_agent.manifest.variant(result.variant).density
    np.testing.assert_allclose(result.outputs[0], logits_of(SAMPLE_IDS, density), atol=1e-5)


@pytest.mark.parametrize("ids, message", [
    (SAMPLE_IDS.astype(np.float32), "input 'input_ids' must be int64 token ids, got float32"),
    (np.array([[2, VOCAB]], dtype=np.int64), rf"token ids in \[0, {VOCAB}\), got {VOCAB}"),
    (np.array([[-1, 2]], dtype=np.int64), r"token ids in \[0, 11\), got -1"),
    (np.zeros((1, 0), dtype=np.int64), "is empty"),
    (np.array([2, 3], dtype=np.int64), "must have shape"),
])
def test_bad_token_ids_are_refused_and_serving_goes_on(lm_agent, ids, message):
    with pytest.raises(InferenceError, match=message):
        lm_agent.infer(ids)
    assert lm_agent.infer(SAMPLE_IDS[:1]).outputs[0].shape == (1, 5, VOCAB)


@pytest.mark.parametrize("prompt, max_new_tokens, message", [
    ([], 4, "the prompt is empty"),
    ([2, 99], 4, r"prompt token 1 is 99; token ids must be in \[0, 11\)"),
    ([2, 2.0], 4, "prompt token 1 must be an integer token id"),
    ([2], 0, "max_new_tokens must be between 1 and 4096, got 0"),
    ([2], 5000, "max_new_tokens must be between 1 and 4096, got 5000"),
    ("", 4, "the prompt is empty"),
])
def test_bad_generation_requests_are_refused(lm_agent, prompt, max_new_tokens, message):
    with pytest.raises(InferenceError, match=message):
        lm_agent.generate(prompt, max_new_tokens=max_new_tokens)


def test_a_portfolio_without_tokenizer_takes_token_ids_only(ids_only_dir):
    agent = started(ids_only_dir)
    try:
        assert agent.portfolio.tokenizer_path is None
        with pytest.raises(InferenceError, match="this portfolio ships no tokenizer; send input_ids"):
            agent.generate("one two")
        result = agent.generate(ids_of("one two"), max_new_tokens=2)
        assert result.new_ids == ids_of("three four") and result.text is None
    finally:
        agent.close()


def test_without_the_tokenizers_package_text_asks_for_it(lm_dir, monkeypatch):
    monkeypatch.setattr("agent.tokenizer.tokenizers_installed", lambda: False)
    agent = started(lm_dir)
    try:
        with pytest.raises(InferenceError, match="pip install tokenizers"):
            agent.generate("one two")
        assert agent.generate(ids_of("one"), max_new_tokens=1).new_ids == ids_of("two")
    finally:
        agent.close()


def test_generate_on_a_classification_portfolio_is_refused(small_portfolio):
    agent = started(small_portfolio)
    try:
        with pytest.raises(InferenceError, match="generate needs a causal-lm portfolio"):
            agent.generate([1, 2, 3])
    finally:
        agent.close()


# ----------------------------------------------------------------------------- one variant per generation


@pytest.mark.parametrize("preload", ["all", "lazy"])
def test_a_switch_mid_generation_neither_drops_nor_moves_it(lm_dir, preload):
    agent = started(lm_dir, preload=preload)
    first = agent.active
    other = next(vid for vid in agent.status()["variants"] if vid != first)
    windows = agent.runtime.windows
    before = {vid: windows[vid].total for vid in windows}

    def switch_after_the_first_token(step: int, token: int) -> None:
        if step == 0:
            agent.switch(other, "test: switch while a generation is in flight")

    result = agent.generate("one", max_new_tokens=6, on_step=switch_after_the_first_token)

    assert agent.active == other
    assert result.variant == first and result.text == "two three four five six seven"
    assert windows[first].total - before[first] == 6
    assert windows[other].total == before[other]
    assert agent.generate("one", max_new_tokens=1).variant == other  # the next generation takes the new one
    agent.close()


class SlowOnnxRuntime(OnnxRuntimeBackend):
    """onnxruntime whose sessions take at least a fixed time per run, chosen per variant."""

    def __init__(self, delays_s: dict[str, float]):
        super().__init__()
        self.delays_s = delays_s

    def open(self, path, variant_id, **options):
        return _SlowSession(super().open(path, variant_id, **options), self.delays_s.get(variant_id, 0.0))


class _SlowSession(Session):
    def __init__(self, session, delay_s: float):
        self.session, self.delay_s = session, delay_s
        self.variant_id, self.path = session.variant_id, session.path

    def run(self, inputs):
        time.sleep(self.delay_s)
        return self.session.run(inputs)

    def close(self):
        self.session.close()


def test_generations_finish_while_another_thread_keeps_switching(lm_dir):
    variants = ["dense", "mosaic-unstructured-50", "mosaic-composite-30"]
    agent = started(lm_dir, preload="lazy", backend=SlowOnnxRuntime({vid: 0.002 for vid in variants}))
    stop, failures, switches = threading.Event(), [], []

    def keep_switching():
        index = 0
        while not stop.is_set():
            index += 1
            try:
                agent.switch(variants[index % 3], "test")
                switches.append(index)
            except (BackendError, KeyError) as error:
                failures.append(repr(error))

    switcher = threading.Thread(target=keep_switching)
    switcher.start()
    try:
        results = [agent.generate("one", max_new_tokens=8) for _ in range(5)]
    finally:
        stop.set()
        switcher.join()
        agent.close()

    assert not failures and len(switches) > 5
    assert all(result.text == "two three four five six seven eight nine" for result in results)


# ----------------------------------------------------------------------------- the policy on LM variants


def test_a_tighter_slo_moves_an_lm_portfolio_to_a_cheaper_variant(lm_dir, tmp_path):
    # On-device latencies per step as `edgeshift-agent bench --state-dir` stores them; perplexity 8, 9 and 11.
    portfolio = Portfolio.open(lm_dir)
    bench = {"dense": 30.0, "mosaic-unstructured-50": 4.0, "mosaic-composite-30": 0.5}
    measured_with = Runtime(portfolio, OnnxRuntimeBackend(), threads=1, providers={vid: CPU for vid in bench})
    save_bench(store_path(tmp_path, measured_with),
               {vid: LatencySummary(30, ms, ms, ms) for vid, ms in bench.items()}, measured_with)
    agent = started(lm_dir, slo_ms=1000, state_dir=tmp_path, backend=SlowOnnxRuntime({"dense": 0.030}))
    try:
        assert agent.active == "dense"  # the lowest perplexity that fits
        for _ in range(3):
            agent.generate("one", max_new_tokens=8)  # 24 steps of live evidence, each at least 30 ms

        agent.policy.update(latency_slo_ms=15.0)
        decision = agent.step()

        # The best perplexity whose expected latency fits, not merely the fastest variant.
        assert decision.kind == "step-down" and decision.variant == "mosaic-unstructured-50"
        assert agent.active == "mosaic-unstructured-50"
    finally:
        agent.close()


# ----------------------------------------------------------------------------- manifest checks on a real portfolio


def test_a_changed_tokenizer_refuses_the_portfolio(lm_dir, tmp_path):
    import shutil

    copy = shutil.copytree(lm_dir, tmp_path / "copy")
    path = copy / "tokenizer.json"
    path.write_text(path.read_text().replace('"nine"', '"nein"'))

    with pytest.raises(PortfolioError, match="tokenizer.json: sha256 differs from the manifest"):
        Portfolio.open(copy)


def test_an_unreadable_tokenizer_refuses_the_portfolio_at_start(lm_dir, tmp_path):
    import shutil

    copy = shutil.copytree(lm_dir, tmp_path / "copy")
    (copy / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    manifest = Portfolio.open(copy, verify=False).manifest
    manifest.language_model.tokenizer = tokenizer_entry(copy, "tokenizer.json")
    write_manifest(copy, manifest)

    agent = Agent(Portfolio.open(copy), load_profile("x86"), PolicySettings(latency_slo_ms=1000),
                  backend="onnxruntime", threads=1, bench_runs=1)
    with pytest.raises(PortfolioError, match="tokenizer.json: not a readable tokenizers file"):
        agent.start()


# ----------------------------------------------------------------------------- HTTP


@pytest.fixture(scope="module")
def lm_server(lm_agent):
    server = InferenceServer(lm_agent, port=0).start()
    yield lm_agent, server
    server.stop()


def send(server, path: str, body: dict | None = None):
    """POST body as JSON, or GET when there is none; the status and the decoded JSON reply."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("POST" if body is not None else "GET", path,
                       body=None if body is None else json.dumps(body).encode(),
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    reply = json.loads(response.read())
    connection.close()
    return response.status, reply


def test_http_generate_from_text(lm_server):
    agent, server = lm_server
    status, reply = send(server, f"/v2/models/{agent.name}/generate",
                         {"id": "g-1", "text_input": "one two", "parameters": {"max_tokens": 3}})

    assert status == 200
    assert reply["text_output"] == "three four five" and reply["output_ids"] == ids_of("three four five")
    assert reply["model_name"] == agent.name and reply["id"] == "g-1"
    assert reply["parameters"]["variant"] == agent.active
    assert reply["parameters"]["stop_reason"] == "max_tokens" and reply["parameters"]["tokens"] == 3


def test_http_generate_from_token_ids_stops_at_eos(lm_server):
    agent, server = lm_server
    status, reply = send(server, f"/v2/models/{agent.name}/generate", {"input_ids": ids_of("eight")})

    assert status == 200
    assert reply["output_ids"] == ids_of("nine") + [EOS_ID] and reply["text_output"] == "nine"
    assert reply["parameters"]["stop_reason"] == "eos"


def test_http_infer_takes_int64_token_ids(lm_server):
    agent, server = lm_server
    tensor = {"name": "input_ids", "shape": [2, 5], "datatype": "INT64", "data": SAMPLE_IDS.ravel().tolist()}
    status, reply = send(server, f"/v2/models/{agent.name}/infer", {"inputs": [tensor]})

    assert status == 200
    out = reply["outputs"][0]
    assert out["name"] == "logits" and out["shape"] == [2, 5, VOCAB] and out["datatype"] == "FP32"
    density = agent.manifest.variant(reply["parameters"]["variant"]).density
    np.testing.assert_allclose(np.reshape(out["data"], out["shape"]), logits_of(SAMPLE_IDS, density), atol=1e-5)


def test_http_metadata_shows_int64_token_ids_and_the_generate_extension(lm_server):
    agent, server = lm_server
    status, meta = send(server, f"/v2/models/{agent.name}")
    assert status == 200
    assert meta["inputs"] == [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, -1, VOCAB]}]
    assert send(server, "/v2")[1]["extensions"] == ["binary_tensor_data", "generate"]


def ids_tensor(data, datatype: str = "INT64") -> dict:
    return {"name": "input_ids", "shape": [1, len(data)], "datatype": datatype, "data": data}


@pytest.mark.parametrize("route, body, message", [
    ("infer", {"inputs": [ids_tensor([2.0, 3.0], "FP32")]}, "datatype must be INT64"),
    ("infer", {"inputs": [ids_tensor([2.5, 3])]}, "data must be integers for INT64"),
    ("infer", {"inputs": [ids_tensor([2, 300])]}, r"token ids in [0, 11), got 300"),
    ("generate", {"input_ids": [2, 300]}, "prompt token 1 is 300"),
    ("generate", {"input_ids": [2] * 9}, "the prompt has 9 tokens, more than the model's context of 8"),
    ("generate", {"input_ids": [2.5]}, "'input_ids' must be a flat list of integer token ids"),
    ("generate", {"text_input": "one", "parameters": {"max_tokens": 0}}, "'max_tokens' must be an integer between 1"),
    ("generate", {"text_input": "one", "parameters": {"min_p": 0.1}}, "unknown parameter 'min_p'"),
    ("generate", {"text_input": "one", "parameters": {"temperature": "hot"}}, "temperature must be a number"),
    ("generate", {"text_input": "one", "parameters": {"stop": [""]}}, "stop strings must not be empty"),
    ("generate", {"text_input": "one", "input_ids": [2]}, "exactly one of them"),
    ("generate", {"parameters": {}}, "exactly one of them"),
    ("generate", {"text_input": 7}, "'text_input' must be a string"),
])
def test_http_bad_lm_requests_are_400_with_the_reason(lm_server, route, body, message):
    agent, server = lm_server
    status, reply = send(server, f"/v2/models/{agent.name}/{route}", body)
    assert status == 400 and message in reply["error"]


def test_http_text_on_a_portfolio_without_tokenizer_is_400(ids_only_dir):
    agent = started(ids_only_dir)
    server = InferenceServer(agent, port=0).start()
    try:
        status, reply = send(server, f"/v2/models/{agent.name}/generate", {"text_input": "one"})
        assert status == 400 and reply["error"] == "this portfolio ships no tokenizer; send input_ids"
        status, reply = send(server, f"/v2/models/{agent.name}/generate", {"input_ids": ids_of("seven")})
        assert status == 200 and reply["output_ids"] == ids_of("eight nine") + [EOS_ID]
        assert "text_output" not in reply
    finally:
        server.stop()
        agent.close()


# ----------------------------------------------------------------------------- CLI


def test_cli_generate_prints_the_text_the_variant_and_the_speed(lm_dir, capsys):
    argv = ["generate", str(lm_dir), "--prompt", "one two", "--max-tokens", "3", "--threads", "1"]
    assert main(argv + ["--variant", "mosaic-composite-30"]) == 0

    captured = capsys.readouterr()
    assert captured.out == "three four five\n"
    assert captured.err.startswith("mosaic-composite-30: 3 tokens in ") and "tokens/s" in captured.err


def test_cli_generate_takes_token_ids(ids_only_dir, capsys):
    assert main(["generate", str(ids_only_dir), "--ids", "8, 9", "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out == f"{ids_of('nine')[0]} {EOS_ID}\n"


@pytest.mark.parametrize("portfolio, argv, message", [
    ("ids_only_dir", ["--prompt", "one"], "this portfolio ships no tokenizer; send input_ids"),
    ("lm_dir", ["--prompt", "one", "--max-tokens", "0"], "max_new_tokens must be between 1 and 4096"),
    ("lm_dir", ["--prompt", "one", "--variant", "huge"], "unknown variant 'huge'"),
])
def test_cli_generate_refuses_in_one_line(request, capsys, portfolio, argv, message):
    directory = request.getfixturevalue(portfolio)
    assert main(["generate", str(directory), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgeshift-agent: error: ") and message in err and "\n" not in err
