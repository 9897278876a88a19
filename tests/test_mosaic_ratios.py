"""Mosaic's ratio rules: more outliers, less pruning; each ratio within target ± lam; the weighted target met exactly."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.errors import ExportError
from exporter.mosaic.load import PROJECTIONS
from exporter.mosaic.ratios import (
    OutlierShares,
    allocate,
    balanced_ratios,
    layer_and_type_spread,
    outlier_share,
    wanda_scores,
)

# Projection sizes of a small GQA decoder layer: k/v a third of q/o, the MLP 2.7x wider.
LAYER_SIZES = {"q_proj": 576 * 576, "k_proj": 576 * 192, "v_proj": 576 * 192, "o_proj": 576 * 576,
               "gate_proj": 576 * 1536, "up_proj": 576 * 1536, "down_proj": 1536 * 576}


def weighted_mean(ratios: list[dict[str, float]], sizes: list[dict[str, int]]) -> float:
    total = sum(sum(layer.values()) for layer in sizes)
    return sum(ratios[i][name] * sizes[i][name] for i in range(len(sizes)) for name in sizes[i]) / total


def shares_of(by_projection: list[dict[str, float]]) -> OutlierShares:
    return OutlierShares(by_layer=[sum(layer.values()) / len(layer) for layer in by_projection], by_projection=by_projection)


@settings(max_examples=200, deadline=None)
@given(
    data=st.lists(st.lists(st.floats(0, 0.2), min_size=7, max_size=7), min_size=1, max_size=6),
    target=st.floats(0, 0.95),
    lam=st.floats(0, 0.2),
    granularity=st.sampled_from(["projection", "layer", "layer+type"]),
)
def test_ratios_stay_within_lam_hit_the_weighted_target_and_fall_as_outliers_rise(data, target, lam, granularity):
    by_projection = [dict(zip(PROJECTIONS, layer)) for layer in data]
    shares = shares_of(by_projection)
    sizes = [dict(LAYER_SIZES) for _ in data]

    ratios = allocate(shares, sizes, target, lam, granularity)

    for layer in ratios:
        for ratio in layer.values():
            assert max(0.0, target - lam) - 1e-12 <= ratio <= min(1.0, target + lam) + 1e-12
    assert weighted_mean(ratios, sizes) == pytest.approx(target, abs=1e-6)
    if granularity == "layer+type":
        # Within a layer, types order by their mean share over the layers; within a type, layers by the layer share.
        type_mean = {n: sum(layer[n] for layer in by_projection) / len(data) for n in PROJECTIONS}
        orderings = [[(type_mean[n], ratios[i][n]) for n in PROJECTIONS] for i in range(len(data))]
        orderings += [[(shares.by_layer[i], ratios[i][n]) for i in range(len(data))] for n in PROJECTIONS]
    else:
        orderings = [[(by_projection[i][n] if granularity == "projection" else shares.by_layer[i], ratios[i][n])
                      for i in range(len(data)) for n in PROJECTIONS]]
    for flat in orderings:
        for share_a, ratio_a in flat:
            for share_b, ratio_b in flat:
                if share_a > share_b:
                    assert ratio_a <= ratio_b + 1e-12


def test_layer_and_type_adds_the_types_offset_to_the_layers_owl_spread():
    # Two layers; v_proj has the most outliers in both, down_proj the fewest; layer 1 has more outliers overall.
    by_projection = [dict.fromkeys(PROJECTIONS, 0.02), dict.fromkeys(PROJECTIONS, 0.02)]
    for layer in by_projection:
        layer["v_proj"], layer["down_proj"] = 0.04, 0.0
    shares = OutlierShares(by_layer=[0.01, 0.03], by_projection=by_projection)
    sizes = [dict.fromkeys(PROJECTIONS, 1000), dict.fromkeys(PROJECTIONS, 1000)]

    ratios = allocate(shares, sizes, target=0.5, lam=0.1, granularity="layer+type")

    # Spreads: layer -0.1 / +0.1; type v_proj +0.1, down_proj -0.1, the rest 0. Equal sizes and a
    # symmetric spread need no offset; the sums of +-0.2 clip at target -+ lam.
    assert ratios[0]["q_proj"] == pytest.approx(0.6) and ratios[1]["q_proj"] == pytest.approx(0.4)
    assert ratios[0]["v_proj"] == pytest.approx(0.5) and ratios[1]["v_proj"] == pytest.approx(0.4)
    assert ratios[0]["down_proj"] == pytest.approx(0.6) and ratios[1]["down_proj"] == pytest.approx(0.5)
    assert weighted_mean(ratios, sizes) == pytest.approx(0.5, abs=1e-9)
    # Unlike "projection", a type's offset is the same in every layer: its own share in one layer does not matter.
    by_projection[0]["k_proj"] = 0.03
    spread = layer_and_type_spread(OutlierShares([0.01, 0.03], by_projection), lam=0.1)
    assert spread[0]["k_proj"] - spread[0]["q_proj"] == pytest.approx(spread[1]["k_proj"] - spread[1]["q_proj"])
    assert spread[0]["k_proj"] > spread[0]["q_proj"]


def test_the_projection_with_most_outliers_is_pruned_least_and_large_projections_pull_the_offset():
    by_projection = [dict.fromkeys(PROJECTIONS, 0.01), dict.fromkeys(PROJECTIONS, 0.01)]
    by_projection[1]["v_proj"] = 0.05
    by_projection[0]["down_proj"] = 0.0
    sizes = [dict(LAYER_SIZES), dict(LAYER_SIZES)]

    ratios = allocate(shares_of(by_projection), sizes, target=0.5, lam=0.08, granularity="projection")

    assert ratios[1]["v_proj"] == pytest.approx(0.42)  # at the floor, target - lam
    assert min(r for layer in ratios for r in layer.values()) == ratios[1]["v_proj"]
    assert max(r for layer in ratios for r in layer.values()) == ratios[0]["down_proj"]
    assert weighted_mean(ratios, sizes) == pytest.approx(0.5, abs=1e-6)
    # A plain mean of ratios would miss: the small v_proj's relief must be paid by the big projections.
    plain_mean = sum(r for layer in ratios for r in layer.values()) / 14
    assert plain_mean != pytest.approx(0.5, abs=1e-3)


def test_global_gives_every_projection_the_target():
    by_projection = [{name: 0.01 * k for k, name in enumerate(PROJECTIONS)}]
    ratios = allocate(shares_of(by_projection), [dict(LAYER_SIZES)], target=0.6, lam=0.08, granularity="global")
    assert ratios == [dict.fromkeys(PROJECTIONS, 0.6)]


def test_layer_granularity_gives_one_ratio_per_layer_from_the_layer_share():
    by_projection = [{name: 0.01 * k for k, name in enumerate(PROJECTIONS)} for _ in range(3)]
    shares = OutlierShares(by_layer=[0.02, 0.06, 0.04], by_projection=by_projection)
    sizes = [dict(LAYER_SIZES) for _ in range(3)]

    ratios = allocate(shares, sizes, target=0.5, lam=0.1, granularity="layer")

    per_layer = [set(layer.values()) for layer in ratios]
    assert all(len(values) == 1 for values in per_layer)
    first, second, third = (values.pop() for values in per_layer)
    assert second < third < first
    assert (first, second) == (pytest.approx(0.6), pytest.approx(0.4))


def test_constant_shares_give_every_projection_the_target():
    assert balanced_ratios([0.03, 0.03, 0.03], [10, 200, 3000], target=0.7, lam=0.08) == [0.7, 0.7, 0.7]


def test_ratios_never_go_below_zero_for_a_small_target():
    ratios = balanced_ratios([0.0, 0.1, 0.2], [100, 100, 100], target=0.03, lam=0.08)
    assert min(ratios) == 0.0
    assert sum(ratios) / 3 == pytest.approx(0.03, abs=1e-9)


def test_wanda_scores_multiply_each_weight_by_its_input_column_norm():
    weight = torch.tensor([[1.0, -2.0], [-3.0, 0.5]])
    scores = wanda_scores(weight, torch.tensor([4.0, 9.0]))
    assert torch.equal(scores, torch.tensor([[2.0, 6.0], [6.0, 1.5]]))


def test_outlier_share_counts_scores_above_m_times_the_mean_over_all_tensors_together():
    assert outlier_share(torch.tensor([1.0, 1.0, 1.0, 1.0, 100.0]), m=2) == 0.2
    # Together the mean is 12.25, so only the 100 is above 2x; alone, [1, 1, 1] has none.
    assert outlier_share([torch.tensor([1.0, 1.0, 1.0]), torch.tensor([[1.0, 100.0], [1.0, 1.0]])], m=2) == pytest.approx(1 / 7)


@pytest.mark.parametrize("target", [1.0, -0.1, float("nan")])
def test_a_sparsity_outside_zero_to_one_is_refused(target):
    with pytest.raises(ExportError, match=r"sparsity must be in \[0, 1\), got"):
        allocate(shares_of([dict.fromkeys(PROJECTIONS, 0.0)]), [dict(LAYER_SIZES)], target, 0.08, "projection")


def test_bad_lam_m_and_granularity_are_refused():
    shares, sizes = shares_of([dict.fromkeys(PROJECTIONS, 0.0)]), [dict(LAYER_SIZES)]
    with pytest.raises(ExportError, match="lam must be >= 0, got -0.1"):
        allocate(shares, sizes, 0.5, -0.1, "projection")
    with pytest.raises(ExportError, match="unknown granularity 'row': choose one of global, layer, projection, layer\\+type"):
        allocate(shares, sizes, 0.5, 0.08, "row")
    with pytest.raises(ExportError, match="m must be > 0, got 0"):
        outlier_share(torch.ones(3), m=0)
