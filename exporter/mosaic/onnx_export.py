"""Export a causal LM to ONNX with a KV cache, under onnxruntime-genai's input and output names.

    inputs   input_ids                     int64   [batch, sequence]
             attention_mask                int64   [batch, past + sequence]   1 for a real token, 0 for padding
             past_key_values.{i}.key       float32 [batch, kv_heads_i, past, head_dim_i]   (and .value)
    outputs  logits                        float32 [batch, sequence, vocab]   for the new positions only
             present.{i}.key               float32 [batch, kv_heads_i, past + sequence, head_dim_i]   (and .value)

Batch, sequence and past are dynamic; past 0 is the prefill (zero-size cache tensors, which
onnxruntime takes). Each layer keeps its own key-value head count (GQA heads are not repeated in
the cache) and head size, so a shrunk Mosaic model exports as is. Positions come from the
attention mask (cumulative sum - 1, as transformers' generate does), so left padding works.

A model whose attention exports as onnxruntime's GroupQueryAttention (the manifest's kv_cache buffer
"shared", `cache_entry`) also takes as past a buffer longer than past + sequence: its valid length is
the attention mask's, and present is the same buffer with the new positions written in, so past and
present bound to one array (agent.kv_cache) make a decode step that copies no cache. Such a file reads
each row's length from the mask as onnxruntime-genai's models do: no padding, and several tokens after
a past in a batch of one row only.
"""

from __future__ import annotations

import inspect
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from agent.backends.onnx import OnnxRuntimeSession
from agent.kv_cache import cache_inputs, empty_cache, in_place, shared_cache, shared_inputs
from agent.manifest import KvCache
from exporter.errors import ExportError
from exporter.export import eval_mode, run_quietly

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
LOGITS = "logits"
# torch and onnxruntime sum float32 in different orders: on SmolLM2-135M (logits up to about 35)
# they differ by up to 0.0019 (AVX-512), 5e-5 of the largest logit. On 32 tokens of WikiText-2, a
# causal mask that lets positions see later tokens moves logits by 0.73 of the largest (KL up to
# 8.6 nats, top-1 changed at 91% of positions), two KV heads swapped in every layer by 1.21 (KL 12).
# Each bound leaves a correct export 20x or more and fails those by 70x or more.
LOGITS_RTOL = 1e-2     # max |difference| / max(1, max |torch logit|)
TIE_RTOL = 1e-3        # top-1 may change only where torch's two best logits are this close (relative)
KL_MAX = 1e-3          # KL(torch || onnx) of the next-token distributions, nats, at every position


def past_names(layer: int) -> tuple[str, str]:
    return f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"


def present_names(layer: int) -> tuple[str, str]:
    return f"present.{layer}.key", f"present.{layer}.value"


def cache_entry(model: nn.Module) -> KvCache:
    """The manifest's kv_cache of the file export_causal_lm_onnx writes for `model`."""
    return KvCache(cache_layers(model), "shared" if _fused_tables(model) is not None else "concat")


