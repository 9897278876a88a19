"""edgeshift-agent check / bench / run: what an operator types, and the one-line refusals."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cli import main
from conftest import SMALL_PORTFOLIO_VARIANTS

REPO = Path(__file__).resolve().parents[1]


def test_check_verifies_and_health_checks_every_variant(small_portfolio, capsys):
    assert main(["check", str(small_portfolio), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "checksums and paths verified" in out and out.count(" ok") == len(SMALL_PORTFOLIO_VARIANTS)


def test_check_refuses_a_corrupt_portfolio_in_one_line(small_portfolio, tmp_path, capsys):
    broken = shutil.copytree(small_portfolio, tmp_path / "broken")
    (broken / "variants" / "dense.onnx").write_bytes(b"not a model")
    assert main(["check", str(broken)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgeshift-agent: error: variants/dense.onnx") and "\n" not in err


def test_bench_prints_percentiles_and_stores_them_for_the_agent(small_portfolio, tmp_path, capsys):
    assert main(["bench", str(small_portfolio), "--runs", "5", "--threads", "1", "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "p50 ms" in out and "dense-int8" in out
    assert len(list((tmp_path / "bench").glob("*.json"))) == 1


@pytest.mark.parametrize("argv, message", [
    (["check", "/no/such/portfolio"], "not a directory"),
    (["check", "{portfolio}", "--device", "toaster"], "unknown device profile 'toaster'"),
    (["check", "{portfolio}", "--backend", "tensorrt"], "unknown backend 'tensorrt'"),
    (["run", "--config", "/no/such/agent.toml"], "no such configuration file"),
])
def test_bad_input_is_one_line_and_exit_2(small_portfolio, capsys, argv, message):
    argv = [a.replace("{portfolio}", str(small_portfolio)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_no_agent_module_imports_torch():
    code = ("import importlib, pkgutil, sys, agent\n"
            "for m in pkgutil.walk_packages(agent.__path__, 'agent.'):\n"
            "    importlib.import_module(m.name)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "print(len(list(pkgutil.walk_packages(agent.__path__, 'agent.'))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= 20
