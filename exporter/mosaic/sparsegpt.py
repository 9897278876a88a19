"""SparseGPT (Frantar & Alistarh, 2023): unstructured pruning of one Linear with OBS weight updates.

Columns are visited left to right in blocks; in each block the weights with the smallest saliency
w² / [H⁻¹]_jj² are zeroed, and every zeroed weight's error is spread over the not yet visited
columns through the inverse Hessian, so the layer's output on the calibration inputs moves little.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from exporter.errors import ExportError


@torch.no_grad()
def prune_sparsegpt(
    linear: nn.Linear, hessian: torch.Tensor, sparsity: float, *, blocksize: int = 128, percdamp: float = 0.01
) -> None:
    """Zero `sparsity` of the weights of `linear` in place and update the rest to compensate.

    `hessian` is H = 2 X Xᵀ / tokens over the layer's calibration inputs X. Each block of up to
    `blocksize` columns (all rows) gets round(sparsity * its size) zeros; the dampening adds
    `percdamp` times the mean of diag(H) to the diagonal.
    """
    columns = linear.weight.shape[1]
    if hessian.shape != (columns, columns):
        raise ExportError(
            f"Hessian has shape {list(hessian.shape)} but the layer has {columns} input columns: "
            "measure the statistics again after resizing a layer (LayerStats.refresh)"
        )
    if not 0 <= sparsity <= 1:
        raise ExportError(f"sparsity must be in [0, 1], got {sparsity}")
    weight = linear.weight.detach().clone().float()
    hinv = _upper_inverse_cholesky(hessian, weight, percdamp)

    with _one_thread():
        _sweep(weight, hinv, sparsity, blocksize)
    linear.weight.copy_(weight.to(linear.weight.dtype))


def _sweep(weight: torch.Tensor, hinv: torch.Tensor, sparsity: float, blocksize: int) -> None:
    """The column sweep, in place on `weight`, given the upper Cholesky factor of H⁻¹."""
    columns = weight.shape[1]
    for start in range(0, columns, blocksize):
        end = min(start + blocksize, columns)
        block = weight[:, start:end].clone()
        block_hinv = hinv[start:end, start:end]
        saliency = block ** 2 / torch.diag(block_hinv).unsqueeze(0) ** 2
        pruned = torch.zeros_like(block, dtype=torch.bool)
        lowest = torch.argsort(saliency.flatten(), stable=True)[: round(sparsity * block.numel())]
        pruned.view(-1)[lowest] = True

        errors = torch.zeros_like(block)
        for j in range(end - start):
            column = block[:, j]
            kept = torch.where(pruned[:, j], torch.zeros_like(column), column)
            error = (column - kept) / block_hinv[j, j]
            block[:, j:] -= error.unsqueeze(1) @ block_hinv[j, j:].unsqueeze(0)
            block[:, j] = kept
            errors[:, j] = error
        weight[:, start:end] = block
        weight[:, end:] -= errors @ hinv[start:end, end:]


@contextmanager
def _one_thread() -> Iterator[None]:
    """The sweep is thousands of tiny vector operations: extra intra-op threads only add
    synchronisation (10x slower on a busy 2-core host), so run it on one and restore the setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _upper_inverse_cholesky(hessian: torch.Tensor, weight: torch.Tensor, percdamp: float) -> torch.Tensor:
    """The upper Cholesky factor of the dampened H⁻¹, which the column sweep walks down.

    Input columns that never saw a non-zero activation (diag H = 0) carry no information: their
    weights are zeroed (in `weight`) and their diagonal set to 1 so H stays invertible.
    """
    h = hessian.detach().double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    weight[:, dead] = 0
    h += torch.eye(h.shape[0], dtype=h.dtype, device=h.device) * (percdamp * torch.diag(h).mean())
    try:
        lower = torch.linalg.cholesky(h)
    except torch.linalg.LinAlgError as error:
        raise ExportError(
            f"the calibration Hessian is not positive definite even after dampening ({error}); "
            "use more calibration windows or the wanda pruner"
        ) from error
    # cholesky_solve, not cholesky_inverse: the latter takes 100x longer with more than one thread.
    inverse = torch.cholesky_solve(torch.eye(h.shape[0], dtype=h.dtype, device=h.device), lower)
    return torch.linalg.cholesky(inverse, upper=True).float()
