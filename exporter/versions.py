"""Versions of the packages that shaped an export, recorded in every manifest."""
from __future__ import annotations

from importlib import metadata

_PACKAGES = ("edgeshift", "torch", "torch-pruning", "onnx", "onnxscript", "onnxruntime", "litert-torch")


def exporter_versions() -> dict[str, str]:
    versions = {}
    for package in _PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions
