"""The binary tensor data extension, spoken by Triton's own client, and a fuzzed HTTP front that never answers 5xx."""
from __future__ import annotations

import collections
import http.client
import json
import socket

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.http_api import MAX_JSON_DEPTH, InferenceServer
from agent.policy import PolicySettings
from agent.portfolio import Portfolio
from agent.profiles import load_profile
from agent.service import Agent

httpclient = pytest.importorskip("tritonclient.http", reason="the dev extra's tritonclient[http]")


@pytest.fixture(scope="module")
def served(small_portfolio):
    agent = Agent(Portfolio.open(small_portfolio), load_profile("x86"), PolicySettings(latency_slo_ms=1000),
                  backend="onnxruntime", threads=1, bench_runs=3)
    agent.start()
    agent.step()
    agent.pin(agent.active)  # one variant answers every request: the onnxruntime reference below is its file
    server = InferenceServer(agent, port=0, max_body_bytes=1 << 20).start()
    yield agent, server
    server.stop()
    agent.close()


@pytest.fixture(scope="module")
def triton(served):
    agent, server = served
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
    yield client
    client.close()


def reference(agent, x: np.ndarray) -> np.ndarray:
    """The served variant's ONNX file run by a bare onnxruntime session."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(agent.portfolio.file_path(agent.active, "onnx")),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def infer(agent, client, x: np.ndarray, binary_input: bool, binary_output: bool | None):
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary_input)
    outputs = None if binary_output is None else [httpclient.InferRequestedOutput("logits",
                                                                                  binary_data=binary_output)]
    return client.infer(agent.name, [tensor], outputs=outputs, request_id="r-1")


def test_server_metadata_lists_the_binary_extension(served, triton):
    assert "binary_tensor_data" in triton.get_server_metadata()["extensions"]
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready(served[0].name)


@pytest.mark.parametrize("binary_input, binary_output", [
    (True, None),  # tritonclient's default: binary input, and no outputs named, so binary_data_output
    (False, False),  # JSON both ways
    (True, False),  # binary in, JSON out
    (False, True),  # JSON in, binary out
])
def test_triton_client_infers_in_every_mix_of_json_and_binary(served, triton, binary_input, binary_output):
    agent, server = served
    x = agent.portfolio.samples().inputs[0][:3].astype(np.float32)
    result = infer(agent, triton, x, binary_input, binary_output)
    logits = result.as_numpy("logits")
    assert logits.dtype == np.float32 and logits.shape == (3, 10)
    np.testing.assert_allclose(logits, reference(agent, x), atol=1e-4)
    response = result.get_response()
    assert response["id"] == "r-1" and response["parameters"]["variant"] == agent.active
    binary_out = binary_output is not False
    assert ("binary_data_size" in response["outputs"][0].get("parameters", {})) == binary_out
    assert ("data" in response["outputs"][0]) == (not binary_out)


def raw_post(server, path: str, body: bytes, headers: dict[str, str]):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("POST", path, body=body, headers=headers)
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response, data


def binary_request(x: np.ndarray, size: int | None = None, extra: bytes = b"", **request):
    header = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes if size is None else size}}],
                         **request}).encode()
    return header + x.tobytes() + extra, {"Inference-Header-Content-Length": str(len(header))}


def test_binary_reply_has_the_extension_headers(served):
    agent, server = served
    x = np.zeros((1, 3, 32, 32), np.float32)
    body, headers = binary_request(x, parameters={"binary_data_output": True})
    response, data = raw_post(server, f"/v2/models/{agent.name}/infer", body, headers)
    assert response.status == 200 and response.getheader("Content-Type") == "application/octet-stream"
    split = int(response.getheader("Inference-Header-Content-Length"))
    header = json.loads(data[:split])
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 40} and len(data) == split + 40
    np.testing.assert_allclose(np.frombuffer(data[split:], "<f4").reshape(1, 10), reference(agent, x), atol=1e-4)


@pytest.mark.parametrize("make, message", [
    (lambda x: binary_request(x, size=x.nbytes - 4), "input 'input': binary_data_size 12284 is not the 12288 bytes"),
    (lambda x: binary_request(x, extra=b"\0" * 8), "8 bytes of binary data after the JSON header belong to no input"),
    (lambda x: (binary_request(x)[0][:-8], binary_request(x)[1]), "input 'input': binary_data_size 12288 runs past"),
    (lambda x: (binary_request(x)[0], {"Inference-Header-Content-Length": "99999999"}), "must be an integer between"),
    (lambda x: (binary_request(x)[0], {"Inference-Header-Content-Length": "²"}), "must be an integer between"),
    (lambda x: binary_request(x, parameters={"binary_data_output": "yes"}), "'binary_data_output' must be true or"),
    (lambda x: binary_request(x, outputs=[{"name": "nope"}]), "unknown output 'nope'"),
])
def test_binary_sizes_that_do_not_add_up_are_400_naming_the_tensor(served, make, message):
    agent, server = served
    body, headers = make(np.zeros((1, 3, 32, 32), np.float32))
    response, data = raw_post(server, f"/v2/models/{agent.name}/infer", body, headers)
    assert response.status == 400 and message in json.loads(data)["error"]


@pytest.mark.parametrize("tensor, message", [
    ({"name": ["input"], "shape": [1], "datatype": "FP32", "data": [1.0]}, "'name' must be a string, got list"),
    ({"name": {"a": 1}, "shape": [1], "datatype": "FP32", "data": [1.0]}, "'name' must be a string, got dict"),
    ({"name": "input", "shape": [1, -3], "datatype": "FP32", "data": [1.0]}, "shape must be a list"),
    ({"name": "input", "shape": "1x3", "datatype": "FP32", "data": [1.0]}, "shape must be a list"),
    ({"name": "input", "shape": [1], "datatype": ["FP32"], "data": [1.0]}, "datatype must be FP32"),
    ({"name": "input", "shape": [1], "datatype": "FP32", "data": None}, "'data' must be a list"),
    ({"name": "input", "shape": [0, 1 << 61, 1 << 61], "datatype": "FP32", "data": []}, "input 'input': shape"),
    ({"name": "input", "shape": [1], "datatype": "FP32", "data": [1.0], "parameters": []}, "'parameters' must be"),
])
def test_malformed_tensors_are_400_not_500(served, tensor, message):
    agent, server = served
    response, data = raw_post(server, f"/v2/models/{agent.name}/infer", json.dumps({"inputs": [tensor]}).encode(),
                              {"Content-Type": "application/json"})
    assert response.status == 400 and message in json.loads(data)["error"]


def test_deep_nesting_is_refused_before_parsing(served):
    agent, server = served
    for depth in (MAX_JSON_DEPTH + 1, 100_000):
        data = "[" * depth + "]" * depth
        body = ('{"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": ' + data + "}]}").encode()
        response, reply = raw_post(server, f"/v2/models/{agent.name}/infer", body, {})
        assert response.status == 400 and "nested deeper than" in json.loads(reply)["error"]
    body = json.dumps({"id": "[" * 200, "inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                                    "data": np.zeros((1, 3, 32, 32)).tolist()}]}).encode()
    response, reply = raw_post(server, f"/v2/models/{agent.name}/infer", body, {})  # brackets in strings: not nesting
    assert response.status == 200, reply


def nested_body(data_depth: int) -> bytes:
    """An infer request whose JSON nests data_depth arrays inside its 3 levels (object, inputs, tensor)."""
    data = "[" * data_depth + "0.5" + "]" * data_depth
    return ('{"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": ' + data + "}]}").encode()


@pytest.fixture(params=["json", "orjson"])
def loads(request, monkeypatch):
    """The server parses with the standard library's json.loads, or with orjson (its default when installed)."""
    import agent.http_api

    module = pytest.importorskip(request.param)
    monkeypatch.setattr(agent.http_api, "_json_loads", module.loads)
    return request.param


