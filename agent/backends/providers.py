"""onnxruntime's execution providers: which to try for a variant, best first, and their options.

A device profile (or the agent's configuration) names a preference, e.g. TensorRT, CUDA, CPU on a
Jetson. What this onnxruntime build offers decides which of them are tried; the CPU always comes
last, as the provider that takes any variant. The list of installed providers is a parameter, so
tests can pretend to have a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("edgeshift.providers")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
ENGINE_CACHE_DIR = "tensorrt-engines"  # under the agent's state directory
_SUFFIX = "ExecutionProvider"


def installed_providers() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def provider_chain(preferred: Sequence[str], installed: Sequence[str]) -> list[str]:
    """The preferred providers that are installed, in the preferred order, then the CPU if not named.

    Logs one warning naming the preferred providers this onnxruntime lacks and what serves instead.
    """
    chain = [name for name in dict.fromkeys(preferred) if name in installed or name == CPU]
    if CPU not in chain:
        chain.append(CPU)
    missing = [name for name in dict.fromkeys(preferred) if name not in installed and name != CPU]
    if missing:
        log.warning("this onnxruntime lacks %s (it offers %s); variants are served by %s instead",
                    ", ".join(missing), ", ".join(installed) or "none", ", ".join(chain))
    return chain


def provider_options(provider: str, engine_cache_dir: Path | None) -> dict[str, object]:
    """Options for one provider. TensorRT builds an engine per model, which takes minutes on a Jetson:
    cached in the state directory, a restart loads it instead."""
    if provider == TENSORRT and engine_cache_dir is not None:
        return {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(engine_cache_dir)}
    return {}


def short_name(provider: str) -> str:
    """"TensorrtExecutionProvider" -> "Tensorrt", for reasons and file names."""
    return provider[:-len(_SUFFIX)] if provider.endswith(_SUFFIX) and provider != _SUFFIX else provider
