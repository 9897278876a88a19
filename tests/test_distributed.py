"""IMP under torchrun: two CPU processes (gloo) train one level together and end with one set of masks."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

# What each rank runs: the exporter's own entry points, as `torchrun -m exporter.cli portfolio` would.
RANK = textwrap.dedent('''
    import sys
    from pathlib import Path
    import torch
    import torch.distributed as dist
    from exporter.data import load_dataset
    from exporter.distributed import start_from_environment
    from exporter.dnnshifter.imp import ImpConfig, imp_settings, run_imp
    from exporter.models import build_model
    from exporter.run_dir import RunDir
    from exporter.train import TrainConfig, seeded

    start_from_environment()
    rank, out = dist.get_rank(), Path(sys.argv[1])
    train, imp = TrainConfig(epochs=1), ImpConfig(levels=1, fraction=0.5, rewind_iteration=5, level_epochs=1)
    run_dir = RunDir.open(out / "run", {"imp": imp_settings({}, train, imp)})
    build = lambda: seeded(rank, lambda: build_model("resnet20", width=0.25))  # ranks start apart on purpose
    levels = run_imp(build, load_dataset("digits"), train, imp, keep={1}, run_dir=run_dir, progress=False)
    torch.save({"masks": levels[1].masks.ranked, "model": levels[1].state}, out / f"rank{rank}.pt")
''')


def test_two_ranks_train_one_level_with_identical_masks_and_weights(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    script = tmp_path / "rank.py"
    script.write_text(RANK)

    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)

    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    first, second = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name, mask in first["masks"].items():
        assert torch.equal(mask, second["masks"][name]), name
    for name, tensor in first["model"].items():
        assert torch.equal(tensor, second["model"][name]), name
    assert 0.2 < float(sum(m.sum() for m in first["masks"].values())) / sum(
        m.numel() for m in first["masks"].values()) < 0.8
    assert sorted(p.name for p in (tmp_path / "run").glob("*.pt")) == ["level_00.pt", "level_01.pt"]
