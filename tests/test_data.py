from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from exporter.data import load_dataset
from exporter.errors import ExportError

CIFAR_BATCH_SIZE = 20


def write_pickle(path: Path, content: object) -> None:
    with path.open("wb") as file:
        pickle.dump(content, file)


def fake_cifar10(directory: Path, with_meta: bool = True) -> Path:
    generator = np.random.default_rng(0)
    for name in [f"data_batch_{index}" for index in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": generator.integers(0, 256, size=(CIFAR_BATCH_SIZE, 3072), dtype=np.uint8),
            b"labels": [index % 10 for index in range(CIFAR_BATCH_SIZE)],
        }
        write_pickle(directory / name, batch)
    if with_meta:
        names = b"airplane automobile bird cat deer dog frog horse ship truck".split()
        write_pickle(directory / "batches.meta", {b"label_names": names})
    return directory


def test_digits_is_the_default_and_is_normalized() -> None:
    dataset = load_dataset()
    assert dataset.name == "digits"
    assert dataset.train_x.shape == (1347, 3, 32, 32)
    assert dataset.test_x.shape == (450, 3, 32, 32)
    assert dataset.train_x.dtype == torch.float32 and dataset.train_y.dtype == torch.int64
    assert dataset.labels == [str(digit) for digit in range(10)]
    assert dataset.num_classes == 10
    assert dataset.input_shape == (3, 32, 32)
    assert torch.allclose(dataset.train_x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)
    assert torch.allclose(dataset.train_x.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3)
    assert dataset.preprocessing["scale"] == 1 / 16
    assert len(dataset.preprocessing["mean"]) == len(dataset.preprocessing["std"]) == 3


def test_digits_split_is_stratified() -> None:
    dataset = load_dataset("digits", test_fraction=0.25)
    per_class = torch.bincount(torch.cat([dataset.train_y, dataset.test_y]))
    assert (torch.bincount(dataset.test_y) - per_class * 0.25).abs().max() < 1


def test_digits_are_deterministic_per_seed() -> None:
    first, again, other = load_dataset(seed=1), load_dataset(seed=1), load_dataset(seed=2)
    assert torch.equal(first.train_x, again.train_x) and torch.equal(first.test_y, again.test_y)
    assert not torch.equal(first.test_x, other.test_x)


def test_cifar10_directory_loads_with_label_names(tmp_path) -> None:
    dataset = load_dataset(str(fake_cifar10(tmp_path)))
    assert dataset.name == "cifar10"
    assert dataset.train_x.shape == (5 * CIFAR_BATCH_SIZE, 3, 32, 32)
    assert dataset.test_x.shape == (CIFAR_BATCH_SIZE, 3, 32, 32)
    assert dataset.labels[:3] == ["airplane", "automobile", "bird"]
    assert dataset.preprocessing["scale"] == 1 / 255
    assert dataset.train_y.tolist()[:3] == [0, 1, 2]


def test_cifar10_without_meta_names_classes_by_number(tmp_path) -> None:
    dataset = load_dataset(str(fake_cifar10(tmp_path, with_meta=False)))
    assert dataset.labels == [str(index) for index in range(10)]


def test_cifar10_missing_test_batch_is_named(tmp_path) -> None:
    (fake_cifar10(tmp_path) / "test_batch").unlink()
    with pytest.raises(ExportError, match=r"lacks test_batch"):
        load_dataset(str(tmp_path))


def test_cifar10_corrupt_pickle_names_the_file(tmp_path) -> None:
    (fake_cifar10(tmp_path) / "data_batch_3").write_bytes(b"\x00garbage")
    with pytest.raises(ExportError, match=r"data_batch_3 as a CIFAR-10 pickle"):
        load_dataset(str(tmp_path))


def test_cifar10_batch_of_the_wrong_width_is_rejected(tmp_path) -> None:
    narrow = {b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}
    write_pickle(fake_cifar10(tmp_path) / "data_batch_1", narrow)
    with pytest.raises(ExportError, match=r"data_batch_1 holds data of shape \[4, 100\]"):
        load_dataset(str(tmp_path))


def test_npz_in_nchw_and_nhwc_give_the_same_dataset(tmp_path) -> None:
    generator = np.random.default_rng(0)
    images = generator.integers(0, 256, size=(40, 3, 16, 16), dtype=np.uint8)
    labels = np.arange(40) % 4
    np.savez(tmp_path / "nchw.npz", x=images, y=labels)
    names = np.array(["a", "b", "c", "d"])
    np.savez(tmp_path / "nhwc.npz", x=images.transpose(0, 2, 3, 1), y=labels, labels=names)

    nchw = load_dataset(str(tmp_path / "nchw.npz"))
    nhwc = load_dataset(str(tmp_path / "nhwc.npz"))
    assert nchw.name == "nchw"
    assert nchw.input_shape == nhwc.input_shape == (3, 16, 16)
    assert (len(nchw.train_y), len(nchw.test_y)) == (30, 10)
    assert torch.equal(nchw.train_x, nhwc.train_x)
    assert nchw.labels == ["0", "1", "2", "3"] and nhwc.labels == ["a", "b", "c", "d"]


def test_npz_with_its_own_test_split_and_float_images(tmp_path) -> None:
    x = np.random.default_rng(0).random((12, 1, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "gray.npz", x=x, y=np.arange(12) % 3, x_test=x[:5], y_test=np.arange(5) % 3)
    dataset = load_dataset(str(tmp_path / "gray.npz"))
    assert dataset.train_x.shape == (12, 1, 8, 8) and dataset.test_x.shape == (5, 1, 8, 8)
    assert dataset.preprocessing["scale"] == 1.0


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": np.zeros((4, 3, 8, 8), np.uint8)}, r"has no 'x' array"),
        ({"x": np.zeros((4, 3, 8, 8), np.uint8), "y": np.zeros(5, np.int64)}, r"'y' has shape \[5\]"),
        ({"x": np.zeros((4, 64), np.uint8), "y": np.zeros(4, np.int64)}, r"'x' has shape \[4, 64\]; must be 4-D"),
        ({"x": np.zeros((4, 3, 8, 8), np.uint8), "y": np.zeros(4, np.float32)}, r"labels must be integers"),
    ],
)
def test_bad_npz_says_what_is_wrong(tmp_path, arrays: dict, message: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ExportError, match=message):
        load_dataset(str(tmp_path / "bad.npz"))


def test_unknown_paths_and_formats_list_the_accepted_ones(tmp_path) -> None:
    with pytest.raises(ExportError, match=r"not found; give 'digits', a CIFAR-10 python directory"):
        load_dataset(str(tmp_path / "nowhere"))
    (tmp_path / "images.csv").write_text("1,2,3\n")
    with pytest.raises(ExportError, match=r"is not an .npz; give 'digits'"):
        load_dataset(str(tmp_path / "images.csv"))
    with pytest.raises(ExportError, match=r"is not in CIFAR-10 python format"):
        load_dataset(str(tmp_path))
