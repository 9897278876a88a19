"""Whole groups of a grouped convolution: the one removal a grouped conv allows.

Group k of a conv with `groups` g reads input channels [k*ipg, (k+1)*ipg) and writes output
channels [k*opg, (k+1)*opg). Dropping single channels breaks `groups`; dropping a whole group
leaves a valid conv with g - 1 groups. That is exact when every reader of the group's outputs
ignores them or reads them as zero (then what the group reads stops mattering), and every other
reader of its inputs ignores those too.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch_pruning as tp

from exporter.pruning.coupling import dead_root_indices
from exporter.pruning.liveness import is_depthwise, plain_module


def dead_conv_groups(dg: tp.DependencyGraph, zero: dict, ignored: list[nn.Module]) -> dict[nn.Conv2d, list[int]]:
    """For every grouped conv, the groups that can go (judged before anything is removed)."""
    found = {}
    for conv in list(dg.module2node):
        if not (isinstance(conv, nn.Conv2d) and conv.groups > 1 and not is_depthwise(conv)) or conv in ignored \
                or not plain_module(conv):
            continue
        outputs, inputs = _groups_of(dg, conv)
        if any(item.dep.target.type == tp.ops.OPTYPE.PARAMETER for item in (*outputs.items, *inputs.items)):
            continue  # a bare parameter in the group would need re-attaching, which only Group.prune does
        if any(item.dep.target.module is conv and dg.is_out_channel_pruning_fn(item.dep.handler) for item in inputs):
            continue  # its inputs and outputs are one channel dimension (a residual around it)
        dead_out = set(dead_root_indices(dg, outputs, zero, whole_groups_of=conv))
        unread_in = set(dead_root_indices(dg, inputs, zero, whole_groups_of=conv))
        out_per, in_per = conv.out_channels // conv.groups, conv.in_channels // conv.groups
        whole = [k for k in range(conv.groups)
                 if set(range(k * out_per, (k + 1) * out_per)) <= dead_out
                 and set(range(k * in_per, (k + 1) * in_per)) <= unread_in]
        if len(whole) == conv.groups:
            whole = whole[1:]  # a conv needs one group; the kept one is dead, so outputs stay exact
        if whole:
            found[conv] = whole
    return found


def remove_conv_groups(dg: tp.DependencyGraph, conv: nn.Conv2d, whole: list[int]) -> int:
    """Remove groups `whole` of `conv` and the channels its neighbours hold for them; output channels removed."""
    out_per, in_per = conv.out_channels // conv.groups, conv.in_channels // conv.groups
    out_idxs = [c for k in whole for c in range(k * out_per, (k + 1) * out_per)]
    in_idxs = [c for k in whole for c in range(k * in_per, (k + 1) * in_per)]
    pruner = dg.get_pruner_of_module(conv)
    for handler, idxs in ((pruner.prune_out_channels, out_idxs), (pruner.prune_in_channels, in_idxs)):
        for dep, member_idxs in dg.get_pruning_group(conv, handler, idxs):
            if dep.target.module is not conv:  # torch-pruning would cut the conv's weight as if ungrouped
                dep(member_idxs)
    keep = torch.tensor([c for c in range(conv.out_channels) if c not in set(out_idxs)])
    conv.weight = nn.Parameter(conv.weight.detach()[keep].clone())
    if conv.bias is not None:
        conv.bias = nn.Parameter(conv.bias.detach()[keep].clone())
    conv.out_channels -= len(out_idxs)
    conv.in_channels -= len(in_idxs)
    conv.groups -= len(whole)
    return len(out_idxs)


def _groups_of(dg: tp.DependencyGraph, conv: nn.Conv2d):
    pruner = dg.get_pruner_of_module(conv)
    return (dg.get_pruning_group(conv, pruner.prune_out_channels, list(range(conv.out_channels))),
            dg.get_pruning_group(conv, pruner.prune_in_channels, list(range(conv.in_channels))))
