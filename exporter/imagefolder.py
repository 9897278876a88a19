"""Image folders, torchvision's ImageFolder layout: one sub-folder of JPEG/PNG images per class.

DIR/<class>/<image> is one pool that the caller splits into train and test; DIR/train/<class>/...
and DIR/val/<class>/... are train and test as they stand. Labels are the class folder names,
sorted. Every image is converted to RGB and resized (stretched, no crop) to size x size, the shape
recorded as the model's input, so a device resizes its frames the same way before normalizing.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from exporter.errors import ExportError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
DEFAULT_INPUT_SIZE = 32  # the zoo's models are built for 32x32 inputs
TRAIN_FOLDER, VAL_FOLDER = "train", "val"
LAYOUT_HINT = "put each class's JPEG/PNG images in a sub-folder named after the class"


@dataclass
class ImageFolder:
    labels: list[str]
    train: tuple[torch.Tensor, torch.Tensor]  # uint8 [N, 3, size, size], int64 [N]
    test: tuple[torch.Tensor, torch.Tensor] | None  # from val/; None when the caller must split train


def looks_like_image_folder(directory: Path) -> bool:
    """Whether a sub-folder (or a sub-folder of train/ or val/) holds a JPEG or PNG image."""
    candidates = chain(*(directory.glob(pattern) for pattern in ("*/*", f"{TRAIN_FOLDER}/*/*", f"{VAL_FOLDER}/*/*")))
    return any(_is_image(path) for path in candidates)


def read_image_folder(directory: Path, size: int) -> ImageFolder:
    train_dir, val_dir = directory / TRAIN_FOLDER, directory / VAL_FOLDER
    if train_dir.is_dir() != val_dir.is_dir():
        present, absent = (TRAIN_FOLDER, VAL_FOLDER) if train_dir.is_dir() else (VAL_FOLDER, TRAIN_FOLDER)
        raise ExportError(f"{directory} has {present}/ but no {absent}/; give both, or put the class folders "
                          f"directly in {directory}")
    if not train_dir.is_dir():
        labels = _class_names(directory)
        return ImageFolder(labels, _read_split(directory, labels, size), None)
    labels, val_labels = _class_names(train_dir), _class_names(val_dir)
    if labels != val_labels:
        only_train = sorted(set(labels) - set(val_labels)) or ["none"]
        only_val = sorted(set(val_labels) - set(labels)) or ["none"]
        raise ExportError(f"{directory}: train/ and val/ hold different classes (only in train/: "
                          f"{', '.join(only_train)}; only in val/: {', '.join(only_val)}); give both the same "
                          "class folders")
    return ImageFolder(labels, _read_split(train_dir, labels, size), _read_split(val_dir, labels, size))


def _class_names(root: Path) -> list[str]:
    names = sorted(path.name for path in root.iterdir() if path.is_dir() and not path.name.startswith("."))
    if not names:
        raise ExportError(f"{root} has no class sub-folders; {LAYOUT_HINT}")
    if len(names) == 1:
        raise ExportError(f"{root} has one class folder ({names[0]}); a classifier needs at least two, so "
                          f"{LAYOUT_HINT}")
    return names


def _read_split(root: Path, labels: list[str], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, targets = [], []
    for index, label in enumerate(labels):
        files = sorted(path for path in (root / label).iterdir() if _is_image(path))
        if not files:
            raise ExportError(f"class folder {root / label} has no JPEG or PNG images; add some or remove the folder")
        images += [_read_image(path, size) for path in files]
        targets += [index] * len(files)
    return torch.from_numpy(np.stack(images)), torch.tensor(targets, dtype=torch.int64)


def _read_image(path: Path, size: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    except Exception as error:  # Pillow raises many types for corrupt, truncated or foreign files
        raise ExportError(f"cannot read image {path} ({type(error).__name__}); replace or delete the file") from error
    return np.asarray(rgb).transpose(2, 0, 1)  # HWC -> CHW


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()