def cache_layers(model: nn.Module) -> list[list[int]]:
    """[kv_heads, head_dim] of every layer's cache: what the manifest's kv_cache lists."""
    layers = []
    for layer in model.model.layers:
        attention = layer.self_attn
        head_dim = int(attention.head_dim)
        layers.append([attention.k_proj.out_features // head_dim, head_dim])
    return layers


class _CachedLm(nn.Module):
    """(input_ids, attention_mask, past keys and values) -> (logits, present keys and values), for torch.export."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        from transformers import DynamicCache

        self.model = model
        self.cache_type = DynamicCache
        # transformers 5 renamed the argument past_key_values to cache
        self.cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.fused_attention = False  # set while the attention exports fused (_export)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, past: tuple[torch.Tensor, ...]):
        cache = self.cache_type(ddp_cache_data=list(zip(past[0::2], past[1::2])))
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
        # transformers sizes its mask by the cache tensors' length, which for a shared buffer is not the valid
        # length: the fused attention reads the attention mask itself (a 4-D mask passes transformers as is)
        mask = attention_mask[:, None, None, :] if self.fused_attention else attention_mask
        logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                            use_cache=True, **{self.cache_argument: cache}).logits
        return (logits, *[tensor for layer in cache.layers for tensor in (layer.keys, layer.values)])


def export_causal_lm_onnx(model: nn.Module, path: Path, check_ids: torch.Tensor) -> float:
    """Export `model` with a KV cache as one self-contained ONNX file, checked (check_causal_lm_onnx).

    Traced on batch >= 2, sequence 2 and past 3: torch.export would fix any dimension whose example
    size is 0 or 1. Returns the max abs logits difference from torch.
    """
    path = Path(path)
    vocab = _vocab_size(model)
    _require_ids(check_ids, vocab)
    layers = cache_layers(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    with eval_mode(model):
        wrapper = _CachedLm(model).eval()
        batch = len(check_ids) + 1
        ids = torch.randint(0, vocab, (batch, 2), generator=torch.Generator().manual_seed(0))
        past = tuple(torch.from_numpy(array) for array in _random_cache(batch, layers, 3))
        example = (ids, torch.ones(batch, 5, dtype=torch.int64), past)
        run_quietly("ONNX export", path, lambda: _export(wrapper, example, layers, path),
                    hint="check that the model is a stock transformers causal LM")
    return check_causal_lm_onnx(model, path, check_ids)


def check_causal_lm_onnx(model: nn.Module, path: Path, check_ids: torch.Tensor) -> float:
    """Max abs logits difference of the ONNX file at `path` from the model's own full-sequence logits.

    In onnxruntime: a prefill of `check_ids`, and on a second batch (one more row, three more
    tokens) a prefill, a two-token chunk and a one-token step, each fed the presents of the call
    before. For a shared cache (cache_entry) the second batch takes its three tokens one by one,
    and its first row the prefill, two and one in place in buffers two positions longer than it,
    as the agent decodes. ExportError when the logits differ (check_logits) or the file's sizes are
    not dynamic.
    """
    path = Path(path)
    vocab = _vocab_size(model)
    _require_ids(check_ids, vocab)
    batch, seq = check_ids.shape
    other_ids = torch.randint(0, vocab, (batch + 1, seq + 3), generator=torch.Generator().manual_seed(0))
    layers = cache_layers(model)
    with eval_mode(model):
        expected = [_torch_logits(model, ids) for ids in (check_ids, other_ids)]
    session = run_quietly(
        "loading the exported ONNX model", path,
        lambda: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]),
        hint="re-run the export; the file may be incomplete",
    )
    inputs = session.get_inputs()
    if any(not isinstance(item.shape[0], str) for item in inputs) or any(not isinstance(item.shape[2], str)
                                                                         for item in inputs[2:]):
        raise ExportError(f"ONNX export at {path} has fixed batch or past sizes, not dynamic ones: "
                          "check that the model has no shape-dependent Python control flow")
    prefill = _run_cached(session, path, check_ids.numpy(), layers, [seq])
    differences = [check_logits(expected[0], prefill, path, f"ONNX prefill of input_ids {list(check_ids.shape)}")]
    if cache_entry(model).buffer == "shared":  # several tokens after a past in one row only
        steps = _run_cached(session, path, other_ids.numpy(), layers, [seq, 1, 1, 1])
        differences.append(check_logits(expected[1], steps, path, f"ONNX prefill of {seq} tokens, then 1, 1 and 1 "
                                                                  f"(batch {batch + 1})"))
        steps = _run_in_place(session, path, other_ids[:1].numpy(), layers, [seq, 2, 1])
        differences.append(check_logits(expected[1][:1], steps, path, f"ONNX prefill of {seq} tokens, then 2, then 1 "
                                                                      "in a shared cache buffer"))
    else:
        steps = _run_cached(session, path, other_ids.numpy(), layers, [seq, 2, 1])
        differences.append(check_logits(expected[1], steps, path,
                                        f"ONNX prefill of {seq} tokens, then 2, then 1 (batch {batch + 1})"))
    return max(differences)


def _export(wrapper: nn.Module, example: tuple, layers: list[list[int]], path: Path) -> None:
    batch = torch.export.Dim("batch_size", min=1)
    past = torch.export.Dim("past_sequence_length", min=0)
    cache_dims = tuple({0: batch, 2: past} for _ in range(2 * len(layers)))
    with _fused_attention(wrapper.model) as fused:
        wrapper.fused_attention = fused
        torch.onnx.export(
            wrapper, example, str(path), dynamo=True, external_data=False, verbose=False,
            custom_translation_table=_contrib_translations() if fused else None,
            input_names=[INPUT_IDS, ATTENTION_MASK, *[n for i in range(len(layers)) for n in past_names(i)]],
            output_names=[LOGITS, *[n for i in range(len(layers)) for n in present_names(i)]],
            dynamic_shapes=({0: batch, 1: torch.export.Dim("sequence_length", min=1)},
                            {0: batch, 1: torch.export.Dim("total_sequence_length", min=1)}, cache_dims),
        )
    model = onnx.load(str(path))
    divisions = _rms_norm_as_division(model)
    if divisions + (_skip_rms_norms(model) if fused else 0):
        onnx.save(model, str(path))


GROUPED_ATTENTION = "edgeshift_grouped"


@contextmanager
def _grouped_attention(model: nn.Module):
    """The model's attention as `_grouped_attention_forward` while exporting; its own implementation after.

    transformers' attention (sdpa or eager) repeats every cached key and value head for each query head
    of its group (repeat_kv) and exports the key's transpose after that copy: per layer and decode step,
    an Expand and a Transpose of 3x the cache (SmolLM2: 3 KV heads for 9 query heads) that onnxruntime
    cannot fuse away. Grouping the query heads instead reads the cache as it is.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "_attn_implementation"):
        yield
        return
    AttentionInterface.register(GROUPED_ATTENTION, _grouped_attention_forward)
    AttentionMaskInterface.register(GROUPED_ATTENTION, eager_mask)  # additive float masks, as eager has
    before = config._attn_implementation
    config._attn_implementation = GROUPED_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before


def _grouped_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               attention_mask: torch.Tensor | None, scaling: float | None = None,
                               dropout: float = 0.0, **kwargs):
    """Eager attention without repeat_kv: query [B, H, S, D] read as [B, KV, H/KV * S, D] against
    key and value [B, KV, T, D]; head h uses KV head h // (H/KV), as repeat_kv pairs them."""
    batch, heads, length, head_dim = query.shape
    kv_heads = key.shape[1]
    if (heads % kv_heads or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None
            or kwargs.get("sinks") is not None or (attention_mask is not None and attention_mask.dtype == torch.bool)):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = heads // kv_heads
    scale = head_dim ** -0.5 if scaling is None else scaling
    grouped = query.reshape(batch, kv_heads, groups * length, head_dim)
    scores = torch.matmul(grouped, key.transpose(2, 3)) * scale  # [B, KV, G * S, T]
    if attention_mask is not None:
        total = scores.shape[-1]
        scores = (scores.reshape(batch, kv_heads, groups, length, total)
                  + attention_mask.unsqueeze(2)).reshape(batch, kv_heads, groups * length, total)
    weights = torch.softmax(scores, dim=-1)
    output = torch.matmul(weights, value).reshape(batch, heads, length, head_dim)
    return output.transpose(1, 2).contiguous(), None


