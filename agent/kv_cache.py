"""Sessions of causal-lm files that take and return their attention key-value cache (manifest `kv_cache`).

Such a file's inputs are input_ids, attention_mask and every layer's past key and value; its
outputs logits and every layer's present key and value (agent.manifest.KvCache). The wrapper
lets every caller that knows only input_ids (health checks, benches, /infer) use it as a file
without cache, and checks on load that the file takes the cache its manifest entry describes.
"""
from __future__ import annotations

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


def decode_step_inputs(session: "CachedLmSession", ids: np.ndarray) -> list[np.ndarray]:
    """Inputs of one decode step after the prompt `ids`: its last token again, after the cache of the rest.

    What a generation's steps cost, the calls its latency window holds, so a bench of these is what the
    policy compares live latencies with (a prefill would cost more, and grow with the prompt)."""
    prompt = ids[:, :-1] if ids.shape[1] > 1 else ids
    past = session.run(cache_inputs(prompt, empty_cache(len(ids), session.cache)))[1:]
    return cache_inputs(ids[:, -1:], past)


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

    def close(self) -> None:
        self.session.close()

    def _check(self) -> None:
        """One token from an empty cache must give one position of every layer's cache, sized as declared."""
        described = f"the kv_cache its manifest entry describes ({len(self.cache.layers)} layers)"
        try:
            outputs = self.session.run(cache_inputs(np.zeros((1, 1), np.int64), empty_cache(1, self.cache)))
        except BackendError as error:
            reason, prefix = str(error), f"{self.path}: "
            reason = " ".join((reason[len(prefix):] if reason.startswith(prefix) else reason).split())
            raise BackendError(f"{self.path}: variant '{self.variant_id}' does not take {described}: {reason}") from None
        expected = [[1, heads, 1, head_dim] for heads, head_dim in self.cache.layers for _ in range(2)]
        got = [list(output.shape) for output in outputs[1:]]
        if got != expected:
            raise BackendError(f"{self.path}: variant '{self.variant_id}' does not give {described}: its cache "
                               f"outputs are {got or 'missing'}, expected {expected}")
