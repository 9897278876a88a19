"""The structured step removes dead channels and never changes an output."""
import copy

import pytest
import torch
import torch.nn as nn

from exporter.models import ZOO, build_model, classifier_of
from exporter.pruning.masks import apply_masks, full_masks, prunable_weights, with_batchnorm_of_empty_filters
from exporter.pruning.structured import remove_dead_channels

EXACT = 1e-4


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> None:
    """Trained-looking BN statistics, so an emptied filter still emits a non-zero constant."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)


def plant_empty_structure(model: nn.Module, filters: float, columns: float, seed: int = 0):
    """Empty a share of every conv's filters and input columns, the way IMP's masks would, BN included."""
    g = torch.Generator().manual_seed(seed)
    weights = prunable_weights(model, classifier_of(model), include_classifier=False)
    masks = full_masks(weights)
    for name, mask in masks.ranked.items():
        out_channels, in_channels = mask.shape[:2]
        mask[torch.rand(out_channels, generator=g) < filters] = False
        if in_channels > 1:
            mask[:, torch.rand(in_channels, generator=g) < columns] = False
    masks = with_batchnorm_of_empty_filters(model, masks, torch.randn(1, 3, 32, 32))
    apply_masks(model, masks)
    return masks


def max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a.eval()(x) - b.eval()(x)).abs().max())


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(ZOO))
def test_structured_step_is_exact_on_every_zoo_model(name):
    torch.manual_seed(0)
    sparse = build_model(name, num_classes=10, width=0.25)
    randomize_batchnorm(sparse)
    plant_empty_structure(sparse, filters=0.3, columns=0.2)
    x = torch.randn(8, 3, 32, 32)

    structured = copy.deepcopy(sparse)
    result = remove_dead_channels(structured, x[:1], keep_outputs_of=classifier_of(structured))

    assert params(result.model) < 0.85 * params(sparse)
    assert max_diff(sparse, result.model, x) <= EXACT
    assert result.model(x).shape == (8, 10)
    assert sum(result.removed.values()) > 0


def test_emptied_filter_with_live_batchnorm_constant_is_kept():
    """A zero filter followed by BN still emits ReLU(beta - gamma*mean/std): removing it would change outputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    randomize_batchnorm(model)
    with torch.no_grad():
        model[0].weight[2] = 0          # emptied, but BN 1 keeps emitting its constant on channel 2
        model[1].bias[2] = 1.0
    x = torch.randn(4, 3, 32, 32)

    structured = copy.deepcopy(model)
    result = remove_dead_channels(structured, x[:1], keep_outputs_of=structured[8])

    assert result.model[0].out_channels == 8
    assert max_diff(model, result.model, x) <= EXACT
    with torch.no_grad():
        before = model.eval()(x)
        model[1].weight[2], model[1].bias[2] = 0.0, 0.0  # what removing channel 2 outright would compute
        assert float((model(x) - before).abs().max()) > 1e-3


def test_batchnorm_masked_behind_emptied_filter_makes_it_removable():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    randomize_batchnorm(model)
    masks = full_masks(prunable_weights(model, model[5], include_classifier=False))
    masks.ranked["0.weight"][[1, 5]] = False

    masks = with_batchnorm_of_empty_filters(model, masks, torch.randn(1, 3, 32, 32))
    apply_masks(model, masks)
    structured = copy.deepcopy(model)
    result = remove_dead_channels(structured, torch.randn(1, 3, 32, 32), keep_outputs_of=structured[5])

    assert masks.derived["1.weight"].tolist() == [True, False, True, True, True, False, True, True]
    assert result.model[0].out_channels == 6
    assert result.model[5].in_features == 6
    assert max_diff(model, result.model, torch.randn(4, 3, 32, 32)) <= EXACT


def test_channel_nobody_reads_is_removed():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[2].weight[:, [0, 3]] = 0  # the 1x1 conv ignores channels 0 and 3 of the first conv

    structured = copy.deepcopy(model)
    result = remove_dead_channels(structured, torch.randn(1, 3, 16, 16), keep_outputs_of=structured[5])

    assert result.model[0].out_channels == 6
    assert max_diff(model, result.model, torch.randn(4, 3, 16, 16)) <= EXACT


def test_fully_dead_layer_keeps_one_channel_and_stays_exact():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.zero_()

    structured = copy.deepcopy(model)
    result = remove_dead_channels(structured, torch.randn(1, 3, 16, 16), keep_outputs_of=structured[5])

    assert result.model[0].out_channels == 1
    assert max_diff(model, result.model, torch.randn(4, 3, 16, 16)) <= EXACT


def test_classifier_outputs_are_never_removed():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    with torch.no_grad():
        model[3].weight[2] = 0
        model[3].bias[2] = 0

    structured = copy.deepcopy(model)
    result = remove_dead_channels(structured, torch.randn(1, 3, 8, 8), keep_outputs_of=structured[3])

    assert result.model[3].out_features == 5


