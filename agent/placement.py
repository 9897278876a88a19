"""Which execution provider serves each variant: the first of the backend's providers (best first,
the CPU last) on which the variant loads and reproduces the exporter's outputs on the health-check
samples. A provider that cannot take a variant (TensorRT refusing an operator, a GPU answer out of
tolerance) passes it on to the next; a variant no provider takes is unhealthy and never serves.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from agent.backends import BackendError
from agent.portfolio import Samples, Variant
from agent.runtime import Runtime, session_problem


@dataclass(frozen=True)
class Rejection:
    variant: str
    provider: str | None            # the provider that could not take it
    problem: str
    next_provider: str | None       # the one tried next; None: none left, the variant is unhealthy


@dataclass
class Placement:
    providers: dict[str, str | None] = field(default_factory=dict)  # healthy variant -> the provider serving it
    unhealthy: dict[str, str] = field(default_factory=dict)         # variant -> why no provider serves it
    rejections: list[Rejection] = field(default_factory=list)       # every provider that passed a variant on

    def fallbacks(self) -> list[Rejection]:
        """The rejections after which another provider was tried (worth an event each)."""
        return [r for r in self.rejections if r.next_provider is not None]


def place_variants(runtime: Runtime, variants: list[Variant], samples: Samples) -> Placement:
    placement = Placement()
    chain = list(runtime.backend.providers)
    for variant in variants:
        for index, provider in enumerate(chain):
            serving, problem = _try(runtime, variant, provider, samples.inputs, samples.expected[variant.id])
            if problem is None:
                if serving != provider:  # an older onnxruntime's own fallback: say so as if we had fallen back
                    placement.rejections.append(Rejection(variant.id, provider, f"onnxruntime ran it on {serving}",
                                                          serving))
                placement.providers[variant.id] = serving
                break
            following = chain[index + 1] if index + 1 < len(chain) else None
            placement.rejections.append(Rejection(variant.id, provider, problem, following))
            if following is None:
                placement.unhealthy[variant.id] = problem
    return placement


def _try(runtime: Runtime, variant: Variant, provider: str | None, sample_inputs: list[np.ndarray],
         expected: np.ndarray) -> tuple[str | None, str | None]:
    """(the provider that actually ran it, why it must not serve there or None)."""
    try:
        session = runtime.open_session(variant.id, provider)
    except (BackendError, KeyError, OSError) as error:
        return provider, f"cannot load: {error}"
    with session:
        serving = session.provider or provider
        return serving, session_problem(session, variant, runtime.backend.file_format, sample_inputs, expected)
