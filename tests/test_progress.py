"""Progress off a terminal: one plain line per epoch and per IMP level where a bar would print nothing;
bars on a terminal; nothing at all with --quiet."""
import re
import subprocess
import sys

import pytest
import torch

from exporter import progress
from exporter.cli import main
from exporter.data import Dataset, load_dataset
from exporter.dnnshifter.imp import ImpConfig, run_imp
from exporter.models import build_model
from exporter.train import TrainConfig, seeded

TRAIN = ["--model", "resnet20", "--width", "0.25", "--epochs", "2"]
EPOCH_LINE = re.compile(r"^train epoch (\d)/2: loss \d+\.\d{3}, train acc \d+\.\d%, \d+\.\d s$", re.MULTILINE)


def run_train(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    """`edgeshift-export train` with stdout and stderr both pipes, as under `| tee log` or in CI."""
    return subprocess.run([sys.executable, "-m", "exporter.cli", "train", "--out", str(tmp_path / "dense.pt"),
                           *TRAIN, *extra], capture_output=True, text=True, timeout=300)


def test_off_a_terminal_every_epoch_is_one_line_with_its_loss_and_accuracy(tmp_path):
    result = run_train(tmp_path)

    assert result.returncode == 0, result.stderr
    assert [int(epoch) for epoch in EPOCH_LINE.findall(result.stdout)] == [1, 2]
    assert result.stdout.startswith("device: ")  # where it trains, before it starts
    assert "it/s" not in result.stderr  # no bar written into a log


def test_quiet_prints_no_progress_at_all(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "dense.pt"), *TRAIN[:-1], "1", "--quiet"]) == 0

    captured = capsys.readouterr()
    assert captured.out.startswith("trained resnet20 on digits: test accuracy ") and captured.out.count("\n") == 1
    assert captured.err == ""


def test_on_a_terminal_a_bar_replaces_the_epoch_lines(monkeypatch, capsys):
    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    shown = progress.EpochProgress("dense", epochs=1, steps_per_epoch=2)
    for _ in range(2):
        shown.step(torch.tensor(0.5))
    shown.epoch(1, 0.5, 0.9)
    shown.close()

    captured = capsys.readouterr()
    assert captured.out == "" and "dense" in captured.err


def test_imp_logs_one_line_per_level_it_trains():
    digits = load_dataset("digits")
    data = Dataset(digits.name, digits.train_x[:256], digits.train_y[:256], digits.test_x[:64], digits.test_y[:64],
                   digits.labels, digits.preprocessing)
    lines = []

    run_imp(lambda: seeded(0, lambda: build_model("resnet20", width=0.25)), data, TrainConfig(epochs=1),
            ImpConfig(levels=2, fraction=0.5, rewind_iteration=2, level_epochs=1), keep={2}, progress=False,
            log=lines.append)

    assert [line.split(":")[0] for line in lines] == ["IMP level 0/2", "IMP level 1/2", "IMP level 2/2"]
    assert re.fullmatch(r"IMP level 2/2: density 0\.25\d, accuracy \d\.\d{4}, \d+\.\d s", lines[2])


@pytest.mark.parametrize("enabled", [True, False])
def test_lines_are_written_only_when_progress_is_wanted(monkeypatch, capsys, enabled):
    monkeypatch.setattr(progress, "on_terminal", lambda: False)
    shown = progress.EpochProgress("level 3 (density 0.512)", epochs=4, steps_per_epoch=10, enabled=enabled)
    shown.epoch(2, 0.4123, 0.881)

    out = capsys.readouterr().out
    assert out == ("" if not enabled else "level 3 (density 0.512) epoch 2/4: loss 0.412, train acc 88.1%, 0.0 s\n")
