"""DNNShifter's structured step: a sparse model becomes a smaller dense one, exactly.

A channel leaves the model when removing it cannot change any output:
- it is provably zero everywhere (see `liveness`): every producer in its coupling group
  (conv filters, BN, depthwise convs, residual adds) outputs zero on it; or
- nobody reads it: every conv or linear that consumes it has all-zero weights for it.
Torch-Pruning's DependencyGraph supplies the coupling (BN, residual adds, depthwise convs,
the classifier's inputs). A channel that is merely small, or a BN constant that is not zero,
stays: that is what keeps the removal exact, unlike removing zero filters outright.

What the analysis proves, the step then checks: the smaller model runs on probe inputs and must
answer like the sparse one. If it crashes or differs (an op the analysis does not model, say),
the step starts again from the sparse model one coupling group at a time, keeps every group whose
removal breaks exactness, and says which and why: it always returns an exact model.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch_pruning as tp

from exporter.pruning.coupling import dead_root_indices
from exporter.pruning.grouped import dead_conv_groups, remove_conv_groups
from exporter.pruning.liveness import trace, zero_node_channels


EXACT_ATOL = 1e-4      # relative to max(1, |output|): what "answers like the sparse model" means
PROBE_COUNT = 8        # random inputs the result is checked on, besides the example input
_MAX_ROUNDS = 3        # group-by-group rounds: a removal can leave other channels unread


class Untraceable(Exception):
    """Torch-pruning cannot trace the model, so no removal can be proven; the message is one line."""


@dataclass
class StructuredResult:
    model: nn.Module
    removed: dict[str, int] = field(default_factory=dict)  # root layer name -> channels removed
    seconds: float = 0.0
    kept: dict[str, str] = field(default_factory=dict)     # root layer name -> why its dead channels stay
    fallback: str | None = None  # why the one-pass removal was not used (then `model` is a rebuilt copy)

    def kept_details(self) -> dict:
        """For a variant's details: what the check made the step keep, and why (empty when it kept nothing)."""
        return {} if self.fallback is None else {"structured_kept": {"because": self.fallback, "groups": self.kept}}

    def kept_warning(self) -> str | None:
        if self.fallback is None:
            return None
        return (f"removing every dead channel at once was not exact ({self.fallback}); "
                f"kept {len(self.kept)} coupling group(s): {', '.join(self.kept)}")


def remove_dead_channels(model: nn.Module, example_input: torch.Tensor | None, keep_outputs_of: nn.Module | None = None,
                         dg: tp.DependencyGraph | None = None) -> StructuredResult:
    """Remove `model`'s dead channels and check the result answers like `model` did; use `result.model`.

    The removal works in place and `result.model is model`, unless the check fails: then `model`
    may be left half-changed and `result.model` is a copy rebuilt group by group (see `fallback`
    and `kept`). `keep_outputs_of` (the classifier) keeps its outputs. Raises `Untraceable` when
    torch-pruning cannot trace the model. `dg`, the model's traced graph when the caller has it
    already, is used and changed, and the caller checks the result (Reconvene changes the model's
    weights around the step). `seconds` is the whole step.
    """
    started = time.perf_counter()
    model.eval()
    ignored = [keep_outputs_of] if keep_outputs_of is not None else []
    if dg is not None:
        removed = _remove_in_place(ignored, dg)
        return StructuredResult(model=model, removed=removed, seconds=time.perf_counter() - started)

    names = {module: name for name, module in model.named_modules()}
    keep_name = names.get(keep_outputs_of) if keep_outputs_of is not None else None
    original = copy.deepcopy(model)
    probe = _probe_inputs(example_input)
    expected = _outputs(original, probe)
    try:
        dg = trace(model, example_input)
    except Exception as error:  # the tracer runs forward under autograd: a forward that leaves torch fails
        raise Untraceable(_one_line(error)) from None
    try:
        removed = _remove_in_place(ignored, dg)
        problem = _mismatch(model, probe, expected)
    except Exception as error:  # an op the analysis does not model can break the rebuilt layers any way
        problem = _one_line(error)
    if problem is None:
        return StructuredResult(model=model, removed=removed, seconds=time.perf_counter() - started)
    rebuilt, removed, kept = _remove_group_by_group(original, example_input, keep_name, probe, expected)
    return StructuredResult(model=rebuilt, removed=removed, seconds=time.perf_counter() - started, kept=kept,
                            fallback=problem)