def test_the_step_works_in_place_and_returns_the_model():
    model = build_model("resnet20", width=0.25)
    plant_empty_structure(model, filters=0.5, columns=0.0)
    before = params(model)

    result = remove_dead_channels(model, torch.randn(1, 3, 32, 32), keep_outputs_of=classifier_of(model))

    assert result.model is model and params(model) < before


def test_grouped_conv_readers_are_never_misread():
    """A grouped conv's weight columns index channels within a group; such readers count as unknown."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    with torch.no_grad():
        model[2].weight[:, 0] = 0  # in-group column 0: channels 0 and 4 overall; a naive column test misreads it
    structured = copy.deepcopy(model)
    result = remove_dead_channels(structured, torch.randn(1, 3, 16, 16), keep_outputs_of=structured[5])
    assert max_diff(model, result.model, torch.randn(4, 3, 16, 16)) <= EXACT


class PlusOne(nn.Module):
    """relu(conv(x) + 1.0): a dead filter emits the constant 1, which the next layer reads."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = torch.relu(self.conv1(x) + 1.0)
        return self.fc(torch.relu(self.conv2(x)).mean(dim=(2, 3)))


class ScalarShift(PlusOne):
    """relu(s * conv(x) + b) with learned scalars: b is a parameter the graph does not show as a channel tensor."""

    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.tensor(0.7))
        self.b = nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        x = torch.relu(self.s * self.conv1(x) + self.b)
        return self.fc(torch.relu(self.conv2(x)).mean(dim=(2, 3)))


class ChannelMean(PlusOne):
    """A reduction over channels: removing a zero channel changes what the mean divides by."""

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        return self.fc((torch.relu(self.conv2(x)) * x.mean(dim=1, keepdim=True)).mean(dim=(2, 3)))


class ChannelShuffle(PlusOne):
    """ShuffleNet's view-transpose-reshape: channel c of conv1 is not channel c of conv2's input."""

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.fc(torch.relu(self.conv2(x)).mean(dim=(2, 3)))


class StandardizedConv(nn.Conv2d):
    """Weight standardization: the weights used are not the weights stored, so zero columns prove nothing."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


class StandardizedReader(PlusOne):
    def __init__(self):
        super().__init__()
        self.conv2 = StandardizedConv(8, 8, 3, padding=1)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean(dim=(2, 3)))


class GroupedConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.fc = nn.Linear(16, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean(dim=(2, 3)))


def empty_filters(model: nn.Module, layer: str, count: int = 3) -> nn.Module:
    with torch.no_grad():
        conv = getattr(model, layer)
        conv.weight[:count] = 0
        conv.bias[:count] = 0
    return model


UNPROVABLE = [(PlusOne, "conv1"), (ScalarShift, "conv1"), (ChannelMean, "conv1"), (ChannelShuffle, "conv1"),
              (GroupedConvNet, "conv2")]


@pytest.mark.parametrize("build, dead_layer", UNPROVABLE)
def test_channels_the_analysis_cannot_prove_dead_are_kept(build, dead_layer):
    """Issue 11's cases: a constant or scalar parameter added behind the conv, a reduction over channels, a
    channel shuffle, a grouped conv's filters. Each used to come out inexact or crashing; the analysis now
    keeps them itself, so the fallback is not needed."""
    torch.manual_seed(0)
    sparse = empty_filters(build().eval(), dead_layer)
    x = torch.randn(4, 3, 16, 16)

    result = remove_dead_channels(copy.deepcopy(sparse), x[:1], keep_outputs_of=None)

    assert dead_layer not in result.removed and result.fallback is None
    assert max_diff(sparse, result.model, x) <= EXACT


def test_zero_weight_columns_of_a_weight_transforming_conv_are_not_read_as_unread():
    torch.manual_seed(0)
    sparse = StandardizedReader().eval()
    with torch.no_grad():
        sparse.conv2.weight[:, :3] = 0  # stored zero, used non-zero after standardization
    x = torch.randn(4, 3, 16, 16)

    result = remove_dead_channels(copy.deepcopy(sparse), x[:1], keep_outputs_of=None)

    assert result.removed == {} and result.fallback is None
    assert max_diff(sparse, result.model, x) <= EXACT


def test_a_removal_the_analysis_got_wrong_is_caught_and_its_group_kept(monkeypatch):
    """The safety net behind the analysis: with the shuffle wrongly taken as channel-aligned, the one-pass
    removal crashes; the check catches it and rebuilds group by group, keeping conv1's channels."""
    import exporter.pruning.coupling as coupling
    import exporter.pruning.liveness as liveness

    for module in (liveness, coupling):
        monkeypatch.setattr(module, "channel_aligned", lambda node: True)
    torch.manual_seed(0)
    sparse = empty_filters(ChannelShuffle().eval(), "conv1")
    x = torch.randn(4, 3, 16, 16)

    result = remove_dead_channels(copy.deepcopy(sparse), x[:1], keep_outputs_of=None)

    assert result.fallback is not None  # the one-pass removal broke the model...
    assert "conv1" in result.kept and result.kept["conv1"]  # ...so that group stays, with the reason
    assert max_diff(sparse, result.model, x) <= EXACT and result.model is not sparse


