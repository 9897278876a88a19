"""The portfolio contract: the exporter writes through this module, the agent reads through it.

A portfolio is a directory holding ``manifest.json``, the variant files it lists and
``samples.npz`` (see DESIGN.md, "The portfolio"). numpy and the standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent.manifest import (
    EVALUATION_FILE, FORMATS, LAYOUTS, MANIFEST_FILE, METHODS, SAMPLES_FILE, SCHEMA, TASKS, TRANSFORMS, VARIANT_ID,
    EvaluationFile, LanguageModel, Manifest, ModelFile, PortfolioError, Preprocessing, TensorSpec, TokenizerFile,
    Variant, known_method, relpath_problem,
)

__all__ = [  # the contract's names, whichever module defines them
    "EVALUATION_FILE", "FORMATS", "LAYOUTS", "MANIFEST_FILE", "METHODS", "SAMPLES_FILE", "SCHEMA", "TASKS",
    "TRANSFORMS", "VARIANT_ID", "EvaluationFile", "LanguageModel", "Manifest", "ModelFile", "Portfolio",
    "PortfolioError", "Preprocessing", "Samples", "TensorSpec", "TokenizerFile", "Variant", "file_entry",
    "known_method", "save_evaluation", "save_samples", "sha256_file", "tokenizer_entry", "write_manifest",
]

_CHUNK = 1 << 20


@dataclass
class Samples:
    inputs: list[np.ndarray]  # health-check inputs, in the model's input order
    expected: dict[str, np.ndarray]  # variant id -> expected first output


def _listed_files(manifest: Manifest) -> list[tuple[str, ModelFile | TokenizerFile | EvaluationFile]]:
    """Every file the manifest lists, with what it is (for messages)."""
    listed = [
        (f"variant '{variant.id}' {fmt} file", entry)
        for variant in manifest.variants
        for fmt, entry in variant.files.items()
    ]
    if manifest.language_model is not None and manifest.language_model.tokenizer is not None:
        listed.append(("tokenizer file", manifest.language_model.tokenizer))
    if manifest.evaluation is not None:
        listed.append(("evaluation file", manifest.evaluation))
    return listed


def _check_containment(root: Path, manifest: Manifest) -> None:
    """Symlinks (in the file or any parent directory) must not lead outside the root."""
    real_root = root.resolve()
    for what, entry in _listed_files(manifest):
        target = (root / entry.path).resolve()
        if target != real_root and real_root not in target.parents:  # is_relative_to is Python 3.9+
            raise PortfolioError(
                f"{entry.path}: {what} resolves outside the portfolio "
                f"directory (to {target}); portfolio files must stay inside it"
            )


# --------------------------------------------------------------------------- writing


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(
    root: Path, relpath: str, max_abs_diff: float, input_shape: list[int] | None = None
) -> ModelFile:
    """The manifest entry (checksum and size) for the file root/relpath."""
    reason = relpath_problem(relpath)
    if reason:
        raise PortfolioError(f"{relpath}: {reason}")
    path = Path(root) / relpath
    if not path.is_file():
        raise PortfolioError(f"{relpath}: no such file in {root}")
    return ModelFile(
        path=relpath,
        sha256=sha256_file(path),
        bytes=path.stat().st_size,
        max_abs_diff=float(max_abs_diff),
        input_shape=None if input_shape is None else [int(dim) for dim in input_shape],
    )


def tokenizer_entry(root: Path, relpath: str) -> TokenizerFile:
    """The manifest entry (checksum and size) for the tokenizer file root/relpath."""
    entry = file_entry(root, relpath, max_abs_diff=0.0)
    return TokenizerFile(path=entry.path, sha256=entry.sha256, bytes=entry.bytes)


def save_evaluation(root: Path, x: np.ndarray, y: np.ndarray) -> EvaluationFile:
    """Write evaluation.npz (labelled held-out inputs x and integer labels y) and return its manifest entry."""
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y) or len(x) == 0:
        raise PortfolioError(f"{EVALUATION_FILE}: needs as many labels as inputs (at least one), got {len(x)} and {len(y)}")
    if y.dtype.kind not in "iu":
        raise PortfolioError(f"{EVALUATION_FILE}: labels must be integers, got {y.dtype}")
    path = Path(root) / EVALUATION_FILE
    _write_atomically(path, lambda stream: np.savez(stream, x=x, y=y.astype(np.int64)))
    entry = file_entry(root, EVALUATION_FILE, max_abs_diff=0.0)
    return EvaluationFile(path=entry.path, sha256=entry.sha256, bytes=entry.bytes, count=len(y))


def _write_atomically(path: Path, write) -> None:
    """Write through a temporary file in the same directory, then rename over path."""
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temp_name, 0o644)  # mkstemp makes it private; an agent running as another user must read it
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def write_manifest(root: Path, manifest: Manifest) -> Path:
    """Validate (as a reader would, except that files need not exist yet) and write manifest.json."""
    root = Path(root)
    data = manifest.to_dict()
    checked = Manifest.from_dict(data)
    root.mkdir(parents=True, exist_ok=True)
    _check_containment(root, checked)
    try:
        text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    except TypeError as error:  # a free-form field (metrics, details) holding a non-JSON value
        raise PortfolioError(f"{MANIFEST_FILE}: cannot be written as JSON ({error})") from None
    path = root / MANIFEST_FILE
    _write_atomically(path, lambda stream: stream.write(text.encode("utf-8")))
    return path


def save_samples(root: Path, inputs: list[np.ndarray], expected: dict[str, np.ndarray]) -> Path:
    """Write samples.npz: inputs as x, x1, x2, ...; each variant's expected first output as y_<id>."""
    if not inputs:
        raise PortfolioError(f"{SAMPLES_FILE}: at least one input is needed")
    arrays = {("x" if index == 0 else f"x{index}"): np.asarray(array) for index, array in enumerate(inputs)}
    for variant_id, array in expected.items():
        if not VARIANT_ID.fullmatch(variant_id):
            raise PortfolioError(f"{SAMPLES_FILE}: '{variant_id}' is not a valid variant id")
        arrays[f"y_{variant_id}"] = np.asarray(array)
    for key, array in arrays.items():
        if array.dtype.hasobject:
            raise PortfolioError(f"{SAMPLES_FILE}: {key} has dtype object; samples must be numeric arrays")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / SAMPLES_FILE
    _write_atomically(path, lambda stream: np.savez(stream, **arrays))
    return path


