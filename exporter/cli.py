"""edgeshift-export: train a model, build a portfolio of its pruned variants, inspect a portfolio."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agent.portfolio import Portfolio, PortfolioError
from exporter.errors import ExportError

DEFAULT_WIDTH = 1.0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except (ExportError, PortfolioError) as error:
        print(f"edgeshift-export: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgeshift-export: interrupted; nothing was written", file=sys.stderr)
        return 130


def _train(args) -> int:
    import torch

    from exporter.data import load_dataset
    from exporter.models import build_model
    from exporter.train import seeded, train

    if args.out.exists() and not args.force:
        raise ExportError(f"{args.out} exists; pass --force to overwrite it")
    config = _train_config(args)  # an unusable --device fails before the data loads
    _log(args)(f"device: {_device_line(config)}")
    data = load_dataset(args.data, seed=args.seed, input_size=args.input_size)
    model = seeded(args.seed, lambda: build_model(args.model, data.num_classes, args.width, data.input_shape[0]))
    result = train(model, data, config, rewind_iteration=args.rewind_iteration, progress=not args.quiet)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + ".partial")
    torch.save({"model": model.state_dict(), "rewind": result.rewind_state, "rewind_iteration": args.rewind_iteration,
                "accuracy": result.accuracy, "model_name": args.model, "width": args.width, "data": args.data,
                "train": config.to_dict()}, partial)
    partial.replace(args.out)
    print(f"trained {args.model} on {data.name}: test accuracy {result.accuracy:.4f}, saved {args.out}")
    return 0


def _portfolio(args) -> int:
    if args.method == ["mosaic"]:
        return _mosaic_portfolio(args)
    from exporter.distributed import is_writer, start_from_environment
    from exporter.dnnshifter.imp import ImpConfig
    from exporter.pipeline import PortfolioSpec, build_portfolio

    start_from_environment()  # under torchrun: every rank trains, rank 0 writes and speaks
    if not is_writer():
        args.quiet = True
    from exporter.reconvene.method import DEFAULT_DENSITIES
    from exporter.reconvene.reconvene import ReconveneConfig

    spec = PortfolioSpec(
        out=args.out, model=args.model, width=args.width, data=args.data, input_size=args.input_size,
        methods=tuple(args.method),
        checkpoint=args.checkpoint, train=_train_config(args),
        imp=ImpConfig(levels=args.imp_levels, fraction=args.prune_fraction, rewind_iteration=args.rewind_iteration,
                      include_classifier=args.prune_classifier, level_epochs=args.level_epochs),
        levels=args.levels, run_dir=args.run_dir,
        reconvene=ReconveneConfig(scorer=args.scorer, structured_share=args.structured_share,
                                  synflow_rounds=args.synflow_rounds, seed=args.seed),
        densities=tuple(args.densities or DEFAULT_DENSITIES), calibration_size=args.calibration_size,
        pai_unstructured=args.pai_unstructured, quantize=args.quantize, keep_dominated=args.keep_dominated,
        tflite=not args.no_tflite, name=args.name, force=args.force, progress=not args.quiet,
    )
    _log(args)(f"device: {_device_line(spec.train)}")
    manifest = build_portfolio(spec, log=_log(args))
    if manifest is None:
        return 0  # a rank that helped train; rank 0 wrote the portfolio
    print(f"portfolio {manifest.name}: {len(manifest.variants)} variants written to {args.out}")
    print(f"report: {args.out / 'report.md'}")
    return 0


def _mosaic_portfolio(args) -> int:
    from exporter.device import describe_device, resolve_device
    from exporter.mosaic.pipeline import MosaicSpec, build_mosaic_portfolio
    from exporter.mosaic.recovery import RecoveryConfig
    from exporter.mosaic.unstructured import UnstructuredConfig
    from exporter.models import DEFAULT_MODEL

    if args.calib is None or args.eval is None:
        raise ExportError("--method mosaic needs --calib and --eval: text files to calibrate on and to measure "
                          "perplexity on (e.g. WikiText-2's valid.txt and test.txt)")
    if args.model == DEFAULT_MODEL:
        raise ExportError("--method mosaic needs --model: a local Hugging Face checkpoint directory or a .gguf file")
    sparsities = tuple(args.sparsities or (0.5,))
    device = resolve_device(args.device)
    _log(args)(f"device: {describe_device(device)}")
    spec = MosaicSpec(
        out=args.out, model=Path(args.model), calib=args.calib, eval=args.eval, sparsities=sparsities,
        composite_ratio=args.composite_ratio, baselines=args.baselines,
        unstructured=UnstructuredConfig(sparsity=sparsities[0], m=args.outlier_m, lam=args.lam, pruner=args.pruner),
        context=args.context, calib_windows=args.calib_windows, eval_windows=args.eval_windows, seed=args.seed,
        checkpoints=args.checkpoints, name=args.name, force=args.force, device=str(device),
        offload_layers=args.offload_layers,
        recovery=RecoveryConfig(steps=args.recovery_steps, lr=args.recovery_lr, seed=args.seed),
        weight_bits=args.lm_quantize)
    manifest = build_mosaic_portfolio(spec, log=_log(args))
    print(f"portfolio {manifest.name}: {len(manifest.variants)} variants written to {args.out}")
    print(f"report: {args.out / 'report.md'}")
    return 0


def _structure(args) -> int:
    from exporter.device import describe_device, resolve_device
    from exporter.dnnshifter.own_model import StructureSpec, build_structured_portfolio

    device = resolve_device(args.device)  # an unusable --device fails before anything is read
    spec = StructureSpec(out=args.out, model=args.model, checkpoint=args.checkpoint, input_shape=args.input_shape,
                         num_classes=args.num_classes, data=args.data, quantize=args.quantize == "int8",
                         tflite=not args.no_tflite, name=args.name, force=args.force, device=str(device))
    _log(args)(f"device: {describe_device(device)} (accuracies; the structured step and export run on the CPU)")
    manifest = build_structured_portfolio(spec, log=_log(args))
    print(f"portfolio {manifest.name}: {len(manifest.variants)} variants written to {args.out}")
    return 0


def _inspect(args) -> int:
    from exporter.report import variant_table

    portfolio = Portfolio.open(args.dir)
    m = portfolio.manifest
    print(f"{m.name}  ({m.task}, {len(m.variants)} variants, default {m.default_variant}, created {m.created})")
    print(f"manifest sha256 {portfolio.digest}; every file present and matching its checksum")
    print(variant_table(m))
    return 0


def _sign(args) -> int:
    from agent.signing import sign_manifest

    Portfolio.open(args.dir)  # sign only what verifies
    print(f"signed: {sign_manifest(args.dir, args.key)}")
    return 0


def _keygen(args) -> int:
    from agent.signing import generate_keypair

    private, public = args.out.with_suffix(".pem"), args.out.with_suffix(".pub")
    if (private.exists() or public.exists()) and not args.force:
        raise ExportError(f"{private} or {public} exists; pass --force to replace the key pair")
    generate_keypair(private, public)
    print(f"private key {private} (keep it on the build host), public key {public} (for agent.toml public_key)")
    return 0


def _train_config(args):
    from exporter.train import TrainConfig

    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                       device=args.device, amp=args.amp).resolved()


def _device_line(config) -> str:
    from exporter.device import describe_device

    return f"{describe_device(config.device)}, amp {config.amp}"


def _log(args):
    """Where a run's lines go: stdout, flushed line by line; nowhere with --quiet."""
    from exporter.progress import line, quiet

    return quiet if args.quiet else line