def _remove_in_place(ignored: list[nn.Module], dg: tp.DependencyGraph) -> dict[str, int]:
    # Liveness masks index channels as they are before any removal, so every group is judged on
    # them first; removing one group's channels leaves the other groups' root indices as they were.
    zero = zero_node_channels(dg)
    proven = {group[0].dep.target.module: (len(group[0].idxs), dead_root_indices(dg, group, zero))
              for group in _groups(dg, ignored)}
    conv_groups = dead_conv_groups(dg, zero, ignored)
    removed: dict[str, int] = {}
    for conv, whole in conv_groups.items():
        removed[_name_of(dg, conv)] = remove_conv_groups(dg, conv, whole)

    for first_pass in (True, False, False):  # later passes catch channels whose readers were removed
        progress = False
        for group in _groups(dg, ignored):
            width, dead = proven.get(group[0].dep.target.module, (None, []))
            count = _prune_dead(dg, group, dead if first_pass and width == len(group[0].idxs)
                                else dead_root_indices(dg, group, {}))
            if count:
                name = _root_name(dg, group)
                removed[name] = removed.get(name, 0) + count
                progress = True
        if not progress and not first_pass:
            break
    return removed


def _remove_group_by_group(original: nn.Module, example_input: torch.Tensor, keep_name: str | None,
                           probe: torch.Tensor, expected: torch.Tensor) -> tuple[nn.Module, dict[str, int], dict[str, str]]:
    """Remove one coupling group at a time from a copy of `original`, checking each; keep the ones that break it."""
    current = copy.deepcopy(original)
    removed: dict[str, int] = {}
    kept: dict[str, str] = {}
    for _ in range(_MAX_ROUNDS):
        progress = False
        for name in _dead_group_roots(current, example_input, keep_name):
            if name in kept:
                continue
            trial = copy.deepcopy(current)
            try:
                count = _remove_group(trial, example_input, keep_name, name)
                problem = _mismatch(trial, probe, expected) if count else None
            except Exception as error:
                count, problem = 0, _one_line(error)
            if problem is not None:
                kept[name] = problem
            elif count:
                current, removed[name], progress = trial, removed.get(name, 0) + count, True
        if not progress:
            break
    return current, removed, kept


def _dead_group_roots(model: nn.Module, example_input: torch.Tensor, keep_name: str | None) -> list[str]:
    dg = trace(model, example_input)
    zero = zero_node_channels(dg)
    return [_root_name(dg, group) for group in _groups(dg, _kept_outputs(model, keep_name))
            if dead_root_indices(dg, group, zero)]


def _remove_group(model: nn.Module, example_input: torch.Tensor, keep_name: str | None, root_name: str) -> int:
    """Remove the dead channels of the one coupling group rooted at `root_name`; how many went."""
    dg = trace(model, example_input)
    zero = zero_node_channels(dg)
    group = next((g for g in _groups(dg, _kept_outputs(model, keep_name)) if _root_name(dg, g) == root_name), None)
    return 0 if group is None else _prune_dead(dg, group, dead_root_indices(dg, group, zero))


def _prune_dead(dg: tp.DependencyGraph, group, dead: list[int]) -> int:
    """Prune the group's channels at root indices `dead`; how many went."""
    norms = {item.dep.target.module for item in group.items if isinstance(item.dep.target.module, nn.GroupNorm)}
    if len(dead) == len(group[0].idxs):
        if norms:
            return 0  # a group norm would have to keep a whole group: rare enough to keep them all
        dead = dead[1:]  # a layer needs one channel; the kept one is dead, so outputs stay exact
    if dead:
        per_group = {norm: norm.num_channels // norm.num_groups for norm in norms}
        dg.get_pruning_group(group[0].dep.target.module, group[0].dep.handler, dead).prune()
        for norm, channels in per_group.items():  # torch-pruning shrinks a group norm's channels, not its groups
            norm.num_groups = norm.num_channels // channels
    return len(dead)


def _groups(dg: tp.DependencyGraph, ignored: list[nn.Module]):
    return dg.get_all_groups(ignored_layers=ignored, root_module_types=(nn.Conv2d, nn.Linear))


def _kept_outputs(model: nn.Module, keep_name: str | None) -> list[nn.Module]:
    return [model.get_submodule(keep_name)] if keep_name else []


def _root_name(dg: tp.DependencyGraph, group) -> str:
    return _name_of(dg, group[0].dep.target.module)


def _name_of(dg: tp.DependencyGraph, module: nn.Module) -> str:
    return dg._module2name.get(module, type(module).__name__)


def _probe_inputs(example_input: torch.Tensor) -> torch.Tensor:
    example = example_input.detach().float()
    noise = torch.randn(PROBE_COUNT, *example.shape[1:], generator=torch.Generator().manual_seed(0))
    return torch.cat([example, noise])


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _mismatch(model: nn.Module, probe: torch.Tensor, expected: torch.Tensor) -> str | None:
    """None when `model` answers like the sparse model did on the probe inputs, else what differs."""
    actual = _outputs(model, probe)
    if actual.shape != expected.shape:
        return f"outputs of shape {list(actual.shape)} instead of {list(expected.shape)}"
    diff = float((actual - expected).abs().max())
    tolerance = EXACT_ATOL * max(1.0, float(expected.abs().max()))
    return None if diff <= tolerance else f"outputs differ by {diff:.1e} (tolerance {tolerance:.1e})"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200]}"
