"""The OpenAI-compatible routes, spoken to by the real `openai` client on a real HTTP port: completions, chat,
streaming, seeds, stop strings, and bad input answered with a 400 while the agent keeps serving."""
import http.client
import json
import logging
import re
import socket
import time

import pytest

openai = pytest.importorskip("openai", reason="the tests speak to the agent through the openai client")
pytest.importorskip("onnx", reason="the test portfolio's ONNX files are written with onnx.helper")
pytest.importorskip("tokenizers", reason="the test portfolio's tokenizer.json is written with tokenizers")
pytest.importorskip("jinja2", reason="chat templates render with jinja2")

from agent.http_api import InferenceServer  # noqa: E402
from agent.policy import PolicySettings  # noqa: E402
from agent.portfolio import Portfolio, write_manifest  # noqa: E402
from agent.profiles import load_profile  # noqa: E402
from agent.service import Agent  # noqa: E402
from lm_portfolio import build_lm_portfolio  # noqa: E402
from test_generate import SlowOnnxRuntime  # noqa: E402

# Renders each message's content followed by a space: the counting model reads the words and goes on counting.
CHAT_TEMPLATE = ("{% for message in messages %}"
                 "{% if message['role'] not in ['user', 'assistant'] %}"
                 "{{ raise_exception('Only user and assistant roles are supported') }}"
                 "{% endif %}{{ message['content'] }} {% endfor %}")


def serve(portfolio_dir, backend=None):
    agent = Agent(Portfolio.open(portfolio_dir), load_profile("x86"), PolicySettings(latency_slo_ms=1000),
                  backend=backend or "onnxruntime", threads=1, bench_runs=3)
    agent.start()
    return agent, InferenceServer(agent, port=0).start()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    agent, server = serve(build_lm_portfolio(tmp_path_factory.mktemp("chat") / "portfolio",
                                             chat_template=CHAT_TEMPLATE))
    yield agent, server
    server.stop()
    agent.close()


@pytest.fixture(scope="module")
def client(served):
    agent, server = served
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def model(served):
    return served[0].name


def post(server, path: str, body: dict):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    reply = json.loads(response.read())
    connection.close()
    return response.status, reply


# ----------------------------------------------------------------------------- round trips


def test_models_lists_the_served_portfolio(client, model):
    assert [card.id for card in client.models.list()] == [model]
    assert client.models.retrieve(model).owned_by == "edgeshift"


def test_a_completion_counts_on_and_reports_usage(client, model):
    completion = client.completions.create(model=model, prompt="one two", max_tokens=3, temperature=0)

    choice = completion.choices[0]
    assert choice.text == "three four five" and choice.finish_reason == "length"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens) == (2, 3, 5)
    assert completion.model == model and completion.id.startswith("cmpl-")
    assert completion.system_fingerprint in ("dense", "mosaic-unstructured-50", "mosaic-composite-30")


def test_a_completion_that_reaches_eos_finishes_with_stop(client, model):
    choice = client.completions.create(model=model, prompt="seven", max_tokens=10, temperature=0).choices[0]
    assert choice.text == "eight nine" and choice.finish_reason == "stop"


def test_a_chat_renders_the_template_and_answers_as_assistant(client, model):
    chat = client.chat.completions.create(model=model, max_tokens=3, temperature=0,
                                          messages=[{"role": "user", "content": "one"},
                                                    {"role": "assistant", "content": "two"}])

    message = chat.choices[0].message
    assert message.role == "assistant" and message.content == "three four five"
    assert chat.choices[0].finish_reason == "length" and chat.usage.prompt_tokens == 2


def test_a_streamed_completion_sends_the_same_text_in_pieces(client, model):
    chunks = list(client.completions.create(model=model, prompt="one two", max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))

    texts = [chunk.choices[0].text for chunk in chunks if chunk.choices]
    assert "".join(texts) == "three four five six seven" and len([t for t in texts if t]) >= 5
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert len({chunk.id for chunk in chunks}) == 1


def test_a_streamed_chat_starts_with_the_role_and_ends_with_the_reason(client, model):
    chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "six"}],
                                                 temperature=0, stream=True))

    deltas = [chunk.choices[0].delta for chunk in chunks]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == "seven eight nine"
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].system_fingerprint is not None


def test_the_same_seed_gives_the_same_text_streamed_or_not(client, model):
    def sampled(seed, stream=False):
        reply = client.completions.create(model=model, prompt="one", max_tokens=12, temperature=3.0, seed=seed,
                                          extra_body={"top_k": 6}, stream=stream)
        return "".join(c.choices[0].text for c in reply) if stream else reply.choices[0].text

    assert sampled(7) == sampled(7) == sampled(7, stream=True)
    assert sampled(7) != sampled(8)


def test_top_k_of_one_is_greedy_at_any_temperature(client, model):
    choice = client.completions.create(model=model, prompt="three", max_tokens=3, temperature=2.0,
                                       extra_body={"top_k": 1}).choices[0]
    assert choice.text == "four five six"


