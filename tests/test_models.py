from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from torch import nn

from exporter.errors import ExportError
from exporter.models import DEFAULT_MODEL, ZOO, build_model, classifier_of, load_checkpoint

SMALL = 0.25


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_zoo_model_maps_images_to_class_scores(name: str) -> None:
    model = build_model(name, num_classes=7, width=SMALL).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert classifier_of(model) is model.fc
    assert model.fc.out_features == 7


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_models_take_other_input_channel_counts(name: str) -> None:
    model = build_model(name, num_classes=3, width=SMALL, in_channels=1).eval()
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 3)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_models_build_a_torch_pruning_dependency_graph(name: str) -> None:
    model = build_model(name, width=SMALL).eval()
    tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_models_export_with_torch_export(name: str) -> None:
    model = build_model(name, width=SMALL).eval()
    torch.export.export(model, (torch.randn(1, 3, 32, 32),))


def test_default_model_is_in_the_zoo() -> None:
    assert DEFAULT_MODEL in ZOO


def test_parameter_counts_at_width_1() -> None:
    # ResNet-20 with 1x1-conv projection shortcuts (option B): 2,752 more than option A's 269,722.
    resnet20 = parameter_count(build_model("resnet20"))
    assert resnet20 == 272_474
    assert 260_000 < resnet20 < 280_000
    assert parameter_count(build_model("resnet56")) == 855_770
    assert parameter_count(build_model("mobilenetv2")) == 2_236_682


def test_vgg16_matches_openlth_less_the_conv_biases() -> None:
    # OpenLTH's 14,728,266 counts conv biases, which BN makes redundant; ours has none (4,224 channels).
    conv_channels = 2 * 64 + 2 * 128 + 3 * 256 + 6 * 512
    assert parameter_count(build_model("vgg16")) == 14_728_266 - conv_channels == 14_724_042


def test_width_scales_channels() -> None:
    assert build_model("resnet20", width=0.5).fc.in_features == 32
    assert build_model("vgg16", width=0.25).fc.in_features == 128
    assert build_model("mobilenetv2", width=0.25).fc.in_features == 1280
    assert build_model("mobilenetv2", width=1.5).fc.in_features == 1920


def test_unknown_model_name_lists_the_choices() -> None:
    with pytest.raises(ExportError, match=r"unknown model 'resnet99'; choose one of: mobilenetv2, resnet20"):
        build_model("resnet99")


def test_bad_build_options_are_rejected() -> None:
    with pytest.raises(ExportError, match="number of classes"):
        build_model("resnet20", num_classes=0)
    with pytest.raises(ExportError, match="width multiplier"):
        build_model("resnet20", width=-1.0)


def test_user_factory_spec_builds_the_users_model(tmp_path, monkeypatch) -> None:
    (tmp_path / "my_models.py").write_text(
        "from torch import nn\n"
        "def tiny(num_classes, width=1.0):\n"
        "    hidden = int(8 * width)\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, hidden), nn.Linear(hidden, num_classes))\n"
        "def not_a_model(num_classes):\n"
        "    return 42\n"
        "NOT_CALLABLE = 3\n"
        "def broken(num_classes):\n"
        "    raise RuntimeError('boom\\nsecond line')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    model = build_model("my_models:tiny", num_classes=4, width=2.0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4)
    assert classifier_of(model) is model[2]

    with pytest.raises(ExportError, match=r"my_models:not_a_model returned int, not a torch.nn.Module"):
        build_model("my_models:not_a_model")
    with pytest.raises(ExportError, match=r"my_models:NOT_CALLABLE.*not a callable"):
        build_model("my_models:NOT_CALLABLE")
    with pytest.raises(ExportError, match=r"^model factory my_models:broken failed: RuntimeError: boom$"):
        build_model("my_models:broken")


def test_bad_user_specs_name_the_spec_and_the_reason() -> None:
    with pytest.raises(ExportError, match=r"cannot import nosuchpkg.mod for model nosuchpkg.mod:f"):
        build_model("nosuchpkg.mod:f")
    with pytest.raises(ExportError, match=r"exporter.models:nosuch.*no attribute 'nosuch'"):
        build_model("exporter.models:nosuch")
    with pytest.raises(ExportError, match="malformed"):
        build_model("exporter.models:")


def test_checkpoint_round_trip(tmp_path) -> None:
    trained = build_model("resnet20", width=SMALL)
    torch.nn.init.normal_(trained.fc.weight)
    torch.save({"model": trained.state_dict(), "epoch": 3}, tmp_path / "ours.pt")
    torch.save(trained.state_dict(), tmp_path / "raw.pt")

    for name in ("ours.pt", "raw.pt"):
        fresh = build_model("resnet20", width=SMALL)
        load_checkpoint(fresh, tmp_path / name)
        assert torch.equal(fresh.fc.weight, trained.fc.weight)


def test_checkpoint_of_another_width_names_the_offending_shapes(tmp_path) -> None:
    torch.save({"model": build_model("resnet20", width=0.5).state_dict()}, tmp_path / "ck.pt")
    with pytest.raises(
        ExportError,
        match=r"checkpoint .*ck.pt does not fit resnet20: conv1.weight has shape \[8, 3, 3, 3\], "
        r"the model expects \[4, 3, 3, 3\]; .*; and \d+ more",
    ):
        load_checkpoint(build_model("resnet20", width=SMALL), tmp_path / "ck.pt")


def test_checkpoint_with_missing_and_unexpected_keys(tmp_path) -> None:
    state = build_model("resnet20", width=SMALL).state_dict()
    state["extra.weight"] = state.pop("fc.bias")
    torch.save(state, tmp_path / "ck.pt")
    with pytest.raises(ExportError, match=r"fc.bias is missing; extra.weight is unexpected"):
        load_checkpoint(build_model("resnet20", width=SMALL), tmp_path / "ck.pt")


def test_missing_or_unreadable_checkpoint(tmp_path) -> None:
    model = build_model("resnet20", width=SMALL)
    with pytest.raises(ExportError, match=r"checkpoint .*absent.pt not found"):
        load_checkpoint(model, tmp_path / "absent.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(ExportError, match=r"checkpoint .*junk.pt is not a readable torch file"):
        load_checkpoint(model, tmp_path / "junk.pt")
    torch.save(model, tmp_path / "whole.pt")
    with pytest.raises(ExportError, match=r"whole.pt is not a readable torch file.*not the whole model$"):
        load_checkpoint(model, tmp_path / "whole.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ExportError, match=r"checkpoint .*list.pt holds no state_dict"):
        load_checkpoint(model, tmp_path / "list.pt")


def test_classifier_of_falls_back_to_the_last_linear_and_fails_without_one() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert classifier_of(model) is model[2]
    with pytest.raises(ExportError, match="no nn.Linear classifier"):
        classifier_of(nn.Sequential(nn.Conv2d(3, 4, 3)))
