"""How good, fast and big a causal LM is: perplexity, CPU latency per token, parameter counts."""
from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from exporter.device import device_of, to_device
from exporter.errors import ExportError
from exporter.mosaic.calibration import hidden_states_through
from exporter.mosaic.offload import final_logits, layer_device


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 1) -> float:
    """exp of the mean next-token negative log-likelihood over every predicted token of the windows.

    Each window [context] is scored on its own (no state carries over), predicting tokens 1..context-1,
    wherever `model` lives.
    """
    if windows.dtype != torch.int64 or windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ExportError(
            f"evaluation windows must be int64 input_ids shaped [count, context >= 2], got {windows.dtype} "
            f"{list(windows.shape)}"
        )
    if batch_size < 1:
        raise ExportError(f"batch size must be at least 1, got {batch_size}")
    total_nll, tokens = 0.0, 0
    offload_to = layer_device()
    device = device_of(model) if offload_to is None else offload_to
    for start in range(0, windows.shape[0], batch_size):
        batch = to_device(windows[start:start + batch_size], device)
        if offload_to is None:
            logits = model(input_ids=batch, use_cache=False).logits
        else:  # the model stays in CPU memory; its layers visit the device in turn
            logits = final_logits(model, hidden_states_through(model, batch.cpu()), offload_to)
        targets = batch[:, 1:]
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum")
        total_nll += float(nll)
        tokens += targets.numel()
    return math.exp(total_nll / tokens)


@torch.no_grad()
def latency_per_token_ms(model: nn.Module, context: int, repeats: int = 5) -> float:
    """Milliseconds per token of one batch-1 forward pass over `context` tokens (a prompt's prefill,
    no KV cache) on this machine's CPU: the median of `repeats` timed runs after one warm-up, / context."""
    if context < 1 or repeats < 1:
        raise ExportError(f"need context >= 1 and repeats >= 1, got context={context}, repeats={repeats}")
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (1, context), generator=generator)
    model(input_ids=input_ids, use_cache=False)
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        model(input_ids=input_ids, use_cache=False)
        timings.append(time.perf_counter() - started)
    return statistics.median(timings) * 1000.0 / context


def parameter_count(model: nn.Module) -> int:
    """All parameters, a tied embedding counted once."""
    return sum(p.numel() for p in model.parameters())


def nonzero_count(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(p)) for p in model.parameters())


def weights_bytes(model: nn.Module) -> int:
    """Bytes of all parameters as stored now (dense, so zeros take room too)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