# --------------------------------------------------------------------------- reading


@dataclass
class Portfolio:
    root: Path
    manifest: Manifest
    # Taken when opened, so the digest names the manifest that was validated, not a later rewrite.
    manifest_sha256: str | None = field(default=None, repr=False)

    @property
    def digest(self) -> str:
        """sha256 of the manifest.json bytes."""
        if self.manifest_sha256 is None:
            self.manifest_sha256 = sha256_file(self.root / MANIFEST_FILE)
        return self.manifest_sha256

    @classmethod
    def open(cls, root: str | Path, verify: bool = True) -> Portfolio:
        """Read and validate manifest.json; with verify, check every file's size and sha256 too."""
        root = Path(root)
        if not root.is_dir():
            raise PortfolioError(
                f"{root}: not a directory; a portfolio is a directory holding {MANIFEST_FILE}"
            )
        manifest_path = root / MANIFEST_FILE
        try:
            raw = manifest_path.read_bytes()
        except FileNotFoundError:
            raise PortfolioError(
                f"{MANIFEST_FILE}: missing in {root}; is this a portfolio directory?"
            ) from None
        except OSError as error:
            raise PortfolioError(f"{MANIFEST_FILE}: cannot be read ({error.strerror})") from None
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise PortfolioError(f"{MANIFEST_FILE}: not UTF-8 text; re-export the portfolio") from None
        except json.JSONDecodeError as error:
            raise PortfolioError(
                f"{MANIFEST_FILE}: not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})"
            ) from None
        manifest = Manifest.from_dict(data)
        _check_containment(root, manifest)
        if verify:
            for _, entry in _listed_files(manifest):
                _verify_file(root, entry)
        return cls(root=root, manifest=manifest, manifest_sha256=hashlib.sha256(raw).hexdigest())

    @property
    def tokenizer_path(self) -> Path | None:
        """The tokenizer.json a causal-lm portfolio ships, or None (token ids only)."""
        language_model = self.manifest.language_model
        if language_model is None or language_model.tokenizer is None:
            return None
        return self.root / language_model.tokenizer.path

    def file_path(self, variant_id: str, fmt: str = "onnx") -> Path:
        variant = self.manifest.variant(variant_id)
        if fmt not in variant.files:
            have = ", ".join(variant.files) or "none"
            raise PortfolioError(f"variant '{variant_id}' has no {fmt} file (it has: {have})")
        return self.root / variant.files[fmt].path

    def evaluation_data(self) -> tuple[np.ndarray, np.ndarray]:
        """The labelled held-out inputs (x, y) the exporter shipped, for benchmarks that score answers."""
        entry = self.manifest.evaluation
        if entry is None:
            raise PortfolioError(f"{MANIFEST_FILE}: lists no evaluation data; re-export the portfolio with "
                                 "a current edgeshift-export")
        path = self.root / entry.path
        try:
            with np.load(path, allow_pickle=False) as archive:
                return archive["x"], archive["y"]
        except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise PortfolioError(f"{entry.path}: unreadable ({error}); re-export the portfolio") from None

    def samples(self) -> Samples:
        path = self.root / SAMPLES_FILE
        if not path.is_file():
            raise PortfolioError(f"{SAMPLES_FILE}: missing in {self.root}; re-export the portfolio")
        if not zipfile.is_zipfile(path):  # np.load would try to read anything else as a pickle
            raise PortfolioError(f"{SAMPLES_FILE}: not an .npz archive; re-export the portfolio")
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {key: archive[key] for key in archive.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise PortfolioError(f"{SAMPLES_FILE}: unreadable ({error}); re-export the portfolio") from None
        if "x" not in arrays:
            raise PortfolioError(f"{SAMPLES_FILE}: has no input 'x'; re-export the portfolio")
        inputs = [arrays["x"]]
        while f"x{len(inputs)}" in arrays:
            inputs.append(arrays[f"x{len(inputs)}"])
        expected = {}
        for variant in self.manifest.variants:
            key = f"y_{variant.id}"
            if key not in arrays:
                raise PortfolioError(
                    f"{SAMPLES_FILE}: has no expected output '{key}' for variant '{variant.id}'; "
                    "re-export the portfolio"
                )
            expected[variant.id] = arrays[key]
        return Samples(inputs=inputs, expected=expected)


def _verify_file(root: Path, entry: ModelFile | TokenizerFile) -> None:
    path = root / entry.path
    if not path.is_file():
        raise PortfolioError(
            f"{entry.path}: missing (listed in {MANIFEST_FILE}); re-export or re-deploy the portfolio"
        )
    size = path.stat().st_size
    if size != entry.bytes:
        raise PortfolioError(
            f"{entry.path}: size {size} bytes differs from the manifest ({entry.bytes}) "
            "(file changed or truncated); re-export or re-deploy the portfolio"
        )
    if sha256_file(path) != entry.sha256:
        raise PortfolioError(
            f"{entry.path}: sha256 differs from the manifest (file changed or corrupt); "
            "re-export or re-deploy the portfolio"
        )
