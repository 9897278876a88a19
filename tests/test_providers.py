"""Execution providers: a profile's preference kept to what onnxruntime offers, TensorRT's engine
cache in the state directory, and a variant that one provider rejects served by the next.

This machine has no GPU: the installed providers are injected, and "GPU" sessions are real CPU
sessions that report the provider they were asked for.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from agent.backends.onnx import OnnxRuntimeBackend, inference_session
from agent.backends.providers import CPU, CUDA, TENSORRT, provider_chain
from agent.policy import PolicySettings
from agent.portfolio import Portfolio
from agent.profiles import load_profile
from agent.service import Agent

OPENVINO = "OpenVINOExecutionProvider"
JETSON_ONNXRUNTIME = [TENSORRT, CUDA, CPU]  # NVIDIA's onnxruntime-gpu for JetPack


@pytest.mark.parametrize("profile, installed, chain", [
    ("jetson-orin-nano", JETSON_ONNXRUNTIME, [TENSORRT, CUDA, CPU]),
    ("jetson-nano", [CUDA, CPU], [CUDA, CPU]),
    ("x86", [CUDA, CPU], [CUDA, CPU]),
    ("x86", [OPENVINO, CPU], [OPENVINO, CPU]),
    ("x86", [CPU], [CPU]),
    ("rpi5", JETSON_ONNXRUNTIME, [CPU]),
])
def test_a_profile_names_its_preference_and_the_installed_onnxruntime_decides(profile, installed, chain):
    assert provider_chain(load_profile(profile).providers, installed) == chain


def test_a_provider_this_onnxruntime_lacks_is_one_warning_naming_it_and_the_fallback(caplog):
    with caplog.at_level(logging.WARNING, logger="edgeshift.providers"):
        chain = provider_chain([TENSORRT, CUDA, CPU], installed=["AzureExecutionProvider", CPU])

    assert chain == [CPU]
    [warning] = [record for record in caplog.records if record.name == "edgeshift.providers"]
    assert TENSORRT in warning.message and CUDA in warning.message
    assert warning.message.endswith(f"variants are served by {CPU} instead")


def test_the_cpu_comes_last_even_when_a_preference_leaves_it_out():
    assert provider_chain([CUDA], installed=[CUDA, CPU]) == [CUDA, CPU]


def test_tensorrt_caches_its_engines_in_the_state_directory(small_portfolio, tmp_path):
    asked = []

    def create_session(path, options, providers, options_per_provider):
        asked.append(dict(zip(providers, options_per_provider)))
        return inference_session(path, options, [CPU], [{}])

    backend = OnnxRuntimeBackend(installed=JETSON_ONNXRUNTIME, create_session=create_session)
    backend.use_providers(load_profile("jetson-orin-nano").providers, state_dir=tmp_path / "state")
    backend.open(Portfolio.open(small_portfolio).file_path("dense", "onnx"), "dense", threads=1)

    cache = tmp_path / "state" / "tensorrt-engines"
    assert asked == [{TENSORRT: {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache)},
                      CUDA: {}, CPU: {}}]
    assert cache.is_dir()


class PretendSession:
    """A real CPU session that reports the given providers (this machine has no GPU); `fail_runs`
    makes every run raise, as a GPU that fails at run time."""

    def __init__(self, session, providers: list[str], fail_runs: bool = False):
        self._session, self._providers, self._fail_runs = session, providers, fail_runs

    def get_providers(self) -> list[str]:
        return list(self._providers)

    def run(self, *args, **kwargs):
        if self._fail_runs:
            raise RuntimeError(f"{self._providers[0]}: CUDA failure 700: an illegal memory access was encountered")
        return self._session.run(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._session, name)


def pretend_gpu(rejects: dict[str, str], how: str):
    """Sessions on any provider; the provider `rejects[variant]` cannot take that variant, `how`."""

    def create_session(path, options, providers, options_per_provider):
        rejected = rejects.get(Path(path).stem) == providers[0]
        if rejected and how == "at load":
            raise RuntimeError(f"{providers[0]}: unsupported operator")
        cpu_session = inference_session(path, options, [CPU], [{}])
        if rejected and how == "by onnxruntime's own fallback":  # older releases move to the next provider
            return PretendSession(cpu_session, providers[1:])
        return PretendSession(cpu_session, providers, fail_runs=rejected and how == "on its first inference")

    return create_session


@pytest.mark.parametrize("how", ["at load", "on its first inference", "by onnxruntime's own fallback"])
def test_a_variant_the_gpu_rejects_is_served_by_the_cpu_with_an_event(small_portfolio, how):
    backend = OnnxRuntimeBackend(installed=[CUDA, CPU], create_session=pretend_gpu({"dense": CUDA}, how))
    agent = Agent(Portfolio.open(small_portfolio), load_profile("x86"), PolicySettings(latency_slo_ms=1000),
                  backend=backend, threads=1, bench_runs=3)
    agent.start()
    try:
        providers = agent.status()["providers"]
        assert providers["dense"] == CPU
        assert providers["imp-l01-sparse"] == providers["dense-int8"] == CUDA
        [event] = [e for e in agent.events if e.type == "provider"]
        assert event.details == {"variant": "dense", "provider": CUDA, "next_provider": CPU}
        assert "dense" not in agent.unhealthy
        assert agent.infer(agent.canary).outputs[0].shape[0] == 1
    finally:
        agent.close()


def test_a_configured_provider_that_onnxruntime_lacks_is_a_warning_and_the_cpu_serves(small_portfolio, caplog):
    with caplog.at_level(logging.WARNING, logger="edgeshift.providers"):
        agent = Agent(Portfolio.open(small_portfolio), load_profile("rpi5"), PolicySettings(latency_slo_ms=1000),
                      backend="onnxruntime", threads=1, bench_runs=3, providers=["NoSuchExecutionProvider"])
    agent.start()
    try:
        assert set(agent.status()["providers"].values()) == {CPU}
        [warning] = [record for record in caplog.records if record.name == "edgeshift.providers"]
        assert "NoSuchExecutionProvider" in warning.message
    finally:
        agent.close()
