"""The structured step on model families nobody here wrote: transformers vision models built from config.

Dead structure is planted the way IMP leaves it (bench/families.py); every result must run, answer
like the sparse model within 1e-4, and remove at least the channels it can prove dead, so "exact
because nothing was removed" fails.
"""
import copy

import pytest
import torch

from exporter.pruning.structured import remove_dead_channels

pytest.importorskip("transformers")
from bench.families import families, plant_dead_filters  # noqa: E402

EXACT = 1e-4
FAMILIES = families()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_structured_step_is_exact_and_removes_what_it_can_prove(family):
    build, at_least = FAMILIES[family]
    sparse = build()
    plant_dead_filters(sparse)
    x = torch.randn(4, 3, 64, 64)

    result = remove_dead_channels(copy.deepcopy(sparse), x[:1])

    with torch.no_grad():
        assert float((sparse(x) - result.model(x)).abs().max()) <= EXACT
    removed = sum(result.removed.values())
    assert removed >= at_least and (at_least > 0 or removed == 0)
