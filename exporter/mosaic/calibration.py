"""The sequential layer loop of Wanda and SparseGPT: calibration activations, one decoder layer at a time.

The windows' hidden states enter decoder layer 0, and each layer's outputs become the next layer's
inputs. Only the running hidden states of all windows and one layer's statistics are alive at once,
so calibrating never holds the activations of the whole model.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from exporter.device import device_of, to_device
from exporter.errors import ExportError
from exporter.mosaic.load import decoder_layers, projections
from exporter.mosaic.offload import layer_device, moved

# Windows run through a layer together: fewer, larger operations, while the MLP's intermediate
# activations (windows x context x intermediate size) stay small.
_WINDOWS_PER_BATCH = 8


@dataclass
class LayerStats:
    """What the calibration windows showed about one decoder layer's projection inputs.

    `input_sq_norms[p]` is Wanda's `scaler_row`: per input column of projection p, the squared L2
    norm of that column's activations over all calibration tokens, divided by the token count.
    `hessians[p]` (only when asked for) is SparseGPT's H = 2 X Xᵀ / tokens over the same inputs.
    """
    index: int
    layer: nn.Module
    input_sq_norms: dict[str, torch.Tensor]
    hessians: dict[str, torch.Tensor] = field(default_factory=dict)
    _measure: Callable[[], LayerStats] | None = field(default=None, repr=False, compare=False)

    def matches(self, linears: dict[str, nn.Linear]) -> bool:
        """Whether the statistics still fit these projections' input widths (a resize changes them)."""
        return all(
            self.input_sq_norms[name].shape == (linear.in_features,)
            and (name not in self.hessians or self.hessians[name].shape == (linear.in_features,) * 2)
            for name, linear in linears.items()
        )

    def refresh(self) -> None:
        """Measure again, from the same layer inputs, on the layer as it is now in the model.

        After heads or neurons are removed this equals slicing the old statistics (the kept
        heads' and neurons' activations do not change), without the caller having to."""
        if self._measure is None:
            raise ExportError("these statistics cannot be refreshed: only sequential_layers' can")
        fresh = self._measure()
        self.layer, self.input_sq_norms, self.hessians = fresh.layer, fresh.input_sq_norms, fresh.hessians


def sequential_layers(model: nn.Module, windows: torch.Tensor, *, hessians: bool = False) -> Iterator[LayerStats]:
    """Yield each decoder layer with its input statistics, in order.

    While a LayerStats is out, the caller may change that layer in place (prune it, resize it) or
    replace it in the model's layer list, and `stats.refresh()` measures the changed layer again;
    when the caller asks for the next one, the layer's outputs are recomputed from the same inputs
    with the changed layer, so later layers calibrate on what the pruned model really feeds them.
    `windows` is int64 input_ids [count, context].
    """
    hidden, layer_kwargs = _layer_zero_inputs(model, windows)
    count = len(decoder_layers(model))
    for index in range(count):
        _visit(model, index)

        def measure(index: int = index, hidden: torch.Tensor = hidden) -> LayerStats:
            return _layer_stats(index, decoder_layers(model)[index], hidden, layer_kwargs, hessians)[0]

        stats = measure()
        stats._measure = measure
        yield stats
        stats._measure = None  # let go of this layer's inputs: only one set of hidden states stays alive
        del stats
        if index + 1 < count:
            hidden = _run_layer(decoder_layers(model)[index], hidden, layer_kwargs)
        _leave(model, index)  # the layer as the caller left it (resized layers are new modules)


def collect_stats(model: nn.Module, windows: torch.Tensor) -> list[LayerStats]:
    """Every layer's input norms of the unchanged model, each layer run once (pass 1 of Mosaic)."""
    hidden, layer_kwargs = _layer_zero_inputs(model, windows)
    collected = []
    for index, layer in enumerate(decoder_layers(model)):
        _visit(model, index)
        stats, hidden = _layer_stats(index, layer, hidden, layer_kwargs, hessians=False)
        _leave(model, index)
        home = device_of(layer)  # the statistics stay beside the weights they score
        stats.input_sq_norms = {name: norm.to(home) for name, norm in stats.input_sq_norms.items()}
        collected.append(stats)
    return collected


