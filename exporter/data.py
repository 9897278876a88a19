"""Datasets for calibration and fine-tuning: sklearn's digits, a CIFAR-10 python directory, an image folder
(exporter.imagefolder), or an .npz file.

Every loader returns normalized model inputs plus the preprocessing that produced them, so a device can
repeat it: model_input = (raw * scale - mean) / std, per channel, where raw is the stored image
(for digits, the 3x32x32 upsampled image with values 0..16; for an image folder, the RGB image resized to the
model's input size, values 0..255).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from exporter.errors import ExportError
from exporter.imagefolder import DEFAULT_INPUT_SIZE, looks_like_image_folder, read_image_folder

ACCEPTED_FORMATS = (
    "give 'digits', a CIFAR-10 python directory (data_batch_1..5, test_batch), a directory with one sub-folder "
    "of JPEG/PNG images per class, or an .npz file with x and y"
)
CIFAR_TRAIN_FILES = tuple(f"data_batch_{index}" for index in range(1, 6))
CIFAR_TEST_FILE = "test_batch"
CIFAR_META_FILE = "batches.meta"
CIFAR_SUBDIRECTORY = "cifar-10-batches-py"  # what the official archive unpacks to
CIFAR_IMAGE_SHAPE = (3, 32, 32)
DIGITS_SIZE = 32


@dataclass
class Dataset:
    name: str
    train_x: torch.Tensor  # float32 [N, C, H, W], normalized: the model's input
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor
    test_y: torch.Tensor
    labels: list[str]
    preprocessing: dict  # {"scale": float, "mean": [per channel], "std": [per channel]}

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        channels, height, width = self.train_x.shape[1:]
        return (channels, height, width)


def load_dataset(
    spec: str = "digits", seed: int = 0, test_fraction: float = 0.25, input_size: int | None = None
) -> Dataset:
    """input_size: the side an image folder's images are resized to (default 32, the zoo's input); the other
    formats have a size of their own, which input_size, when given, must match."""
    if not 0 < test_fraction < 1:
        raise ExportError(f"test fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    if input_size is not None and input_size < 1:
        raise ExportError(f"input size must be a positive number of pixels, got {input_size}")
    dataset = _load(spec, seed, test_fraction, input_size)
    height, width = dataset.input_shape[1:]
    if input_size is not None and (height, width) != (input_size, input_size):
        fits = f"give --input-size {height} or leave it out" if height == width else "leave --input-size out"
        raise ExportError(f"{spec} holds {height}x{width} images and only an image folder is resized; {fits}")
    return dataset


def _load(spec: str, seed: int, test_fraction: float, input_size: int | None) -> Dataset:
    if spec == "digits":
        return _load_digits(seed, test_fraction)
    path = Path(spec)
    if not path.exists():
        raise ExportError(f"dataset '{spec}' not found; {ACCEPTED_FORMATS}")
    if path.is_dir():
        if (path / CIFAR_SUBDIRECTORY).is_dir():
            path = path / CIFAR_SUBDIRECTORY
        if _looks_like_cifar(path):
            return _load_cifar10(path)
        if looks_like_image_folder(path):
            return _load_image_folder(path, seed, test_fraction, input_size or DEFAULT_INPUT_SIZE)
        raise ExportError(f"directory {path} is not in CIFAR-10 python format and has no class sub-folders of "
                          f"JPEG/PNG images; {ACCEPTED_FORMATS}")
    if path.suffix == ".npz":
        return _load_npz(path, seed, test_fraction)
    raise ExportError(f"dataset file {path} is not an .npz; {ACCEPTED_FORMATS}")


def _load_digits(seed: int, test_fraction: float) -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1)  # [N, 1, 8, 8], values 0..16
    images = F.interpolate(images, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)
    images = images.repeat(1, 3, 1, 1)
    targets = torch.from_numpy(digits.target).long()
    train, test = _split(targets.numpy(), seed, test_fraction, "digits")
    labels = [str(name) for name in digits.target_names]
    return _normalized("digits", images[train], targets[train], images[test], targets[test], labels, 1 / 16)


def _looks_like_cifar(directory: Path) -> bool:
    return any((directory / name).exists() for name in (*CIFAR_TRAIN_FILES, CIFAR_TEST_FILE))


def _load_cifar10(directory: Path) -> Dataset:
    missing = [name for name in (*CIFAR_TRAIN_FILES, CIFAR_TEST_FILE) if not (directory / name).is_file()]
    if missing:
        raise ExportError(
            f"CIFAR-10 directory {directory} lacks {', '.join(missing)}; it needs data_batch_1..5 and test_batch"
        )
    train_batches = [_read_cifar_batch(directory / name) for name in CIFAR_TRAIN_FILES]
    train_x = torch.cat([images for images, _ in train_batches])
    train_y = torch.cat([targets for _, targets in train_batches])
    test_x, test_y = _read_cifar_batch(directory / CIFAR_TEST_FILE)
    labels = _read_cifar_labels(directory / CIFAR_META_FILE)
    _check_targets(torch.cat([train_y, test_y]), labels, directory)
    return _normalized("cifar10", train_x, train_y, test_x, test_y, labels, 1 / 255)


def _unpickle(path: Path) -> object:
    try:
        with path.open("rb") as file:
            return pickle.load(file, encoding="bytes")
    except Exception as error:  # unpickling a corrupt or foreign file raises many types
        raise ExportError(f"cannot read {path} as a CIFAR-10 pickle ({_describe(error)})") from error


def _read_cifar_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    batch = _unpickle(path)
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ExportError(f"{path} is not a CIFAR-10 batch: expected a dict with b'data' and b'labels'")
    data = np.asarray(batch[b"data"])
    targets = np.asarray(batch[b"labels"])
    width = int(np.prod(CIFAR_IMAGE_SHAPE))
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != width:
        raise ExportError(
            f"{path} holds data of shape {list(data.shape)} and type {data.dtype}; "
            f"CIFAR-10 needs uint8 [N, {width}]"
        )
    if targets.ndim != 1 or not np.issubdtype(targets.dtype, np.integer):
        raise ExportError(f"{path}: b'labels' must be a list of integer class indices")
    if len(targets) != len(data):
        raise ExportError(f"{path} has {len(targets)} labels for {len(data)} images; it needs one label per image")
    images = torch.from_numpy(data.reshape(-1, *CIFAR_IMAGE_SHAPE).astype(np.float32))
    return images, torch.from_numpy(targets.astype(np.int64))


def _read_cifar_labels(path: Path) -> list[str]:
    if not path.is_file():
        return [str(index) for index in range(10)]
    meta = _unpickle(path)
    names = meta.get(b"label_names") if isinstance(meta, dict) else None
    if not isinstance(names, list) or not names:
        raise ExportError(f"{path} is not CIFAR-10 metadata: expected a dict with a b'label_names' list")
    return [name.decode() if isinstance(name, bytes) else str(name) for name in names]


def _load_image_folder(directory: Path, seed: int, test_fraction: float, size: int) -> Dataset:
    folder = read_image_folder(directory, size)
    if folder.test is None:
        images, targets = folder.train
        train, test = _split(targets.numpy(), seed, test_fraction, str(directory),
                             remedy="add images or split them into train/ and val/ folders")
        train_x, train_y, test_x, test_y = images[train], targets[train], images[test], targets[test]
    else:
        (train_x, train_y), (test_x, test_y) = folder.train, folder.test
    name = directory.resolve().name
    return _normalized(name, train_x.float(), train_y, test_x.float(), test_y, folder.labels, 1 / 255)


def _load_npz(path: Path, seed: int, test_fraction: float) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except Exception as error:  # np.load raises many types for foreign or corrupt files
        raise ExportError(f"cannot read {path} as an .npz ({_describe(error)})") from error
    for key in ("x", "y"):
        if key not in arrays:
            raise ExportError(
                f"{path} has no '{key}' array (it has {sorted(arrays)}); save it with x=images, y=labels"
            )
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise ExportError(f"{path} has only one of x_test and y_test; give both or neither")

    x, scale = _npz_images(arrays["x"], path, "x")
    y = _npz_targets(arrays["y"], len(x), path, "y")
    if "x_test" in arrays:
        test_x, test_scale = _npz_images(arrays["x_test"], path, "x_test")
        test_y = _npz_targets(arrays["y_test"], len(test_x), path, "y_test")
        if test_x.shape[1:] != x.shape[1:] or test_scale != scale:
            raise ExportError(f"{path}: x_test must have the same image shape and dtype as x")
        train_x, train_y = x, y
    else:
        train, test = _split(y.numpy(), seed, test_fraction, str(path))
        train_x, train_y, test_x, test_y = x[train], y[train], x[test], y[test]

    all_targets = torch.cat([train_y, test_y])
    if "labels" in arrays:
        labels = [str(name) for name in np.asarray(arrays["labels"]).reshape(-1)]
    else:
        labels = [str(index) for index in range(int(all_targets.max()) + 1)]
    _check_targets(all_targets, labels, path)
    return _normalized(path.stem, train_x, train_y, test_x, test_y, labels, scale)


def _npz_images(array: np.ndarray, path: Path, key: str) -> tuple[torch.Tensor, float]:
    if array.ndim != 4:
        raise ExportError(f"{path}: '{key}' has shape {list(array.shape)}; must be 4-D, [N,C,H,W] or [N,H,W,C]")
    if len(array) == 0:
        raise ExportError(f"{path}: '{key}' holds no images")
    if array.dtype == np.uint8:
        scale = 1 / 255
    elif np.issubdtype(array.dtype, np.floating):
        scale = 1.0
    else:
        raise ExportError(f"{path}: '{key}' has dtype {array.dtype}; use uint8 (0..255) or float images")
    if array.shape[-1] in (1, 3) and array.shape[1] not in (1, 3):
        array = array.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)), scale


def _npz_targets(array: np.ndarray, count: int, path: Path, key: str) -> torch.Tensor:
    if not np.issubdtype(array.dtype, np.integer):
        raise ExportError(f"{path}: '{key}' has dtype {array.dtype}; class labels must be integers")
    if array.ndim != 1 or len(array) != count:
        raise ExportError(
            f"{path}: '{key}' has shape {list(array.shape)}; it must be 1-D with one label per image ({count})"
        )
    return torch.from_numpy(array.astype(np.int64))


def _check_targets(targets: torch.Tensor, labels: list[str], source: Path) -> None:
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= len(labels):
        raise ExportError(
            f"{source} has class labels {low}..{high} but {len(labels)} class names; "
            f"labels must be 0..{len(labels) - 1}"
        )


def _split(
    targets: np.ndarray, seed: int, test_fraction: float, source: str,
    remedy: str = "add images or give x_test and y_test",
) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    try:
        train, test = train_test_split(
            np.arange(len(targets)), test_size=test_fraction, stratify=targets, random_state=seed
        )
    except ValueError as error:
        raise ExportError(
            f"cannot split {source} into train and test ({error}); {remedy}"
        ) from error
    return train, test


def _normalized(
    name: str,
    train_raw: torch.Tensor,
    train_y: torch.Tensor,
    test_raw: torch.Tensor,
    test_y: torch.Tensor,
    labels: list[str],
    scale: float,
) -> Dataset:
    # Contiguous NCHW whatever layout a loader produced: stacked CHW views of HWC images are channels-last,
    # and CPU training on channels-last 1x1 convolutions with fewer than 16 input channels writes out of
    # bounds in torch 2.13's oneDNN (a segfault or corrupt memory later; uxlfoundation/oneDNN#6035).
    train_x = train_raw.contiguous() * scale
    mean = train_x.mean(dim=(0, 2, 3))
    std = train_x.std(dim=(0, 2, 3), unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))  # a constant channel must not divide by zero
    shape = (1, -1, 1, 1)
    train_x.sub_(mean.view(shape)).div_(std.view(shape))  # in place: CIFAR-10 is 600 MB as float32
    test_x = (test_raw.contiguous() * scale).sub_(mean.view(shape)).div_(std.view(shape))
    return Dataset(
        name=name,
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        labels=labels,
        preprocessing={"scale": float(scale), "mean": mean.tolist(), "std": std.tolist()},
    )


def _describe(error: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