class SqueezeExcite(nn.Module):
    """MobileNetV3/EfficientNet's gate: x * sigmoid(expand(relu(reduce(mean(x)))))."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.reduce = nn.Conv2d(8, 4, 1)
        self.expand = nn.Conv2d(4, 8, 1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        gate = torch.sigmoid(self.expand(torch.relu(self.reduce(x.mean(dim=(2, 3), keepdim=True)))))
        return self.fc(torch.relu(self.conv2(x * gate)).mean(dim=(2, 3)))


def test_a_dead_channel_times_its_gate_goes_with_the_gate_weights():
    torch.manual_seed(0)
    sparse = empty_filters(SqueezeExcite().eval(), "conv1")
    x = torch.randn(4, 3, 16, 16)

    result = remove_dead_channels(copy.deepcopy(sparse), x[:1], keep_outputs_of=sparse.fc)

    model = result.model
    assert sum(result.removed.values()) == 3 and result.fallback is None
    assert (model.conv1.out_channels, model.reduce.in_channels, model.expand.out_channels,
            model.conv2.in_channels) == (5, 5, 5, 5)
    assert max_diff(sparse, model, x) <= EXACT


class GroupedBottleneck(nn.Module):
    """RegNet's block: 1x1, grouped 3x3 (4 groups of 4 channels), 1x1."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 1)
        self.bn1 = nn.BatchNorm2d(16)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = torch.relu(self.bn2(self.grouped(torch.relu(self.bn1(self.conv1(x))))))
        return self.fc(torch.relu(self.conv3(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize("emptied, groups_left", [(range(4, 8), 3), (range(4, 6), 4)])
def test_a_grouped_conv_loses_whole_dead_groups_only(emptied, groups_left):
    """IMP empties the grouped conv's filters (and masks the BN behind them); a whole emptied group goes,
    with the channels conv1 computes only for it; a half-emptied group stays."""
    torch.manual_seed(0)
    sparse = GroupedBottleneck().eval()
    randomize_batchnorm(sparse)
    with torch.no_grad():
        sparse.grouped.weight[list(emptied)] = 0
        sparse.bn2.weight[list(emptied)] = 0
        sparse.bn2.bias[list(emptied)] = 0
    x = torch.randn(4, 3, 16, 16)

    result = remove_dead_channels(copy.deepcopy(sparse), x[:1], keep_outputs_of=sparse.fc)

    model, width = result.model, 4 * groups_left
    assert result.fallback is None and sum(result.removed.values()) == 16 - width
    assert (model.grouped.groups, model.grouped.in_channels, model.grouped.out_channels) == (groups_left, width, width)
    assert (model.conv1.out_channels, model.bn2.num_features, model.conv3.in_channels) == (width, width, width)
    assert max_diff(sparse, model, x) <= EXACT


class GroupNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = nn.GroupNorm(4, 16)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.norm(self.conv1(x))))).mean(dim=(2, 3)))


def test_group_norm_loses_whole_dead_groups_only():
    """Channels 0-3 (group 0) are dead with zero beta; 4-5 are dead but share group 1 with live ones."""
    torch.manual_seed(0)
    sparse = empty_filters(GroupNormNet().eval(), "conv1", count=6)
    with torch.no_grad():
        sparse.norm.bias[:6] = 0
    x = torch.randn(4, 3, 16, 16)

    result = remove_dead_channels(copy.deepcopy(sparse), x[:1], keep_outputs_of=sparse.fc)

    norm = result.model.norm
    assert sum(result.removed.values()) == 4 and result.fallback is None
    assert (norm.num_groups, norm.num_channels, result.model.conv2.in_channels) == (3, 12, 12)
    assert max_diff(sparse, result.model, x) <= EXACT


class DenseBlock(nn.Module):
    """DenseNet's pattern: every layer reads the concatenation of all earlier outputs."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.conv3 = nn.Conv2d(16, 8, 3, padding=1, bias=False)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        a = torch.relu(self.conv1(x))
        b = torch.relu(self.conv2(a))
        return self.fc(torch.relu(self.conv3(torch.cat([a, b], dim=1))).mean(dim=(2, 3)))


@pytest.mark.parametrize("dead_layer, removed", [("conv2", {"conv2": 3}), ("conv1", {"conv1": 3})])
def test_dead_channels_are_removed_through_a_concatenation(dead_layer, removed):
    torch.manual_seed(0)
    sparse = DenseBlock().eval()
    with torch.no_grad():
        getattr(sparse, dead_layer).weight[:3] = 0
    x = torch.randn(4, 3, 16, 16)

    result = remove_dead_channels(copy.deepcopy(sparse), x[:1], keep_outputs_of=None)

    assert result.removed == removed and result.fallback is None
    assert result.model.conv3.in_channels == 13  # the concatenation's reader lost the same 3 channels
    assert max_diff(sparse, result.model, x) <= EXACT