def test_a_stop_string_ends_the_answer_before_it(client, model):
    choice = client.completions.create(model=model, prompt="one", max_tokens=8, temperature=0,
                                       stop=["five", "nine"]).choices[0]
    assert choice.text == "two three four " and choice.finish_reason == "stop"

    streamed = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "one"}],
                                              temperature=0, stop="four", stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "two three "
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_fields_clients_send_by_default_are_taken_at_their_defaults(client, model):
    choice = client.completions.create(model=model, prompt="one", max_tokens=2, temperature=0, n=1, best_of=1,
                                       echo=False, logprobs=None, presence_penalty=0, frequency_penalty=0.0,
                                       logit_bias={}, user="tester").choices[0]
    assert choice.text == "two three"
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": [
        {"type": "text", "text": "one"}]}], max_completion_tokens=2, temperature=0, n=1, logprobs=False,
        response_format={"type": "text"}, tool_choice="none", metadata={"who": "test"})
    assert chat.choices[0].message.content == "two three"


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("path, body, message", [
    ("completions", {"prompt": "one two three four five six seven eight nine"},
     "the prompt has 9 tokens, more than the model's context of 8"),
    ("completions", {"prompt": "one two three four five six seven eight nine", "stream": True},
     "the prompt has 9 tokens, more than the model's context of 8"),
    ("completions", {"prompt": "one", "n": 2}, "'n': 2 is not supported by this server; it takes null or 1 only"),
    ("completions", {"prompt": "one", "logprobs": 5}, "'logprobs': 5 is not supported"),
    ("completions", {"prompt": "one", "presence_penalty": 0.5}, "'presence_penalty': 0.5 is not supported"),
    ("completions", {"prompt": "one", "min_p": 0.1}, "unknown field 'min_p' for /v1/completions"),
    ("completions", {"prompt": "one", "temperature": "hot"}, "temperature must be a number, got str 'hot'"),
    ("completions", {"prompt": "one", "top_k": 1.5}, "top_k must be an integer, got float 1.5"),
    ("completions", {"prompt": "one", "top_p": 0}, "top_p must be greater than 0"),
    ("completions", {"prompt": "one", "seed": True}, "seed must be an integer"),
    ("completions", {"prompt": "one", "stop": [1]}, "stop must be a string or a list of strings"),
    ("completions", {"prompt": "one", "max_tokens": 0}, "'max_tokens' must be an integer between 1 and 4096, got 0"),
    ("completions", {"prompt": "one", "stream": "yes"}, "'stream' must be true or false"),
    ("completions", {"prompt": "one", "stream_options": {"include_usage": True}},
     "'stream_options' is only allowed with stream: true"),
    ("completions", {"prompt": ["one", "two"]}, "'prompt' must be a string or a list of token ids"),
    ("completions", {"prompt": [2, 300]}, "prompt token 1 is 300"),
    ("completions", {"prompt": [2, 300], "stream": True}, "prompt token 1 is 300"),
    ("completions", {"prompt": ""}, "the prompt is empty"),
    ("chat/completions", {"messages": []}, "'messages' must be a non-empty list"),
    ("chat/completions", {"messages": [{"role": "system", "content": "be brief"}]},
     "the chat template refused the messages: Only user and assistant roles are supported"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0]: only text content parts are supported"),
    ("chat/completions", {"messages": [{"role": "user", "content": "one"}], "tools": [{"type": "function"}]},
     "'tools'"),
    ("chat/completions", {"messages": [{"role": "user", "content": "one"}], "echo": False},
     "unknown field 'echo' for /v1/chat/completions"),
])
def test_bad_requests_are_a_400_naming_the_problem_and_serving_goes_on(served, client, model, path, body, message):
    agent, server = served
    status, reply = post(server, f"/v1/{path}", {"model": model, **body})

    assert status == 400, reply
    assert message in reply["error"]["message"] and reply["error"]["type"] == "invalid_request_error"
    assert client.completions.create(model=model, prompt="one", max_tokens=1, temperature=0).choices[0].text == "two"


def test_the_client_raises_bad_request_with_the_servers_message(client, model):
    with pytest.raises(openai.BadRequestError, match="'n': 3 is not supported"):
        client.completions.create(model=model, prompt="one", n=3)
    with pytest.raises(openai.NotFoundError, match="model 'gpt-4o' not found; this agent serves"):
        client.completions.create(model="gpt-4o", prompt="one")


def test_a_chat_without_a_template_is_a_400_and_completions_still_work(tmp_path):
    agent, server = serve(build_lm_portfolio(tmp_path / "portfolio"))
    try:
        status, reply = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "one"}]})
        assert status == 400
        assert reply["error"]["message"].startswith(f"'{agent.name}' has no chat template")
        status, reply = post(server, "/v1/completions", {"prompt": "one", "max_tokens": 1, "temperature": 0})
        assert status == 200 and reply["choices"][0]["text"] == "two"
    finally:
        server.stop()
        agent.close()


def test_a_client_that_drops_a_stream_stops_its_generation(tmp_path, caplog):
    # Without an eos token the counting model never stops on its own: only the client's leaving can end it early.
    directory = build_lm_portfolio(tmp_path / "portfolio")
    manifest = Portfolio.open(directory, verify=False).manifest
    manifest.language_model.eos_token_id = None
    write_manifest(directory, manifest)
    variants = ("dense", "mosaic-unstructured-50", "mosaic-composite-30")
    agent, server = serve(directory, backend=SlowOnnxRuntime({vid: 0.002 for vid in variants}))
    caplog.set_level(logging.INFO, logger="edgeshift")
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            body = json.dumps({"prompt": "one", "max_tokens": 4096, "stream": True, "temperature": 0}).encode()
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            first = sock.recv(4096)
        assert first.startswith(b"HTTP/1.1 200") and b"text/event-stream" in first

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any("left a stream" in r.getMessage() for r in caplog.records):
            time.sleep(0.05)
        left = [r.getMessage() for r in caplog.records if "left a stream" in r.getMessage()]
        assert left, "the generation went on after the client left"
        assert int(re.search(r"after (\d+) tokens", left[0]).group(1)) < 4096
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]

        status, reply = post(server, "/v1/completions", {"prompt": "one", "max_tokens": 2, "temperature": 0})
        assert status == 200 and reply["choices"][0]["text"] == "two three"
    finally:
        server.stop()
        agent.close()
