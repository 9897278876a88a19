"""Sessions of causal-lm files that take and return their attention key-value cache (manifest `kv_cache`).

Such a file's inputs are input_ids, attention_mask and every layer's past key and value; its
outputs logits and every layer's present key and value (agent.manifest.KvCache). The wrapper
lets every caller that knows only input_ids (health checks, benches, /infer) use it as a file
without cache, and checks on load that the file takes the cache its manifest entry describes.
A file whose kv_cache buffer is "shared" also decodes in place: `shared_cache` allocates every
layer's buffers once, `in_place` binds each as both its past and its present (Session.bound), and
each call writes its new positions into them.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from agent.backends import BackendError, Session
from agent.manifest import KvCache


def empty_cache(batch: int, cache: KvCache) -> list[np.ndarray]:
    """The past of a prefill: every layer's key and value, with no position yet."""
    return [np.zeros((batch, heads, 0, head_dim), np.float32) for heads, head_dim in cache.layers for _ in range(2)]


def cache_inputs(ids: np.ndarray, past: list[np.ndarray]) -> list[np.ndarray]:
    """A call's inputs in the file's order: new tokens `ids` [batch, n] after the cached `past`, no padding."""
    mask = np.ones((ids.shape[0], past[0].shape[2] + ids.shape[1]), np.int64)
    return [ids, mask, *past]


def shared_cache(batch: int, cache: KvCache, length: int) -> list[np.ndarray]:
    """Every layer's key and value buffer of `length` positions, for a file whose kv_cache buffer is "shared"."""
    return [np.zeros((batch, heads, length, head_dim), np.float32) for heads, head_dim in cache.layers
            for _ in range(2)]


def shared_inputs(ids: np.ndarray, filled: int, buffers: Sequence[np.ndarray] = ()) -> list[np.ndarray]:
    """A call's inputs in the file's order: new tokens `ids` [batch, n] after the first `filled` positions
    of the buffers, no padding (the mask's length tells the file where the valid part ends). Without
    buffers: what a call of `in_place` takes."""
    return [ids, np.ones((ids.shape[0], filled + ids.shape[1]), np.int64), *buffers]


def in_place(session: Session, buffers: list[np.ndarray], logits: np.ndarray | None = None
             ) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
    """session.bound with every layer's buffer (shared_cache) bound once as both its past and its present:
    a call takes shared_inputs(ids, filled) and returns [logits], the file writing the new positions into
    the buffers. With `logits` (float32 [batch, n, vocab]) bound too, every call must take n tokens per
    row, writes their logits there and returns []: a decode step then allocates and binds no output."""
    into = {index + 1: buffer for index, buffer in enumerate(buffers)}
    if logits is not None:
        into[0] = logits
    return session.bound(into, {index + 2: buffer for index, buffer in enumerate(buffers)})


def decode_step(session: "CachedLmSession", ids: np.ndarray) -> Callable[[], list[np.ndarray]]:
    """One decode step after the prompt `ids`, run as generations run it: its last token again, after the
    cache of the rest (in place in a shared buffer where the file has one). Each call repeats the step.

    What a generation's steps cost, the calls its latency window holds, so a bench of these is what the
    policy compares live latencies with (a prefill would cost more, and grow with the prompt)."""
    prompt = ids[:, :-1] if ids.shape[1] > 1 else ids
    if session.cache.buffer == "shared":
        run = in_place(session, shared_cache(len(ids), session.cache, prompt.shape[1] + 1))
        run(shared_inputs(prompt, 0))
        step = shared_inputs(ids[:, -1:], prompt.shape[1])
        return lambda: run(step)
    past = session.run(cache_inputs(prompt, empty_cache(len(ids), session.cache)))[1:]
    inputs = cache_inputs(ids[:, -1:], past)
    return lambda: session.run(inputs)


class CachedLmSession(Session):
    """run([input_ids]) scores whole sequences from an empty cache and answers [logits];
    run(cache_inputs(...)) answers [logits, present key and value of every layer]."""

    def __init__(self, session: Session, cache: KvCache):
        self.session, self.cache = session, cache
        self.variant_id, self.path, self.provider = session.variant_id, session.path, session.provider
        try:
            self._check()
        except BackendError:
            session.close()
            raise

    def run(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        if len(inputs) == 1:
            return self.session.run(cache_inputs(inputs[0], empty_cache(len(inputs[0]), self.cache)))[:1]
        return self.session.run(inputs)

    def bound(self, into: dict[int, np.ndarray], fixed: dict[int, np.ndarray] | None = None
              ) -> Callable[[list[np.ndarray]], list[np.ndarray]]:
        return self.session.bound(into, fixed)

    def close(self) -> None:
        self.session.close()

    def _check(self) -> None:
        """One token from an empty cache must give one position of every layer's cache, sized as declared;
        into a shared buffer of two positions, that buffer back (a file that appends would give three)."""
        described = f"the kv_cache its manifest entry describes ({len(self.cache.layers)} layers)"
        ids, shared = np.zeros((1, 1), np.int64), self.cache.buffer == "shared"
        positions = 2 if shared else 1
        inputs = (shared_inputs(ids, 0, shared_cache(1, self.cache, positions)) if shared
                  else cache_inputs(ids, empty_cache(1, self.cache)))
        try:
            outputs = self.session.run(inputs)
        except BackendError as error:
            reason, prefix = str(error), f"{self.path}: "
            reason = " ".join((reason[len(prefix):] if reason.startswith(prefix) else reason).split())
            raise BackendError(f"{self.path}: variant '{self.variant_id}' does not take {described}: {reason}") from None
        expected = [[1, heads, positions, head_dim] for heads, head_dim in self.cache.layers for _ in range(2)]
        got = [list(output.shape) for output in outputs[1:]]
        if got != expected:
            raise BackendError(f"{self.path}: variant '{self.variant_id}' does not give {described}: its cache "
                               f"outputs are {got or 'missing'}, expected {expected}")

