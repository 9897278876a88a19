"""A run directory makes a killed export resume where it stopped, with the result of an unbroken run."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from exporter.cli import main
from exporter.errors import ExportError
from exporter.run_dir import RunDir

# A short IMP run (dense and two levels of two epochs) in its own process, so a test can kill it.
IMP_RUN = textwrap.dedent('''
    import sys
    from pathlib import Path
    from exporter.data import load_dataset
    from exporter.dnnshifter.imp import ImpConfig, imp_settings, run_imp
    from exporter.models import build_model
    from exporter.run_dir import RunDir
    from exporter.train import TrainConfig, seeded

    train, imp = TrainConfig(epochs=2), ImpConfig(levels=2, fraction=0.5, rewind_iteration=5, level_epochs=2)
    run_dir = RunDir.open(Path(sys.argv[1]), {"imp": imp_settings({}, train, imp)})
    build = lambda: seeded(0, lambda: build_model("resnet20", width=0.25))
    run_imp(build, load_dataset("digits"), train, imp, keep={0, 1, 2}, run_dir=run_dir, log=print)
''')


def start_imp(run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen([sys.executable, "-c", IMP_RUN, str(run_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def test_a_killed_imp_run_resumes_mid_level_and_ends_with_the_same_checkpoints(tmp_path):
    unbroken, killed = tmp_path / "unbroken", tmp_path / "killed"
    reference = start_imp(unbroken)
    victim = start_imp(killed)
    deadline = time.monotonic() + 300
    while not (killed / "level_01-training.pt").exists():  # level 1 is half trained
        assert victim.poll() is None and time.monotonic() < deadline, victim.stdout.read()
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (killed / "level_01.pt").exists()

    resumed = start_imp(killed)
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0 and reference.wait(timeout=300) == 0, output
    assert "level 1 (density 0.500): resuming after epoch 1/2" in output

    for level in ("level_00", "level_01", "level_02"):
        expected = torch.load(unbroken / f"{level}.pt", weights_only=True)
        actual = torch.load(killed / f"{level}.pt", weights_only=True)
        assert actual["accuracy"] == expected["accuracy"], level
        for name, tensor in expected["model"].items():
            assert torch.equal(actual["model"][name], tensor), f"{level} {name}"
    assert sorted(p.name for p in killed.glob("*.pt")) == ["level_00.pt", "level_01.pt", "level_02.pt"]


def test_a_run_directory_from_other_settings_is_refused_and_left_as_it_was(tmp_path):
    RunDir.open(tmp_path, {"dense": {"train": {"epochs": 4}}})
    recorded = (tmp_path / "run.json").read_text()

    with pytest.raises(ExportError, match=r"other dense settings \(train: \{'epochs': 4\} there, \{'epochs': 2\} now\)"):
        RunDir.open(tmp_path, {"dense": {"train": {"epochs": 2}}})
    assert (tmp_path / "run.json").read_text() == recorded

    RunDir.open(tmp_path, {"dense": {"train": {"epochs": 4}}, "imp": {"fraction": 0.2}})  # a new part joins
    assert set(json.loads((tmp_path / "run.json").read_text())) == {"dense", "imp"}


def test_the_cli_refuses_another_runs_directory_in_one_line_and_writes_nothing(tmp_path, capsys):
    run_dir, out = tmp_path / "run", tmp_path / "portfolio"
    args = ["portfolio", "--model", "resnet20", "--width", "0.25", "--method", "dnnshifter", "--run-dir", str(run_dir),
            "--out", str(out), "--quiet"]
    RunDir.open(run_dir, {"dense": {"model": "vgg16"}})

    assert main([*args, "--epochs", "1"]) == 2

    err = capsys.readouterr().err.strip()
    assert "holds a run with other dense settings (model: 'vgg16' there, 'resnet20' now)" in err and "\n" not in err
    assert not out.exists() and sorted(p.name for p in run_dir.iterdir()) == ["run.json"]


def test_reconvene_variants_are_kept_and_reused_by_the_next_run(tmp_path):
    from exporter.data import load_dataset
    from exporter.methods import Context
    from exporter.models import build_model
    from exporter.reconvene.method import Reconvene, reconvene_settings
    from exporter.reconvene.reconvene import ReconveneConfig
    from exporter.train import TrainConfig, seeded

    train, config = TrainConfig(epochs=1), ReconveneConfig()
    data = load_dataset("digits")
    build = lambda: seeded(0, lambda: build_model("resnet20", width=0.25))

    def run() -> tuple[dict[str, float], list[str]]:
        lines: list[str] = []
        run_dir = RunDir.open(tmp_path, {"reconvene": reconvene_settings({}, train, config, 64)})
        context = Context(data, build, None, None, train, False, lines.append)
        method = Reconvene(config, (1 / 16,), 64, with_unstructured=False, run_dir=run_dir)
        return {v.variant.id: v.variant.metrics["accuracy"] for v in method.variants(context)}, lines

    first, _ = run()
    again, lines = run()

    assert again == first and list(first) == ["pai-synflow-x16-structured"]
    assert any("reused from" in line for line in lines)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["pai-synflow-x16-structured.pt"]
