"""A Mosaic portfolio of a causal LM: the dense model, projection-pruned and composite variants.

Per sparsity: `mosaic-unstructured` (ratios from outlier shares at UnstructuredConfig.granularity) and
`mosaic-composite` (heads and neurons removed first, so the model really shrinks, then projection
pruning of what remains); with `baselines`, also `mosaic-global` (uniform) and `mosaic-layer`
(OWL), each unless it is mosaic-unstructured's own allocation. Every variant is evaluated (perplexity on the evaluation text at a fixed
context), exported to ONNX with a key-value cache (onnx_export), checked against torch and timed. Calibration, pruning
and perplexity run on the chosen device; each variant goes back to the CPU once measured, for export
and timing.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn

from agent.portfolio import LanguageModel, Manifest, TensorSpec, Variant, file_entry, save_samples, tokenizer_entry, \
    write_manifest
from exporter.device import CPU, resolve_device
from exporter.errors import ExportError
from exporter.quantize.common import QuantizationUnsupported
from exporter.mosaic.corpus import read_corpus, token_windows
from exporter.mosaic.evaluate import latency_per_token_ms, nonzero_count, parameter_count, perplexity, weights_bytes
from exporter.mosaic.load import load_causal_lm
from exporter.mosaic.offload import layers_on
from exporter.mosaic.onnx_export import cache_entry, cache_layers, export_causal_lm_onnx, step_latency_ms
from exporter.mosaic.checkpoint import save_pruned
from exporter.mosaic.quantized import WEIGHT_BITS, Twin, weight_only_twin
from exporter.mosaic.recovery import RecoveryConfig, recover
from exporter.mosaic.structure import layer_shapes, remove_dead_structure, shrink_layer
from exporter.mosaic.unstructured import PruneReport, UnstructuredConfig, prune_unstructured
from exporter.report import write_report
from exporter.versions import exporter_versions
from exporter.writer import BuiltVariant, check_output_dir, staged_output

BASELINES = {"global": "mosaic-global", "layer": "mosaic-layer"}
SAMPLE_SHAPE = (2, 16)    # health-check input_ids in samples.npz: 2 sequences of 16 tokens


@dataclass
class MosaicSpec:
    out: Path
    model: Path                       # a local HF checkpoint directory or a .gguf file
    calib: Path
    eval: Path
    sparsities: tuple[float, ...] = (0.5,)
    composite_ratio: float = 0.1      # share of heads and neurons the composite variants remove first (heads hurt most)
    baselines: bool = False           # add mosaic-global and mosaic-layer variants
    unstructured: UnstructuredConfig = field(default_factory=lambda: UnstructuredConfig(sparsity=0.5))
    context: int = 256
    calib_windows: int = 32
    eval_windows: int = 32
    seed: int = 0
    checkpoints: Path | None = None   # also save each pruned model here (loads back with load_causal_lm)
    name: str | None = None
    force: bool = False
    device: str = "auto"              # where to calibrate, prune and measure perplexity (exporter.device)
    offload_layers: bool = False      # keep the model in CPU memory; its layers visit the device one at a time
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)  # fine-tune of each composite variant
    weight_bits: tuple[int, ...] = WEIGHT_BITS  # weight-only quantized twins of every variant; () for none


def build_mosaic_portfolio(spec: MosaicSpec, log=print) -> Manifest:
    check_output_dir(spec.out, spec.force)
    for sparsity in spec.sparsities:
        replace(spec.unstructured, sparsity=sparsity).validate()  # every bad option fails before loading the model
    if not 0 <= spec.composite_ratio < 1:
        raise ExportError(f"composite structured ratio must be in [0, 1), got {spec.composite_ratio}")
    try:
        spec.recovery.validate()
    except ValueError as error:
        raise ExportError(f"{error}: see --recovery-steps and --recovery-lr") from None
    device = resolve_device(spec.device)
    model, tokenizer = load_causal_lm(spec.model)
    with layers_on(device if spec.offload_layers else None):
        if not spec.offload_layers:
            model.to(device)
        return _build(spec, model, tokenizer, device, log)


def _build(spec: MosaicSpec, model: nn.Module, tokenizer, device: torch.device, log) -> Manifest:
    if tokenizer is None:
        raise ExportError(f"{spec.model} ships no tokenizer; Mosaic needs one to read the calibration text")
    calib = token_windows(tokenizer, read_corpus(spec.calib), spec.context, spec.calib_windows, spec.seed,
                          name=spec.calib.name)
    held_out = token_windows(tokenizer, read_corpus(spec.eval), spec.context, spec.eval_windows, None,
                             name=spec.eval.name)
    metrics = lambda m: {"perplexity": perplexity(m, held_out), "dataset": spec.eval.name,
                         "n": held_out[:, 1:].numel(), "context": spec.context}

    built = [BuiltVariant(_describe(model, "dense", "dense", None, 1.0, metrics(model), {}), model)]
    log(f"dense: perplexity {built[0].variant.metrics['perplexity']:.2f} on {held_out.numel()} tokens")
    # mosaic-unstructured is pruned at the configured allocation (whichever measured best, README);
    # a baseline that is that same allocation would be the same model twice.
    mosaic = spec.unstructured.granularity
    runs = {g: method for g, method in BASELINES.items() if spec.baselines and g != mosaic}
    runs[mosaic] = "mosaic-unstructured"
    for sparsity in spec.sparsities:
        config = replace(spec.unstructured, sparsity=sparsity)
        for granularity, method in runs.items():
            pruned = copy.deepcopy(model)
            report = prune_unstructured(pruned, calib, replace(config, granularity=granularity))
            variant_id = f"{method}-s{round(sparsity * 100)}"
            built.append(BuiltVariant(_describe(pruned, variant_id, method, "dense", 1 - report.overall,
                                          metrics(pruned), _details(report, granularity, config)), pruned.to(CPU)))
            log(_line(built[-1].variant, report))
        built.append(_composite(model, calib, config, spec, metrics, log))

    model.to(CPU)  # the dense variant, the last one still on the device
    name = spec.name or f"{Path(spec.model).stem.lower()}-mosaic"
    with staged_output(spec.out, spec.force) as staging:
        return _export(staging, name, tokenizer, model, built, held_out, spec, device, log)


def _composite(model: nn.Module, calib: torch.Tensor, config: UnstructuredConfig, spec: MosaicSpec, metrics, log
               ) -> BuiltVariant:
    pruned = copy.deepcopy(model)
    shapes = []
    report = prune_unstructured(pruned, calib, config, on_layer=lambda stats: shapes.append(
        shrink_layer(stats.layer, stats.input_sq_norms, spec.composite_ratio)))
    started = time.perf_counter()
    remove_dead_structure(pruned)  # heads and neurons the unstructured pass emptied go too
    details = {**_details(report, config.granularity, config), "structured_ratio": spec.composite_ratio,
               "dead_removal_s": round(time.perf_counter() - started, 3),
               "layers": [shape.sizes() for shape in layer_shapes(pruned)]}
    if spec.recovery.steps:
        details["recovery"] = _recovered(pruned, calib, spec.recovery, metrics, log)
    variant_id = f"mosaic-composite-s{round(config.sparsity * 100)}"
    density = nonzero_count(pruned) / parameter_count(model)
    built = BuiltVariant(_describe(pruned, variant_id, "mosaic-composite", "dense", density, metrics(pruned), details),
                         pruned.to(CPU))
    log(_line(built.variant, report))
    return built


def _recovered(pruned: nn.Module, calib: torch.Tensor, config: RecoveryConfig, metrics, log) -> dict:
    """Fine-tune the composite variant on the calibration text; what it cost and what it brought back."""
    before = metrics(pruned)["perplexity"]
    done = recover(pruned, calib, config)
    log(f"recovery: {done.steps} steps in {done.seconds:.1f} s, calibration loss {done.loss_before:.3f} -> "
        f"{done.loss_after:.3f} (perplexity before {before:.2f})")
    return {"steps": done.steps, "lr": config.lr, "batch_windows": config.batch_windows, "seconds": done.seconds,
            "calibration_loss_before": round(done.loss_before, 4), "calibration_loss_after": round(done.loss_after, 4),
            "perplexity_before": round(before, 4)}


def _details(report: PruneReport, granularity: str, config: UnstructuredConfig) -> dict:
    return {"granularity": granularity, "target_sparsity": config.sparsity, "m": config.m, "lam": config.lam,
            "pruner": config.pruner, "projection_sparsity": round(report.overall, 6),
            "pruning_s": round(report.pass1_seconds + report.pass2_seconds, 2),
            "ratios": [{k: round(v, 4) for k, v in layer.items()} for layer in report.ratios]}


def _describe(model: nn.Module, variant_id: str, method: str, parent: str | None, density: float, metrics: dict,
              details: dict) -> Variant:
    params = parameter_count(model)
    details = {**details, "weights_mib": round(weights_bytes(model) / 2**20, 2)}
    return Variant(id=variant_id, method=method, parent=parent, density=round(density, 6), params=params,
                   params_nonzero=nonzero_count(model), macs=_macs_per_token(model), metrics=metrics, files={},
                   details=details)


def _macs_per_token(model: nn.Module) -> int:
    """Multiply-accumulates of the linear layers for one token (attention scores excluded: they grow with context)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def _line(variant: Variant, report: PruneReport) -> str:
    return (f"{variant.id}: perplexity {variant.metrics['perplexity']:.2f}, {variant.params:,} params, "
            f"projection sparsity {report.overall:.3f}, pruned in {report.pass1_seconds + report.pass2_seconds:.1f} s")


