"""manifest.json: its typed form, strict parsing and validation (schema edgeshift.portfolio/1).

Errors name the offending field's path, e.g. "manifest.json: variants[2].files.onnx.sha256 is missing".
numpy and the standard library only; `agent.portfolio` is the module the two sides import.
"""

from __future__ import annotations

import math
import posixpath
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import PureWindowsPath
from typing import Any

import numpy as np

SCHEMA = "edgeshift.portfolio/1"
METHODS = frozenset(
    {
        "dense",
        "imp-sparse",
        "imp-structured",
        "pai-unstructured",
        "pai-structured",
        "mosaic-global",
        "mosaic-layer",
        "mosaic-unstructured",
        "mosaic-composite",
        "sparse",
        "structured",
    }
)
# A transform of a variant appends "+<transform>" to its method: "imp-structured+int8" (static int8 of a
# classifier), "mosaic-composite+int4" (weight-only, block-wise int4 or int8 of a causal LM).
TRANSFORMS = frozenset({"int8", "int4"})
TASKS = frozenset({"classification", "causal-lm"})
FORMATS = ("onnx", "tflite")
LAYOUTS = ("NCHW", "NHWC")
KV_BUFFERS = ("concat", "shared")  # agent.manifest.KvCache.buffer
VARIANT_ID = re.compile(r"[a-z0-9][a-z0-9._-]*")  # use with fullmatch

MANIFEST_FILE = "manifest.json"
SAMPLES_FILE = "samples.npz"
EVALUATION_FILE = "evaluation.npz"

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


class PortfolioError(Exception):
    """A portfolio that cannot be used; the message names the file and the reason."""


@dataclass
class TensorSpec:
    name: str
    dtype: str
    shape: list[int]  # -1 for a dynamic dimension
    layout: str | None = None  # "NCHW", "NHWC" or None


@dataclass
class Preprocessing:
    """model_input = (raw * scale - mean) / std, per channel."""

    scale: float
    mean: list[float]
    std: list[float]


@dataclass
class ModelFile:
    path: str  # relative to the portfolio root, forward slashes
    sha256: str
    bytes: int
    max_abs_diff: float  # largest |output - reference output| measured at export
    input_shape: list[int] | None = None  # the file's fixed input shape, when it has one
    kv_cache: KvCache | None = None  # a causal-lm file that takes and returns its attention cache


@dataclass
class KvCache:
    """A causal-lm file with a key-value cache, in onnxruntime-genai's names: inputs input_ids,
    attention_mask [batch, past + sequence] and past_key_values.{i}.key/.value; outputs logits (new
    positions only) and present.{i}.key/.value. Layer i's cache is [batch, kv_heads, positions, head_dim]
    float32, from `layers[i]` = [kv_heads, head_dim]: layers of a shrunk model differ.

    `buffer` "concat" (every file exported before the field): present has past + sequence positions, a
    new tensor each call. "shared": the past may also be a buffer longer than what it holds, the
    attention mask's length (past + sequence) telling how much of it is valid; present is then that
    buffer with the new positions written at [past, past + sequence), so a caller that passes one array
    as both past and present (onnxruntime's IOBinding) has it updated in place. A shared file takes no
    padding (the mask is all ones), several tokens after a past in a batch of one row only, and given a
    past of exactly its positions answers as a concat one."""

    layers: list[list[int]]
    buffer: str = "concat"


@dataclass
class Variant:
    id: str
    method: str
    parent: str | None
    density: float
    params: int
    params_nonzero: int
    macs: int
    metrics: dict  # e.g. {"accuracy": 0.97, "dataset": "digits", "n": 450}
    files: dict[str, ModelFile]  # keys from FORMATS
    host_latency_ms: dict[str, float] = field(default_factory=dict)  # {"p50": .., "p95": ..}
    details: dict = field(default_factory=dict)  # method-specific, free-form JSON


@dataclass
class TokenizerFile:
    """A Hugging Face `tokenizers` fast-tokenizer file (tokenizer.json) at the portfolio root."""

    path: str  # relative to the portfolio root, forward slashes
    sha256: str
    bytes: int


@dataclass
class LanguageModel:
    """What serving a causal-lm portfolio needs beyond its tensors; absent for classification."""

    tokenizer: TokenizerFile | None  # None: the portfolio takes token ids only
    bos_token_id: int | None
    eos_token_id: int | None  # greedy generation stops after emitting it
    context_length: int  # the most tokens the variants are fed; a generation that fills it stops ("length")
    chat_template: str | None = None  # the tokenizer's Jinja chat template; None: no chat endpoint


