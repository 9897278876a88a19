"""Which channels of a network are provably zero, whatever its input.

A sparse model can carry channels that always output exactly zero: a conv filter whose
weights are all masked, a depthwise channel fed only by such a filter. Removing a channel is
exact only if it is provably zero (or nobody reads it), so this analysis walks Torch-Pruning's
traced graph forward and proves zero-ness from the weights alone, never from sample inputs.

It is sound before it is complete: what the traced graph does not show as a channel tensor
(a constant or a scalar parameter added in, a buffer) counts as live; an op it does not model
(a reshape or transpose that moves the channel axis, a reduction over channels, a module whose
forward transforms its own weight) passes nothing on, and `channel_aligned` tells the structured
step not to remove channels through it.

BatchNorm is the trap: a zero input leaves BN as the constant beta - gamma * mean / std, and
ReLU of that constant feeds the next layer. `bn_as_masked=True` is the view IMP takes when it
masks BN's affine terms behind an emptied filter; `False` is the strict view of the model as is.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
from torch.overrides import TorchFunctionMode

ZeroMask = torch.Tensor  # bool [channels]; True = provably zero for every input
_READS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> (weight identity, block_nonzero)
_OPTYPE = tp.ops.OPTYPE

# grad_fn names (without "Backward<n>") of ops that act on each channel alone...
_ZERO_PRESERVING = {  # ...and map a zero channel to zero
    "Relu", "LeakyRelu", "Gelu", "Silu", "Hardswish", "Tanh", "Elu", "Mish", "Neg", "Abs", "Clone",
    "MaxPool2DWithIndices", "AvgPool2D", "AdaptiveAvgPool2D", "AdaptiveMaxPool2D", "UpsampleNearest2D",
    "UpsampleBilinear2D", "Contiguous",
}
_CHANNEL_WISE = {"ConstantPadNd", "Sigmoid", "Hardsigmoid", "Softplus", "Clamp", "Hardtanh", "Exp", "Sqrt", "Rsqrt", "Erf", "Pow"}
_SPATIAL_REDUCTIONS = {"Mean", "Sum", "Amax", "Amin", "Squeeze", "Unsqueeze"}  # aligned when they leave dims 0, 1 alone
_FLATTENS = {"View", "Reshape", "UnsafeView", "ReshapeAlias"}  # aligned when every dim after the channels is 1
_PLAIN_MODULES = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm)


def op_name(node) -> str:
    name = type(node.grad_fn).__name__ if node.grad_fn is not None else ""
    return name.split("Backward")[0]


def channel_aligned(node) -> bool:
    """Whether a traced op keeps channel c at position c, so liveness and removal may pass through it."""
    name, grad_fn = op_name(node), node.grad_fn
    if name in _ZERO_PRESERVING or name in _CHANNEL_WISE or name in ("Add", "Sub", "Mul", "Div"):
        return True
    if name == "Cat":
        return _normalized_dims(grad_fn, (getattr(grad_fn, "_saved_dim", None),)) == [1]
    if name in _SPATIAL_REDUCTIONS:
        dims = getattr(grad_fn, "_saved_dim", None)
        dims = _normalized_dims(grad_fn, dims if isinstance(dims, tuple) else (dims,))
        return dims is not None and all(dim >= 2 for dim in dims)
    if name == "ConstantPadNd":
        return len(getattr(grad_fn, "_saved_pad", ())) <= 4 and _feature_map(node)
    if name in _FLATTENS:
        sizes = getattr(grad_fn, "_saved_self_sym_sizes", None)
        return sizes is not None and len(sizes) >= 2 and all(size == 1 for size in sizes[2:])
    return False


def _feature_map(node) -> bool:
    """Whether a node outputs [N, C, H, W]: a 2-d conv or BN, or a channel-wise op of one."""
    if isinstance(node.module, (nn.Conv2d, nn.BatchNorm2d)):
        return True
    name = op_name(node)
    return (name in _ZERO_PRESERVING or name in _CHANNEL_WISE) and bool(node.inputs) and all(
        _feature_map(source) for source in node.inputs)


def plain_module(module: nn.Module) -> bool:
    """A conv, linear or BN that computes what its weights say: no overridden forward, no hooks.

    A subclass that transforms its weight in forward (weight standardization, say) makes a zero
    weight column mean nothing, so its weights prove nothing either way.
    """
    base = next((kind for kind in _PLAIN_MODULES if isinstance(module, kind)), None)
    return (base is not None and type(module).forward is base.forward
            and not module._forward_hooks and not module._forward_pre_hooks)


def bn_constant(bn: nn.BatchNorm2d | nn.BatchNorm1d) -> torch.Tensor:
    """What eval-mode BN outputs for an all-zero input channel: beta - gamma * mean / std."""
    std = torch.sqrt(bn.running_var + bn.eps)
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    return (beta - gamma * bn.running_mean / std).detach()


class _PadValues(TorchFunctionMode):
    """Records each constant pad's value by its output's grad_fn: autograd keeps the pad widths, not the value."""

    def __init__(self):
        super().__init__()
        self.values: dict[object, float] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in (F.pad, torch._C._nn.pad, torch.constant_pad_nd) and isinstance(out, torch.Tensor) \
                and out.grad_fn is not None and type(out.grad_fn).__name__.startswith("ConstantPadNd"):
            mode = kwargs.get("mode", args[2] if len(args) > 2 and func is not torch.constant_pad_nd else "constant")
            value = kwargs.get("value", args[-1] if len(args) > (2 if func is torch.constant_pad_nd else 3) else None)
            if mode == "constant":
                self.values[out.grad_fn] = 0.0 if value is None else value
        return out


def trace(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph of `model`, with what it leaves out that liveness needs (pad values)."""
    with _PadValues() as pads:
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    dg.pad_values = pads.values
    return dg


