"""What the int8 paths share: the dedicated failure, the calibration batch, naming the op that failed."""
from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np
import torch

from exporter.errors import ExportError

CALIBRATION_COUNT = 256  # training images the activation ranges are measured on
CALIBRATION_SEED = 0


class QuantizationUnsupported(ExportError):
    """The quantizer (or the runtime, on its result) cannot handle an op of this model: keep the float variant.

    The message is one line naming the op; the caller adds the variant, e.g.
    ``log(f"warning: no int8 twin of {variant.id}: {error}")``.
    """

    def __init__(self, message: str, op: str | None = None):
        super().__init__(message)
        self.op = op


def calibration_batch(train_x: torch.Tensor, input_shape: list[int] | tuple[int, ...], *,
                      count: int = CALIBRATION_COUNT, seed: int = CALIBRATION_SEED) -> np.ndarray:
    """A seeded choice of `count` training images, checked against the model's input shape [C, H, W]."""
    expected = [int(size) for size in input_shape]
    shown = "[N, " + ", ".join(str(size) for size in expected) + "]"
    if not isinstance(train_x, torch.Tensor) or list(train_x.shape[1:]) != expected or len(train_x) == 0:
        got = list(train_x.shape) if hasattr(train_x, "shape") else type(train_x).__name__
        raise ExportError(f"calibration data must be float32 images of shape {shown} like the model's input, "
                          f"got {got}: pass the dataset the model was trained on")
    if train_x.dtype != torch.float32:
        raise ExportError(f"calibration data must be float32 of shape {shown}, got {train_x.dtype}: "
                          "convert it with .float()")
    chosen = np.random.default_rng(seed).choice(len(train_x), size=min(count, len(train_x)), replace=False)
    return np.ascontiguousarray(train_x[torch.from_numpy(np.sort(chosen))].numpy())


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text[:300] + ("..." if len(text) > 300 else "")


def failing_op(error: BaseException, nodes: dict[str, str]) -> str | None:
    """The op type the failure is about, found from `nodes` (node name -> op type) or the error's text.

    The quantizers do not say which node they were working on when they raise, so the traceback's
    frames are searched (innermost first) for the node being processed: a local `node` (an ONNX
    NodeProto or similar with op_type), ai-edge-quantizer's `op_info`, or anything carrying a
    `node_name`, and the error text for a node name or an "Op (Type)" as onnxruntime writes it.
    """
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        for frame_locals in reversed(list(_frame_locals(cause))):
            node = frame_locals.get("node")
            op_type = getattr(node, "op_type", None)
            if isinstance(op_type, str) and op_type:
                return op_type
            op_name = getattr(frame_locals.get("op_info"), "op_name", None)  # ai-edge-quantizer's OpInfo
            if op_name is not None:
                return str(getattr(op_name, "value", op_name))
            for value in frame_locals.values():
                name = getattr(value, "node_name", None)
                if isinstance(name, str) and name in nodes:
                    return nodes[name]
            name = frame_locals.get("node_name")
            if isinstance(name, str) and name in nodes:
                return nodes[name]
        text = str(cause)
        match = re.search(r"Op \((\w+)\)", text)
        if match:
            return match.group(1)
        match = re.search(r"Node \(([^)]*)\)", text)
        if match and match.group(1) in nodes:
            return nodes[match.group(1)]
        cause = cause.__cause__ or cause.__context__
    return None


def _frame_locals(error: BaseException) -> Iterable[dict]:
    trace = error.__traceback__
    while trace is not None:
        yield trace.tb_frame.f_locals
        trace = trace.tb_next

