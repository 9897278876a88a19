"""Choosing tokens (temperature, top-k, top-p, seed) and stop strings: the Sampler alone, then through
generate, the KServe generate extension and the CLI on the counting LM portfolio."""
import http.client
import json

import numpy as np
import pytest

from agent.runtime import InferenceError
from agent.sampling import Sampler, StopStrings, sampler_from, stop_strings


def softmax(logits, temperature=1.0):
    weights = np.exp((logits - logits.max()) / temperature)
    return weights / weights.sum()


def frequencies(sampler: Sampler, logits, draws: int = 4000) -> np.ndarray:
    counts = np.bincount([sampler.choose(logits) for _ in range(draws)], minlength=len(logits))
    return counts / draws


LOGITS = np.array([2.0, 1.5, 1.0, 0.0, -1.0, -3.0])


# ----------------------------------------------------------------------------- the Sampler


def test_temperature_zero_is_argmax():
    rows = np.random.default_rng(1).normal(0, 5, (50, 100)).astype(np.float32)
    sampler = Sampler(temperature=0)
    assert [sampler.choose(row) for row in rows] == [int(np.argmax(row)) for row in rows]


def test_top_k_of_one_is_argmax_at_any_temperature():
    rows = np.random.default_rng(2).normal(0, 1, (50, 30))
    sampler = Sampler(temperature=5.0, top_k=1, seed=0)
    assert [sampler.choose(row) for row in rows] == [int(np.argmax(row)) for row in rows]


def test_samples_follow_the_softmax_of_logits_over_temperature():
    for temperature in (0.5, 1.0, 2.0):
        measured = frequencies(Sampler(temperature=temperature, seed=3), LOGITS)
        np.testing.assert_allclose(measured, softmax(LOGITS, temperature), atol=0.03)


def test_top_k_keeps_the_k_most_likely_tokens_in_their_proportions():
    measured = frequencies(Sampler(temperature=1.0, top_k=3, seed=4), LOGITS)

    assert measured[3:].sum() == 0 and (measured[:3] > 0).all()
    np.testing.assert_allclose(measured[:3], softmax(LOGITS[:3]), atol=0.03)


def test_top_p_keeps_the_smallest_head_that_holds_p():
    logits = np.log(np.array([0.05, 0.5, 0.15, 0.3]))  # ranked: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)

    measured = frequencies(Sampler(temperature=1.0, top_p=0.75, seed=5), logits)

    assert measured[0] == measured[2] == 0  # 0.5 alone is short of 0.75: 0.5 + 0.3 is the head
    np.testing.assert_allclose(measured[[1, 3]], [0.5 / 0.8, 0.3 / 0.8], atol=0.03)
    assert set(np.flatnonzero(frequencies(Sampler(top_p=0.4, seed=5), logits, 200))) == {1}


def test_the_same_seed_gives_the_same_tokens_and_another_seed_others():
    rows = np.random.default_rng(6).normal(0, 1, (64, 50))

    def draw(seed):
        sampler = Sampler(temperature=1.0, top_p=0.9, top_k=20, seed=seed)
        return [sampler.choose(row) for row in rows]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
    assert draw(-7) == draw(-7)  # OpenAI seeds may be negative


def test_extreme_logits_neither_overflow_nor_pick_the_impossible():
    huge = np.array([3e38, 2.9e38, -3e38], dtype=np.float32)
    assert set(np.flatnonzero(frequencies(Sampler(temperature=0.01, seed=9), huge, 200))) == {0}

    masked = np.array([-np.inf, 1.0, -np.inf, 1.0, np.nan])
    assert set(np.flatnonzero(frequencies(Sampler(seed=9), masked, 400))) == {1, 3}

    assert Sampler(seed=9).choose(np.array([0.0, np.inf, 5.0])) == 1
    assert Sampler(seed=9).choose(np.full(4, -np.inf)) == 0  # nothing to weigh: greedy's answer
    assert Sampler(temperature=0).choose(np.array([np.nan, 1.0, 2.0])) == 2


@pytest.mark.parametrize("options, message", [
    ({"temperature": -0.1}, "temperature must be at least 0.0, got -0.1"),
    ({"temperature": "hot"}, "temperature must be a number, got str 'hot'"),
    ({"temperature": True}, "temperature must be a number"),
    ({"temperature": float("nan")}, "temperature must be a number"),
    ({"top_k": 2.5}, "top_k must be an integer, got float 2.5"),
    ({"top_k": -1}, "top_k must be at least 0, got -1"),
    ({"top_p": 0}, "top_p must be greater than 0"),
    ({"top_p": 1.5}, "top_p must be between 0.0 and 1.0, got 1.5"),
    ({"seed": "42"}, "seed must be an integer, got str '42'"),
])
def test_bad_sampling_parameters_name_themselves(options, message):
    with pytest.raises(InferenceError, match=message):
        sampler_from(options, default_temperature=1.0)


def test_absent_or_null_options_take_the_defaults():
    sampler = sampler_from({"temperature": None, "top_p": None, "seed": 3}, default_temperature=0.0)
    assert sampler.greedy and sampler.top_p == 1.0 and sampler.seed == 3