def zero_node_channels(dg: tp.DependencyGraph, bn_as_masked: bool = False) -> dict[object, ZeroMask | None]:
    """For every node of the traced graph, its output channels that are provably zero (None: not known)."""
    memo: dict[object, ZeroMask | None] = {}
    pad_values = getattr(dg, "pad_values", {})  # a graph not built by `trace`: every pad counts as live

    def zero_of(node) -> ZeroMask | None:
        if node not in memo:
            memo[node] = None  # guards against cycles; none occur in feed-forward graphs
            memo[node] = _node_zero(node, zero_of, bn_as_masked, pad_values)
        return memo[node]

    for node in dg.module2node.values():
        zero_of(node)
    return memo


def zero_output_channels(dg: tp.DependencyGraph, bn_as_masked: bool = False) -> dict[nn.Module, ZeroMask]:
    """For every conv, linear and BN module in the graph, the output channels that are provably zero."""
    zero = zero_node_channels(dg, bn_as_masked)
    return {module: zero[node] for module, node in dg.module2node.items()
            if isinstance(module, _PLAIN_MODULES) and zero.get(node) is not None}


def _node_zero(node, zero_of, bn_as_masked: bool, pad_values: dict) -> ZeroMask | None:
    module, kind = node.module, node.type
    with torch.no_grad():
        if kind in (_OPTYPE.CONV, _OPTYPE.LINEAR, _OPTYPE.DEPTHWISE_CONV, _OPTYPE.BN, _OPTYPE.GN):
            inputs = [zero_of(i) for i in node.inputs]
            if not plain_module(module):
                return torch.zeros(_out_channels(module), dtype=torch.bool)
            if kind == _OPTYPE.GN:
                return _groupnorm_zero(module, _first_of_size(inputs, module.num_channels))
            if kind == _OPTYPE.BN:
                return _batchnorm_zero(module, _first_of_size(inputs, module.num_features), bn_as_masked)
            return _weighted_zero(module, inputs)
        if kind in (_OPTYPE.ELEMENTWISE, _OPTYPE.RESHAPE, _OPTYPE.CONCAT) and channel_aligned(node):
            return _op_zero(node, zero_of, pad_values)
    return None  # split, slice, transposes, custom ops: unknown, so never claimed zero