def _comma_list(convert, plural: str, example: str, valid, rule: str):
    """An argparse type for a comma-separated list, e.g. `--levels 0,3,6`, with one rule for every value."""
    def parse(text: str) -> list:
        try:
            values = [convert(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{plural} must be comma-separated numbers like {example}, got {text!r}")
        if not values or not all(valid(v) for v in values):
            raise argparse.ArgumentTypeError(f"{rule}, got {text!r}")
        return values
    return parse


def _input_shape(text: str) -> tuple[int, int, int]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"input shape must be three positive integers C,H,W like 3,32,32, got {text!r}")
    return shape


def _method_list(text: str) -> list[str]:
    from exporter.methods import parse_methods

    try:
        return parse_methods(text)
    except ExportError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


_levels = _comma_list(int, "levels", "0,3,6", lambda v: v >= 0, "levels must be non-negative integers")
_densities = _comma_list(float, "densities", "0.125,0.0625", lambda v: 0 < v <= 1, "every density must be in (0, 1]")
_sparsities = _comma_list(float, "sparsities", "0.5,0.7", lambda v: 0 <= v < 1, "every sparsity must be in [0, 1)")


def _weight_bits(text: str) -> tuple[int, ...]:
    if text.strip() == "none":
        return ()
    names = [name.strip() for name in text.split(",")]
    if not names or any(name not in ("int4", "int8") for name in names):
        raise argparse.ArgumentTypeError(f"'{text}': give int4, int8, int4,int8 or none")
    return tuple(sorted({int(name[3:]) for name in names}))


def _parser() -> argparse.ArgumentParser:
    from exporter.mosaic.pipeline import MosaicSpec
    from exporter.mosaic.recovery import RecoveryConfig
    from exporter.mosaic.unstructured import UnstructuredConfig
    from exporter.models import DEFAULT_MODEL
    from exporter.dnnshifter.imp import ImpConfig
    from exporter.pipeline import DEFAULT_METHODS, QUANTIZE_CHOICES, PortfolioSpec
    from exporter.reconvene.reconvene import ReconveneConfig
    from exporter.train import AMP_CHOICES, TrainConfig

    parser = argparse.ArgumentParser(prog="edgeshift-export", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def model_and_data(p):
        p.add_argument("--model", default=DEFAULT_MODEL,
                       help="zoo name (resnet20, resnet56, vgg16, mobilenetv2) or package.module:factory")
        p.add_argument("--width", type=float, default=DEFAULT_WIDTH, help="channel width multiplier")
        p.add_argument("--data", default="digits",
                       help="'digits' (bundled), a CIFAR-10 python directory, a directory with one sub-folder of "
                            "JPEG/PNG images per class (or train/ and val/ holding such sub-folders), or an .npz "
                            "with x and y")
        p.add_argument("--input-size", type=int,
                       help="side in pixels that an image folder's images are resized to (default 32, the zoo "
                            "models' input)")
        p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
        p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
        p.add_argument("--lr", type=float, default=TrainConfig.lr)
        p.add_argument("--seed", type=int, default=TrainConfig.seed)
        device_and_precision(p)
        p.add_argument("--rewind-iteration", type=int, default=ImpConfig.rewind_iteration, help="iteration whose weights IMP rewinds to")
        p.add_argument("--force", action="store_true", help="replace an existing output")
        p.add_argument("--quiet", action="store_true", help="no progress bars or per-step lines")

    def device_and_precision(p):
        p.add_argument("--device", default=TrainConfig.device,
                       help="where to train, score and evaluate: auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:N "
                            "or mps; export, the structured step, quantization and timing always run on the CPU")
        p.add_argument("--amp", choices=AMP_CHOICES, default=TrainConfig.amp,
                       help="mixed precision of the training forward (bf16, or fp16 with loss scaling); "
                            "evaluation stays float32")

    train = commands.add_parser("train", help="train a dense model and save a checkpoint")
    model_and_data(train)
    train.add_argument("--out", type=Path, required=True, help="checkpoint file to write")
    train.set_defaults(run=_train)

    portfolio = commands.add_parser("portfolio", help="prune, shrink, export and check: a portfolio directory")
    model_and_data(portfolio)
    portfolio.add_argument("--out", type=Path, required=True, help="portfolio directory to write")
    portfolio.add_argument("--method", type=_method_list, default=list(DEFAULT_METHODS),
                           help="comma-separated: dnnshifter (IMP with rewinding, then the exact structured step), "
                                "reconvene (alias pai: structured pruning at initialization), or mosaic alone "
                                f"(composite projection pruning of a LLaMA-style causal LM, --model PATH); "
                                f"default {','.join(DEFAULT_METHODS)}")
    portfolio.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="int8",
                           help="int8: add an int8 twin of every variant (onnxruntime static QDQ, calibrated on "
                                "training data); none: float variants only")
    portfolio.add_argument("--keep-dominated", action="store_true",
                           help="keep variants that another one beats on both accuracy and latency")
    portfolio.add_argument("--checkpoint", type=Path, help="dense weights to start from instead of training")
    portfolio.add_argument("--imp-levels", type=int, default=ImpConfig.levels, help="IMP levels trained after the dense one")
    portfolio.add_argument("--level-epochs", type=int, default=ImpConfig.level_epochs, help="retraining epochs per IMP level")
    portfolio.add_argument("--prune-fraction", type=float, default=ImpConfig.fraction, help="share of surviving weights pruned per level")
    portfolio.add_argument("--prune-classifier", action="store_true", help="let IMP prune the final linear layer too")
    portfolio.add_argument("--levels", type=_levels, help="levels kept as variants, e.g. 0,3,6,9 (default: every third and the last)")
    portfolio.add_argument("--run-dir", type=Path, help="keep per-level checkpoints here and reuse them on the next run")
    portfolio.add_argument("--no-tflite", action="store_true", help="export ONNX only")
    portfolio.add_argument("--name", help="portfolio name (default: model-dataset)")
    pai = portfolio.add_argument_group("pai (Reconvene) options")
    pai.add_argument("--scorer", default=ReconveneConfig.scorer, help="PaI scorer: snip, grasp, synflow, magnitude, random")
    pai.add_argument("--densities", type=_densities, help="densities in (0, 1], e.g. 0.125,0.0625 (default: 1/16, 1/64, 1/256)")
    pai.add_argument("--structured-share", type=float, default=ReconveneConfig.structured_share,
                     help="share of conv layers, least sensitive first, made structured")
    pai.add_argument("--synflow-rounds", type=int, default=ReconveneConfig.synflow_rounds, help="SynFlow's pruning rounds")
    pai.add_argument("--pai-unstructured", action="store_true",
                     help="also each density's unstructured PaI variant (Reconvene's baseline; as slow as dense)")
    mosaic = portfolio.add_argument_group("mosaic options (--model is a checkpoint directory or .gguf file)")
    mosaic.add_argument("--calib", type=Path, help="calibration text file")
    mosaic.add_argument("--eval", type=Path, help="held-out text file for perplexity")
    mosaic.add_argument("--sparsities", type=_sparsities, help="projection sparsities in [0, 1), e.g. 0.5,0.7 (default 0.5)")
    mosaic.add_argument("--composite-ratio", type=float, default=MosaicSpec.composite_ratio,
                        help="share of attention heads and MLP neurons the composite variants remove")
    mosaic.add_argument("--baselines", action="store_true",
                        help="also global (uniform) and layer (OWL) variants, unless mosaic-unstructured already uses one")
    mosaic.add_argument("--pruner", default=UnstructuredConfig.pruner, help="wanda or sparsegpt")
    mosaic.add_argument("--outlier-m", type=float, default=UnstructuredConfig.m, help="outlier threshold M, times the mean score")
    mosaic.add_argument("--lam", type=float, default=UnstructuredConfig.lam, help="how far a projection's ratio may stray from the target")
    mosaic.add_argument("--context", type=int, default=MosaicSpec.context, help="tokens per calibration and evaluation window")
    mosaic.add_argument("--calib-windows", type=int, default=MosaicSpec.calib_windows)
    mosaic.add_argument("--eval-windows", type=int, default=MosaicSpec.eval_windows)
    mosaic.add_argument("--offload-layers", action="store_true",
                        help="keep the model in CPU memory and move one decoder layer at a time to --device "
                             "(a model larger than the GPU's memory)")
    mosaic.add_argument("--checkpoints", type=Path, help="also save each pruned model here (a loadable checkpoint)")
    mosaic.add_argument("--lm-quantize", type=_weight_bits, default=(4, 8), metavar="int4,int8|none",
                        help="weight-only quantized twins of every variant (block-wise, onnxruntime MatMulNBits)")
    mosaic.add_argument("--recovery-steps", type=int, default=RecoveryConfig.steps,
                        help="fine-tuning steps on the calibration text after composite pruning, masks kept (0: none)")
    mosaic.add_argument("--recovery-lr", type=float, default=RecoveryConfig.lr, help="recovery learning rate (AdamW)")
    pai.add_argument("--calibration-size", type=int, default=PortfolioSpec.calibration_size,
                     help="images SNIP and GraSP score on")
    portfolio.set_defaults(run=_portfolio)

    structure = commands.add_parser("structure", help="your own sparse model and its exact smaller twin: a portfolio")
    structure.add_argument("--model", required=True, help="package.module:factory (called with num_classes=) or a zoo name")
    structure.add_argument("--checkpoint", type=Path, required=True, help="the sparse model's state_dict (.pt)")
    structure.add_argument("--input-shape", type=_input_shape, required=True, help="C,H,W, e.g. 3,32,32")
    structure.add_argument("--num-classes", type=int, required=True)
    structure.add_argument("--data", help="labelled data for accuracies and int8 twins: 'digits', a CIFAR-10 "
                                          "directory, an image folder (resized to --input-shape, which must be "
                                          "square) or an .npz with x and y (default: none, random check inputs)")
    structure.add_argument("--out", type=Path, required=True, help="portfolio directory to write")
    structure.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="int8", help="int8 twins (needs --data)")
    structure.add_argument("--no-tflite", action="store_true", help="export ONNX only")
    structure.add_argument("--name", help="portfolio name (default: <factory>-structured)")
    structure.add_argument("--force", action="store_true", help="replace an existing output")
    structure.add_argument("--device", default=TrainConfig.device,
                           help="where accuracies are evaluated: auto, cpu, cuda, cuda:N or mps")
    structure.add_argument("--quiet", action="store_true")
    structure.set_defaults(run=_structure)

    inspect = commands.add_parser("inspect", help="verify a portfolio and print its variants")
    inspect.add_argument("dir", type=Path)
    inspect.set_defaults(run=_inspect)
    sign = commands.add_parser("sign", help="sign a portfolio's manifest (ed25519) for agents with a public_key")
    sign.add_argument("dir", type=Path)
    sign.add_argument("--key", type=Path, required=True, help="ed25519 private key (PEM)")
    sign.set_defaults(run=_sign)

    keygen = commands.add_parser("keygen", help="make an ed25519 key pair for signing portfolios")
    keygen.add_argument("--out", type=Path, required=True, help="path prefix: writes PREFIX.pem and PREFIX.pub")
    keygen.add_argument("--force", action="store_true")
    keygen.set_defaults(run=_keygen)
    return parser


if __name__ == "__main__":
    sys.exit(main())
