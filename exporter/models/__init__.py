"""Model zoo for 32x32 inputs, user-model loading, checkpoints, and finding a model's classifier."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from exporter.errors import ExportError
from exporter.models.mobilenet import mobilenetv2
from exporter.models.resnet import resnet20, resnet56
from exporter.models.user import build_user_model, is_user_spec
from exporter.models.vgg import vgg16

ZOO: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet56": resnet56,
    "vgg16": vgg16,
    "mobilenetv2": mobilenetv2,
}
DEFAULT_MODEL = "vgg16"

_MAX_LISTED_PROBLEMS = 3


def build_model(name: str, num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> nn.Module:
    """A zoo model by name, or a user model from a "package.module:factory" spec."""
    _check_options(num_classes, width, in_channels)
    if is_user_spec(name):
        return build_user_model(name, num_classes, width, in_channels)
    if name not in ZOO:
        choices = ", ".join(sorted(ZOO))
        raise ExportError(f"unknown model '{name}'; choose one of: {choices}, or give package.module:factory")
    return ZOO[name](num_classes=num_classes, width=width, in_channels=in_channels)


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a raw state_dict, or our own {"model": state_dict, ...} format, into model (strictly)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"checkpoint {path} not found; give the path of a .pt file saved with torch.save")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for foreign or corrupt files
        # torch's own message runs to many lines; the CLI wants one.
        raise ExportError(
            f"checkpoint {path} is not a readable torch file of tensors ({type(error).__name__}); "
            "save model.state_dict() or {'model': model.state_dict()} with torch.save, not the whole model"
        ) from error
    state = _state_dict_in(content, path)
    problems = _mismatches(model.state_dict(), state)
    if problems:
        listed = "; ".join(problems[:_MAX_LISTED_PROBLEMS])
        more = len(problems) - _MAX_LISTED_PROBLEMS
        suffix = f"; and {more} more" if more > 0 else ""
        raise ExportError(
            f"checkpoint {path} does not fit {_model_name(model)}: {listed}{suffix}; "
            "check that the model, width, classes and input channels match the training run"
        )
    model.load_state_dict(state, strict=True)


def classifier_of(model: nn.Module) -> nn.Linear:
    """The final nn.Linear: model.fc when it is one, else the last Linear among the model's modules."""
    fc = getattr(model, "fc", None)
    if isinstance(fc, nn.Linear):
        return fc
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ExportError(
            f"model {_model_name(model)} has no nn.Linear classifier; end it with an nn.Linear, ideally named fc"
        )
    return linears[-1]


def _check_options(num_classes: int, width: float, in_channels: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ExportError(f"number of classes must be a positive integer, got {num_classes!r}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise ExportError(f"width multiplier must be a positive number, got {width!r}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ExportError(f"input channels must be a positive integer, got {in_channels!r}")


def _state_dict_in(content: object, path: Path) -> Mapping[str, object]:
    if isinstance(content, Mapping) and isinstance(content.get("model"), Mapping):
        content = content["model"]
    if not isinstance(content, Mapping) or not all(isinstance(key, str) for key in content):
        raise ExportError(
            f"checkpoint {path} holds no state_dict; save model.state_dict() or {{'model': model.state_dict()}}"
        )
    return content


def _mismatches(expected: Mapping[str, torch.Tensor], given: Mapping[str, object]) -> list[str]:
    problems = []
    for key, tensor in expected.items():
        if key not in given:
            problems.append(f"{key} is missing")
            continue
        value = given[key]
        if not isinstance(value, torch.Tensor):
            problems.append(f"{key} is a {type(value).__name__}, not a tensor")
        elif value.shape != tensor.shape:
            problems.append(
                f"{key} has shape {list(value.shape)}, the model expects {list(tensor.shape)}"
            )
    problems += [f"{key} is unexpected" for key in given if key not in expected]
    return problems


def _model_name(model: nn.Module) -> str:
    return getattr(model, "arch", type(model).__name__)
