"""The structured step on model families nobody here wrote: transformers vision models built from config.

Dead structure is planted the way IMP leaves it (a share of each conv's filters zeroed, the BN right
behind them masked too); every result must run, answer like the sparse model within 1e-4, and
remove at least the channels it can prove dead, so "exact because nothing was removed" fails.
"""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

from exporter.pruning.structured import remove_dead_channels

transformers = pytest.importorskip("transformers")
EXACT = 1e-4


class Logits(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x).logits


def plant_dead_filters(model: nn.Module, share: float = 0.3) -> None:
    generator = torch.Generator().manual_seed(0)
    modules = list(model.modules())
    with torch.no_grad():
        for index, module in enumerate(modules):
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
            if not (isinstance(module, nn.Conv2d) and module.groups == 1 and module.out_channels > 4):
                continue
            dead = torch.randperm(module.out_channels, generator=generator)[:int(share * module.out_channels)]
            module.weight[dead] = 0
            if module.bias is not None:
                module.bias[dead] = 0
            behind = modules[index + 1] if index + 1 < len(modules) else None
            if isinstance(behind, nn.BatchNorm2d) and behind.num_features == module.out_channels:
                behind.weight[dead] = 0
                behind.bias[dead] = 0


T = transformers
FAMILIES = {  # name: (model from config, channels the step must at least remove)
    "resnet": (lambda: T.ResNetForImageClassification(T.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=10)), 40),
    "mobilenetv2": (lambda: T.MobileNetV2ForImageClassification(T.MobileNetV2Config(
        depth_multiplier=0.35, num_labels=10, image_size=64)), 300),
    "efficientnet": (lambda: T.EfficientNetForImageClassification(T.EfficientNetConfig(  # squeeze-and-excitation
        width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320, num_labels=10, image_size=64)), 120),
    "regnet": (lambda: T.RegNetForImageClassification(T.RegNetConfig(  # grouped convs
        embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], groups_width=8, num_labels=10)), 25),
    "mobilevit": (lambda: T.MobileViTForImageClassification(T.MobileViTConfig(  # convs around attention
        image_size=64, hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 16, 24, 32, 40, 48, 160], num_labels=10)), 100),
    # LayerNorm over channels reads every channel: removing one changes the mean, so nothing may go.
    "convnext": (lambda: T.ConvNextForImageClassification(T.ConvNextConfig(
        hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_labels=10)), 0),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_structured_step_is_exact_and_removes_what_it_can_prove(family):
    build, at_least = FAMILIES[family]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparse = Logits(build()).eval()
    plant_dead_filters(sparse)
    x = torch.randn(4, 3, 64, 64)

    result = remove_dead_channels(copy.deepcopy(sparse), x[:1])

    with torch.no_grad():
        assert float((sparse(x) - result.model(x)).abs().max()) <= EXACT
    removed = sum(result.removed.values())
    assert removed >= at_least and (at_least > 0 or removed == 0)
