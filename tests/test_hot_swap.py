"""Hot-swap under load: concurrent Python-API and HTTP clients while variants change hundreds of times."""
import itertools
import json
import threading
import time
import urllib.request

import numpy as np
import pytest

from agent.http_api import InferenceServer
from agent.policy import PolicySettings
from agent.portfolio import Portfolio
from agent.profiles import load_profile
from agent.runtime import Runtime
from agent.backends import get_backend
from agent.service import Agent

SWAPS = 500


def agent_for(portfolio_dir, preload: str) -> Agent:
    agent = Agent(Portfolio.open(portfolio_dir), load_profile("x86"), PolicySettings(latency_slo_ms=1000),
                  backend="onnxruntime", threads=1, preload=preload, bench_runs=3)
    agent.start()
    return agent


def post_infer(port: int, name: str, x: np.ndarray) -> dict:
    body = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v2/models/{name}/infer", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.parametrize("preload", ["all", "lazy"])
def test_no_request_fails_or_is_dropped_while_variants_swap(small_portfolio, preload):
    agent = agent_for(small_portfolio, preload)
    server = InferenceServer(agent, port=0).start()
    samples = agent.portfolio.samples()
    x, expected = samples.inputs[0], samples.expected
    variants = agent.status()["variants"]
    stop = threading.Event()
    answers, failures = [], []

    def python_client(batch: int):
        while not stop.is_set():
            try:
                result = agent.infer(x[:batch])
                answers.append((result.variant, result.outputs[0], batch))
            except Exception as error:  # any failure is what this test exists to catch
                failures.append(repr(error))

    def http_client():
        while not stop.is_set():
            try:
                reply = post_infer(server.port, agent.name, x[:2])
                out = np.asarray(reply["outputs"][0]["data"], dtype=np.float32).reshape(reply["outputs"][0]["shape"])
                answers.append((reply["parameters"]["variant"], out, 2))
            except Exception as error:
                failures.append(repr(error))

    clients = [threading.Thread(target=python_client, args=(b,)) for b in (1, 8, 3)]
    clients += [threading.Thread(target=http_client) for _ in range(2)]
    for client in clients:
        client.start()
    try:
        for i, variant in enumerate(itertools.islice(itertools.cycle(variants), SWAPS)):
            agent.switch(variant, "test swap")
            time.sleep(0.0005)  # let clients run inside every variant's active window
            deadline = time.monotonic() + 10
            while len(answers) < i // 5 and time.monotonic() < deadline:
                time.sleep(0.001)  # keep traffic and swaps interleaved, however slow this machine is
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=60)
        server.stop()
        agent.close()

    swaps = sum(1 for e in agent.events if e.type == "switch")
    assert failures == []
    assert swaps >= SWAPS - 1
    assert len(answers) >= SWAPS // 5
    assert len({variant for variant, _, _ in answers}) == len(variants)
    for variant, output, batch in answers:
        assert variant in variants
        np.testing.assert_allclose(output, expected[variant][:batch], atol=1e-4)


def test_retired_variant_is_closed_only_after_its_last_request(small_portfolio):
    portfolio = Portfolio.open(small_portfolio)
    runtime = Runtime(portfolio, get_backend("onnxruntime"), threads=1, preload="lazy")
    runtime.start("dense")
    first = runtime._active
    assert first.enter()  # a request in flight on "dense"

    runtime.switch("dense-int8", "test")

    assert runtime.active == "dense-int8"
    assert runtime.resident() == ["dense-int8"]
    x = portfolio.samples().inputs[0][:1]
    assert first.session.run([x])[0].shape == (1, 10)  # the in-flight request can still finish
    first.leave()
    assert not first.enter()  # now retired and closed
    runtime.close()


def test_bad_inputs_are_refused_and_serving_goes_on(small_portfolio):
    from agent.runtime import InferenceError

    agent = agent_for(small_portfolio, "all")
    x = agent.portfolio.samples().inputs[0]
    for bad, message in [(x[:, :2], "must have shape"), (x.astype(np.float64), "must be float32"),
                         (np.zeros((0, 3, 32, 32), np.float32), "batch size"),
                         (np.zeros((65, 3, 32, 32), np.float32), "batch size"), ([x, x], "expected 1 input")]:
        with pytest.raises(InferenceError, match=message):
            agent.infer(bad)
    assert agent.infer(x[:1]).outputs[0].shape == (1, 10)
    agent.close()


def renamed_copy(portfolio_dir, tmp_path, name: str):
    """The same variants under another portfolio name: a different manifest, hence another digest."""
    import shutil

    copy = shutil.copytree(portfolio_dir, tmp_path / name)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["name"] = name
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_replacing_the_portfolio_under_load_drops_nothing(small_portfolio, tmp_path):
    agent = agent_for(small_portfolio, "all")
    x = agent.portfolio.samples().inputs[0][:1]
    stop, failures, served = threading.Event(), [], []

    def client():
        while not stop.is_set():
            try:
                served.append(agent.infer(x).variant)
            except Exception as error:
                failures.append(repr(error))

    clients = [threading.Thread(target=client) for _ in range(3)]
    for c in clients:
        c.start()
    try:
        time.sleep(0.2)
        agent.replace_portfolio(Portfolio.open(renamed_copy(small_portfolio, tmp_path, "second")), "deploy test")
        time.sleep(0.2)
    finally:
        stop.set()
        for c in clients:
            c.join(timeout=30)
    assert failures == [] and len(served) > 10
    assert agent.name == "second" and agent.events[-1].type == "deploy"
    agent.close()


def test_a_portfolio_that_fails_its_health_checks_is_refused_and_serving_goes_on(small_portfolio, tmp_path):
    from agent.portfolio import PortfolioError

    agent = agent_for(small_portfolio, "all")
    broken = renamed_copy(small_portfolio, tmp_path, "broken")
    samples = dict(np.load(broken / "samples.npz"))
    for key in samples:
        if key.startswith("y_"):
            samples[key] = samples[key] + 1.0  # no variant can reproduce these
    np.savez(broken / "samples.npz", **samples)

    with pytest.raises(PortfolioError, match="no variant passed its health check"):
        agent.replace_portfolio(Portfolio.open(broken), "deploy test")
    assert agent.name != "broken"
    assert agent.infer(agent.portfolio.samples().inputs[0][:1]).outputs[0].shape == (1, 10)
    agent.close()
