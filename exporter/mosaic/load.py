"""Load a local LLaMA-style causal LM (HF checkpoint directory or GGUF file) and find its projections."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from exporter.errors import ExportError

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PRUNED_MODEL_MARKER = "edgeshift_layers.json"  # written by exporter.mosaic.checkpoint.save_pruned
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_causal_lm(path: Path) -> tuple[nn.Module, object | None]:
    """The model (float32, eval mode) and its tokenizer, from local files only, never the hub.

    `path` is a checkpoint directory (config.json + weights), a directory written by
    `exporter.mosaic.checkpoint.save_pruned`, or a `.gguf` file. The tokenizer is None when a checkpoint
    directory holds no tokenizer files.
    """
    path = Path(path)
    if not path.exists():
        raise ExportError(f"model {path} does not exist: give a checkpoint directory or a .gguf file")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ExportError(f"model {path} is a file but not a .gguf: give a .gguf file or a checkpoint directory")
        model, tokenizer = _load_gguf(path)
    elif (path / PRUNED_MODEL_MARKER).exists():
        from exporter.mosaic.checkpoint import load_pruned

        model, tokenizer = load_pruned(path), _load_tokenizer(path)
    else:
        model, tokenizer = _load_checkpoint(path), _load_tokenizer(path)
    _drop_quantization(model)
    model = model.to(torch.float32).eval()
    decoder_layers(model)  # refuse a model Mosaic cannot prune now, not halfway through pruning
    return model, tokenizer


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers in order, each checked to have all seven LLaMA-style projections."""
    layers = _layer_list(model)
    for index, layer in enumerate(layers):
        projections(layer, index)
    return list(layers)


def projections(layer: nn.Module, index: int | None = None) -> dict[str, nn.Linear]:
    """The seven projections of one decoder layer by name, in PROJECTIONS order."""
    linears = {name.rsplit(".", 1)[-1]: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
    where = f"layer {index}" if index is not None else "decoder layer"
    for name in PROJECTIONS:
        if name not in linears:
            raise ExportError(
                f"{where} has no '{name}' (found: {', '.join(linears) or 'no linear layers'}); "
                f"Mosaic needs LLaMA-style projections: {', '.join(PROJECTIONS)}"
            )
    return {name: linears[name] for name in PROJECTIONS}


def _layer_list(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    if isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return inner.layers
    # Other architectures keep their blocks elsewhere (OPT: model.decoder.layers); find them so the
    # error can say which projection is missing rather than only that the layout is unknown.
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and name.rsplit(".", 1)[-1] in ("layers", "h"):
            return module
    raise ExportError(
        f"{type(model).__name__} has no model.layers (found no decoder layers); Mosaic needs a LLaMA-style "
        "causal LM (e.g. LlamaForCausalLM)"
    )


def _load_checkpoint(directory: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    if not (directory / "config.json").exists():
        raise ExportError(f"{directory} has no config.json: give a Hugging Face checkpoint directory or a .gguf file")
    try:
        return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, local_files_only=True)
    except Exception as error:
        raise ExportError(f"cannot load checkpoint {directory}: {_one_line(error)}") from error


def _load_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    if not any((directory / name).exists() for name in _TOKENIZER_FILES):
        return None
    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as error:
        raise ExportError(f"cannot load the tokenizer in {directory}: {_one_line(error)}") from error


def _load_gguf(file: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            file.parent, gguf_file=file.name, dtype=torch.float32, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name, local_files_only=True)
    except Exception as error:
        raise ExportError(f"cannot read GGUF file {file}: {_one_line(error)}") from error
    return model, tokenizer


def _drop_quantization(model: nn.Module) -> None:
    """Forget how the weights were stored (GGUF is dequantized on load) so saving writes a plain checkpoint."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
