"""Which channels of one coupling group can go: the rule the structured step removes by.

Torch-pruning's group ties together every layer that shares a channel dimension: producers
(convs, linears, BN), ops the channel passes through (activations, adds, gates, concatenations)
and readers (the next convs and linears). A channel goes when every reader ignores it (zero
weights) or reads it as zero; a member whose channel handling the analysis does not model
keeps the whole group.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch_pruning as tp

from exporter.pruning.liveness import block_nonzero, channel_aligned, is_depthwise, op_name, plain_module


def dead_root_indices(dg: tp.DependencyGraph, group, zero: dict, whole_groups_of: nn.Conv2d | None = None) -> list[int]:
    """Root indices of the group's channels that every reader ignores (zero weights) or reads as zero.

    `zero` maps traced nodes to their provably zero channels (empty: weights alone decide). A
    channel nobody reads, or that reaches its readers as zero, changes no output when it goes,
    whatever gates, activations or residual adds it passes on the way. `whole_groups_of`, a grouped
    conv in the group, is let through: the caller removes whole groups of it (see `grouped`).
    """
    width = len(group[0].idxs)
    ignored = torch.ones(width, dtype=torch.bool)
    has_reader = False

    for item in group.items:
        node, handler = item.dep.target, item.dep.handler
        module = node.module
        if len(item.idxs) != width or sorted(item.root_idxs) != list(range(width)):
            return []  # index remapping (split, flatten of a feature map) that this analysis does not follow
        if module is whole_groups_of:
            has_reader |= dg.is_in_channel_pruning_fn(handler)  # what a removed group reads stops mattering
            continue
        if not _removable_through(node):
            return []
        if dg.is_in_channel_pruning_fn(handler) and _plain_reader(module):
            position, member = torch.tensor(item.root_idxs), torch.tensor(item.idxs)
            reads = block_nonzero(module)
            ignored[position] &= ~reads.any(dim=0)[member] | _input_zero(node, zero, reads.shape[1])[member]
            has_reader = True
        elif dg.is_in_channel_pruning_fn(handler) and not _passes_channels_through(module):
            return []
    if not has_reader:
        return []
    for item in group.items:  # a group norm loses whole groups only, so its other groups' statistics stay
        norm = item.dep.target.module
        if isinstance(norm, nn.GroupNorm):
            by_member = torch.empty(width, dtype=torch.long)
            by_member[torch.tensor(item.idxs)] = torch.tensor(item.root_idxs)
            groups = by_member.view(norm.num_groups, -1)
            ignored[groups[~ignored[groups].all(dim=1)].flatten()] = False
    return torch.nonzero(ignored).flatten().tolist()


def _removable_through(node) -> bool:
    """Whether removing a channel from this member keeps it consistent: a plain conv, linear or BN
    (a grouped conv only when depthwise), or an op that keeps channel c at position c."""
    module = node.module
    if isinstance(module, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
        return plain_module(module) and (getattr(module, "groups", 1) == 1 or is_depthwise(module))
    if isinstance(module, (tp.ops._ElementWiseOp, tp.ops._ReshapeOp, tp.ops._ConcatOp)):
        return channel_aligned(node) or _weight_transpose(node)
    return False  # norms over channels, custom modules, splits, slices: keep everything


def _weight_transpose(node) -> bool:
    """The transpose of a linear's own weight that tracing shows as an op: it reads no activation."""
    return op_name(node) == "T" and not node.inputs


def _input_zero(node, zero: dict, size: int) -> torch.Tensor:
    """A reader's input channels that are provably zero (none known: all False)."""
    for source in node.inputs:
        mask = zero.get(source)
        if mask is not None and mask.numel() == size:
            return mask
    return torch.zeros(size, dtype=torch.bool)


def _plain_reader(module: nn.Module) -> bool:
    """A linear, or a conv whose every filter reads every input channel (groups == 1)."""
    return isinstance(module, nn.Linear) or isinstance(module, nn.Conv2d) and module.groups == 1


def _passes_channels_through(module: nn.Module) -> bool:
    """Modules that read a channel only to pass it on, so they are not its final readers.

    A concatenation passes each input channel on at an offset; torch-pruning's group indexes its
    readers at that offset (`item.idxs`), which is what `dead_root_indices` reads them by.
    """
    return is_depthwise(module) or isinstance(
        module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, tp.ops._ElementWiseOp, tp.ops._ReshapeOp, tp.ops._ConcatOp))