def hidden_states_through(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """The hidden states leaving the last decoder layer, layer by layer (see `offload`)."""
    hidden, layer_kwargs = _layer_zero_inputs(model, windows)
    for index in range(len(decoder_layers(model))):
        _visit(model, index)
        hidden = _run_layer(decoder_layers(model)[index], hidden, layer_kwargs)
        _leave(model, index)
    return hidden


def _visit(model: nn.Module, index: int) -> None:
    device = layer_device()
    if device is not None:
        decoder_layers(model)[index].to(device)


def _leave(model: nn.Module, index: int) -> None:
    if layer_device() is not None:
        decoder_layers(model)[index].to("cpu")


class _Caught(Exception):
    """Raised by the hook on layer 0 once it has its inputs: nothing after it needs to run."""


@torch.no_grad()
def _layer_zero_inputs(model: nn.Module, windows: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The hidden states entering decoder layer 0 for every window, and the keyword arguments the
    model passes its layers (attention mask, rotary position embeddings, position ids)."""
    if windows.dtype != torch.int64 or windows.dim() != 2 or windows.shape[0] < 1:
        raise ExportError(
            f"calibration windows must be int64 input_ids shaped [count, context], got {windows.dtype} "
            f"{list(windows.shape)}"
        )
    captured: list[torch.Tensor] = []
    layer_kwargs: dict = {}

    def catch(module, args, kwargs):
        captured.append((args[0] if args else kwargs["hidden_states"]).detach())
        if not layer_kwargs:  # every window has the same length, so the same mask and positions
            layer_kwargs.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Caught

    handle = decoder_layers(model)[0].register_forward_pre_hook(catch, with_kwargs=True)
    device = device_of(model)
    try:
        for window in windows:
            try:
                model(to_device(window.unsqueeze(0), device), use_cache=False)
            except _Caught:
                pass
    finally:
        handle.remove()
    hidden = torch.cat(captured)
    offload_to = layer_device()
    return (hidden, layer_kwargs) if offload_to is None else (hidden.to(offload_to), moved(layer_kwargs, offload_to))


@torch.no_grad()
def _run_layer(layer: nn.Module, hidden: torch.Tensor, layer_kwargs: dict) -> torch.Tensor:
    """The layer's outputs for every window, a few windows at a time (the kwargs, captured with
    batch 1, broadcast over any batch)."""
    outputs = torch.empty_like(hidden)
    for start in range(0, hidden.shape[0], _WINDOWS_PER_BATCH):
        end = start + _WINDOWS_PER_BATCH
        out = layer(hidden[start:end], **layer_kwargs)
        outputs[start:end] = out[0] if isinstance(out, tuple) else out  # transformers 4.x layers return tuples
    return outputs


@torch.no_grad()
def _layer_stats(
    index: int, layer: nn.Module, hidden: torch.Tensor, layer_kwargs: dict, hessians: bool
) -> tuple[LayerStats, torch.Tensor]:
    """Run the windows through `layer` with hooks on its projections: its statistics and outputs."""
    linears = projections(layer, index)
    sums = {name: torch.zeros(m.in_features, dtype=torch.float64, device=m.weight.device) for name, m in linears.items()}
    products = {name: torch.zeros(m.in_features, m.in_features, device=m.weight.device)
                for name, m in linears.items()} if hessians else {}
    tokens = {name: 0 for name in linears}

    def hook_for(name: str):
        def accumulate(module, inputs, output):
            x = inputs[0].detach().reshape(-1, module.in_features).float()
            sums[name] += x.square().sum(dim=0, dtype=torch.float64)
            tokens[name] += x.shape[0]
            if hessians:
                products[name] += x.T @ x
        return accumulate

    handles = [m.register_forward_hook(hook_for(name)) for name, m in linears.items()]
    try:
        outputs = _run_layer(layer, hidden, layer_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    stats = LayerStats(
        index=index,
        layer=layer,
        input_sq_norms={name: (sums[name] / tokens[name]).float() for name in linears},
        hessians={name: products[name] * (2.0 / tokens[name]) for name in products},
    )
    return stats, outputs
