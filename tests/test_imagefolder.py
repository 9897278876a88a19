"""Image folders as data: one sub-folder of JPEG/PNG images per class, or train/ and val/ holding such folders."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from exporter.cli import main
from exporter.data import load_dataset
from exporter.errors import ExportError
from exporter.models import build_model

# One colour per class, so the dominant channel tells an image's class and a model has something to learn.
COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}
SIZES = [(20, 24), (40, 40), (32, 32)]  # (width, height): every image is resized, whatever its own size
TRAIN_TINY = ["--model", "resnet20", "--width", "0.25", "--epochs", "1", "--rewind-iteration", "0", "--quiet"]


def write_class_folders(root: Path, per_class: int = 12, classes: tuple[str, ...] = ("red", "green", "blue")) -> Path:
    """Noisy single-colour images, PNG and JPEG alternating, of several sizes."""
    generator = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            width, height = SIZES[index % len(SIZES)]
            noise = generator.integers(-30, 31, size=(height, width, 3))
            pixels = np.clip(np.array(COLOURS[name]) + noise, 0, 255).astype(np.uint8)
            suffix = ".png" if index % 2 == 0 else ".jpg"
            Image.fromarray(pixels).save(root / name / f"{index:03d}{suffix}")
    return root


def write_train_val(root: Path, train_classes=("red", "green", "blue"), val_classes=("red", "green", "blue")) -> Path:
    write_class_folders(root / "train", per_class=8, classes=train_classes)
    write_class_folders(root / "val", per_class=4, classes=val_classes)
    return root


def raw_images(folder: Path, size: int) -> np.ndarray:
    """The images under folder/<class>/ as the loader should see them, read here independently: [N, H, W, 3]."""
    files = sorted(path for path in folder.glob("*/*") if path.suffix in (".png", ".jpg"))
    return np.stack([np.asarray(Image.open(path).convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
                     for path in files])


def unnormalized(dataset, x: torch.Tensor) -> torch.Tensor:
    """Back from model inputs to 0..255 pixels."""
    pre = dataset.preprocessing
    mean, std = torch.tensor(pre["mean"]).view(1, -1, 1, 1), torch.tensor(pre["std"]).view(1, -1, 1, 1)
    return (x * std + mean) / pre["scale"]


def test_class_folders_give_labels_from_their_names_and_a_stratified_split(tmp_path):
    dataset = load_dataset(str(write_class_folders(tmp_path / "colours")), test_fraction=0.25)

    assert dataset.name == "colours" and dataset.labels == ["blue", "green", "red"]  # sorted folder names
    assert dataset.train_x.shape == (27, 3, 32, 32) and dataset.test_x.shape == (9, 3, 32, 32)
    assert dataset.train_x.dtype == torch.float32 and dataset.train_y.dtype == torch.int64
    assert torch.bincount(dataset.test_y).tolist() == [3, 3, 3]
    assert dataset.preprocessing["scale"] == 1 / 255 and len(dataset.preprocessing["mean"]) == 3
    # Each image's strongest channel is its class colour: the labels follow the folders.
    strongest = unnormalized(dataset, dataset.test_x).mean(dim=(2, 3)).argmax(dim=1)
    channel_of = {"red": 0, "green": 1, "blue": 2}
    assert strongest.tolist() == [channel_of[dataset.labels[label]] for label in dataset.test_y.tolist()]


def test_the_split_is_seeded(tmp_path):
    folder = str(write_class_folders(tmp_path / "colours"))
    first, again, other = load_dataset(folder, seed=1), load_dataset(folder, seed=1), load_dataset(folder, seed=2)
    assert torch.equal(first.test_x, again.test_x) and torch.equal(first.test_y, again.test_y)
    assert not torch.equal(first.test_x, other.test_x)


def test_images_come_out_contiguous_nchw(tmp_path):
    """Read as CHW views of HWC images they would stack channels-last, which CPU training must not get
    (a oneDNN out-of-bounds write; exporter.data._normalized)."""
    for dataset in (load_dataset(str(write_class_folders(tmp_path / "colours"))),
                    load_dataset(str(write_train_val(tmp_path / "split")))):
        assert dataset.train_x.is_contiguous() and dataset.test_x.is_contiguous()


def test_train_and_val_folders_are_train_and_test_normalized_by_the_train_images(tmp_path):
    dataset = load_dataset(str(write_train_val(tmp_path / "split")))

    assert dataset.train_x.shape == (24, 3, 32, 32) and dataset.test_x.shape == (12, 3, 32, 32)
    assert dataset.train_y.tolist() == [0] * 8 + [1] * 8 + [2] * 8 and dataset.labels == ["blue", "green", "red"]
    train = raw_images(tmp_path / "split" / "train", 32) / 255
    mean, std = train.mean(axis=(0, 1, 2)), train.std(axis=(0, 1, 2))
    assert np.allclose(dataset.preprocessing["mean"], mean, atol=1e-5)
    assert np.allclose(dataset.preprocessing["std"], std, atol=1e-5)
    expected = torch.from_numpy(((train - mean) / std).transpose(0, 3, 1, 2)).float()
    assert torch.allclose(dataset.train_x, expected, atol=1e-4)


def test_input_size_sets_the_side_images_are_resized_to(tmp_path):
    dataset = load_dataset(str(write_class_folders(tmp_path / "colours")), input_size=16)
    assert dataset.input_shape == (3, 16, 16)


def test_other_files_and_hidden_folders_are_ignored(tmp_path):
    folder = write_class_folders(tmp_path / "colours", per_class=4, classes=("red", "blue"))
    (folder / "red" / "notes.txt").write_text("not an image")
    (folder / ".thumbnails").mkdir()
    (folder / "labels.csv").write_text("red,blue\n")
    dataset = load_dataset(str(folder), test_fraction=0.5)
    assert dataset.labels == ["blue", "red"] and len(dataset.train_y) + len(dataset.test_y) == 8


def test_a_fixed_size_format_refuses_another_input_size():
    assert load_dataset("digits", input_size=32).input_shape == (3, 32, 32)
    with pytest.raises(ExportError, match=r"digits holds 32x32 images and only an image folder is resized"):
        load_dataset("digits", input_size=64)


def refused(argv: list[str], capsys) -> str:
    """Run the CLI, expect a refusal, and return its one-line message."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("edgeshift-export: error: ") and "\n" not in err and "Traceback" not in err
    return err


