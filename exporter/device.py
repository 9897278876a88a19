"""Where the host side computes: `--device auto|cpu|cuda|cuda:N|mps`, resolved once, and the moves to and from it.

Training, pruning-at-initialization scoring, Mosaic's calibration and evaluation run on the
chosen device; everything that leaves them (export, the structured step, quantization, timing,
the manifest) takes CPU float32 models, so a model always comes back to the CPU afterwards.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from exporter.errors import ExportError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
CPU = torch.device("cpu")


def resolve_device(spec: str = "auto") -> torch.device:
    """The device `spec` names on this machine; auto: CUDA, else MPS, else the CPU. One-line ExportError otherwise."""
    text = str(spec).strip().lower()
    if text == "auto":
        return _current_cuda() if torch.cuda.is_available() else torch.device("mps") if _mps_available() else CPU
    if text == "cpu":
        return CPU
    if text == "mps":
        if not _mps_available():
            raise ExportError("--device mps: MPS is not available (torch.backends.mps.is_available() is False); "
                              "use --device cpu")
        return torch.device("mps")
    kind, colon, index = text.partition(":")
    if kind != "cuda" or (colon and not index.isdigit()):
        raise ExportError(f"--device {spec}: unknown device; use {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        raise ExportError(f"--device {spec}: no CUDA device is visible (torch.cuda.is_available() is False); "
                          "use --device cpu")
    count = torch.cuda.device_count()
    if index and int(index) >= count:
        visible = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        raise ExportError(f"--device {spec}: there is no CUDA device {index}; this machine has {visible}")
    return torch.device("cuda", int(index)) if index else _current_cuda()


def describe_device(device: torch.device | str) -> str:
    """'cpu', 'mps', or 'cuda:0 (NVIDIA H200)': what a run prints about where it computes."""
    device = torch.device(device)
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor (a batch) on `device`; through pinned memory on CUDA, so the copy overlaps the computation."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def device_of(model: nn.Module) -> torch.device:
    """Where `model`'s parameters live (the CPU for a model without any)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else CPU


@contextmanager
def placed_on(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """`model` on `device` inside the block and back on the CPU after it, even when the block fails."""
    model.to(device)
    try:
        yield model
    finally:
        model.to(CPU)


def _current_cuda() -> torch.device:
    """CUDA with its index, so that what a manifest records names one device."""
    return torch.device("cuda", torch.cuda.current_device())


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())