@dataclass
class EvaluationFile:
    """Labelled held-out inputs (x, y) in an .npz at the portfolio root: what benchmarks replay and score."""

    path: str  # relative to the portfolio root, forward slashes
    sha256: str
    bytes: int
    count: int  # how many labelled inputs


def known_method(method: str) -> bool:
    """A base method, optionally with transforms: "pai-structured", "imp-structured+int8"."""
    base, *transforms = method.split("+")
    return base in METHODS and all(t in TRANSFORMS for t in transforms)


def _utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Manifest:
    name: str
    task: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    variants: list[Variant]
    default_variant: str
    labels: list[str] | None = None
    preprocessing: Preprocessing | None = None
    language_model: LanguageModel | None = None  # required when task is "causal-lm"
    evaluation: EvaluationFile | None = None  # optional labelled held-out data
    created: str = field(default_factory=_utc_now)
    exporter: dict[str, str] = field(default_factory=dict)  # versions: {"torch": "2.4.1", ...}
    schema: str = SCHEMA

    def variant(self, variant_id: str) -> Variant:
        for variant in self.variants:
            if variant.id == variant_id:
                return variant
        known = ", ".join(v.id for v in self.variants)
        raise PortfolioError(f"unknown variant '{variant_id}'; this portfolio has: {known}")

    def to_dict(self) -> dict:
        """Plain JSON data (numpy scalars and arrays become Python numbers and lists)."""
        data = {
            "schema": self.schema,
            "name": self.name,
            "created": self.created,
            "exporter": dict(self.exporter),
            "task": self.task,
            "inputs": [asdict(spec) for spec in self.inputs],
            "outputs": [asdict(spec) for spec in self.outputs],
            "labels": None if self.labels is None else list(self.labels),
            "preprocessing": None if self.preprocessing is None else asdict(self.preprocessing),
            "language_model": None if self.language_model is None else asdict(self.language_model),
            "evaluation": None if self.evaluation is None else asdict(self.evaluation),
            "default_variant": self.default_variant,
            "variants": [asdict(variant) for variant in self.variants],
        }
        return _to_json_value(data, "")

    @classmethod
    def from_dict(cls, data: dict, source: str = MANIFEST_FILE) -> Manifest:
        """Parse and validate; a PortfolioError names the offending field path."""
        if not isinstance(data, dict):
            raise PortfolioError(f"{source}: the top level must be a JSON object")
        top = _Fields(source, "", data)
        schema = top.text("schema")
        if schema != SCHEMA:
            raise PortfolioError(
                f"{source}: schema '{schema}' is not supported (this agent reads {SCHEMA}); "
                "upgrade the agent or re-export"
            )
        preprocessing = top.child("preprocessing", optional=True)
        language_model = top.child("language_model", optional=True)
        evaluation = top.child("evaluation", optional=True)
        manifest = cls(
            schema=schema,
            name=top.text("name"),
            created=top.text("created"),
            exporter=top.text_map("exporter", optional=True) or {},
            task=top.text("task"),
            inputs=[_tensor_spec(item) for item in top.children("inputs")],
            outputs=[_tensor_spec(item) for item in top.children("outputs")],
            labels=top.texts("labels", optional=True),
            preprocessing=None if preprocessing is None else _preprocessing(preprocessing),
            language_model=None if language_model is None else _language_model(language_model),
            evaluation=None if evaluation is None else _evaluation_file(evaluation),
            default_variant=top.text("default_variant"),
            variants=[_variant(item) for item in top.children("variants")],
        )
        _check_manifest(manifest, source)
        return manifest


# --------------------------------------------------------------------------- parsing


