"""Weight-only int4 and int8 twins of an exported causal LM, by onnxruntime's block-wise quantizer.

Every MatMul whose second operand is a constant weight (the seven projections of each decoder
layer and the output head) becomes a MatMulNBits: symmetric `bits`-bit weights in blocks of
`block_size` input features, one float scale per block. Activations stay float; with
accuracy_level 4 onnxruntime computes the products in int8 on CPUs that have int8 dot products
(x86 VNNI, Arm dotprod), where the speed of 4-bit LMs comes from. Attention's own MatMuls (two
activations) stay float. The file shrinks by about 8x (int4) or 4x (int8) on the weights. An int4
twin's embedding table, gathered rather than multiplied, becomes a GatherBlockQuantized in the same
4-bit blocks along the hidden axis, as onnxruntime-genai's int4 builder makes it (SmolLM2-135M: the
file 191 -> 100 MiB, held-out perplexity 38.4 -> 39.0, fp32 31.8); where the quantizer cannot take
it, the table stays float32 and the result says so. The quantizer then labels the file opset 21 (the
first with 4-bit tensors) without converting it; the twin's perplexity and kernel check run on that
file (exporter.mosaic.quantized). An int8 twin keeps its table float. A head tied to the embedding
exports as MatMul(x, Transpose(embedding)), which the quantizer skips (its weight is not a constant);
it gets its own transposed copy first, so the head, a fifth of a small LM, is quantized too. In an
int4 twin the two then hold the same 4-bit blocks (the same values and scales: checked, not
assumed), so the table gathers from the head's weights, as genai's builder shares them (SmolLM2-135M:
file 99.6 -> 82.8 MiB; the logits are bit-identical).
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from exporter.quantize.common import QuantizationUnsupported, one_line

BITS = (4, 8)
BLOCK_SIZE = 32           # the common choice of GGUF's Q4_0/Q8_0 and onnxruntime-genai's int4 builder
ACCURACY_LEVEL = 4        # int8 compute for the dot products (MatMulNBits' fastest CPU path)


@dataclass(frozen=True)
class WeightOnlyResult:
    path: Path
    bits: int
    block_size: int
    quantized: int            # MatMuls turned into MatMulNBits
    kept_float: int           # MatMuls left float (two activations, or a weight the quantizer refused)
    embedding_quantized: bool = False  # the embedding table gathered from 4-bit blocks
    embedding_shares_head: bool = False  # ... the output head's own blocks (a tied model's int4 twin)


def quantize_weights(source: Path, target: Path, bits: int, block_size: int = BLOCK_SIZE) -> WeightOnlyResult:
    """Write `target`: `source` with its constant-weight MatMuls as `bits`-bit MatMulNBits.

    Raises QuantizationUnsupported (keep the float variant) when the quantizer fails or finds no
    weight to quantize; nothing is left at `target` then.
    """
    if bits not in BITS:
        raise ValueError(f"weight-only bits must be one of {BITS}, got {bits}")
    quantized_model = None
    if bits == 4:
        try:
            quantized_model = _quantized(source, bits, block_size, with_embedding=True)
        except Exception:  # noqa: BLE001 - the table stays float; the MatMuls alone are tried below
            quantized_model = None
    if quantized_model is None:
        try:
            quantized_model = _quantized(source, bits, block_size, with_embedding=False)
        except Exception as error:  # noqa: BLE001 - any quantizer failure means: no twin, float kept
            raise QuantizationUnsupported(f"onnxruntime's {bits}-bit weight quantizer failed: {one_line(error)}",
                                          op="MatMul") from None
    shared = bits == 4 and _share_tied_table(quantized_model)
    after = Counter(node.op_type for node in quantized_model.graph.node)
    if after["MatMulNBits"] == 0:
        raise QuantizationUnsupported("no MatMul with a constant weight to quantize", op="MatMul")
    target = Path(target)
    partial = target.with_name(target.name + ".partial")
    onnx.save(quantized_model, str(partial))
    partial.replace(target)
    return WeightOnlyResult(target, bits, block_size, after["MatMulNBits"], after["MatMul"],
                            embedding_quantized=after["GatherBlockQuantized"] > 0, embedding_shares_head=shared)


def _quantized(source: Path, bits: int, block_size: int, with_embedding: bool) -> onnx.ModelProto:
    """`source` with its constant-weight MatMuls (and, with_embedding, its Gathers) block-quantized."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(source))
    _untie_transposed_weights(model)
    gathers = {"op_types_to_quantize": ("MatMul", "Gather"), "quant_axes": (("MatMul", 0), ("Gather", 1))}
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                     accuracy_level=ACCURACY_LEVEL, **(gathers if with_embedding else {}))
    quiet = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it logs every node it skips at INFO, and the opset relabel at WARNING
    try:
        quantizer.process()
    finally:
        quiet.setLevel(level)
    return quantizer.model.model


