"""edgeshift-agent check / bench / run: what an operator types, and the one-line refusals."""
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.bench import load_bench
from agent.cli import main
from agent.config import parse_config
from agent.daemon import build_agent
from agent.platform_support import unsupported_platform_reason
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


def test_the_agent_starts_on_what_bench_stored_even_when_asked_for_more_threads_than_cpus(
        small_portfolio, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("agent.profiles.usable_cpus", lambda: 1)  # a power mode that left one core online
    state = tmp_path / "state"
    assert main(["bench", str(small_portfolio), "--runs", "5", "--threads", "4", "--state-dir", str(state)]) == 0
    assert "1 threads (of 4 asked: the CPUs this process may use)" in capsys.readouterr().out
    [stored] = (state / "bench").glob("*.json")

    def measure_again(*args, **kwargs):
        raise AssertionError(f"the agent measured again instead of reading {stored}")
    monkeypatch.setattr("agent.service.bench_variants", measure_again)
    agent = build_agent(parse_config({"device": "x86", "portfolio": str(small_portfolio), "state_dir": str(state),
                                      "threads": 4, "http": {"listen": ""}}))
    agent.start()
    try:
        assert agent.threads == 1
        assert agent.bench == load_bench(stored, agent.status()["providers"])
        assert list((state / "bench").glob("*.json")) == [stored]
    finally:
        agent.close()


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


@pytest.mark.parametrize("argv", [["run", "--config", "{config}"], ["check", "{portfolio}"]])
def test_a_32_bit_arm_system_is_refused_at_start_in_one_line(small_portfolio, monkeypatch, capsys, argv):
    monkeypatch.setattr(platform, "machine", lambda: "armv7l")
    argv = [a.replace("{config}", str(REPO / "systemd" / "agent.toml")).replace("{portfolio}", str(small_portfolio))
            for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgeshift-agent: error: this is a 32-bit ARM system (armv7l)")
    assert "install a 64-bit OS" in err and "\n" not in err


@pytest.mark.parametrize("machine, pointer_bits, refused", [
    ("armv7l", 32, True),   # 32-bit Raspberry Pi OS on a 32-bit kernel
    ("armv6l", 32, True),   # Pi Zero and Pi 1
    ("aarch64", 32, True),  # 32-bit Raspberry Pi OS on a Pi 4 or 5: a 64-bit kernel under a 32-bit userland
    ("aarch64", 64, False),
    ("arm64", 64, False),   # macOS on Apple silicon
    ("x86_64", 64, False),
])
def test_only_32_bit_arm_systems_are_refused(machine, pointer_bits, refused):
    assert (unsupported_platform_reason(machine, pointer_bits) is not None) == refused


def test_no_agent_module_imports_torch():
    code = ("import importlib, pkgutil, sys, agent\n"
            "for m in pkgutil.walk_packages(agent.__path__, 'agent.'):\n"
            "    importlib.import_module(m.name)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "print(len(list(pkgutil.walk_packages(agent.__path__, 'agent.'))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= 20
