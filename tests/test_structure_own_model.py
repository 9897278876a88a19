"""`edgeshift-export structure`: a sparse model pruned by someone else's tool, and its exact smaller twin."""
import sys
import textwrap

import pytest
import torch
import torch.nn.utils.prune as prune

from agent.portfolio import Portfolio
from exporter.cli import main

FACTORY = textwrap.dedent('''
    import torch
    import torch.nn as nn

    def small_cnn(num_classes=10):
        return nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))


    class ThroughNumpy(nn.Sequential):
        """Runs for inference, but leaves torch in forward, so autograd (and the tracer) cannot follow."""

        def forward(self, x):
            return torch.from_numpy(super().forward(x).numpy())


    def numpy_cnn(num_classes=10):
        return ThroughNumpy(*small_cnn(num_classes))


    def broken(num_classes=10):
        raise ValueError("this factory needs a config file")
''')


@pytest.fixture()
def sparse_checkpoint(tmp_path, monkeypatch):
    """A user's package on the path, and a checkpoint pruned with torch.nn.utils.prune (half of conv1's filters)."""
    (tmp_path / "usermodels.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("usermodels", None)
    import usermodels

    torch.manual_seed(0)
    model = usermodels.small_cnn()
    prune.ln_structured(model[0], "weight", amount=0.5, n=1, dim=0)
    prune.remove(model[0], "weight")
    checkpoint = tmp_path / "sparse.pt"
    torch.save(model.state_dict(), checkpoint)
    return checkpoint


def test_a_users_sparse_model_gets_its_exact_smaller_twin(tmp_path, sparse_checkpoint, capsys):
    out = tmp_path / "portfolio"
    assert main(["structure", "--model", "usermodels:small_cnn", "--checkpoint", str(sparse_checkpoint),
                 "--input-shape", "3,32,32", "--num-classes", "10", "--data", "digits", "--out", str(out),
                 "--quantize", "none", "--quiet"]) == 0

    manifest = Portfolio.open(out).manifest
    sparse, structured = manifest.variants
    assert (sparse.id, sparse.method, structured.id, structured.method) == ("sparse", "sparse", "structured", "structured")
    assert structured.parent == "sparse" and structured.details["channels_removed"] == {"0": 8}
    assert structured.params < sparse.params and structured.metrics["accuracy"] == sparse.metrics["accuracy"]
    assert set(structured.files) == {"onnx", "tflite"} and manifest.evaluation is not None

    from agent.cli import main as agent_main
    capsys.readouterr()
    assert agent_main(["check", str(out), "--threads", "1"]) == 0
    assert capsys.readouterr().out.count(" ok") == 2


def test_without_data_random_inputs_check_the_twin_and_no_accuracy_is_claimed(tmp_path, sparse_checkpoint):
    out = tmp_path / "portfolio"
    assert main(["structure", "--model", "usermodels:small_cnn", "--checkpoint", str(sparse_checkpoint),
                 "--input-shape", "3,32,32", "--num-classes", "10", "--out", str(out), "--no-tflite", "--quiet"]) == 0

    manifest = Portfolio.open(out).manifest
    assert [v.id for v in manifest.variants] == ["sparse", "structured"]  # no int8 twins without data to calibrate on
    assert all("accuracy" not in v.metrics for v in manifest.variants) and manifest.evaluation is None


@pytest.mark.parametrize("extra, message", [
    (["--input-shape", "1,8,8"], "rejects inputs of shape [1, 1, 8, 8]"),
    (["--num-classes", "3"], "does not fit"),
    (["--data", "digits", "--input-shape", "3,16,16"], "holds inputs of shape [3, 32, 32]"),
    (["--model", "usermodels:numpy_cnn"], "the structured step cannot trace model usermodels:numpy_cnn"),
    (["--model", "usermodels:broken"], "model factory usermodels:broken failed"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, sparse_checkpoint, capsys, extra, message):
    argv = ["structure", "--model", "usermodels:small_cnn", "--checkpoint", str(sparse_checkpoint),
            "--input-shape", "3,32,32", "--num-classes", "10", "--out", str(tmp_path / "p"), "--quiet"]
    argv += extra  # later flags win
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "p").exists()