def _graph_index(graph) -> tuple[dict, dict[str, list], set[str]]:
    """Each tensor's producing node, each tensor's reading nodes, and the graph's output names."""
    producers = {output: node for node in graph.node for output in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return producers, consumers, {item.name for item in graph.output}


def _rms_norm_as_division(model) -> int:
    """Mul(x, Reciprocal(Sqrt(v))) -> Div(x, Sqrt(v)) in place; returns how many Reciprocals went.

    torch exports RMSNorm's x * rsqrt(mean(x^2) + eps) as Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul,
    Mul(weight): seven nodes a norm, which onnxruntime runs one by one. Its SimplifiedLayerNormalization
    fusion matches the Div form only (SmolLM2-135M int4: 61 norms fused, 2100 nodes -> 1734 after
    optimization; a few percent of a decode step). x / sqrt(v) is what rsqrt computes, to a rounding.
    """
    graph = model.graph
    producers, consumers, outputs = _graph_index(graph)
    removed = []
    for node in graph.node:
        if node.op_type != "Reciprocal" or node.domain not in ("", "ai.onnx"):
            continue
        sqrt = producers.get(node.input[0])
        users = consumers.get(node.output[0], [])
        if (sqrt is None or sqrt.op_type != "Sqrt" or node.output[0] in outputs or not users
                or any(user.op_type != "Mul" or user.domain not in ("", "ai.onnx") or len(user.input) != 2
                       or list(user.input).count(node.output[0]) != 1 for user in users)):
            continue
        for user in users:
            other = user.input[0] if user.input[1] == node.output[0] else user.input[1]
            user.op_type = "Div"
            del user.input[:]
            user.input.extend([other, sqrt.output[0]])
        removed.append(node)
    for node in removed:
        graph.node.remove(node)
    return len(removed)


def _skip_rms_norms(model) -> int:
    """Each residual Add feeding an RMSNorm in Div form (_rms_norm_as_division) -> one onnxruntime
    SkipSimplifiedLayerNormalization giving the norm and the sum, in place; returns how many.

    onnxruntime fuses the norm alone but never the Add before it, whose sum the next residual Add also
    reads: 60 Add nodes of SmolLM2-135M's decode step run apart, which genai's builder writes fused.
    Matched: Add(a, b) of two same-shaped 3-D tensors, Pow(sum, 2), ReduceMean over the last axis,
    Add(eps), Sqrt, Div(sum, root), Mul by the weight; each intermediate read by the next only.
    """
    graph = model.graph
    constants = {item.name: onnx.numpy_helper.to_array(item) for item in graph.initializer}
    shapes = {item.name: [d.dim_param or d.dim_value for d in item.type.tensor_type.shape.dim]
              for item in [*graph.value_info, *graph.input] if item.type.tensor_type.HasField("shape")}
    producers, consumers, outputs = _graph_index(graph)

    def only_reader(name: str, op_type: str):
        readers = consumers.get(name, [])
        node = readers[0] if len(readers) == 1 and name not in outputs else None
        return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None

    fused = []
    for power in graph.node:
        total = producers.get(power.input[0]) if power.op_type == "Pow" and power.domain in ("", "ai.onnx") else None
        if (total is None or total.op_type != "Add" or total.domain not in ("", "ai.onnx")
                or constants.get(power.input[1]) is None or float(constants.get(power.input[1])) != 2.0
                or len(shapes.get(total.input[0], [])) != 3 or shapes.get(total.input[0]) != shapes.get(total.input[1])):
            continue
        mean = only_reader(power.output[0], "ReduceMean")
        shift = mean and only_reader(mean.output[0], "Add")
        root = shift and only_reader(shift.output[0], "Sqrt")
        division = root and only_reader(root.output[0], "Div")
        scale = division and only_reader(division.output[0], "Mul")
        if scale is None or division.input[0] != total.output[0] or len(mean.input) < 2:
            continue
        axes, epsilon = constants.get(mean.input[1]), constants.get(shift.input[1])
        weight = next((name for name in scale.input if name != division.output[0]), None)
        if (axes is None or list(np.atleast_1d(axes)) not in ([-1], [2]) or epsilon is None or epsilon.size != 1
                or weight is None or constants.get(weight) is None or constants[weight].ndim != 1
                or any(a.name == "keepdims" and a.i == 0 for a in mean.attribute)):
            continue
        fused.append((total, [power, mean, shift, root, division, scale], onnx.helper.make_node(
            "SkipSimplifiedLayerNormalization", [total.input[0], total.input[1], weight],
            [scale.output[0], "", "", total.output[0]], name=f"{total.name or total.output[0]}_skip_norm",
            domain=_CONTRIB, epsilon=float(epsilon.reshape(())))))
    for total, chain, replacement in fused:
        position = list(graph.node).index(total)  # the sum's inputs are ready there, and it gives the sum
        graph.node.insert(position, replacement)
        for node in [total, *chain]:
            graph.node.remove(node)
    return len(fused)


def _run_cached(session: ort.InferenceSession, path: Path, ids: np.ndarray, layers: list[list[int]],
                chunks: list[int]) -> np.ndarray:
    """Logits of `ids` fed in chunks of these lengths, each call given the presents of the one before."""
    names = [item.name for item in session.get_inputs()]
    past, logits, start = empty_cache(len(ids), KvCache(layers)), [], 0
    for size in chunks:
        chunk = ids[:, start:start + size]
        outputs = run_quietly(f"running the ONNX model on input_ids {list(chunk.shape)} after {start} tokens", path,
                              lambda: session.run(None, dict(zip(names, cache_inputs(chunk, past)))),
                              hint="the exported graph may not accept this shape")
        logits.append(outputs[0])
        past, start = outputs[1:], start + size
    return np.concatenate(logits, axis=1)


def _run_in_place(session: ort.InferenceSession, path: Path, ids: np.ndarray, layers: list[list[int]],
                  chunks: list[int]) -> np.ndarray:
    """Logits of `ids` fed in chunks of these lengths, each written into the same buffers (agent.kv_cache)."""
    buffers = shared_cache(len(ids), KvCache(layers), ids.shape[1] + 2)
    run = in_place(OnnxRuntimeSession(session, path, "export check"), buffers)
    logits, start = [], 0
    for size in chunks:
        inputs = shared_inputs(ids[:, start:start + size], start)
        outputs = run_quietly(f"running the ONNX model on input_ids {[len(ids), size]} after {start} tokens in a "
                              f"buffer of {buffers[0].shape[2]}", path, lambda: run(inputs),
                              hint="the exported graph may not accept a shared cache buffer")
        logits.append(outputs[0])
        start += size
    return np.concatenate(logits, axis=1)


def check_logits(expected: np.ndarray, actual: np.ndarray, path: Path, where: str) -> float:
    """Max |difference| of an export's logits from torch's; ExportError when the export is wrong.

    Wrong is: any logit off by more than LOGITS_RTOL of the largest |logit|, a top-1 token that
    changes where torch's two best are not a near tie (TIE_RTOL), or a next-token distribution
    more than KL_MAX nats from torch's at some position.
    """
    if actual.shape != expected.shape:
        raise ExportError(f"{where}: logits shape {list(actual.shape)} differs from torch's {list(expected.shape)} "
                          f"for {path}: the export is wrong")
    expected, actual = expected.astype(np.float64), actual.astype(np.float64)
    scale = max(1.0, float(np.abs(expected).max()))
    diff = float(np.abs(expected - actual).max())
    best_two = np.sort(expected, axis=-1)[..., -2:]
    clear = (best_two[..., 1] - best_two[..., 0]) > TIE_RTOL * scale
    flips = int(np.count_nonzero(clear & (expected.argmax(-1) != actual.argmax(-1))))
    expected_log_p = log_softmax(expected)
    kl = float(np.max(np.sum(np.exp(expected_log_p) * (expected_log_p - log_softmax(actual)), -1)))
    if not (diff <= LOGITS_RTOL * scale and flips == 0 and kl <= KL_MAX):  # `not <=` also catches NaN
        raise ExportError(
            f"{where} differs from torch for {path}: max |logit difference| {diff:.3g} (limit {LOGITS_RTOL * scale:.3g}), "
            f"top-1 token changed at {flips} of {clear.size} positions, max KL {kl:.3g} nats (limit {KL_MAX:g}): "
            "the export is wrong (mask, positions or head grouping)")
    return diff


def step_latency_ms(path: Path, cache: KvCache, past: int, *, warmup: int = 3, runs: int = 20,
                    threads: int | None = None) -> dict[str, float]:
    """p50 and p95 milliseconds of one decode step (batch 1, one new token) after `past` cached tokens,
    run as the agent runs it: in place in buffers of past + 1 positions for a shared cache."""
    options = ort.SessionOptions()
    options.inter_op_num_threads = 1
    if threads is not None:
        options.intra_op_num_threads = threads
    session = OnnxRuntimeSession(ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]),
                                 Path(path), "step latency")
    ids = np.zeros((1, 1), np.int64)
    if cache.buffer == "shared":
        run, inputs = in_place(session, _random_cache(1, cache.layers, past + 1)), shared_inputs(ids, past)
    else:
        run, inputs = session.run, cache_inputs(ids, _random_cache(1, cache.layers, past))
    timings = []
    for index in range(warmup + runs):
        started = time.perf_counter()
        run(inputs)
        if index >= warmup:
            timings.append((time.perf_counter() - started) * 1000)
    return {"p50": round(float(np.percentile(timings, 50)), 3), "p95": round(float(np.percentile(timings, 95)), 3)}


