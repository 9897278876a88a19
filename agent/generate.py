"""Text generation on a causal-lm portfolio, one variant for the whole generation.

A variant file with a key-value cache (manifest `kv_cache`) reads the prompt once (the prefill)
and then one token per step, fed the cache the step before returned. One whose cache is a shared
buffer gets every layer's buffers once per generation, sized for the prompt and the new tokens
(at most the context), and writes each step's positions into them in place: no step copies the
cache. A file without one (portfolios exported before the cache) is fed the whole sequence
at every step. The model never sees more than `context_length` tokens: a prompt longer than that
is refused, and generation stops with stop_reason "length" when the sequence fills the context
(llama.cpp's server default since it disabled context shift, ggml-org/llama.cpp#15416). Each step
is an inference of its own, so it counts toward the variant's latency window and the policy sees
the load of language models too.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from agent.kv_cache import empty_cache, shared_cache
from agent.runtime import HeldVariant, InferenceError, Runtime, vocab_size
from agent.sampling import Sampler, StopStrings

MAX_NEW_TOKENS = 4096
DEFAULT_MAX_NEW_TOKENS = 32


@dataclass(frozen=True)
class Generation:
    ids: list[int]          # the prompt's tokens, then the new ones
    new_ids: list[int]      # the generated tokens (ending with eos when stop_reason is "eos")
    variant: str            # the one variant that answered every step
    stop_reason: str        # "eos", "stop" (a stop string appeared), "max_tokens" or "length" (the context is full)
    seconds: float
    tokens_per_s: float
    text: str | None = None  # the new tokens as text, when the portfolio ships a tokenizer


def generate(runtime: Runtime, prompt_ids: Sequence[int], max_new_tokens: int, eos_token_id: int | None,
             context_length: int, on_step: Callable[[int, int], None] | None = None, *,
             sampler: Sampler | None = None, stop: Sequence[str] = (),
             decode: Callable[[list[int]], str] | None = None) -> Generation:
    """Decoding on the runtime's active variant, held until the end even if a swap happens meanwhile.

    `sampler` chooses each token (None: greedy). `decode` turns new tokens into text (the answer's `text`);
    generation stops once that text contains one of the `stop` strings, and the text ends before it.
    `on_step(step, token)` is called after each new token (for progress, streaming, or tests); an exception
    it raises ends the generation.
    """
    manifest = runtime.manifest
    if manifest.task != "causal-lm":
        raise InferenceError(f"generate needs a causal-lm portfolio; '{manifest.name}' is a {manifest.task} "
                             "model: use infer")
    ids = _checked_prompt(prompt_ids, vocab_size(manifest.outputs[0]))
    _check_limits(max_new_tokens, context_length)
    if len(ids) > context_length:
        raise InferenceError(f"the prompt has {len(ids)} tokens, more than the model's context of {context_length}; "
                             "shorten it")
    stops = StopStrings(stop)
    if stops and decode is None:
        raise InferenceError("stop strings need the portfolio's tokenizer to read the text; this one takes token ids "
                             "only")
    choose = sampler.choose if sampler is not None else (lambda row: int(np.argmax(row)))
    new_ids: list[int] = []
    stop_reason = "max_tokens"
    started = time.perf_counter()
    with runtime.hold() as held:
        steps = _steps(held, min(len(ids) + max_new_tokens - 1, context_length))
        logits = steps.first(ids)
        for step in range(max_new_tokens):
            if step > 0:
                if len(ids) > context_length:  # the last token has no place left in the context
                    stop_reason = "length"
                    break
                logits = steps.next(ids)
            token = choose(logits)
            ids.append(token)
            new_ids.append(token)
            if on_step is not None:
                on_step(step, token)
            if token == eos_token_id:
                stop_reason = "eos"
                break
            if stops and stops.find(decode(new_ids)) is not None:
                stop_reason = "stop"
                break
    seconds = time.perf_counter() - started
    text = None if decode is None else stops.cut(decode(new_ids))
    return Generation(ids, new_ids, held.variant, stop_reason, seconds, len(new_ids) / max(seconds, 1e-9), text)


def _steps(held: HeldVariant, positions: int):
    """How the held variant's file runs a generation whose cache holds at most `positions` tokens (the last
    new token is never fed back)."""
    if held.kv_cache is None:
        return _WholeSequenceSteps(held)
    if held.kv_cache.buffer == "shared":
        return _SharedBufferSteps(held, positions)
    return _CachedSteps(held)


class _SharedBufferSteps:
    """The prompt once, then one token per step, each written into the same buffers by the file itself;
    a step's logits go to one array bound with them, so a step allocates and binds only its token and mask."""

    def __init__(self, held: HeldVariant, positions: int):
        self.held = held
        self.buffers = shared_cache(1, held.kv_cache, positions)
        self.filled = 0

    def first(self, ids: list[int]) -> np.ndarray:
        logits = self.held.in_place(self.buffers)(np.asarray([ids], dtype=np.int64), 0).outputs[0]
        self.logits = np.empty((1, 1, logits.shape[-1]), np.float32)
        self.step = self.held.in_place(self.buffers, self.logits)
        self.filled = len(ids)
        return logits[0, -1]

    def next(self, ids: list[int]) -> np.ndarray:
        self.step(np.asarray([ids[-1:]], dtype=np.int64), self.filled)
        self.filled += 1
        return self.logits[0, -1]


class _CachedSteps:
    """The prompt once, then one token per step after the cache the step before returned."""

    def __init__(self, held: HeldVariant):
        self.held = held
        self.past = empty_cache(1, held.kv_cache)

    def first(self, ids: list[int]) -> np.ndarray:
        return self._run(ids)

    def next(self, ids: list[int]) -> np.ndarray:
        return self._run(ids[-1:])

    def _run(self, new_ids: list[int]) -> np.ndarray:
        outputs = self.held.infer_cached(np.asarray([new_ids], dtype=np.int64), self.past).outputs
        self.past = outputs[1:]
        return outputs[0][0, -1]


class _WholeSequenceSteps:
    """A file without cache: every step scores the whole sequence again."""

    def __init__(self, held: HeldVariant):
        self.held = held

    def first(self, ids: list[int]) -> np.ndarray:
        return self.held.infer(np.asarray([ids], dtype=np.int64)).outputs[0][0, -1]

    next = first


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
