"""A real causal-lm portfolio made without torch: a counting "bigram" LM as ONNX, with a tokenizer.json.

The model is input_ids -> Gather(embedding) -> MatMul(W) -> logits [batch, sequence, vocab]. W gives
each word its successor the largest logit ("one" -> "two" -> ... -> "nine" -> "</s>"), plus seeded
noise; every variant magnitude-prunes W to its own density, so outputs differ between variants while
greedy decoding follows the same known chain on all of them. Perplexities are declared, not measured.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.portfolio import (
    LanguageModel, Manifest, TensorSpec, Variant, file_entry, save_samples, tokenizer_entry, write_manifest,
)

WORDS = ["<unk>", "</s>", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
VOCAB = len(WORDS)
EOS_ID = WORDS.index("</s>")
SAMPLE_IDS = np.array([[2, 3, 4, 5, 6], [7, 8, 9, 10, 1]], dtype=np.int64)


@dataclass(frozen=True)
class LmVariant:
    id: str
    method: str
    density: float
    perplexity: float


VARIANTS = (
    LmVariant("dense", "dense", 1.0, perplexity=8.0),
    LmVariant("mosaic-unstructured-50", "mosaic-unstructured", 0.5, perplexity=9.0),
    LmVariant("mosaic-composite-30", "mosaic-composite", 0.3, perplexity=11.0),
)


def ids_of(text: str) -> list[int]:
    return [WORDS.index(word) for word in text.split()]


def successor(token: int) -> int:
    """The token the model ranks first after `token`: the next number word, "</s>" after "nine"."""
    return token + 1 if 2 <= token < VOCAB - 1 else (EOS_ID if token == VOCAB - 1 else 2)


def bigram_weights(density: float) -> np.ndarray:
    chain = np.zeros((VOCAB, VOCAB), np.float32)
    for token in range(VOCAB):
        chain[token, successor(token)] = 4.0
    noise = np.random.default_rng(0).uniform(-1, 1, (VOCAB, VOCAB)).astype(np.float32)
    weights = chain + noise
    keep = max(1, round(density * weights.size))
    threshold = np.sort(np.abs(weights).ravel())[-keep]
    return np.where(np.abs(weights) >= threshold, weights, 0).astype(np.float32)


def logits_of(ids: np.ndarray, density: float) -> np.ndarray:
    """What the ONNX file answers, computed with numpy (the embedding is the identity)."""
    return bigram_weights(density)[ids]


def _write_onnx(path: Path, weights: np.ndarray) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", VOCAB])
    nodes = [helper.make_node("Gather", ["embedding", "input_ids"], ["hidden"], axis=0),
             helper.make_node("MatMul", ["hidden", "unembedding"], ["logits"])]
    initializers = [numpy_helper.from_array(np.eye(VOCAB, dtype=np.float32), "embedding"),
                    numpy_helper.from_array(weights, "unembedding")]
    graph = helper.make_graph(nodes, "bigram", [ids], [logits], initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def _write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({word: index for index, word in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(["<unk>", "</s>"])  # already in the vocabulary: marks them special
    tokenizer.save(str(path))


def _variant(root: Path, spec: LmVariant, parent: str | None) -> Variant:
    relpath = f"variants/{spec.id}.onnx"
    weights = bigram_weights(spec.density)
    _write_onnx(root / relpath, weights)
    return Variant(
        id=spec.id, method=spec.method, parent=parent, density=spec.density,
        params=2 * VOCAB * VOCAB, params_nonzero=VOCAB * VOCAB + int(np.count_nonzero(weights)),
        macs=VOCAB * VOCAB,
        metrics={"perplexity": spec.perplexity, "dataset": "counting.txt", "n": 64, "context": 8},
        files={"onnx": file_entry(root, relpath, max_abs_diff=0.0)},
    )


def build_lm_portfolio(root: Path, variants: tuple[LmVariant, ...] = VARIANTS, tokenizer: bool = True,
                       context_length: int = 8, chat_template: str | None = None) -> Path:
    """Write a verified causal-lm portfolio into root; the first variant is the parent of the others."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    first = variants[0].id
    entries = [_variant(root, spec, None if spec.id == first else first) for spec in variants]
    if tokenizer:
        _write_tokenizer(root / "tokenizer.json")
    save_samples(root, [SAMPLE_IDS], {spec.id: logits_of(SAMPLE_IDS, spec.density) for spec in variants})
    write_manifest(root, Manifest(
        name="counting-lm",
        task="causal-lm",
        inputs=[TensorSpec("input_ids", "int64", [-1, -1])],
        outputs=[TensorSpec("logits", "float32", [-1, -1, VOCAB])],
        variants=entries,
        default_variant=first,
        language_model=LanguageModel(
            tokenizer=tokenizer_entry(root, "tokenizer.json") if tokenizer else None,
            bos_token_id=None, eos_token_id=EOS_ID, context_length=context_length, chat_template=chat_template,
        ),
    ))
    return root