class _Fields:
    """Typed access to one JSON object; errors name the field's path inside the manifest."""

    def __init__(self, source: str, path: str, data: dict):
        self.source = source
        self.path = path
        self.data = data

    def where(self, key: str | int) -> str:
        if isinstance(key, int):
            return f"{self.path}[{key}]"
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str | int, reason: str) -> PortfolioError:
        return PortfolioError(f"{self.source}: {self.where(key)} {reason}")

    def _get(self, key: str, optional: bool) -> Any:
        if key not in self.data:
            if optional:
                return None
            raise self.error(key, "is missing")
        return self.data[key]

    def _typed(self, key: str, value: Any, kind: str, ok: bool) -> Any:
        if not ok:
            got = "null" if value is None else type(value).__name__
            raise self.error(key, f"must be {kind}, got {got}")
        return value

    def text(self, key: str, optional: bool = False) -> Any:
        value = self._get(key, optional)
        if value is None and optional:
            return None
        return self._typed(key, value, "a string", isinstance(value, str))

    def nullable_text(self, key: str) -> str | None:
        """Required key whose value may be null."""
        value = self._get(key, optional=False)
        return None if value is None else self.text(key)

    def integer(self, key: str) -> int:
        value = self._get(key, optional=False)
        return self._typed(key, value, "an integer", _is_int(value))

    def nullable_integer(self, key: str) -> int | None:
        """Required key whose value may be null."""
        value = self._get(key, optional=False)
        return None if value is None else self.integer(key)

    def number(self, key: str) -> float:
        value = self._get(key, optional=False)
        self._typed(key, value, "a number", _is_number(value))
        if not math.isfinite(value):
            raise self.error(key, f"must be finite, got {value}")
        return float(value)

    def mapping(self, key: str, optional: bool = False) -> dict | None:
        value = self._get(key, optional)
        if value is None and optional:
            return None
        return self._typed(key, value, "an object", isinstance(value, dict))

    def child(self, key: str, optional: bool = False) -> _Fields | None:
        value = self.mapping(key, optional)
        return None if value is None else _Fields(self.source, self.where(key), value)

    def nullable_child(self, key: str) -> _Fields | None:
        """Required key whose value may be null."""
        self._get(key, optional=False)
        return self.child(key, optional=True)

    def sequence(self, key: str, optional: bool = False) -> list | None:
        value = self._get(key, optional)
        if value is None and optional:
            return None
        return self._typed(key, value, "a list", isinstance(value, list))

    def children(self, key: str) -> list[_Fields]:
        items = self.sequence(key)
        if not items:
            raise self.error(key, "must not be empty")
        owner = _Fields(self.source, self.where(key), {})
        result = []
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                raise owner.error(index, f"must be an object, got {type(item).__name__}")
            result.append(_Fields(self.source, owner.where(index), item))
        return result

    def _sequence_of(self, key: str, kind: str, check, optional: bool) -> list | None:
        items = self.sequence(key, optional)
        if items is None:
            return None
        owner = _Fields(self.source, self.where(key), {})
        for index, item in enumerate(items):
            if not check(item):
                got = "null" if item is None else type(item).__name__
                raise owner.error(index, f"must be {kind}, got {got}")
        return list(items)

    def integers(self, key: str, optional: bool = False) -> list[int] | None:
        return self._sequence_of(key, "an integer", _is_int, optional)

    def numbers(self, key: str) -> list[float]:
        items = self._sequence_of(key, "a finite number", _is_finite_number, optional=False)
        return [float(item) for item in items]

    def texts(self, key: str, optional: bool = False) -> list[str] | None:
        return self._sequence_of(key, "a string", lambda item: isinstance(item, str), optional)

    def text_map(self, key: str, optional: bool = False) -> dict[str, str] | None:
        value = self.mapping(key, optional)
        if value is None:
            return None
        node = _Fields(self.source, self.where(key), value)
        return {name: node.text(name) for name in value}

    def number_map(self, key: str, optional: bool = False) -> dict[str, float] | None:
        value = self.mapping(key, optional)
        if value is None:
            return None
        node = _Fields(self.source, self.where(key), value)
        return {name: node.number(name) for name in value}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def _tensor_spec(node: _Fields) -> TensorSpec:
    spec = TensorSpec(
        name=node.text("name"),
        dtype=node.text("dtype"),
        shape=node.integers("shape"),
        layout=node.text("layout", optional=True),
    )
    if any(dim < 1 and dim != -1 for dim in spec.shape):
        raise node.error("shape", f"must hold positive sizes or -1 (dynamic), got {spec.shape}")
    if spec.layout is not None and spec.layout not in LAYOUTS:
        raise node.error("layout", f"must be one of {', '.join(LAYOUTS)} or null, got '{spec.layout}'")
    return spec


def _preprocessing(node: _Fields) -> Preprocessing:
    pre = Preprocessing(scale=node.number("scale"), mean=node.numbers("mean"), std=node.numbers("std"))
    if len(pre.mean) != len(pre.std):
        raise node.error("std", f"has {len(pre.std)} values but mean has {len(pre.mean)}")
    if any(value == 0 for value in pre.std):
        raise node.error("std", "must not contain 0")
    return pre


