"""Throughput and latency of the HTTP front under load, beside the bare onnxruntime session's.

The agent serves the tests' small portfolio (a quarter-width ResNet-20), pinned to one variant, in a child
process (bench/http_overhead.py's `served_in_child`). Triton's own client loads it: N threads,
each with a `tritonclient.http.InferenceServerClient` and one `infer` call always in flight, for a fixed time
(its `async_infer` took 11 ms a call even at concurrency 1 here, its gevent loop's doing, not the server's), with 1x3x32x32 FP32 tensors in binary (the binary
tensor data extension both ways) or as JSON. Beside it, a bare onnxruntime session configured as the agent's
(same intra-op threads) runs the same variant on the same input from 1 and from N Python threads. Each row is
the sum of `--rounds` slices, the rows taking turns, so machine noise hits all alike. Latency is from the
submission of a call to its answer.

    python bench/http_load.py                 # 4 s per row: ~1 min on 2 cores (+ ~3 min once to build)
    python bench/http_load.py --seconds 1     # a quick look
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._portfolio import ensure_portfolio  # noqa: E402
from bench.agent_overhead import bare_session  # noqa: E402
from bench.http_overhead import SMALL_ARGS, served_in_child  # noqa: E402
from agent.portfolio import Portfolio  # noqa: E402

CONCURRENCY = (1, 2, 4, 8)


def http_slice(url: str, model: str, x: np.ndarray, binary: bool, clients: int, seconds: float) -> list[float]:
    """Latencies (ms) of the calls answered in `seconds` by `clients` threads, each with its own client (a
    tritonclient client belongs to the thread that made it) and a call always in flight."""
    import tritonclient.http as httpclient

    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput("logits", binary_data=binary)]

    def client_call():
        client = httpclient.InferenceServerClient(url)

        def call() -> None:
            if client.infer(model, [tensor], outputs=outputs).as_numpy("logits").shape != (1, 10):
                raise SystemExit("unexpected answer")
        return call

    return in_threads([client_call] * clients, seconds)


def bare_slice(session, x: np.ndarray, callers: int, seconds: float) -> list[float]:
    """Latencies (ms) of session.run calls made by `callers` threads for `seconds`."""
    name = session.get_inputs()[0].name
    return in_threads([lambda: lambda: session.run(None, {name: x})] * callers, seconds)


def in_threads(makers: list, seconds: float) -> list[float]:
    """A thread per maker calls what its maker gives over and over for `seconds`: the latencies (ms) of all."""
    latencies: list[float] = []
    end = time.perf_counter() + seconds

    def caller(make) -> None:
        call, mine = make(), []
        while True:
            started = time.perf_counter()
            if started >= end:
                break
            call()
            mine.append((time.perf_counter() - started) * 1000)
        latencies.extend(mine)

    threads = [threading.Thread(target=caller, args=(make,)) for make in makers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


def main() -> None:
    args = _arguments()
    path = args.portfolio or ensure_portfolio("small", SMALL_ARGS, "the tests' small portfolio, ~3 min on 2 cores")
    with served_in_child(path, args.threads) as (port, variant):
        portfolio = Portfolio.open(path)
        x = portfolio.samples().inputs[0][:1].astype(np.float32)
        session = bare_session(portfolio.file_path(variant, "onnx"), args.threads)
        model = portfolio.manifest.name
        rows: dict[tuple[str, int], Callable[[float], list[float]]] = {}
        for n in CONCURRENCY:
            rows[("bare onnxruntime", n)] = lambda seconds, n=n: bare_slice(session, x, n, seconds)
        for mode in ("HTTP binary", "HTTP JSON"):
            for n in CONCURRENCY:
                rows[(mode, n)] = lambda seconds, n=n, binary=mode == "HTTP binary": \
                    http_slice(f"127.0.0.1:{port}", model, x, binary, n, seconds)
        latencies: dict[tuple[str, int], list[float]] = {row: [] for row in rows}
        for run in rows.values():  # warm up every connection and path, untimed
            run(0.2)
        for i in range(args.rounds):
            for row in (list(rows) if i % 2 == 0 else list(rows)[::-1]):
                latencies[row].extend(rows[row](args.seconds / args.rounds))

    print(f"{model}: variant {variant} (pinned), input {list(x.shape)} FP32, onnxruntime {args.threads} "
          f"intra-op thread(s), {args.seconds:g} s per row in {args.rounds} interleaved slices")
    print(f"{'':<17} {'concurrency':>11} {'requests/s':>11} {'p50 ms':>8} {'p99 ms':>8}")
    for (mode, n), ms in latencies.items():
        print(f"{mode:<17} {n:>11} {len(ms) / args.seconds:>11.0f} {np.median(ms):>8.3f} "
              f"{np.percentile(ms, 99):>8.3f}")


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--portfolio", type=Path, help="portfolio directory (default: the tests' small one, built once)")
    parser.add_argument("--seconds", type=float, default=4.0, help="measured time per row")
    parser.add_argument("--rounds", type=int, default=4, help="slices each row's time is cut into, rows alternating")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (agent and bare session)")
    return parser.parse_args()


if __name__ == "__main__":
    main()
