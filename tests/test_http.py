"""The HTTP front against the Open Inference Protocol (KServe v2), with its error codes."""
from __future__ import annotations

import http.client
import json

import numpy as np
import pytest

from agent.http_api import InferenceServer
from agent.policy import PolicySettings
from agent.portfolio import Portfolio
from agent.profiles import load_profile
from agent.service import Agent


@pytest.fixture(scope="module")
def served(small_portfolio):
    agent = Agent(Portfolio.open(small_portfolio), load_profile("x86"), PolicySettings(latency_slo_ms=1000),
                  backend="onnxruntime", threads=1, bench_runs=3)
    agent.start()
    agent.step()
    server = InferenceServer(agent, port=0, max_body_bytes=1 << 20).start()
    yield agent, server
    server.stop()
    agent.close()


def call(server, method: str, path: str, body=None, raw: bytes | None = None):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    payload = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    connection.request(method, path, body=payload, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    kind = response.getheader("Content-Type")
    return response.status, (json.loads(data) if kind == "application/json" else data.decode())


def announce_body(server, path: str, length: int):
    """POST headers announcing `length` bytes and send none: the server must refuse from the header alone.

    (Sending the body too races the server, which answers 413 and closes without reading it.)
    """
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.putrequest("POST", path)
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(length))
    connection.endheaders()
    response = connection.getresponse()
    reply = json.loads(response.read())
    connection.close()
    return response.status, reply


def tensor(x: np.ndarray, name: str = "input", datatype: str = "FP32") -> dict:
    return {"name": name, "shape": list(x.shape), "datatype": datatype, "data": x.ravel().tolist()}


def test_health_and_server_metadata(served):
    agent, server = served
    assert call(server, "GET", "/v2/health/live") == (200, {"live": True})
    assert call(server, "GET", "/v2/health/ready") == (200, {"ready": True})
    status, meta = call(server, "GET", "/v2")
    assert status == 200 and meta["name"] == "edgeshift"


def test_model_metadata_describes_the_tensors(served):
    agent, server = served
    status, meta = call(server, "GET", f"/v2/models/{agent.name}")
    assert status == 200
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert meta["outputs"][0]["datatype"] == "FP32" and meta["parameters"]["active"] in meta["versions"]
    assert meta["parameters"]["providers"] == {vid: "CPUExecutionProvider" for vid in meta["versions"]}
    assert call(server, "GET", f"/v2/models/{agent.name}/ready")[0] == 200


def test_infer_answers_with_the_variant_that_served(served):
    agent, server = served
    samples = agent.portfolio.samples()
    x = samples.inputs[0][:3]
    status, reply = call(server, "POST", f"/v2/models/{agent.name}/infer", {"id": "req-7", "inputs": [tensor(x)]})
    assert status == 200
    variant = reply["parameters"]["variant"]
    assert reply["id"] == "req-7" and reply["model_name"] == agent.name
    out = reply["outputs"][0]
    assert out["name"] == "logits" and out["shape"] == [3, 10] and out["datatype"] == "FP32"
    np.testing.assert_allclose(np.reshape(out["data"], out["shape"]), samples.expected[variant][:3], atol=1e-4)


@pytest.mark.parametrize("inputs, message", [
    ([tensor(np.zeros((1, 3, 16, 16), np.float32))], "must have shape"),
    ([tensor(np.zeros((1, 3, 32, 32), np.float32), datatype="INT64")], "datatype must be FP32"),
    ([tensor(np.zeros((1, 3, 32, 32), np.float32), name="pixels")], "unknown input 'pixels'"),
    ([{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [1.0, 2.0]}], "do not fill shape"),
    ([{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": ["a"] * 3072}], "must be numbers"),
    ([], "non-empty list"),
])
def test_bad_tensors_are_400_with_the_reason(served, inputs, message):
    agent, server = served
    status, reply = call(server, "POST", f"/v2/models/{agent.name}/infer", {"inputs": inputs})
    assert status == 400 and message in reply["error"]


def test_unknown_model_and_endpoint_are_404(served):
    agent, server = served
    status, reply = call(server, "POST", "/v2/models/other/infer", {"inputs": []})
    assert status == 404 and "unknown model 'other'" in reply["error"]
    assert call(server, "GET", "/v2/models/other")[0] == 404
    assert call(server, "GET", "/nope")[0] == 404


def test_malformed_json_is_400_and_oversized_body_is_413(served):
    agent, server = served
    status, reply = call(server, "POST", f"/v2/models/{agent.name}/infer", raw=b"{not json")
    assert status == 400 and "not valid JSON" in reply["error"]
    status, reply = announce_body(server, f"/v2/models/{agent.name}/infer", 2 << 20)
    assert status == 413 and "exceeds the limit" in reply["error"]
    assert call(server, "GET", "/v2/health/live")[0] == 200  # still serving


def test_not_ready_agent_answers_503(served):
    agent, server = served
    agent.ready = False
    try:
        assert call(server, "GET", "/v2/health/ready")[0] == 503
        x = np.zeros((1, 3, 32, 32), np.float32)
        assert call(server, "POST", f"/v2/models/{agent.name}/infer", {"inputs": [tensor(x)]})[0] == 503
    finally:
        agent.ready = True


def test_metrics_are_prometheus_text(served):
    agent, server = served
    agent.infer(agent.portfolio.samples().inputs[0][:1])
    status, text = call(server, "GET", "/metrics")
    assert status == 200
    assert "# TYPE edgeshift_requests_total counter" in text
    assert f'edgeshift_active_variant{{variant="{agent.active}"}} 1' in text
    assert 'edgeshift_latency_ms{variant="' in text and 'quantile="0.95"' in text
    assert "edgeshift_ready 1" in text and "edgeshift_cpu_percent" in text


def test_generate_on_a_classification_model_is_400_with_the_reason(served):
    agent, server = served
    status, reply = call(server, "POST", f"/v2/models/{agent.name}/generate", {"text_input": "hello"})
    assert status == 400 and "generate needs a causal-lm portfolio" in reply["error"]
    assert call(server, "GET", "/v2")[1]["extensions"] == ["binary_tensor_data"]  # and no generate