def _model_file(node: _Fields) -> ModelFile:
    entry = ModelFile(
        path=node.text("path"),
        sha256=node.text("sha256"),
        bytes=node.integer("bytes"),
        max_abs_diff=node.number("max_abs_diff"),
        input_shape=node.integers("input_shape", optional=True),
        kv_cache=_kv_cache(node.child("kv_cache", optional=True)),
    )
    if not _SHA256_HEX.fullmatch(entry.sha256):
        raise node.error("sha256", "must be 64 lowercase hex digits")
    if entry.bytes < 0:
        raise node.error("bytes", f"must not be negative, got {entry.bytes}")
    if entry.max_abs_diff < 0:
        raise node.error("max_abs_diff", f"must not be negative, got {entry.max_abs_diff}")
    return entry


def _kv_cache(node: _Fields | None) -> KvCache | None:
    if node is None:
        return None
    layers = node.sequence("layers")
    if not layers or not all(isinstance(layer, list) and len(layer) == 2 and all(_is_int(size) and size > 0
                                                                              for size in layer) for layer in layers):
        raise node.error("layers", "must be a non-empty list of [kv_heads, head_dim] pairs of positive integers")
    buffer = node.text("buffer", optional=True)
    buffer = "concat" if buffer is None else buffer
    if buffer not in KV_BUFFERS:
        raise node.error("buffer", f"must be one of {', '.join(KV_BUFFERS)}, got {buffer!r}")
    return KvCache(layers=[list(layer) for layer in layers], buffer=buffer)


def _tokenizer_file(node: _Fields) -> TokenizerFile:
    entry = TokenizerFile(path=node.text("path"), sha256=node.text("sha256"), bytes=node.integer("bytes"))
    if not _SHA256_HEX.fullmatch(entry.sha256):
        raise node.error("sha256", "must be 64 lowercase hex digits")
    if entry.bytes < 0:
        raise node.error("bytes", f"must not be negative, got {entry.bytes}")
    return entry


def _evaluation_file(node: _Fields) -> EvaluationFile:
    entry = EvaluationFile(path=node.text("path"), sha256=node.text("sha256"), bytes=node.integer("bytes"),
                           count=node.integer("count"))
    if not _SHA256_HEX.fullmatch(entry.sha256):
        raise node.error("sha256", "must be 64 lowercase hex digits")
    for key in ("bytes", "count"):
        if getattr(entry, key) < 0:
            raise node.error(key, f"must not be negative, got {getattr(entry, key)}")
    return entry


def _language_model(node: _Fields) -> LanguageModel:
    tokenizer = node.nullable_child("tokenizer")
    language_model = LanguageModel(
        tokenizer=None if tokenizer is None else _tokenizer_file(tokenizer),
        bos_token_id=node.nullable_integer("bos_token_id"),
        eos_token_id=node.nullable_integer("eos_token_id"),
        context_length=node.integer("context_length"),
        chat_template=node.text("chat_template", optional=True),
    )
    for key in ("bos_token_id", "eos_token_id"):
        token_id = getattr(language_model, key)
        if token_id is not None and token_id < 0:
            raise node.error(key, f"must not be negative, got {token_id}")
    if language_model.context_length < 1:
        raise node.error("context_length", f"must be at least 1, got {language_model.context_length}")
    return language_model


def _variant(node: _Fields) -> Variant:
    files = node.child("files")
    for fmt in files.data:
        if fmt not in FORMATS:
            raise files.error(fmt, f"is not a known format (known: {', '.join(FORMATS)})")
    if not files.data:
        raise node.error("files", "must list at least one file")
    variant = Variant(
        id=node.text("id"),
        method=node.text("method"),
        parent=node.nullable_text("parent"),
        density=node.number("density"),
        params=node.integer("params"),
        params_nonzero=node.integer("params_nonzero"),
        macs=node.integer("macs"),
        metrics=node.mapping("metrics"),
        files={fmt: _model_file(files.child(fmt)) for fmt in files.data},
        host_latency_ms=node.number_map("host_latency_ms", optional=True) or {},
        details=node.mapping("details", optional=True) or {},
    )
    if not 0 < variant.density <= 1:
        raise node.error("density", f"must be in (0, 1], got {variant.density}")
    for key in ("params", "params_nonzero", "macs"):
        if getattr(variant, key) < 0:
            raise node.error(key, f"must not be negative, got {getattr(variant, key)}")
    return variant