# ----------------------------------------------------------------------------- stop strings


def test_stop_strings_cut_the_text_before_the_earliest_one():
    stops = StopStrings(["\n\n", "END"])

    assert stops.find("a END b\n\n") == 2
    assert stops.cut("a END b\n\n") == "a "
    assert stops.cut("no stop here") == "no stop here"
    assert not StopStrings(()) and StopStrings("END").strings == ("END",)


def test_a_stream_holds_back_what_may_still_become_a_stop_string():
    stops = StopStrings(["STOP"])

    assert stops.settled("hello ST") == len("hello ")  # "ST" may grow into "STOP"
    assert stops.settled("hello STA") == len("hello STA")
    assert stops.settled("hello STOP now") == len("hello ")
    assert StopStrings(()).settled("caf\ufffd") == 3  # half a UTF-8 character waits for the rest


@pytest.mark.parametrize("value, message", [
    (7, "stop must be a string or a list of strings, got int"),
    (["a", 1], "stop must be a string or a list of strings"),
    ([""], "stop strings must not be empty"),
    (["x"] * 17, "stop takes at most 16 strings, got 17"),
])
def test_bad_stop_values_are_refused(value, message):
    with pytest.raises(InferenceError, match=message):
        stop_strings(value)


# ----------------------------------------------------------------------------- through generate, HTTP and the CLI

pytest.importorskip("onnx", reason="the test portfolio's ONNX files are written with onnx.helper")
pytest.importorskip("tokenizers", reason="the test portfolio's tokenizer.json is written with tokenizers")

from agent.cli import main  # noqa: E402
from agent.http_api import InferenceServer  # noqa: E402
from agent.policy import PolicySettings  # noqa: E402
from agent.portfolio import Portfolio  # noqa: E402
from agent.profiles import load_profile  # noqa: E402
from agent.service import Agent  # noqa: E402
from lm_portfolio import EOS_ID, ids_of, build_lm_portfolio  # noqa: E402


def test_a_stop_string_ends_generation_and_is_left_out(lm_agent):
    result = lm_agent.generate("one", max_new_tokens=8, stop=["four"])

    assert result.stop_reason == "stop" and result.text == "two three "
    assert result.new_ids == ids_of("two three four")


def test_sampling_is_reproducible_by_seed_and_greedy_at_temperature_zero(lm_agent):
    def sampled(seed):
        return lm_agent.generate("one", max_new_tokens=12, sampler=Sampler(temperature=3.0, seed=seed)).new_ids

    assert sampled(11) == sampled(11)
    assert sampled(11) != sampled(12)
    greedy = lm_agent.generate("three", max_new_tokens=12, sampler=Sampler(temperature=0, seed=11))
    assert greedy.new_ids == ids_of("four five six seven eight nine") + [EOS_ID]


def test_stop_strings_need_a_tokenizer(tmp_path):
    agent = Agent(Portfolio.open(build_lm_portfolio(tmp_path / "ids-only", tokenizer=False)), load_profile("x86"),
                  PolicySettings(latency_slo_ms=1000), backend="onnxruntime", threads=1, bench_runs=1)
    agent.start()
    try:
        with pytest.raises(InferenceError, match="stop strings need the portfolio's tokenizer"):
            agent.generate(ids_of("one"), stop=["two"])
    finally:
        agent.close()


def test_the_kserve_generate_extension_takes_sampling_parameters(lm_agent):
    server = InferenceServer(lm_agent, port=0).start()

    def generate(parameters):
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        body = {"text_input": "one", "parameters": {"max_tokens": 10, **parameters}}
        connection.request("POST", f"/v2/models/{lm_agent.name}/generate", body=json.dumps(body).encode())
        response = connection.getresponse()
        reply = json.loads(response.read())
        connection.close()
        return response.status, reply

    try:
        sampled = {"temperature": 4.0, "top_k": 5, "top_p": 0.95, "seed": 5}
        status, first = generate(sampled)
        assert status == 200 and generate(sampled)[1]["output_ids"] == first["output_ids"]
        status, reply = generate({"stop": "five"})
        assert status == 200 and reply["text_output"] == "two three four "
        assert reply["parameters"]["stop_reason"] == "stop"
        status, reply = generate({"top_p": 2})
        assert status == 400 and "top_p must be between 0.0 and 1.0, got 2" in reply["error"]
    finally:
        server.stop()


def test_cli_generate_samples_with_a_seed_and_stops_at_a_string(lm_dir, capsys):
    argv = ["generate", str(lm_dir), "--prompt", "one", "--max-tokens", "10", "--threads", "1"]

    assert main(argv + ["--stop", "six", "--stop", "nine"]) == 0
    assert capsys.readouterr().out == "two three four five \n"

    sampled = argv + ["--temperature", "3", "--top-k", "6", "--seed", "21"]
    assert main(sampled) == 0 and main(sampled) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first == second

    assert main(argv + ["--top-p", "0"]) == 2
    assert "top_p must be greater than 0" in capsys.readouterr().err
