"""DNNShifter: IMP with rewinding gives sparse levels; the exact structured step makes each one smaller.

A level whose structured step removes nothing stays one variant (the sparse one), which records
that the step found nothing to remove: a second copy would be the same model under another name.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from exporter.dnnshifter.imp import ImpConfig, run_imp
from exporter.errors import ExportError
from exporter.methods import Context
from exporter.models import classifier_of
from exporter.pruning.structured import EXACT_ATOL, Untraceable, remove_dead_channels
from exporter.run_dir import RunDir
from exporter.train import predict
from exporter.writer import BuiltVariant, describe

@dataclass
class DnnShifter:
    imp: ImpConfig = field(default_factory=ImpConfig)
    levels: list[int] | None = None   # levels kept as variants; default: every third, and the last
    run_dir: RunDir | None = None   # opened with imp_settings
    name: str = "dnnshifter"

    def kept_levels(self) -> list[int]:
        if self.levels is not None:
            return sorted(set(self.levels) - {0})
        return sorted((set(range(0, self.imp.levels + 1, 3)) | {self.imp.levels}) - {0})

    def variants(self, context: Context) -> Iterator[BuiltVariant]:
        started = time.perf_counter()
        pretrained = {"model": context.dense.model.state_dict(), "rewind": context.rewind_state}
        levels = run_imp(context.build, context.data, context.train, self.imp, set(self.kept_levels()), self.run_dir,
                         pretrained=pretrained, progress=context.progress, log=context.log)
        context.log(f"DNNShifter: IMP kept {len(levels)} levels in {time.perf_counter() - started:.1f} s")
        for level in sorted(levels):
            yield from self._level_variants(context, level, levels[level])

    def _level_variants(self, context: Context, level: int, trained) -> Iterator[BuiltVariant]:
        data = context.data
        example = data.test_x[:1]
        sparse = context.build()
        sparse.load_state_dict(trained.state)
        sparse.eval()
        metrics = {"accuracy": trained.accuracy, "dataset": data.name, "n": len(data.test_y)}
        sparse_id = f"imp-l{level:02d}-sparse"
        structured = copy.deepcopy(sparse)  # the step works in place; the sparse parent is a variant too
        try:
            result = remove_dead_channels(structured, example, keep_outputs_of=classifier_of(structured))
        except Untraceable as error:  # ship the sparse level alone
            reason = str(error)
            context.log(f"warning: level {level}: the structured step cannot trace this model, so the level ships as "
                        f"its sparse variant only: {reason}")
            yield BuiltVariant(describe(sparse, sparse_id, "imp-sparse", "dense", trained.density, example, metrics,
                                        {"imp_level": level, "structured_step": f"skipped: {reason}"}), sparse)
            return
        step = {"imp_level": level, "structured_ms": round(result.seconds * 1000, 1), **result.kept_details()}
        if result.kept_warning():
            context.log(f"warning: level {level}: {result.kept_warning()}")
        if not result.removed:
            context.log(f"level {level}: density {trained.density:.3f}, accuracy {trained.accuracy:.3f}; "
                        f"the structured step found no channel to remove, so the level is one variant")
            yield BuiltVariant(describe(sparse, sparse_id, "imp-sparse", "dense", trained.density, example, metrics,
                                        {**step, "structured_step": "removed nothing"}), sparse)
            return
        yield BuiltVariant(describe(sparse, sparse_id, "imp-sparse", "dense", trained.density, example, metrics,
                                    {"imp_level": level}), sparse)
        probe = torch.randn(64, *data.input_shape, generator=torch.Generator().manual_seed(1))
        diff = max(_max_diff(sparse, result.model, probe), _max_diff(sparse, result.model, data.test_x))
        if diff > EXACT_ATOL:
            raise ExportError(f"structured step of level {level} changed the outputs by {diff:.2e} "
                              f"(limit {EXACT_ATOL}); this is a bug, please report it with the model name")
        context.log(f"level {level}: density {trained.density:.3f}, accuracy {trained.accuracy:.3f}, "
                    f"structured step {result.seconds * 1000:.0f} ms removed {sum(result.removed.values())} channels, "
                    f"exact to {diff:.1e}")
        details = {**step, "max_abs_diff_vs_parent": diff, "channels_removed": result.removed}
        yield BuiltVariant(describe(result.model, f"imp-l{level:02d}-structured", "imp-structured", sparse_id,
                                    trained.density, example, metrics, details), result.model)


def _max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    return float((predict(a, x) - predict(b, x)).abs().max())
