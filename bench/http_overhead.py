"""Serving overhead of the HTTP front: one 1x3x32x32 FP32 request over HTTP vs the same Agent.infer in-process.

Three runners take turns in interleaved rounds (the order alternating), so machine noise hits all alike:
`Agent.infer` in-process, `HTTP JSON` (the tensor as a JSON list, outputs as JSON) and `HTTP binary`
(the binary tensor data extension both ways). The server is an agent of its own in a child process (so
client and server do not share a GIL), on the same portfolio and variant. Each HTTP client is one
keep-alive connection with its request body built beforehand: what is timed is the transport, the
server's parsing, the inference and the reading of the answer. Overhead = HTTP p50 - Agent.infer p50.
The portfolio is the tests' small one (a quarter-width ResNet-20: a sub-millisecond model), built once
under build/bench-portfolios/small.

    python bench/http_overhead.py               # 500 rounds, ~10 s on 2 cores (+ ~3 min once to build)
    python bench/http_overhead.py --rounds 50   # a quick look
"""
from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._portfolio import ensure_portfolio, start_agent  # noqa: E402

# tests/conftest.py's SMALL_PORTFOLIO_ARGS
SMALL_ARGS = ["--model", "resnet20", "--width", "0.25", "--method", "dnnshifter", "--epochs", "1",
              "--level-epochs", "1", "--imp-levels", "1", "--rewind-iteration", "5", "--keep-dominated"]


def json_body(x: np.ndarray) -> bytes:
    return json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()


def binary_body(x: np.ndarray) -> tuple[bytes, int]:
    header = json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "parameters": {"binary_data_output": True}}).encode()
    return header + x.astype("<f4").tobytes(), len(header)


def client(port: int, path: str, body: bytes, header_length: int | None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json" if header_length is None else "application/octet-stream"}
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = str(header_length)

    def call() -> np.ndarray:
        connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise SystemExit(f"HTTP {response.status}: {data[:200]!r}")
        split = response.getheader("Inference-Header-Content-Length")
        if split is None:
            out = json.loads(data)["outputs"][0]
            return np.asarray(out["data"], np.float32).reshape(out["shape"])
        out = json.loads(data[:int(split)])["outputs"][0]
        return np.frombuffer(data, "<f4", offset=int(split)).reshape(out["shape"])

    return connection, call


def interleaved_ms(runners: dict, rounds: int, warmup: int) -> dict[str, list[float]]:
    for run in runners.values():
        for _ in range(warmup):
            run()
    names = list(runners)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        for name in (names if i % 2 == 0 else names[::-1]):
            started = time.perf_counter()
            runners[name]()
            times[name].append((time.perf_counter() - started) * 1000)
    return times


def serve(path: Path, threads: int, connection) -> None:
    """The child process: an agent pinned to its first variant and its HTTP front, until the parent says stop."""
    from agent.http_api import InferenceServer

    agent = start_agent(path, "all", threads)
    agent.pin(agent.active)  # one variant answers every request, whatever the load does to its latency
    server = InferenceServer(agent, port=0).start()
    connection.send((server.port, agent.active))
    connection.recv()
    server.stop()
    agent.close()


@contextmanager
def served_in_child(path: Path, threads: int) -> Iterator[tuple[int, str]]:
    """`serve` in a spawned child process for the block: its port and the variant it is pinned to."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    child = context.Process(target=serve, args=(path, threads, theirs), daemon=True)
    child.start()
    try:
        yield ours.recv()
    finally:
        ours.send("stop")
        child.join(timeout=10)


def main() -> None:
    args = _arguments()
    path = args.portfolio or ensure_portfolio("small", SMALL_ARGS, "the tests' small portfolio, ~3 min on 2 cores")
    with served_in_child(path, args.threads) as (port, served):
        agent = start_agent(path, "all", args.threads)
        try:
            times, variant, x = _measure(args, agent, port, served)
        finally:
            agent.close()

    print(f"{agent.name}: variant {variant}, input {list(x.shape)} FP32 ({x.nbytes} bytes), onnxruntime "          f"{args.threads} thread(s), {args.rounds} interleaved rounds, keep-alive connections")
    base = np.median(times["Agent.infer"])
    print(f"{'':<12} {'p50 ms':>8} {'p95 ms':>8} {'overhead p50 ms':>16} {'x Agent.infer':>14}")
    for name, ms in times.items():
        p50 = np.median(ms)
        print(f"{name:<12} {p50:>8.3f} {np.percentile(ms, 95):>8.3f} {p50 - base:>16.3f} {p50 / base:>14.2f}")


def _measure(args, agent, port: int, served: str) -> tuple[dict[str, list[float]], str, np.ndarray]:
    """Agent.infer, HTTP JSON and HTTP binary on the served variant, interleaved: their times, variant, input."""
    if agent.active != served:
        agent.switch(served, "the server's variant")
    x = agent.portfolio.samples().inputs[0][:1].astype(np.float32)
    route = f"/v2/models/{agent.name}/infer"
    json_connection, over_json = client(port, route, json_body(x), None)
    binary_connection, over_binary = client(port, route, *binary_body(x))
    expected = agent.infer(x).outputs[0]
    for call in (over_json, over_binary):
        np.testing.assert_allclose(call(), expected, atol=1e-5)
    times = interleaved_ms({"Agent.infer": lambda: agent.infer(x), "HTTP JSON": over_json,
                            "HTTP binary": over_binary}, args.rounds, args.warmup)
    json_connection.close()
    binary_connection.close()
    return times, agent.active, x


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--portfolio", type=Path, help="portfolio directory (default: the tests' small one, built once)")
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls of each before the rounds")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    return parser.parse_args()


if __name__ == "__main__":
    main()