def test_nesting_at_the_bound_is_parsed_and_one_past_it_refused(served, loads):
    agent, server = served
    route = f"/v2/models/{agent.name}/infer"
    response, reply = raw_post(server, route, nested_body(MAX_JSON_DEPTH - 3), {})
    assert response.status == 400 and "nested more than 32 lists deep" in json.loads(reply)["error"]  # parsed
    response, reply = raw_post(server, route, nested_body(MAX_JSON_DEPTH - 2), {})
    assert response.status == 400 and "nested deeper than 64 levels" in json.loads(reply)["error"]


def test_flat_and_nested_data_give_the_same_answer_with_either_parser(served, loads):
    agent, server = served
    x = agent.portfolio.samples().inputs[0][:2].astype(np.float32)
    answers = []
    for data in (x.ravel().tolist(), x.tolist()):
        body = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": data}],
                           "parameters": {"binary_data_output": True}}).encode()
        response, reply = raw_post(server, f"/v2/models/{agent.name}/infer", body, {})
        assert response.status == 200, reply
        split = int(response.getheader("Inference-Header-Content-Length"))
        answers.append(np.frombuffer(reply[split:], "<f4"))
    assert answers[0].tobytes() == answers[1].tobytes()  # bit for bit
    np.testing.assert_allclose(answers[0].reshape(2, 10), reference(agent, x), atol=1e-4)


def test_a_refused_body_is_not_read_as_the_next_request(served):
    agent, server = served
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    for _ in range(2):  # the 404's body is read and dropped: the connection stays open for the next request
        connection.request("POST", "/v2/models/other/infer", body=b"GET /v2/health/live HTTP/1.1\r\n\r\n")
        response = connection.getresponse()
        assert response.status == 404 and "unknown model" in json.loads(response.read())["error"]
    connection.close()