def _check_manifest(manifest: Manifest, source: str) -> None:
    """Checks across fields; per-field types were checked while parsing."""

    def fail(reason: str) -> PortfolioError:
        return PortfolioError(f"{source}: {reason}")

    if manifest.task not in TASKS:
        raise fail(f"task '{manifest.task}' is not known (known: {', '.join(sorted(TASKS))})")
    try:
        datetime.fromisoformat(manifest.created.replace("Z", "+00:00"))
    except ValueError:
        raise fail(f"created '{manifest.created}' is not an ISO 8601 time") from None
    ids = [variant.id for variant in manifest.variants]
    seen: set[str] = set()
    for index, variant in enumerate(manifest.variants):
        where = f"variants[{index}]"
        if not VARIANT_ID.fullmatch(variant.id):
            raise fail(f"{where}.id '{variant.id}' is malformed (ids match {VARIANT_ID.pattern})")
        if variant.id in seen:
            raise fail(f"{where}.id '{variant.id}' is a duplicate; variant ids must be unique")
        seen.add(variant.id)
        if not known_method(variant.method):
            raise fail(
                f"{where}.method '{variant.method}' is not known (known: {', '.join(sorted(METHODS))}, "
                f"each optionally followed by +{' or +'.join(sorted(TRANSFORMS))})"
            )
        if variant.parent is not None and (variant.parent not in ids or variant.parent == variant.id):
            raise fail(f"{where}.parent '{variant.parent}' is not another variant of this portfolio")
        for fmt, entry in variant.files.items():
            reason = relpath_problem(entry.path)
            if reason:
                raise fail(f"variant '{variant.id}' {fmt} path '{entry.path}' {reason}")
            if entry.kv_cache is not None and manifest.task != "causal-lm":
                raise fail(f"{where}.files.{fmt}.kv_cache is for causal-lm portfolios, not {manifest.task}")
    _check_language_model(manifest, fail)
    if manifest.evaluation is not None:
        reason = relpath_problem(manifest.evaluation.path)
        if reason:
            raise fail(f"evaluation path '{manifest.evaluation.path}' {reason}")
    if manifest.default_variant not in seen:
        raise fail(
            f"default_variant '{manifest.default_variant}' is not a variant id (ids: {', '.join(ids)})"
        )


def _check_language_model(manifest: Manifest, fail) -> None:
    language_model = manifest.language_model
    if manifest.task != "causal-lm":
        if language_model is not None:
            raise fail(f"language_model must be absent or null when task is '{manifest.task}'")
        return
    if language_model is None:
        raise fail(
            "language_model is missing; a causal-lm portfolio needs it "
            "(tokenizer, bos_token_id, eos_token_id, context_length)"
        )
    if manifest.inputs[0].dtype != "int64":
        raise fail(
            f"inputs[0] ('{manifest.inputs[0].name}') must be int64 token ids for a causal-lm portfolio, "
            f"got {manifest.inputs[0].dtype}"
        )
    vocab = manifest.outputs[0].shape[-1] if manifest.outputs[0].shape else -1
    for key in ("bos_token_id", "eos_token_id"):
        token_id = getattr(language_model, key)
        if token_id is not None and vocab > 0 and token_id >= vocab:
            raise fail(f"language_model.{key} {token_id} is outside the vocabulary (outputs[0] has {vocab} logits)")
    if language_model.tokenizer is not None:
        reason = relpath_problem(language_model.tokenizer.path)
        if reason:
            raise fail(f"language_model.tokenizer.path '{language_model.tokenizer.path}' {reason}")


def relpath_problem(relpath: str) -> str | None:
    """Why a manifest path is not a clean relative path inside the portfolio, or None."""
    if not relpath:
        return "is empty"
    if "\\" in relpath or "\0" in relpath:
        return "must use forward slashes only"
    if relpath.startswith("/") or PureWindowsPath(relpath).drive:
        return "is absolute; paths must be relative to the portfolio directory"
    if ".." in relpath.split("/"):
        return "escapes the portfolio directory"
    if posixpath.normpath(relpath) != relpath or relpath == ".":
        return f"is not normalized (expected '{posixpath.normpath(relpath)}')"
    return None


def _to_json_value(value: Any, where: str) -> Any:
    """Plain JSON-compatible copy; NaN and infinity are refused because JSON cannot carry them."""
    if isinstance(value, dict):
        return {
            str(key): _to_json_value(item, f"{where}.{key}" if where else str(key))
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_to_json_value(item, f"{where}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        raise PortfolioError(
            f"{MANIFEST_FILE}: {where} is {value}, which JSON cannot carry; use null instead"
        )
    return value