def _export(root: Path, name: str, tokenizer, dense: nn.Module, built: list[BuiltVariant], held_out: torch.Tensor,
            spec: MosaicSpec, device: torch.device, log) -> Manifest:
    (root / "variants").mkdir()
    samples = held_out[:SAMPLE_SHAPE[0], :SAMPLE_SHAPE[1]].clone()
    for item in built:
        started = time.perf_counter()
        rel = f"variants/{item.variant.id}.onnx"
        diff = export_causal_lm_onnx(item.model, root / rel, samples)
        item.variant.files["onnx"] = file_entry(root, rel, diff)
        item.variant.files["onnx"].kv_cache = cache = cache_entry(item.model)
        # what a generation's steps cost: one new token after half a context of cached ones
        item.variant.host_latency_ms = step_latency_ms(root / rel, cache, spec.context // 2)
        item.variant.details["torch_ms_per_token"] = round(latency_per_token_ms(item.model, spec.context, 3), 3)
        if spec.checkpoints is not None:
            save_pruned(item.model, spec.checkpoints / item.variant.id)
        log(f"exported {item.variant.id}: {item.variant.files['onnx'].bytes / 2**20:.0f} MiB onnx, max diff {diff:.1e}, "
            f"p50 {item.variant.host_latency_ms['p50']:.1f} ms per token ({time.perf_counter() - started:.0f} s)")

    with torch.no_grad():
        expected = {b.variant.id: b.model(input_ids=samples, use_cache=False).logits.numpy() for b in built}
    twins = _weight_only_twins(root, built, spec, held_out, samples, log)
    expected.update({twin.variant.id: twin.expected for twin in twins})
    save_samples(root, [samples.numpy()], expected)
    tokenizer.backend_tokenizer.save(str(root / "tokenizer.json"))
    config = dense.config
    manifest = Manifest(
        name=name, task="causal-lm",
        inputs=[TensorSpec("input_ids", "int64", [-1, -1])],
        outputs=[TensorSpec("logits", "float32", [-1, -1, config.vocab_size])],
        variants=[b.variant for b in built] + [twin.variant for twin in twins], default_variant="dense",
        language_model=LanguageModel(tokenizer=tokenizer_entry(root, "tokenizer.json"),
                                     bos_token_id=_token_id(config.bos_token_id), eos_token_id=_token_id(config.eos_token_id),
                                     context_length=spec.context,
                                     chat_template=_chat_template(tokenizer)),
        exporter={**exporter_versions(), "method": "mosaic", "model": str(spec.model), "device": str(device),
                  "unstructured": json.dumps(asdict(spec.unstructured)), "context": str(spec.context)},
    )
    write_manifest(root, manifest)
    write_report(root, manifest)
    return manifest


def _weight_only_twins(root: Path, built: list[BuiltVariant], spec: MosaicSpec, held_out: torch.Tensor,
                       samples: torch.Tensor, log) -> list[Twin]:
    """An int4 and an int8 weight-only twin of every variant (spec.weight_bits); a failure keeps the float one."""
    twins = []
    for item in built:
        for bits in spec.weight_bits:
            try:
                twin = weight_only_twin(root, item.variant, bits, cache_layers(item.model), held_out, samples,
                                        spec.context)
            except QuantizationUnsupported as error:
                log(f"warning: no int{bits} twin of {item.variant.id}, the float variant stays: {error}")
                continue
            twins.append(twin)
            log(f"{twin.variant.id}: perplexity {twin.variant.metrics['perplexity']:.2f}, "
                f"{twin.variant.details['file_mib']:.0f} MiB onnx, p50 {twin.variant.host_latency_ms['p50']:.1f} ms "
                f"per token ({twin.variant.details['quantize_s']:.0f} s)")
    return twins


def _chat_template(tokenizer) -> str | None:
    """The tokenizer's chat template (tokenizer_config.json, or GGUF's tokenizer.chat_template): tokenizer.json
    does not hold it. A tokenizer with several named templates keeps its default one."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    return template if isinstance(template, str) and template else None


def _token_id(value) -> int | None:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return int(value) if value is not None else None
