"""Which channels of a network are provably zero, whatever its input.

A sparse model can carry channels that always output exactly zero: a conv filter whose
weights are all masked, a depthwise channel fed only by such a filter. Removing a channel is
exact only if it is provably zero (or nobody reads it), so this analysis walks Torch-Pruning's
traced graph forward and proves zero-ness from the weights alone, never from sample inputs.

BatchNorm is the trap: a zero input leaves BN as the constant beta - gamma * mean / std, and
ReLU of that constant feeds the next layer. `bn_as_masked=True` is the view IMP takes when it
masks BN's affine terms behind an emptied filter; `False` is the strict view of the model as is.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch_pruning as tp

ZeroMask = torch.Tensor  # bool [channels]; True = provably zero for every input
_READS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> (weight identity, block_nonzero)

# grad_fn names of element-wise ops that map all-zero inputs to zero (relu(0) = 0, 0 + 0 = 0, ...).
_ZERO_PRESERVING = (
    "Relu", "Hardtanh", "LeakyRelu", "Gelu", "Silu", "Hardswish", "Tanh", "Add", "Mul", "Clone",
    "MaxPool", "AvgPool", "AdaptiveAvgPool", "AdaptiveMaxPool", "Mean", "View", "Reshape",
)
_OPTYPE = tp.ops.OPTYPE


def bn_constant(bn: nn.BatchNorm2d | nn.BatchNorm1d) -> torch.Tensor:
    """What eval-mode BN outputs for an all-zero input channel: beta - gamma * mean / std."""
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    return (beta - gamma * bn.running_mean / std).detach()


def zero_output_channels(dg: tp.DependencyGraph, bn_as_masked: bool = False) -> dict[nn.Module, ZeroMask]:
    """For every conv, linear and BN module in the graph, the output channels that are provably zero."""
    memo: dict[object, ZeroMask | None] = {}

    def zero_of(node) -> ZeroMask | None:
        if node not in memo:
            memo[node] = None  # guards against cycles; none occur in feed-forward graphs
            memo[node] = _node_zero(node, zero_of, bn_as_masked)
        return memo[node]

    result = {}
    for module, node in dg.module2node.items():
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d)):
            mask = zero_of(node)
            if mask is not None:
                result[module] = mask
    return result


def _node_zero(node, zero_of, bn_as_masked: bool) -> ZeroMask | None:
    module, kind = node.module, node.type
    inputs = [zero_of(i) for i in node.inputs]
    with torch.no_grad():
        if kind in (_OPTYPE.CONV, _OPTYPE.LINEAR, _OPTYPE.DEPTHWISE_CONV):
            return _weighted_zero(module, inputs)
        if kind == _OPTYPE.BN:
            return _batchnorm_zero(module, _first_of_size(inputs, module.num_features), bn_as_masked)
        if kind in (_OPTYPE.ELEMENTWISE, _OPTYPE.RESHAPE):
            name = type(node.grad_fn).__name__ if node.grad_fn is not None else ""
            known = [m for m in inputs if m is not None]
            if not known or len(known) != len(inputs) or not name.startswith(_ZERO_PRESERVING):
                return None
            if any(m.shape != known[0].shape for m in known):
                return None
            return torch.stack(known).all(dim=0)
    return None  # concat, split, custom ops: unknown, so never claimed zero


def is_depthwise(module: nn.Module) -> bool:
    """A conv whose every output channel reads only its own input channel."""
    return isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels > 1


def block_nonzero(module: nn.Conv2d | nn.Linear) -> torch.Tensor:
    """bool [out, in_per_group]: whether output channel o reads input channel i with any non-zero weight.

    Rows answer "is this filter empty", columns "does anyone read this channel". Cached on the
    module until its weight changes shape (the structured step asks several times per layer).
    """
    weight = module.weight.detach()
    key = (weight.shape, weight.data_ptr(), weight._version)
    cached = _READS.get(module)
    if cached is not None and cached[0] == key:
        return cached[1]
    out_channels, in_channels = weight.shape[:2]
    reads = (weight.reshape(out_channels * in_channels, -1) != 0).any(dim=1).view(out_channels, in_channels)
    _READS[module] = (key, reads)
    return reads


def _weighted_zero(module: nn.Conv2d | nn.Linear, inputs: list[ZeroMask | None]) -> ZeroMask:
    reads = block_nonzero(module)
    out_channels = reads.shape[0]
    bias_zero = torch.ones(out_channels, dtype=torch.bool) if module.bias is None else module.bias.detach() == 0
    depthwise = is_depthwise(module)
    in_features = module.in_channels if isinstance(module, nn.Conv2d) else module.in_features
    dead_in = _first_of_size(inputs, in_features)

    if depthwise:
        rows_zero = ~reads[:, 0] | (dead_in if dead_in is not None else False)
    elif dead_in is not None and getattr(module, "groups", 1) == 1:
        rows_zero = ~(reads & ~dead_in).any(dim=1)  # weights that only multiply a zero input contribute nothing
    else:
        rows_zero = ~reads.any(dim=1)
    return rows_zero & bias_zero


def _batchnorm_zero(bn, dead_in: ZeroMask | None, bn_as_masked: bool) -> ZeroMask:
    affine_zero = (bn.weight.detach() == 0) & (bn.bias.detach() == 0) if bn.affine else torch.zeros(
        bn.num_features, dtype=torch.bool)
    if dead_in is None:
        return affine_zero
    if bn_as_masked:
        return affine_zero | dead_in
    return affine_zero | (dead_in & (bn_constant(bn) == 0))


def _first_of_size(masks: list[ZeroMask | None], size: int) -> ZeroMask | None:
    for mask in masks:
        if mask is not None and mask.numel() == size:
            return mask
    return None
