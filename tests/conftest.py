"""Fixtures shared by the test files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# The smallest portfolio the exporter makes: a quarter-width ResNet trained for one epoch, and one
# IMP level, giving the variants "dense", "imp-l01-sparse" (its structured step removes nothing at
# that depth) and their int8 twins "dense-int8" and "imp-l01-sparse-int8", as ONNX and TFLite.
SMALL_PORTFOLIO_ARGS = [
    "--model", "resnet20", "--width", "0.25", "--method", "dnnshifter", "--epochs", "1", "--level-epochs", "1",
    "--imp-levels", "1", "--rewind-iteration", "5", "--keep-dominated", "--quiet",
]
SMALL_PORTFOLIO_VARIANTS = ["dense", "imp-l01-sparse", "dense-int8", "imp-l01-sparse-int8"]
PREBUILT_PORTFOLIO_VAR = "EDGESHIFT_TEST_PORTFOLIO"


def build_small_portfolio(out: Path) -> None:
    from exporter.cli import main

    assert main(["portfolio", "--out", str(out), "--force", *SMALL_PORTFOLIO_ARGS]) == 0, "the exporter failed"


@pytest.fixture(scope="session")
def small_portfolio(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real, verified portfolio directory, exported once per test session (about 30 s). Read-only:
    copy it (shutil.copytree) before changing anything in it.

    EDGESHIFT_TEST_PORTFOLIO names one built beforehand (`python tests/conftest.py DIR` builds it):
    how the agent's tests run on Python 3.8, where the exporter cannot (.ci/agent_py38)."""
    from agent.portfolio import Portfolio

    out = tmp_path_factory.mktemp("small_portfolio") / "portfolio"
    prebuilt = os.environ.get(PREBUILT_PORTFOLIO_VAR)
    if prebuilt:
        shutil.copytree(prebuilt, out)  # a copy: a test that forgets to copy cannot spoil the next run
    else:
        pytest.importorskip("torch", reason=f"building a portfolio needs the exporter's dependencies "
                                            f"(or set {PREBUILT_PORTFOLIO_VAR})")
        build_small_portfolio(out)
    variants = [v.id for v in Portfolio.open(out).manifest.variants]  # fail here, not in every test
    assert variants == SMALL_PORTFOLIO_VARIANTS, f"the small portfolio changed: {variants}"
    return out


@pytest.fixture(scope="module")
def agent(small_portfolio, tmp_path_factory):
    """A started agent on the small portfolio (onnxruntime, x86 profile, its own state directory)."""
    from agent.policy import PolicySettings
    from agent.portfolio import Portfolio
    from agent.profiles import load_profile
    from agent.service import Agent

    agent = Agent(Portfolio.open(small_portfolio), load_profile("x86"), PolicySettings(latency_slo_ms=1000),
                  backend="onnxruntime", threads=1, bench_runs=3, state_dir=tmp_path_factory.mktemp("agent-state"))
    agent.start()
    yield agent
    agent.close()


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    """The tiny causal-lm portfolio of tests/lm_portfolio.py (ONNX written with onnx.helper, a word tokenizer)."""
    from lm_portfolio import build_lm_portfolio

    return build_lm_portfolio(tmp_path_factory.mktemp("lm") / "portfolio")


@pytest.fixture(scope="module")
def lm_agent(lm_dir):
    """A started agent on the tiny causal-lm portfolio, every variant resident."""
    from agent.policy import PolicySettings
    from agent.portfolio import Portfolio
    from agent.profiles import load_profile
    from agent.service import Agent

    agent = Agent(Portfolio.open(lm_dir), load_profile("x86"), PolicySettings(latency_slo_ms=1000),
                  backend="onnxruntime", threads=1, preload="all", bench_runs=3)
    agent.start()
    yield agent
    agent.close()


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    """A mosquitto of the test module's own, on a free loopback port (tests/mqtt_broker.py)."""
    from mqtt_broker import Broker, free_port, plain_config

    directory = tmp_path_factory.mktemp("mosquitto")
    port = free_port()
    with Broker(plain_config(port, directory), directory, port) as running:
        yield running


if __name__ == "__main__":  # python tests/conftest.py DIR: the small portfolio, for EDGESHIFT_TEST_PORTFOLIO
    import sys

    build_small_portfolio(Path(sys.argv[1]))
