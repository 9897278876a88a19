"""Greedy text generation on a causal-lm portfolio, one variant for the whole generation.

No KV cache: every step feeds the whole sequence (its last `context_length` tokens) and takes
the most likely next token at the last position. Each step is an inference of its own, so it
counts toward the variant's latency window and the policy sees the load of language models too.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from agent.runtime import InferenceError, Runtime, vocab_size

MAX_NEW_TOKENS = 4096
DEFAULT_MAX_NEW_TOKENS = 32


@dataclass(frozen=True)
class Generation:
    ids: list[int]          # the prompt's tokens, then the new ones
    new_ids: list[int]      # the generated tokens (ending with eos when stop_reason is "eos")
    variant: str            # the one variant that answered every step
    stop_reason: str        # "eos" or "max_tokens"
    seconds: float
    tokens_per_s: float
    text: str | None = None  # the new tokens as text, when the portfolio ships a tokenizer


def generate(runtime: Runtime, prompt_ids: Sequence[int], max_new_tokens: int, eos_token_id: int | None,
             context_length: int, on_step: Callable[[int, int], None] | None = None) -> Generation:
    """Greedy decoding on the runtime's active variant, held until the end even if a swap happens meanwhile.

    `on_step(step, token)` is called after each new token (for progress, streaming, or tests).
    """
    manifest = runtime.manifest
    if manifest.task != "causal-lm":
        raise InferenceError(f"generate needs a causal-lm portfolio; '{manifest.name}' is a {manifest.task} "
                             "model: use infer")
    ids = _checked_prompt(prompt_ids, vocab_size(manifest.outputs[0]))
    _check_limits(max_new_tokens, context_length)
    new_ids: list[int] = []
    stop_reason = "max_tokens"
    started = time.perf_counter()
    with runtime.hold() as held:
        for step in range(max_new_tokens):
            window = np.asarray([ids[-context_length:]], dtype=np.int64)
            logits = held.infer(window).outputs[0]
            token = int(np.argmax(logits[0, -1]))
            ids.append(token)
            new_ids.append(token)
            if on_step is not None:
                on_step(step, token)
            if token == eos_token_id:
                stop_reason = "eos"
                break
    seconds = time.perf_counter() - started
    return Generation(ids, new_ids, held.variant, stop_reason, seconds, len(new_ids) / max(seconds, 1e-9))


def _checked_prompt(prompt_ids: Sequence[int], vocab: int | None) -> list[int]:
    if isinstance(prompt_ids, (str, bytes)) or not isinstance(prompt_ids, Sequence):
        raise InferenceError(f"the prompt must be a list of token ids, got {type(prompt_ids).__name__}")
    if not prompt_ids:
        raise InferenceError("the prompt is empty; give at least one token")
    ids = []
    for position, token in enumerate(prompt_ids):
        if isinstance(token, np.integer):
            token = int(token)
        if not isinstance(token, int) or isinstance(token, bool):
            raise InferenceError(f"prompt token {position} must be an integer token id, got {token!r}")
        if token < 0 or (vocab is not None and token >= vocab):
            bound = f"[0, {vocab})" if vocab is not None else ">= 0"
            raise InferenceError(f"prompt token {position} is {token}; token ids must be in {bound}")
        ids.append(token)
    return ids


def _check_limits(max_new_tokens: int, context_length: int) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool):
        raise InferenceError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise InferenceError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS}, got {max_new_tokens}")
    if context_length < 1:
        raise InferenceError(f"context_length must be at least 1, got {context_length}")
