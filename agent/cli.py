"""edgeshift-agent: run the agent, check a portfolio on this device, benchmark its variants here,
generate text with a causal-lm portfolio."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from agent.backends import BackendError, get_backend
from agent.config import ConfigError, load_config
from agent.generate import DEFAULT_MAX_NEW_TOKENS, generate
from agent.placement import Placement, place_variants
from agent.platform_support import UnsupportedPlatform, require_supported_platform
from agent.portfolio import Portfolio, PortfolioError, Variant
from agent.profiles import DeviceProfile, ProfileError, load_profile, serving_threads
from agent.runtime import InferenceError, Runtime

_BAD_INPUT = (ConfigError, PortfolioError, ProfileError, BackendError, InferenceError, KeyError, OSError,
              UnsupportedPlatform)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(name)s %(message)s")
    try:
        require_supported_platform()
        return args.run(args)
    except _BAD_INPUT as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"edgeshift-agent: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _run(args) -> int:
    from agent.daemon import run_daemon

    run_daemon(load_config(args.config))
    return 0


def _check(args) -> int:
    """Verify the portfolio, then health-check every variant against samples.npz on this device."""
    if args.public_key:
        from agent.signing import verify_manifest_signature
        verify_manifest_signature(args.dir, args.public_key)
    portfolio = Portfolio.open(args.dir)
    runtime, placement = _placed_runtime(args, load_profile(args.device), portfolio, portfolio.manifest.variants)
    print(f"{portfolio.manifest.name}: manifest, checksums and paths verified"
          f"{', signature verified' if args.public_key else ''}; health checks on {runtime.backend.name}:")
    for variant in portfolio.manifest.variants:
        for rejection in placement.fallbacks():
            if rejection.variant == variant.id:
                print(f"  {variant.id:<28} not on {rejection.provider}: {rejection.problem}")
        problem, provider = placement.unhealthy.get(variant.id), placement.providers.get(variant.id)
        verdict = f"FAILED: {problem}" if problem else f"ok on {provider}" if provider else "ok"
        print(f"  {variant.id:<28} {verdict}")
    if placement.unhealthy:
        print(f"edgeshift-agent: {len(placement.unhealthy)} variant(s) failed their health check and would not serve",
              file=sys.stderr)
        return 1
    return 0


def _bench(args) -> int:
    from agent.bench import bench_variants, latency_table, save_bench, store_path

    portfolio = Portfolio.open(args.dir)
    profile = load_profile(args.device)
    runtime, placement = _placed_runtime(args, profile, portfolio, portfolio.manifest.variants, args.state_dir)
    for vid, problem in placement.unhealthy.items():
        print(f"edgeshift-agent: {vid} fails its health check and is not measured: {problem}", file=sys.stderr)
    if not placement.providers:
        raise PortfolioError(f"{portfolio.root}: no variant passed its health check")
    sample = [x[:args.batch] for x in portfolio.samples().inputs]
    results = bench_variants(runtime, list(placement.providers), sample, runs=args.runs)
    asked = args.threads or profile.threads
    capped = f" (of {asked} asked: the CPUs this process may use)" if runtime.threads < asked else ""
    print(f"{portfolio.manifest.name} on {runtime.backend.name}, {runtime.threads} threads{capped}, "
          f"batch {args.batch}, {args.runs} runs each (interleaved)")
    print(latency_table(results, runtime.providers))
    if args.state_dir and args.batch != 1:
        print("edgeshift-agent: not stored: the agent compares its variants at batch 1", file=sys.stderr)
    elif args.state_dir:
        path = store_path(args.state_dir, runtime)
        save_bench(path, results, runtime)
        print(f"stored in {path}: an agent serving this portfolio with {runtime.backend.name} on these providers "
              f"and {runtime.threads} threads takes these numbers at start instead of measuring")
    return 0


def _placed_runtime(args, profile: DeviceProfile, portfolio: Portfolio, variants: list[Variant],
                    state_dir: Path | None = None) -> tuple[Runtime, Placement]:
    """The runtime `edgeshift-agent run` would serve with here: the same backend, providers and (capped)
    threads, each variant on the first provider that passes its health check."""
    backend = get_backend(args.backend or profile.backend)
    backend.use_providers(args.providers or profile.providers, state_dir)
    runtime = Runtime(portfolio, backend, serving_threads(args.threads, profile), preload="lazy")
    placement = place_variants(runtime, variants, portfolio.samples())
    runtime.providers = placement.providers
    return runtime, placement


def _generate(args) -> int:
    """Generation on one variant (the default one unless --variant), health-checked first; greedy unless
    --temperature is above 0."""
    from agent.sampling import Sampler
    from agent.tokenizer import optional_codec, prompt_ids

    portfolio = Portfolio.open(args.dir)
    language_model = portfolio.manifest.language_model
    if language_model is None:
        raise InferenceError(f"{portfolio.manifest.name} is a {portfolio.manifest.task} portfolio; "
                             "generate needs a causal-lm one")
    variant = portfolio.manifest.variant(args.variant or portfolio.manifest.default_variant)
    codec = optional_codec(portfolio.tokenizer_path)
    ids = prompt_ids(args.prompt if args.ids is None else args.ids, portfolio.tokenizer_path, codec)
    sampler = Sampler(args.temperature, args.top_k, args.top_p, args.seed)
    runtime, placement = _placed_runtime(args, load_profile(args.device), portfolio, [variant])
    if variant.id in placement.unhealthy:
        raise PortfolioError(f"variant '{variant.id}' failed its health check: {placement.unhealthy[variant.id]}")
    runtime.start(variant.id)
    try:
        result = generate(runtime, ids, args.max_tokens, language_model.eos_token_id, language_model.context_length,
                          sampler=sampler, stop=args.stop or (), decode=codec.decode if codec else None)
    finally:
        runtime.close()
    print(result.text if result.text is not None else " ".join(str(token) for token in result.new_ids))
    print(f"{result.variant}: {len(result.new_ids)} tokens in {result.seconds:.2f} s "
          f"({result.tokens_per_s:.1f} tokens/s), stopped at {result.stop_reason}", file=sys.stderr)
    return 0


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _token_ids(text: str) -> list[int]:
    try:
        return [int(token) for token in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"token ids must be integers separated by spaces or commas, got {text!r}")


def _demo(args) -> int:
    from agent.demo import run_demo

    run_demo(args.dir, device=args.device, rate_hz=args.rate, calm_s=args.calm, stress_s=args.stress,
             after_s=args.after, fleet=not args.no_fleet)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeshift-agent", description=__doc__)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="serve a portfolio and steer between its variants")
    run.add_argument("--config", type=Path, required=True, help="agent.toml")
    run.set_defaults(run=_run)

    def device_options(p):
        p.add_argument("dir", type=Path, help="portfolio directory")
        p.add_argument("--device", default="x86", help="device profile name or file (default x86)")
        p.add_argument("--backend", help="onnxruntime or tflite (default: the profile's)")
        p.add_argument("--threads", type=int, help="inference threads (default: the profile's)")
        p.add_argument("--providers", type=_names, help="onnxruntime execution providers, best first, comma-separated "
                                                       "(default: the profile's)")

    check = commands.add_parser("check", help="verify a portfolio and health-check every variant here")
    device_options(check)
    check.add_argument("--public-key", type=Path, help="require a valid manifest.sig from this ed25519 key")
    check.set_defaults(run=_check)

    bench = commands.add_parser("bench", help="per-variant latency on this device (p50/p95/p99)")
    device_options(bench)
    bench.add_argument("--runs", type=int, default=100)
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--state-dir", type=Path, help="store the results where the agent reads them")
    bench.set_defaults(run=_bench)

    gen = commands.add_parser("generate", help="text generation with a causal-lm portfolio (greedy by default)")
    device_options(gen)
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs the portfolio's tokenizer and the tokenizers package)")
    prompt.add_argument("--ids", type=_token_ids, help="prompt as token ids, e.g. '1 42 7'")
    gen.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                     help=f"stop after this many new tokens (default {DEFAULT_MAX_NEW_TOKENS})")
    gen.add_argument("--variant", help="variant to generate with (default: the portfolio's default variant)")
    gen.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0: all)")
    gen.add_argument("--top-p", type=float, default=1.0,
                     help="sample among the most likely tokens holding this much probability (default 1: all)")
    gen.add_argument("--seed", type=int, help="random seed: the same seed gives the same tokens")
    gen.add_argument("--stop", action="append", metavar="TEXT",
                     help="stop when the text contains TEXT (left out of the output); repeatable")
    gen.set_defaults(run=_generate)

    demo = commands.add_parser("demo", help="replay samples, apply CPU stress, watch the agent switch")
    demo.add_argument("dir", type=Path, help="portfolio directory")
    demo.add_argument("--device", default="x86")
    demo.add_argument("--rate", type=float, default=200.0, help="requests per second")
    demo.add_argument("--calm", type=float, default=10.0, help="seconds before the stress")
    demo.add_argument("--stress", type=float, default=25.0, help="seconds of CPU stress on every core")
    demo.add_argument("--after", type=float, default=15.0, help="seconds after the stress")
    demo.add_argument("--no-fleet", action="store_true", help="no local broker, fleet watch table or deploy")
    demo.set_defaults(run=_demo)
    return parser


if __name__ == "__main__":
    sys.exit(main())
