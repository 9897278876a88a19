"""Fixtures shared by the test files."""

from __future__ import annotations

from pathlib import Path

import pytest

# The smallest portfolio the exporter makes: a quarter-width ResNet trained for one epoch, and one
# IMP level, giving the variants "dense", "imp-l01-sparse" and "imp-l01-structured" as ONNX and TFLite.
SMALL_PORTFOLIO_ARGS = [
    "--width", "0.25", "--epochs", "1", "--level-epochs", "1", "--imp-levels", "1",
    "--rewind-iteration", "5", "--quiet",
]


@pytest.fixture(scope="session")
def small_portfolio(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real, verified portfolio directory, exported once per test session (about 30 s). Read-only:
    copy it (shutil.copytree) before changing anything in it."""
    pytest.importorskip("torch", reason="building a portfolio needs the exporter's dependencies")
    from agent.portfolio import Portfolio
    from exporter.cli import main

    out = tmp_path_factory.mktemp("small_portfolio") / "portfolio"
    assert main(["portfolio", "--out", str(out), *SMALL_PORTFOLIO_ARGS]) == 0, "the exporter failed"
    Portfolio.open(out)  # fail here, not in every test, if the export is not a valid portfolio
    return out


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    """A mosquitto of the test module's own, on a free loopback port (tests/mqtt_broker.py)."""
    from mqtt_broker import Broker, free_port, plain_config

    directory = tmp_path_factory.mktemp("mosquitto")
    port = free_port()
    with Broker(plain_config(port, directory), directory, port) as running:
        yield running