def _untie_transposed_weights(model: onnx.ModelProto) -> None:
    """MatMul(x, Transpose(W)) with W a constant [K, N] -> MatMul(x, W^T) on a copy of its own."""
    graph = model.graph
    constants = {item.name: item for item in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    for node in graph.node:
        transpose = producers.get(node.input[1]) if node.op_type == "MatMul" else None
        if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in constants:
            continue
        perm = [list(attribute.ints) for attribute in transpose.attribute if attribute.name == "perm"]
        weight = numpy_helper.to_array(constants[transpose.input[0]])
        if weight.ndim != 2 or perm not in ([], [[1, 0]]):
            continue
        name = f"{transpose.input[0]}.transposed"
        if name not in constants:
            constants[name] = numpy_helper.from_array(np.ascontiguousarray(weight.T), name)
            graph.initializer.append(constants[name])
        node.input[1] = name
    used = {name for node in graph.node for name in node.input} | {output.name for output in graph.output}
    unused = [node for node in graph.node if node.op_type == "Transpose" and not set(node.output) & used]
    for node in unused:
        graph.node.remove(node)


def _share_tied_table(model: onnx.ModelProto) -> bool:
    """Point a GatherBlockQuantized table at a MatMulNBits head holding the same 4-bit blocks; True if done.

    MatMulNBits keeps its weight as uint8 [N, blocks, 16] (two values a byte, low nibble first, zero point
    8), the Gather as int4 [N, K]; the Gather reads the same bytes as uint8 [N, K / 2] with `bits` 4
    (zero point 8 too). Only where every value and scale is equal, so the model computes exactly as before.
    """
    graph = model.graph
    constants = {item.name: item for item in graph.initializer}
    heads = [node for node in graph.node if node.op_type == "MatMulNBits" and _attributes(node).get("bits") == 4]
    for gather in (node for node in graph.node if node.op_type == "GatherBlockQuantized"):
        head = next((head for head in heads if _same_blocks(gather, head, constants)), None)
        if head is not None:
            _gather_from_head(graph, gather, head, constants)
            return True
    return False


def _same_blocks(gather: onnx.NodeProto, head: onnx.NodeProto, constants: dict) -> bool:
    """Whether the Gather's int4 table [N, K] and scales are the head's 4-bit blocks and scales, value by value."""
    options = _attributes(gather)
    names = (gather.input[0], gather.input[2], *head.input[1:3])
    if (len(gather.input) > 3 or options.get("quantize_axis") != 1
            or _attributes(head).get("block_size") != options.get("block_size")
            or not all(name in constants for name in names)):
        return False
    sizes = [int(np.prod(constants[name].dims)) for name in names]  # before reading any array: only the head fits
    if len(constants[names[0]].dims) != 2 or sizes[2] * 2 != sizes[0] or sizes[3] != sizes[1]:
        return False
    table, scales, packed, head_scales = (numpy_helper.to_array(constants[name]) for name in names)
    return (str(table.dtype) == "int4" and np.array_equal(head_scales.reshape(scales.shape), scales)
            and np.array_equal(_unpacked(packed, table.shape), table.astype(np.int16) + 8))


def _gather_from_head(graph: onnx.GraphProto, gather: onnx.NodeProto, head: onnx.NodeProto, constants: dict) -> None:
    """The Gather reads the head's blocks (a Reshape of them to [N, K / 2] uint8) and scales; its own go."""
    rows, columns = constants[gather.input[0]].dims
    shape_name, table = f"{head.input[1]}.as_table_shape", f"{head.input[1]}.as_table"
    graph.initializer.append(numpy_helper.from_array(np.array([rows, columns // 2], np.int64), shape_name))
    graph.node.insert(list(graph.node).index(gather),
                      onnx.helper.make_node("Reshape", [head.input[1], shape_name], [table], name=table))
    replaced = [gather.input[0], gather.input[2]]
    gather.input[0], gather.input[2] = table, head.input[2]
    kept = [attribute for attribute in gather.attribute if attribute.name != "bits"]
    del gather.attribute[:]
    gather.attribute.extend(kept + [onnx.helper.make_attribute("bits", 4)])
    read = {name for node in graph.node for name in node.input}
    for name in replaced:
        if name not in read:
            graph.initializer.remove(constants[name])


def _unpacked(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """MatMulNBits' uint8 blocks as one 4-bit value per element, [N, K], low nibble first."""
    flat = packed.reshape(shape[0], -1).astype(np.int16)
    values = np.empty((shape[0], flat.shape[1] * 2), np.int16)
    values[:, 0::2], values[:, 1::2] = flat & 0x0F, flat >> 4
    return values[:, :shape[1]]


def _attributes(node: onnx.NodeProto) -> dict:
    return {attribute.name: onnx.helper.get_attribute_value(attribute) for attribute in node.attribute}
