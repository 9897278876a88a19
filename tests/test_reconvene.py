"""Reconvene: scorers at exact densities, the sensitivity ranking, the shrunk model, a PaI portfolio."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from exporter.errors import ExportError
from exporter.reconvene.reconvene import ReconveneConfig, reconvene
from exporter.reconvene.scorers import SCORERS, get_scorer
from exporter.pruning.masks import prunable_weights


def small_convnet(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def calibration_batch(seed: int = 1, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=generator), torch.randint(0, 10, (n,), generator=generator)


def scored(name: str, density: float, batch=None):
    model = small_convnet()
    weights = prunable_weights(model, model[-1], include_classifier=False)
    options = {"rounds": 10, "input_shape": (3, 8, 8)} if name == "synflow" else {}
    return weights, get_scorer(name, **options).prune(model, weights, density, batch or calibration_batch())


@pytest.mark.parametrize("name", sorted(SCORERS))
@pytest.mark.parametrize("density", [0.5, 1 / 8, 1 / 64])
def test_every_scorer_keeps_exactly_the_requested_share(name, density):
    weights, result = scored(name, density)
    total = sum(w.numel() for w in weights.values())
    kept = sum(int(m.sum()) for m in result.masks.ranked.values())
    assert kept == round(density * total)
    assert set(result.masks.ranked) == set(weights)


def test_scorers_disagree_on_which_weights_matter():
    masks = {name: scored(name, 1 / 8)[1].masks.ranked["3.weight"] for name in SCORERS}
    assert not torch.equal(masks["snip"], masks["random"])
    assert not torch.equal(masks["synflow"], masks["magnitude"])


def test_synflow_uses_no_data():
    _, without_data = scored("synflow", 1 / 16, batch=None)
    garbage = (torch.full((4, 3, 8, 8), float("nan")), torch.zeros(4, dtype=torch.long))
    _, with_garbage = scored("synflow", 1 / 16, batch=garbage)
    assert not get_scorer("synflow").needs_data
    for name, mask in without_data.masks.ranked.items():
        assert torch.equal(mask, with_garbage.masks.ranked[name])


def test_iterative_synflow_keeps_deep_layers_alive_where_one_shot_magnitude_may_not():
    _, result = scored("synflow", 1 / 64)
    assert all(mask.any() for mask in result.masks.ranked.values())


def test_sensitivity_ranking_is_deterministic_for_a_seed():
    def ranking(seed):
        result = reconvene(small_convnet(seed), 1 / 8, ReconveneConfig(scorer="snip"), calibration_batch())
        return [(d.layer, d.sensitivity, d.structured) for d in result.shrunk.decisions]

    assert ranking(0) == ranking(0)
    assert ranking(0) != ranking(3)


def test_least_sensitive_layers_go_structured_and_the_model_matches_the_decisions():
    model = small_convnet()
    result = reconvene(model, 1 / 8, ReconveneConfig(scorer="snip", structured_share=2 / 3), calibration_batch())
    decisions = {d.layer: d for d in result.shrunk.decisions}
    structured = [d for d in decisions.values() if d.structured]
    assert len(structured) == 2
    assert max(d.sensitivity for d in structured) <= min(d.sensitivity for d in decisions.values() if not d.structured)

    smaller = dict(result.shrunk.model.named_modules())
    for name, decision in decisions.items():
        conv = smaller[name]
        assert (conv.out_channels, conv.in_channels) == (decision.out_channels[1], decision.in_channels[1])
        if decision.structured:
            assert decision.out_channels[1] < decision.out_channels[0]
            assert result.shrunk.masks.ranked[name + ".weight"].all(), "a structured layer is dense"
        assert decision.reinitialized == (decision.out_channels[0] != decision.out_channels[1]
                                          or decision.in_channels[0] != decision.in_channels[1])
    assert sum(p.numel() for p in result.shrunk.model.parameters()) < sum(p.numel() for p in model.parameters())
    assert [m.weight.shape for m in model if isinstance(m, nn.Conv2d)][0] == (16, 3, 3, 3), "the original is untouched"


def test_no_structured_share_leaves_the_masks_and_every_shape_alone_when_nothing_is_emptied():
    model = small_convnet()
    result = reconvene(model, 0.5, ReconveneConfig(scorer="magnitude", structured_share=0.0), calibration_batch())
    assert not any(d.structured or d.reinitialized for d in result.shrunk.decisions)
    for name, mask in result.unstructured.ranked.items():
        assert torch.equal(result.shrunk.masks.ranked[name], mask)
        assert torch.equal(result.shrunk.model.get_parameter(name), model.get_parameter(name) * mask)


def test_the_shrunk_model_trains_on_digits():
    from exporter.data import load_dataset
    from exporter.models import build_model
    from exporter.pruning.masks import apply_masks

    data = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("resnet20", data.num_classes, 0.25, data.input_shape[0])
    batch = (data.train_x[:32], data.train_y[:32])
    shrunk = reconvene(model, 1 / 8, ReconveneConfig(scorer="synflow", synflow_rounds=10), batch).shrunk
    smaller, masks = shrunk.model.train(), shrunk.masks
    optimizer = torch.optim.SGD(smaller.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(80):
        index = torch.arange(step * 32, (step + 1) * 32) % len(data.train_y)
        loss = F.cross_entropy(smaller(data.train_x[index]), data.train_y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        apply_masks(smaller, masks)
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.75 * sum(losses[:10]) / 10


@pytest.mark.parametrize("density", [0.0, -0.5, 1.5])
def test_a_density_outside_zero_to_one_is_refused(density):
    with pytest.raises(ExportError, match=r"density must be in \(0, 1\]"):
        reconvene(small_convnet(), density, ReconveneConfig(), calibration_batch())


def test_an_unknown_scorer_is_refused_by_name():
    with pytest.raises(ExportError, match="unknown scorer 'snap'; choose one of: snip, grasp, synflow"):
        reconvene(small_convnet(), 0.5, ReconveneConfig(scorer="snap"), calibration_batch())


def test_a_model_without_conv_layers_is_refused():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(192, 64), nn.ReLU(), nn.Linear(64, 10))
    with pytest.raises(ExportError, match="Sequential has no conv layers"):
        reconvene(mlp, 0.5, ReconveneConfig(), calibration_batch())


def test_a_calibration_batch_of_the_wrong_shape_is_refused():
    with pytest.raises(ExportError, match=r"calibration batch of shape \[4, 1, 8, 8\] does not fit the model"):
        reconvene(small_convnet(), 0.5, ReconveneConfig(), (torch.randn(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)))
    with pytest.raises(ExportError, match="must be images"):
        reconvene(small_convnet(), 0.5, ReconveneConfig(), (torch.randn(4, 3, 8), torch.zeros(4, dtype=torch.long)))


def test_reconvene_leaves_its_input_model_unchanged():
    model = small_convnet()
    before = copy.deepcopy(model.state_dict())
    reconvene(model, 1 / 8, ReconveneConfig(scorer="synflow", synflow_rounds=5), calibration_batch())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_tiny_pai_portfolio_validates_and_the_agent_serves_it(tmp_path, capsys):
    from agent.cli import main as agent_main
    from agent.portfolio import Portfolio
    from exporter.cli import main as export_main

    out = tmp_path / "pai"
    assert export_main(["portfolio", "--method", "reconvene", "--out", str(out), "--model", "resnet20", "--width", "0.25",
                        "--epochs", "1", "--densities", "0.25", "--synflow-rounds", "5", "--pai-unstructured",
                        "--quantize", "none", "--keep-dominated", "--quiet"]) == 0
    manifest = Portfolio.open(out).manifest
    assert [(v.id, v.method, v.parent) for v in manifest.variants] == [
        ("dense", "dense", None),
        ("pai-synflow-x4-unstructured", "pai-unstructured", None),
        ("pai-synflow-x4-structured", "pai-structured", "pai-synflow-x4-unstructured"),
    ]
    unstructured, structured = manifest.variants[1:]
    assert structured.params < unstructured.params
    assert structured.details["generation_s"]["total"] > 0
    assert any(layer["structured"] for layer in structured.details["layers"])
    assert set(structured.files) == {"onnx", "tflite"}
    capsys.readouterr()
    assert agent_main(["check", str(out), "--threads", "1"]) == 0
    assert capsys.readouterr().out.count(" ok") == 3


def test_a_bad_density_option_is_refused_before_any_work(tmp_path, capsys):
    from exporter.cli import main as export_main

    with pytest.raises(SystemExit):
        export_main(["portfolio", "--method", "pai", "--out", str(tmp_path / "p"), "--densities", "0,0.5"])
    assert "every density must be in (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_an_unknown_scorer_option_is_refused_before_any_training(tmp_path, capsys):
    from exporter.cli import main as export_main

    assert export_main(["portfolio", "--method", "pai", "--out", str(tmp_path / "p"), "--scorer", "snap"]) == 2
    assert capsys.readouterr().err.strip() == ("edgeshift-export: error: unknown scorer 'snap'; "
                                               "choose one of: snip, grasp, synflow, magnitude, random")
    assert not (tmp_path / "p").exists()