def _random_cache(batch: int, layers: list[list[int]], past: int) -> list[np.ndarray]:
    generator = np.random.default_rng(0)
    return [generator.standard_normal((batch, heads, past, head_dim)).astype(np.float32)
            for heads, head_dim in layers for _ in range(2)]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Over the last axis, shifted by its maximum so large logits do not overflow."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _torch_logits(model: nn.Module, ids: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
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


# ---------------------------------------------------------------------------- fused attention (onnxruntime contrib ops)

FUSED_ATTENTION_CLASSES = ("LlamaAttention",)  # packed q/k/v projections, rotary on q and k, attention, o_proj
_CONTRIB = "com.microsoft"
_GQA_INPUTS = ("query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache",
               "sin_cache", "position_ids", "attention_bias", "head_sink", "k_scale", "v_scale", "q_norm_weight",
               "k_norm_weight", "query_seqlens")


@torch.library.custom_op("edgeshift::group_query_attention", mutates_args=())
def _gqa_op(qkv: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor, mask: torch.Tensor,
            cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
            scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What onnxruntime's GroupQueryAttention computes here, in torch (what the export traces is its shapes).

    qkv [B, S, (H + 2 KV) * D]: q, k and v packed; `mask` [B, 1, 1, T] the attention mask, all ones: T - S
    positions of past [B, KV, M, D] are valid. q and k are rotated (cos, sin [max, D / 2], rotate_half's
    layout) at their column of the cache, T - S + s, the new k and v go to columns [T - S, T) of present,
    and each query head attends causally over its KV head's first T columns. Present is past with them
    appended when M = T - S, and the buffer past with them written in when M >= T (a shared buffer).
    -> (output [B, S, H * D], present key, present value [B, KV, max(M, T), D]).
    """
    batch, length, _ = qkv.shape
    total, head_dim = mask.shape[3], past_key.shape[3]
    past = total - length
    query, key, value = (part.reshape(batch, length, -1, head_dim).transpose(1, 2) for part in
                         qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1))
    c, s = cos[past:past + length], sin[past:past + length]

    def rotate(x):
        first, second = x.chunk(2, -1)
        return torch.cat([first * c - second * s, second * c + first * s], -1)

    present_key, present_value = (torch.cat([cache[:, :, :past], new, cache[:, :, total:]], 2)
                                  for cache, new in ((past_key, rotate(key)), (past_value, value)))
    keys, values = (tensor[:, :, :total].repeat_interleave(heads // kv_heads, 1)
                    for tensor in (present_key, present_value))
    scores = rotate(query) @ keys.transpose(2, 3) * scale
    future = torch.ones(length, past + length, dtype=torch.bool).triu(past + 1)
    weights = scores.masked_fill(future, float("-inf")).softmax(-1)
    output = (weights @ values).transpose(1, 2).reshape(batch, length, heads * head_dim)
    return output, present_key, present_value


@_gqa_op.register_fake
def _(qkv, past_key, past_value, mask, cos, sin, heads, kv_heads, scale):
    batch, length, _ = qkv.shape
    present = past_key.new_empty((batch, kv_heads, torch.sym_max(past_key.shape[2], mask.shape[3]), past_key.shape[3]))
    return qkv.new_empty((batch, length, heads * past_key.shape[3])), present, torch.empty_like(present)


def _contrib_translations() -> dict:
    """The op above as onnxruntime's GroupQueryAttention, for torch.onnx.export's custom_translation_table."""
    from onnxscript import opset18 as op
    from onnxscript.values import Opset

    _register_gqa_schema()
    contrib = Opset(_CONTRIB, 1)
    int32 = onnx.TensorProto.INT32

    def group_query_attention(qkv, past_key, past_value, mask, cos, sin, heads: int, kv_heads: int, scale: float):
        # as onnxruntime-genai's models: each row's length from the mask (seqlens_k is its sum - 1) and the total
        # from its size, the op masking causally itself; an attention_bias (for left padding) or query_seqlens
        # (several tokens after a past in a batch) cost 5% of an int4 decode step. The mask is every layer's,
        # so onnxruntime computes these once, not per layer.
        lengths = op.ReduceSum(mask, op.Constant(value_ints=[1, 2, 3]), keepdims=0)
        seqlens_k = op.Cast(op.Sub(lengths, op.Constant(value_ints=[1])), to=int32)
        total = op.Cast(op.Squeeze(op.Shape(mask, start=3, end=4)), to=int32)
        return contrib.GroupQueryAttention(
            qkv, None, None, past_key, past_value, seqlens_k, total, cos, sin,
            num_heads=heads, kv_num_heads=kv_heads, scale=scale, do_rotary=1, _outputs=3)

    return {torch.ops.edgeshift.group_query_attention.default: group_query_attention}


def _register_gqa_schema() -> None:
    """onnx's schema of onnxruntime's GroupQueryAttention (its inputs in onnxruntime's order), which torch's
    exporter looks up to build the node; onnx itself knows the standard domain only."""
    from onnx import defs

    try:
        defs.get_schema("GroupQueryAttention", 1, _CONTRIB)
        return
    except defs.SchemaError:
        pass
    option, kind = defs.OpSchema.FormalParameterOption, defs.OpSchema.AttrType
    ints = ("seqlens_k", "total_sequence_length", "position_ids", "query_seqlens")
    defs.register_schema(defs.OpSchema(
        "GroupQueryAttention", _CONTRIB, 1,
        inputs=[defs.OpSchema.FormalParameter(name, "M" if name in ints else "T", param_option=option.Single
                                              if name in ("query", *ints[:2]) else option.Optional)
                for name in _GQA_INPUTS],
        outputs=[defs.OpSchema.FormalParameter(name, "T") for name in ("output", "present_key", "present_value")],
        type_constraints=[("T", ["tensor(float)"], ""), ("M", ["tensor(int32)", "tensor(int64)"], "")],
        attributes=[defs.OpSchema.Attribute(name, attribute, "") for name, attribute in
                    (("num_heads", kind.INT), ("kv_num_heads", kind.INT), ("scale", kind.FLOAT),
                     ("do_rotary", kind.INT))]))


def _fusable(model: nn.Module) -> str | None:
    """Why the model's attention cannot export as onnxruntime's GroupQueryAttention; None when it can."""
    inner = getattr(model, "model", None)
    rotary = getattr(inner, "rotary_emb", None)
    config = getattr(model, "config", None)
    if inner is None or rotary is None or config is None or not hasattr(config, "_attn_implementation"):
        return "not a transformers decoder with a rotary embedding"
    rope = str(getattr(rotary, "rope_type", "default"))
    if "dynamic" in rope or rope == "longrope":
        return f"rope type {rope} changes with the length"
    if getattr(config, "sliding_window", None):
        return "sliding-window attention"
    for layer in inner.layers:
        attention = layer.self_attn
        if type(attention).__name__ not in FUSED_ATTENTION_CLASSES:
            return f"attention {type(attention).__name__}"
        head_dim = int(attention.head_dim)
        heads, kv_heads = attention.q_proj.out_features // head_dim, attention.k_proj.out_features // head_dim
        if heads < 1 or kv_heads < 1 or heads % kv_heads or head_dim % 2:
            return f"{heads} query heads of size {head_dim} for {kv_heads} KV heads"
    return None


@contextmanager
def _fused_attention(model: nn.Module):
    """Every layer's attention as one onnxruntime GroupQueryAttention while exporting (yields True), or
    `_grouped_attention`'s eager form where the model does not fit (yields False).

    The op rotates q and k, appends the step's keys and values to the cache and attends over it in one
    node, fed q, k and v by one MatMul of the three projections' weights stacked (one MatMulNBits in the
    int4 and int8 twins), as onnxruntime-genai's builder makes it; the eager form runs the reshapes,
    transposes, rotary arithmetic, Concat, MatMuls and Softmax node by node. Every layer keeps its own
    head counts; the op reads the attention mask itself (_CachedLm), whose length (past + sequence, not
    the cache tensors') is the op's total length, so the cache may be a shared buffer (cache_entry).
    """
    tables = _fused_tables(model)
    attentions = [layer.self_attn for layer in model.model.layers] if tables is not None else []
    for attention in attentions:
        attention.forward = _fused_forward(attention, *tables)
    try:
        if tables is not None:
            yield True
        else:
            with _grouped_attention(model):
                yield False
    finally:
        for attention in attentions:
            del attention.forward


def _fused_tables(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The rotary tables the fused attention takes (_rotary_tables), None when the model's attention cannot fuse."""
    return _rotary_tables(model) if _fusable(model) is None else None


def _rotary_tables(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The model's rotary cos and sin [max positions, head_dim / 2] as the op takes them; None when the
    rotary covers only part of each head (the op rotates whole heads)."""
    inner = model.model
    length = int(getattr(model.config, "max_position_embeddings", 0) or 4096)
    with torch.no_grad():
        cos, sin = inner.rotary_emb(torch.zeros(1, dtype=torch.float32), torch.arange(length)[None])
    if any(cos.shape[-1] != int(layer.self_attn.head_dim) for layer in inner.layers):
        return None
    half = cos.shape[-1] // 2
    return cos[0, :, :half].float().contiguous(), sin[0, :, :half].float().contiguous()


def _fused_forward(attention: nn.Module, cos: torch.Tensor, sin: torch.Tensor):
    head_dim = int(attention.head_dim)
    heads, kv_heads = attention.q_proj.out_features // head_dim, attention.k_proj.out_features // head_dim
    scale = float(getattr(attention, "scaling", head_dim ** -0.5))
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    with torch.no_grad():
        weight = torch.cat([item.weight for item in projections]).detach().clone()
        bias = None if all(item.bias is None for item in projections) else torch.cat(
            [item.bias if item.bias is not None else torch.zeros(item.out_features) for item in projections]).detach()

    def forward(hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None or attention_mask is None or attention_mask.dim() != 4 or attention_mask.is_floating_point():
            raise ExportError("fused attention needs the cache and the attention mask as it came")
        layer = cache.layers[attention.layer_idx]
        output, layer.keys, layer.values = torch.ops.edgeshift.group_query_attention(
            nn.functional.linear(hidden_states, weight, bias), layer.keys, layer.values, attention_mask,
            cos, sin, heads, kv_heads, scale)
        return attention.o_proj(output), None

    return forward
