"""Export a causal LM to ONNX (input_ids [batch, seq] int64 -> logits [batch, seq, vocab] float32).

No KV cache: every call scores the whole sequence. Layers may differ in head count and intermediate
size (a shrunk Mosaic model): each attention reshapes with -1 and reads its own
num_key_value_groups, so the exported graph simply carries each layer's sizes as constants.
The default sdpa attention exports as is; with a dynamic sequence length its causal mask is built
inside the graph, so the file serves any length (one token included).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from exporter.errors import ExportError
from exporter.export import check_outputs, eval_mode, run_quietly

INPUT_NAME = "input_ids"
OUTPUT_NAME = "logits"
# float32 reduction order differs between torch and onnxruntime: on SmolLM2-135M (30 layers, logits
# up to about 35) the two agree to about 1.3e-4, while a wrong mask, head grouping or position
# encoding moves logits by order 1. 1e-3 absolute sits between the two.
LOGITS_ATOL = 1e-3


class _LogitsOnly(nn.Module):
    """input_ids -> logits, without the cache or the output dataclass, for torch.export."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def export_causal_lm_onnx(model: nn.Module, path: Path, check_ids: torch.Tensor, *, atol: float = LOGITS_ATOL) -> float:
    """Export `model` as one self-contained ONNX file and return its max abs logits difference from torch.

    Batch and sequence length are dynamic. The file is checked in onnxruntime on `check_ids` and on
    a second batch of another shape (one more row, three more tokens); above `atol` is an ExportError.
    The graph is traced on that second batch: torch.export fixes any dimension whose example size is 1.
    """
    path = Path(path)
    vocab = _vocab_size(model)
    _require_ids(check_ids, vocab)
    batch, seq = check_ids.shape
    other_ids = torch.randint(0, vocab, (batch + 1, seq + 3), generator=torch.Generator().manual_seed(0))
    path.parent.mkdir(parents=True, exist_ok=True)
    with eval_mode(model):
        wrapper = _LogitsOnly(model).eval()
        expected = [_torch_logits(wrapper, ids) for ids in (check_ids, other_ids)]

        def export() -> None:
            torch.onnx.export(
                wrapper,
                (other_ids,),
                str(path),
                dynamo=True,
                external_data=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1), 1: torch.export.Dim("seq", min=2)},),
                verbose=False,
            )

        run_quietly("ONNX export", path, export, hint="check that the model is a stock transformers causal LM")

    session = run_quietly(
        "loading the exported ONNX model",
        path,
        lambda: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]),
        hint="re-run the export; the file may be incomplete",
    )
    fixed = [size for size in session.get_inputs()[0].shape if not isinstance(size, str)]
    if fixed:
        raise ExportError(
            f"ONNX export at {path} has fixed input sizes {fixed}, not dynamic batch and sequence: "
            "check that the model has no shape-dependent Python control flow"
        )
    differences = []
    for ids, logits in zip((check_ids, other_ids), expected, strict=True):
        shape = list(ids.shape)
        actual = run_quietly(
            f"running the ONNX model on input_ids {shape}",
            path,
            lambda ids=ids: session.run([OUTPUT_NAME], {INPUT_NAME: ids.cpu().numpy()})[0],
            hint="the exported graph may not accept this shape",
        )
        differences.append(check_outputs(logits, actual, atol, path, runtime=f"ONNX (input_ids {shape})", relative=False))
    return max(differences)


def _torch_logits(wrapper: nn.Module, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        logits = wrapper(ids)
    if not bool(torch.isfinite(logits).all()):
        raise ExportError(f"the model gives NaN or inf logits on input_ids {list(ids.shape)}: fix the model first")
    return logits.float().numpy()


def _vocab_size(model: nn.Module) -> int:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 1:
        raise ExportError(
            f"{type(model).__name__} has no config.vocab_size: pass a transformers causal LM (e.g. LlamaForCausalLM)"
        )
    return vocab


def _require_ids(check_ids: torch.Tensor, vocab: int) -> None:
    if not isinstance(check_ids, torch.Tensor) or check_ids.dtype != torch.int64 or check_ids.dim() != 2:
        got = f"{check_ids.dtype} {list(check_ids.shape)}" if isinstance(check_ids, torch.Tensor) else type(check_ids).__name__
        raise ExportError(f"check_ids is {got}, not int64 input_ids [batch, seq]: pass token ids as a 2-D long tensor")
    if check_ids.numel() == 0:
        raise ExportError(f"check_ids has shape {list(check_ids.shape)}: pass at least one sequence of at least one token")
    if int(check_ids.min()) < 0 or int(check_ids.max()) >= vocab:
        raise ExportError(f"check_ids holds ids outside [0, {vocab}): tokenize with the model's own tokenizer")
