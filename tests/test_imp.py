"""IMP with weight rewinding: global magnitude masks, enforced through training, rewound each level."""
import pytest
import torch
import torch.nn as nn

from exporter.data import load_dataset
from exporter.errors import ExportError
from exporter.models import build_model
from exporter.dnnshifter.imp import ImpConfig, imp_settings, run_imp
from exporter.pruning.masks import full_masks, global_magnitude_prune, prunable_weights
from exporter.run_dir import RunDir
from exporter.train import TrainConfig, seeded, train


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))


def test_global_magnitude_prune_drops_exactly_the_fraction_smallest_first():
    model = tiny_net()
    weights = prunable_weights(model, model[5], include_classifier=True)
    masks = full_masks(weights)

    once = global_magnitude_prune(weights, masks, 0.2)
    twice = global_magnitude_prune(weights, once, 0.2)

    total = sum(w.numel() for w in weights.values())
    assert sum(int(m.sum()) for m in once.ranked.values()) == total - round(0.2 * total)
    assert twice.density == pytest.approx(0.64, abs=2 / total)
    kept = torch.cat([w.detach().abs()[once.ranked[n]] for n, w in weights.items()])
    dropped = torch.cat([w.detach().abs()[~once.ranked[n]] for n, w in weights.items()])
    assert dropped.max() <= kept.min()


def test_classifier_is_left_out_of_ranking_unless_asked():
    model = tiny_net()
    assert list(prunable_weights(model, model[5], include_classifier=False)) == ["0.weight"]
    assert list(prunable_weights(model, model[5], include_classifier=True)) == ["0.weight", "5.weight"]


def test_bad_prune_fraction_is_refused():
    model = tiny_net()
    weights = prunable_weights(model, model[5], include_classifier=True)
    with pytest.raises(ValueError, match="fraction"):
        global_magnitude_prune(weights, full_masks(weights), 1.0)


def test_training_keeps_pruned_weights_at_zero(digits):
    model = seeded(0, lambda: build_model("resnet20", width=0.25))
    weights = prunable_weights(model, model.fc, include_classifier=False)
    masks = global_magnitude_prune(weights, full_masks(weights), 0.5)

    train(model, digits, TrainConfig(epochs=1), masks=masks, progress=False)

    for name, param in model.named_parameters():
        if name in masks.ranked:
            assert (param[~masks.ranked[name]] == 0).all()


def test_training_is_deterministic_for_a_seed(digits):
    first = seeded(3, lambda: build_model("resnet20", width=0.25))
    second = seeded(3, lambda: build_model("resnet20", width=0.25))
    config = TrainConfig(epochs=1, seed=3)

    train(first, digits, config, progress=False)
    train(second, digits, config, progress=False)

    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)


def test_imp_levels_shrink_density_and_rewind(digits, tmp_path):
    build = lambda: seeded(0, lambda: build_model("resnet20", width=0.25))
    config = ImpConfig(levels=2, fraction=0.5, rewind_iteration=5, level_epochs=1)

    run_dir = RunDir.open(tmp_path, {"imp": imp_settings({}, TrainConfig(epochs=2), config)})
    levels = run_imp(build, digits, TrainConfig(epochs=2), config, keep={0, 1, 2}, run_dir=run_dir, progress=False)

    assert [round(levels[k].density, 2) for k in (0, 1, 2)] == [1.0, 0.5, 0.25]
    assert levels[2].accuracy > 0.2  # twice chance (0.1) after one epoch at a quarter of the weights; 0.28-0.31 across CPUs
    assert sorted(p.name for p in tmp_path.glob("level_*.pt")) == ["level_00.pt", "level_01.pt", "level_02.pt"]

    again = run_imp(build, digits, TrainConfig(epochs=2), config, keep={2}, run_dir=run_dir, progress=False)
    assert again[2].accuracy == levels[2].accuracy  # reused from the run directory, not retrained


def test_asking_for_a_level_that_is_not_trained_is_a_clear_error(digits):
    build = lambda: build_model("resnet20", width=0.25)
    with pytest.raises(ExportError, match="level 7 was not trained: this run trains levels 0..3"):
        run_imp(build, digits, TrainConfig(epochs=1), ImpConfig(levels=3), keep={0, 7}, progress=False)
