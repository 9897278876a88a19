"""Layer by layer on the device: an LLM larger than the GPU's memory stays in CPU memory, and each
decoder layer visits the device only while it is calibrated, pruned or evaluated.

Mosaic's passes already go one decoder layer at a time (calibration.py), so the device never needs
more than one layer's weights, the running hidden states of the calibration windows and one
layer's statistics: a 7B LLaMA (13 GB in bf16, 26 GB in fp32) calibrates on one 24 GB GPU. Inside
`layers_on(device)`, `sequential_layers`, `collect_stats` and `perplexity` work this way; outside
it, on whatever device the whole model lives.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn as nn

_LAYER_DEVICE: ContextVar[torch.device | None] = ContextVar("layer_device", default=None)


@contextmanager
def layers_on(device: torch.device | None) -> Iterator[None]:
    """Within the block, decoder layers visit `device` one at a time (None: no offloading)."""
    token = _LAYER_DEVICE.set(device)
    try:
        yield
    finally:
        _LAYER_DEVICE.reset(token)


def layer_device() -> torch.device | None:
    return _LAYER_DEVICE.get()


def moved(value, device: torch.device):
    """Tensors in `value` (a layer's keyword arguments: masks, positions, rotary tables) on `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(moved(item, device) for item in value)
    if isinstance(value, dict):
        return {key: moved(item, device) for key, item in value.items()}
    return value


def final_logits(model: nn.Module, hidden: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The model's head (final norm, then the output projection) on hidden states leaving the last layer."""
    norm, head = model.get_decoder().norm, model.get_output_embeddings()
    norm.to(device)
    head.to(device)  # a head tied to the embeddings takes them along, and brings them back below
    try:
        return head(norm(hidden.to(device)))
    finally:
        norm.to("cpu")
        head.to("cpu")