# ---------------------------------------------------------------------------------------------- fuzzing

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)
datatypes = st.sampled_from(["FP32", "FP16", "INT64", "BOOL", "BYTES", "fp32", ""]) | json_values
shapes = st.sampled_from([[1, 3, 32, 32], [2, 3, 32, 32], [0, 3, 32, 32], [1, 3, 16, 16], [1], [], [3072], [-1]]) \
    | st.lists(st.integers(-2, 1 << 40), max_size=5) | json_values
sizes = st.sampled_from([12288, 0, 4, 12284, 24576, -1, 1 << 40]) | json_values
tensors = st.fixed_dictionaries(
    {"name": st.sampled_from(["input", "pixels"]) | json_values},
    optional={"shape": shapes, "datatype": datatypes,
              "data": st.sampled_from([[0.5] * 3072, [1] * 3072, [0.0]]) | json_values,
              "parameters": st.fixed_dictionaries({}, optional={"binary_data_size": sizes}) | json_values})
outputs = st.lists(st.fixed_dictionaries({"name": st.sampled_from(["logits", "x"]) | json_values},
                                         optional={"parameters": st.fixed_dictionaries(
                                             {}, optional={"binary_data": st.booleans() | json_values})}),
                   max_size=2) | json_values
requests = st.fixed_dictionaries({}, optional={
    "inputs": st.lists(tensors, max_size=2) | json_values, "outputs": outputs, "id": json_values,
    "parameters": st.fixed_dictionaries({}, optional={"binary_data_output": st.booleans() | json_values})
    | json_values})
VALID = [json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.5] * 3072}]}),
         json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                 "parameters": {"binary_data_size": 12288}}],
                     "parameters": {"binary_data_output": True}})]
bodies = st.one_of(
    st.sampled_from(VALID).map(str.encode),  # with the right tensor bytes after it, or not
    st.binary(max_size=300),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.integers(1, 3 * MAX_JSON_DEPTH).map(lambda depth: b'{"inputs": ' + b"[" * depth + b"]" * depth + b"}"),
    requests.map(lambda request: json.dumps(request).encode()),
)
paths = st.sampled_from(["/v2/models/{name}/infer", "/v2/models/{name}/generate", "/v2/models/other/infer",
                         "/v2/models/{name}/versions/1/infer", "/v2", "/v2/models/{name}/infer?x=1"])
# What follows the JSON: tensor bytes (the right size or not), and how Inference-Header-Content-Length is set.
payloads = st.sampled_from([b"", bytes(12288), bytes(12284), bytes(24576)]) | st.binary(max_size=64)
header_lengths = st.sampled_from(["exact", "exact", "absent", "absent", "0", "-1", "9999999", "abc", "²", " 12 "])
content_lengths = st.sampled_from(["exact", "exact", "exact", "short", "absent", "huge", "x"])


def send_fuzzed(port: int, path: str, body: bytes, payload: bytes, header_length: str, content_length: str) -> int:
    """One request over a raw socket (http.client would refuse the odd headers); the reply's status."""
    headers = {}
    if header_length == "exact":
        headers["Inference-Header-Content-Length"] = str(len(body))
    elif header_length != "absent":
        headers["Inference-Header-Content-Length"] = header_length
    whole = body + payload
    if content_length == "short":
        whole = whole[:-1]  # the JSON or the tensor bytes end early
    length = {"exact": str(len(whole)), "short": str(len(whole)), "huge": str(2 << 20), "x": "x"}.get(content_length)
    if length is not None:
        headers["Content-Length"] = length
    if content_length in ("huge", "absent", "x"):
        whole = b""  # the server refuses from the headers alone, and closes
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + \
        "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode("latin-1") + whole)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return int(reply.split(b" ", 2)[1])


def test_fuzzed_requests_are_never_answered_5xx_and_the_server_keeps_serving(served):
    agent, server = served
    statuses = []

    @settings(max_examples=500, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(path=paths, body=bodies, payload=payloads, header_length=header_lengths, content_length=content_lengths)
    def fuzz(path, body, payload, header_length, content_length):
        status = send_fuzzed(server.port, path.format(name=agent.name), body, payload, header_length, content_length)
        assert 200 <= status < 500, status
        statuses.append(status)

    fuzz()
    assert len(statuses) >= 500 and {200, 400, 404, 411, 413} <= set(statuses), collections.Counter(statuses)
    x = agent.portfolio.samples().inputs[0][:1].astype(np.float32)
    body, headers = binary_request(x)
    response, data = raw_post(server, f"/v2/models/{agent.name}/infer", body, headers)
    assert response.status == 200  # still serving