def _op_zero(node, zero_of, pad_values: dict) -> ZeroMask | None:
    """An aligned op's zero channels, from its operands in order; constants and parameters are live."""
    by_grad_fn = {i.grad_fn: i for i in node.inputs if i.grad_fn is not None}
    operands = [by_grad_fn.get(fn) if fn is not None else None for fn, _ in node.grad_fn.next_functions]
    masks = [zero_of(i) if i is not None else None for i in operands]
    known = [m for m in masks if m is not None]
    name = op_name(node)
    if name == "Cat":
        return torch.cat(masks) if masks and len(known) == len(masks) else None
    if not known:
        return None
    width = max(m.numel() for m in known)
    known = [m for m in known if m.numel() == width]  # a [N, 1, ...] operand broadcast over channels says nothing
    if name in ("Add", "Sub"):  # zero where every operand is a channel tensor that is zero there
        all_zero = len(known) == len(masks)
        return torch.stack(known).all(dim=0) if all_zero else torch.zeros(width, dtype=torch.bool)
    if name == "Mul":  # zero times anything finite
        return torch.stack(known).any(dim=0)
    if name == "Div":  # zero over a constant
        numerator = masks[0]
        divisor_constant = len(masks) > 1 and node.grad_fn.next_functions[1][0] is None
        return numerator if numerator is not None and divisor_constant else torch.zeros(width, dtype=torch.bool)
    if name == "ConstantPadNd":
        return known[0] if len(masks) == 1 and pad_values.get(node.grad_fn) == 0 else torch.zeros(width, dtype=torch.bool)
    if name in _CHANNEL_WISE and not _clamps_zero_to_zero(node.grad_fn) or len(masks) != 1:
        return torch.zeros(width, dtype=torch.bool)
    return known[0]  # zero-preserving, spatial reductions, flattens of [N, C, 1, 1]


def _clamps_zero_to_zero(grad_fn) -> bool:
    """ReLU6 and friends: a clamp whose range holds zero."""
    low = getattr(grad_fn, "_saved_min_val", getattr(grad_fn, "_saved_min", None))
    high = getattr(grad_fn, "_saved_max_val", getattr(grad_fn, "_saved_max", None))
    return isinstance(low, (int, float)) and isinstance(high, (int, float)) and low <= 0 <= high


def _normalized_dims(grad_fn, dims: tuple) -> list[int] | None:
    """Reduction dims as non-negative ints; None when a negative dim cannot be resolved without the rank."""
    rank = len(getattr(grad_fn, "_saved_self_sym_sizes", ()) or ())
    result = []
    for dim in dims:
        if not isinstance(dim, int):
            return None
        if dim >= 2 ** 63:  # autograd saves some int64 dims as unsigned
            dim -= 2 ** 64
        if dim < 0:
            if not rank:
                return None
            dim += rank
        result.append(dim)
    return result


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


def _out_channels(module: nn.Module) -> int:
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    return module.num_features


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


def _groupnorm_zero(norm: nn.GroupNorm, dead_in: ZeroMask | None) -> ZeroMask:
    """A group whose every input channel is zero normalizes to zero, so it outputs beta."""
    if dead_in is None:
        return torch.zeros(norm.num_channels, dtype=torch.bool)
    whole = dead_in.view(norm.num_groups, -1).all(dim=1).repeat_interleave(norm.num_channels // norm.num_groups)
    beta_zero = norm.bias.detach() == 0 if norm.affine else torch.ones(norm.num_channels, dtype=torch.bool)
    return whole & beta_zero


def _first_of_size(masks: list[ZeroMask | None], size: int) -> ZeroMask | None:
    for mask in masks:
        if mask is not None and mask.numel() == size:
            return mask
    return None