def empty(root: Path) -> None:
    root.mkdir()


def class_folders_without_images(root: Path) -> None:
    for name in ("red", "green"):
        (root / name).mkdir(parents=True)
        (root / name / "notes.txt").write_text("no images here")


def one_class(root: Path) -> None:
    write_class_folders(root, classes=("red",))


def corrupt_image(root: Path) -> None:
    write_class_folders(root)
    (root / "green" / "003.jpg").write_bytes(b"not a jpeg at all")


def truncated_image(root: Path) -> None:
    write_class_folders(root)
    path = root / "blue" / "004.png"
    path.write_bytes(path.read_bytes()[:60])


def a_class_without_images(root: Path) -> None:
    write_class_folders(root)
    (root / "yellow").mkdir()


def train_and_val_with_other_classes(root: Path) -> None:
    write_train_val(root, val_classes=("green", "blue"))


def train_without_val(root: Path) -> None:
    write_class_folders(root / "train")


def too_few_images_to_split(root: Path) -> None:
    write_class_folders(root, per_class=1)


@pytest.mark.parametrize("make, message", [
    (empty, "has no class sub-folders of JPEG/PNG images"),
    (class_folders_without_images, "has no class sub-folders of JPEG/PNG images"),
    (one_class, "has one class folder (red); a classifier needs at least two"),
    (corrupt_image, "cannot read image {root}/green/003.jpg (UnidentifiedImageError); replace or delete the file"),
    (truncated_image, "cannot read image {root}/blue/004.png"),
    (a_class_without_images, "class folder {root}/yellow has no JPEG or PNG images"),
    (train_and_val_with_other_classes, "different classes (only in train/: red; only in val/: none)"),
    (train_without_val, "has train/ but no val/"),
    (too_few_images_to_split, "add images or split them into train/ and val/ folders"),
])
def test_bad_image_folders_are_one_clear_line_and_write_nothing(tmp_path, capsys, make, message):
    root = tmp_path / "images"
    make(root)
    out = tmp_path / "dense.pt"
    assert message.format(root=root) in refused(["train", "--data", str(root), "--out", str(out), *TRAIN_TINY], capsys)
    assert not out.exists()


def test_a_bad_input_size_is_refused(tmp_path, capsys):
    folder = write_class_folders(tmp_path / "colours")
    argv = ["train", "--data", str(folder), "--out", str(tmp_path / "dense.pt"), *TRAIN_TINY]
    assert "input size must be a positive number of pixels, got 0" in refused([*argv, "--input-size", "0"], capsys)
    assert "digits holds 32x32 images" in refused([*argv, "--data", "digits", "--input-size", "16"], capsys)
    assert not (tmp_path / "dense.pt").exists()


def test_train_on_an_image_folder_end_to_end(tmp_path, capsys):
    folder = write_class_folders(tmp_path / "colours")
    checkpoint = tmp_path / "dense.pt"

    assert main(["train", "--data", str(folder), "--input-size", "16", "--out", str(checkpoint), *TRAIN_TINY]) == 0

    assert "trained resnet20 on colours" in capsys.readouterr().out
    saved = torch.load(checkpoint, weights_only=True)
    model = build_model("resnet20", num_classes=3, width=0.25)
    model.load_state_dict(saved["model"])
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 3)


def test_portfolio_passes_the_input_size_on(tmp_path, capsys):
    out = tmp_path / "portfolio"
    message = refused(["portfolio", "--data", "digits", "--input-size", "16", "--out", str(out), *TRAIN_TINY], capsys)
    assert "digits holds 32x32 images" in message and not out.exists()


def test_structure_resizes_an_image_folder_to_its_input_shape(tmp_path, capsys):
    folder = write_class_folders(tmp_path / "colours")
    argv = ["structure", "--model", "resnet20", "--checkpoint", str(tmp_path / "model.pt"), "--input-shape", "3,16,16",
            "--data", str(folder), "--out", str(tmp_path / "portfolio"), "--quiet"]
    # The class count is checked after the input shape, so this refusal says the 16x16 images fit.
    assert "has 3 classes, but --num-classes says 4" in refused([*argv, "--num-classes", "4"], capsys)
    assert not (tmp_path / "portfolio").exists()
