"""Saving and loading a causal LM whose decoder layers differ in size (after Mosaic's structured step).

A normal Hugging Face checkpoint (config.json, model.safetensors) plus edgeshift_layers.json with
each layer's heads, KV heads and intermediate size: the loader builds the stock model, resizes
each layer's modules to the recorded sizes, and loads the weights strictly.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from exporter.errors import ExportError
from exporter.mosaic.load import decoder_layers
from exporter.mosaic.structure import LayerShape, layer_shapes, llama_parts, resize_empty

LAYERS_FILE = "edgeshift_layers.json"
WEIGHTS_FILE = "model.safetensors"


def save_pruned(model: nn.Module, directory: Path) -> None:
    """config.json, model.safetensors (tied weights once) and edgeshift_layers.json with each layer's sizes.

    Written directly rather than with save_pretrained, which refuses a model loaded from GGUF even
    though its weights are already dequantised; the GGUF quantization_config is dropped for that reason.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    shapes = layer_shapes(model)
    config = copy.deepcopy(model.config)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    config.architectures = [type(model).__name__]
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    save_file(_unique_tensors(model), str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    layers = [shape.sizes() for shape in shapes]
    (directory / LAYERS_FILE).write_text(json.dumps({"layers": layers}, indent=1) + "\n")


def load_pruned(directory: Path) -> nn.Module:
    """The model `save_pruned` wrote, in eval mode: stock modules resized to the recorded sizes."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    shapes = _read_layer_sizes(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise ExportError(f"{weights} is missing: re-save the model with save_pruned")
    try:
        config = AutoConfig.from_pretrained(directory)
    except Exception as error:
        raise ExportError(f"cannot read {directory / 'config.json'}: {error}; re-save the model with save_pruned") from error
    if getattr(config, "num_hidden_layers", None) != len(shapes):
        raise ExportError(
            f"{directory / LAYERS_FILE} lists {len(shapes)} layers but config.json has "
            f"{getattr(config, 'num_hidden_layers', None)}: re-save the model with save_pruned"
        )
    with _no_weight_init():  # the full-size weights are only reserved, never written
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # skipped along with the initialisation
    for layer, shape in zip(decoder_layers(model), shapes, strict=True):
        attention, mlp = llama_parts(layer)
        resize_empty(attention, mlp, shape)
    try:
        state = load_file(weights)
        model.to(next(iter(state.values())).dtype)
        missing, unexpected = model.load_state_dict(state, strict=False)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportError(f"cannot load the weights in {directory}: {reason}; re-save the model with save_pruned") from error
    missing = [key for key in missing if not _is_tied_to_loaded(model, key, state)]
    if missing or unexpected:
        raise ExportError(
            f"weights in {directory} do not match the model (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}): re-save the model with save_pruned"
        )
    return model.eval()


def _read_layer_sizes(directory: Path) -> list[LayerShape]:
    path = directory / LAYERS_FILE
    if not path.is_file():
        raise ExportError(f"{path} is missing: save the model with save_pruned, not save_pretrained alone")
    try:
        layers = json.loads(path.read_text())["layers"]
        shapes = [LayerShape(int(entry["heads"]), int(entry["kv_heads"]), int(entry["intermediate"])) for entry in layers]
    except (ValueError, KeyError, TypeError) as error:
        raise ExportError(f"{path} is corrupt ({type(error).__name__}: {error}): re-save the model with save_pruned") from error
    for index, shape in enumerate(shapes):
        if min(shape.heads, shape.kv_heads, shape.intermediate) < 1 or shape.heads % shape.kv_heads:
            raise ExportError(f"{path} layer {index} has impossible sizes {shape.sizes()}: re-save the model with save_pruned")
    return shapes


def _unique_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor (tied embeddings) under its first name only."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            tensors[name] = tensor.detach().contiguous()
    return tensors


def _is_tied_to_loaded(model: nn.Module, key: str, state: dict[str, torch.Tensor]) -> bool:
    """True when `key` names a parameter shared with one that was loaded (tied embeddings)."""
    names_by_tensor: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names_by_tensor.setdefault(id(parameter), []).append(name)
    return any(key in names and any(name in state for name in names) for names in names_by_tensor.values())


def _no_weight_init():
    """transformers' context that skips random initialisation (its module moved in 5.0)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()
