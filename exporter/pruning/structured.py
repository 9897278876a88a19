"""DNNShifter's structured step: a sparse model becomes a smaller dense one, exactly.

A channel leaves the model when removing it cannot change any output:
- it is provably zero everywhere (see `liveness`): every producer in its coupling group
  (conv filters, BN, depthwise convs, residual adds) outputs zero on it; or
- nobody reads it: every conv or linear that consumes it has all-zero weights for it.
Torch-Pruning's DependencyGraph supplies the coupling (BN, residual adds, depthwise convs,
the classifier's inputs). A channel that is merely small, or a BN constant that is not zero,
stays: that is what keeps the removal exact, unlike removing zero filters outright.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch_pruning as tp

from exporter.pruning.liveness import block_nonzero, is_depthwise, zero_output_channels


@dataclass
class StructuredResult:
    model: nn.Module
    removed: dict[str, int] = field(default_factory=dict)  # root layer name -> channels removed
    seconds: float = 0.0


def remove_dead_channels(model: nn.Module, example_input: torch.Tensor, keep_outputs_of: nn.Module | None = None,
                         dg: tp.DependencyGraph | None = None) -> StructuredResult:
    """Remove `model`'s dead channels, in place (copy it first to keep the sparse parent).

    `keep_outputs_of` (the classifier) keeps its outputs. `dg`, the model's traced graph when the
    caller has it already, is used and changed. `seconds` is the whole step: tracing the graph,
    proving which channels are dead, and rebuilding the layers.
    """
    started = time.perf_counter()
    model.eval()
    if dg is None:
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    ignored = [keep_outputs_of] if keep_outputs_of is not None else []
    zero = zero_output_channels(dg)  # indexed by channels as they are now; valid until a module's outputs shrink
    removed: dict[str, int] = {}

    for with_zero_analysis in (True, False, False):  # later passes catch channels whose readers were removed
        progress = False
        for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=(nn.Conv2d, nn.Linear)):
            dead = _dead_root_indices(dg, group, zero if with_zero_analysis else {})
            width = len(group[0].idxs)
            if len(dead) == width:
                dead = dead[1:]  # a layer needs one channel; the kept one is dead, so outputs stay exact
            if not dead:
                continue
            root = group[0].dep.target.module
            dg.get_pruning_group(root, group[0].dep.handler, dead).prune()
            name = dg._module2name.get(root, type(root).__name__)
            removed[name] = removed.get(name, 0) + len(dead)
            progress = True
        if not progress and not with_zero_analysis:
            break
    return StructuredResult(model=model, removed=removed, seconds=time.perf_counter() - started)


def _dead_root_indices(dg: tp.DependencyGraph, group, zero: dict[nn.Module, torch.Tensor]) -> list[int]:
    """Root indices of the group's channels that are provably zero or read by nobody."""
    width = len(group[0].idxs)
    produced_zero = torch.ones(width, dtype=torch.bool) if zero else torch.zeros(width, dtype=torch.bool)
    unread = torch.ones(width, dtype=torch.bool)
    has_source = has_reader = False

    for item in group.items:
        module, handler = item.dep.target.module, item.dep.handler
        if len(item.idxs) != width or sorted(item.root_idxs) != list(range(width)):
            return []  # index remapping (concat, split) that this analysis does not follow
        position = torch.tensor(item.root_idxs)
        member = torch.tensor(item.idxs)
        depthwise = is_depthwise(module)
        if dg.is_out_channel_pruning_fn(handler) and isinstance(module, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)):
            if zero:
                mask = zero.get(module)
                produced_zero[position] &= mask[member] if mask is not None else False
            has_source |= isinstance(module, (nn.Conv2d, nn.Linear)) and not depthwise
        elif dg.is_in_channel_pruning_fn(handler) and _plain_reader(module):
            unread[position] &= ~block_nonzero(module).any(dim=0)[member]
            has_reader = True
        elif dg.is_in_channel_pruning_fn(handler) and not _passes_channels_through(module):
            return []  # an unknown reader (a norm layer, a custom op): keep everything

    dead = torch.zeros(width, dtype=torch.bool)
    if has_source:
        dead |= produced_zero
    if has_reader:
        dead |= unread
    return torch.nonzero(dead).flatten().tolist()


def _plain_reader(module: nn.Module) -> bool:
    """A linear, or a conv whose every filter reads every input channel (groups == 1)."""
    return isinstance(module, nn.Linear) or isinstance(module, nn.Conv2d) and module.groups == 1


def _passes_channels_through(module: nn.Module) -> bool:
    """Modules that read a channel only to pass it on, so they are not its final readers."""
    return is_depthwise(module) or isinstance(
        module, (nn.modules.batchnorm._BatchNorm, tp.ops._ElementWiseOp, tp.ops._ReshapeOp))
