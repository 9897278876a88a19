"""Builds a user's own model from a "package.module:factory" spec."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any, Callable

from torch import nn

from exporter.errors import ExportError


def is_user_spec(name: str) -> bool:
    return ":" in name


def build_user_model(spec: str, num_classes: int, width: float, in_channels: int) -> nn.Module:
    factory = _import_factory(spec)
    options: dict[str, Any] = {"num_classes": num_classes}
    for option, value in (("width", width), ("in_channels", in_channels)):
        if _accepts(factory, option):
            options[option] = value
    try:
        model = factory(**options)
    except Exception as error:  # the user's code may raise anything; report it as bad input
        raise ExportError(f"model factory {spec} failed: {describe(error)}") from error
    if not isinstance(model, nn.Module):
        raise ExportError(
            f"model factory {spec} returned {type(model).__name__}, not a torch.nn.Module; "
            "make it return the model"
        )
    return model


def _import_factory(spec: str) -> Callable[..., Any]:
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute or ":" in attribute:
        raise ExportError(f"model spec '{spec}' is malformed; write it as package.module:factory")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: the user's own package in the current directory
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # importing runs the user's module code, which may raise anything
        raise ExportError(
            f"cannot import {module_name} for model {spec}: {describe(error)}; "
            "check the name and that it is on PYTHONPATH"
        ) from error
    factory = getattr(module, attribute, None)
    if factory is None:
        raise ExportError(f"model {spec}: module {module_name} has no attribute '{attribute}'")
    if not callable(factory):
        raise ExportError(f"model {spec}: {attribute} is a {type(factory).__name__}, not a callable factory")
    return factory


def _accepts(factory: Callable[..., Any], option: str) -> bool:
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # some builtins and C extensions have no signature
        return False
    return any(
        parameter.name == option or parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters
    )


def describe(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
