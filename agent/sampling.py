"""How the next token is chosen (temperature, top-k, top-p, seed) and when text stops (stop strings).

The same checks serve the Python API, the KServe generate extension, the OpenAI-compatible routes and
the CLI: a bad value is an InferenceError naming the parameter, which the HTTP fronts answer as a 400.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from agent.runtime import InferenceError

MAX_STOP_STRINGS = 16
SAMPLING_PARAMETERS = ("temperature", "top_k", "top_p", "seed")


class Sampler:
    """Chooses one token from a row of logits; greedy (argmax) when temperature is 0.

    One Sampler per generation: it owns the random stream, so the same seed gives the same tokens.
    top_k 0 and top_p 1 turn those filters off.
    """

    def __init__(self, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None):
        self.temperature = _number("temperature", temperature, low=0.0)
        self.top_k = _integer("top_k", top_k, low=0)
        self.top_p = _number("top_p", top_p, low=0.0, high=1.0)
        if self.top_p == 0.0:
            raise InferenceError("top_p must be greater than 0 and at most 1, got 0")
        if seed is not None:
            seed = _integer("seed", seed, low=None)
        self.seed = seed
        self._rng = np.random.default_rng(None if seed is None else seed % 2**64)  # OpenAI seeds may be negative

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def choose(self, logits_row: np.ndarray) -> int:
        logits = np.asarray(logits_row, dtype=np.float64).reshape(-1)
        logits = np.where(np.isnan(logits), -np.inf, logits)  # a NaN is never chosen
        if self.greedy:
            return int(np.argmax(logits))
        if np.isposinf(logits).any():  # +inf outranks everything: choose among those alone, evenly
            logits = np.where(np.isposinf(logits), 0.0, -np.inf)
        candidates = np.flatnonzero(np.isfinite(logits))
        if candidates.size == 0:  # every logit -inf: nothing to weigh, keep greedy's answer
            return int(np.argmax(logits))
        scaled = logits[candidates] / self.temperature
        if 0 < self.top_k < candidates.size:
            keep = np.argpartition(scaled, -self.top_k)[-self.top_k:]
            candidates, scaled = candidates[keep], scaled[keep]
        order = np.argsort(-scaled, kind="stable")
        candidates, scaled = candidates[order], scaled[order]
        weights = np.exp(scaled - scaled[0])  # shifted by the largest: no overflow whatever the logits
        probabilities = weights / weights.sum()
        if self.top_p < 1.0:
            # The smallest head of the ranking whose mass reaches top_p (always at least the first token).
            cut = int(np.searchsorted(np.cumsum(probabilities), self.top_p, side="left")) + 1
            candidates, probabilities = candidates[:cut], probabilities[:cut] / probabilities[:cut].sum()
        pick = int(np.searchsorted(np.cumsum(probabilities), self._rng.random() * probabilities.sum(), side="right"))
        return int(candidates[min(pick, candidates.size - 1)])


class StopStrings:
    """Strings that end a generation when the decoded text contains one; the text returned stops before it."""

    def __init__(self, strings: Sequence[str] = ()):
        self.strings = stop_strings(strings if isinstance(strings, str) else list(strings))

    def __bool__(self) -> bool:
        return bool(self.strings)

    def find(self, text: str) -> int | None:
        """Where the earliest stop string begins in text, or None."""
        found = [index for index in (text.find(s) for s in self.strings) if index >= 0]
        return min(found) if found else None

    def cut(self, text: str) -> str:
        index = self.find(text)
        return text if index is None else text[:index]

    def settled(self, text: str) -> int:
        """How much of text is final while streaming: up to a stop string, and short of a tail that may still
        grow into one (or an incomplete UTF-8 character, which decodes as U+FFFD)."""
        index = self.find(text)
        if index is not None:
            return index
        end = len(text)
        for s in self.strings:
            for size in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:size]):
                    end = min(end, len(text) - size)
                    break
        while end > 0 and text[end - 1] == "\ufffd":
            end -= 1
        return end


def sampler_from(options: Mapping, default_temperature: float) -> Sampler:
    """A Sampler from request options (temperature, top_k, top_p, seed; absent or null: the default)."""
    given = {key: options[key] for key in SAMPLING_PARAMETERS if options.get(key) is not None}
    given.setdefault("temperature", default_temperature)
    return Sampler(**given)


def stop_strings(value) -> tuple[str, ...]:
    """null, one string, or a list of up to MAX_STOP_STRINGS non-empty strings."""
    if value is None:
        return ()
    strings = [value] if isinstance(value, str) else value
    if not isinstance(strings, list) or not all(isinstance(s, str) for s in strings):
        raise InferenceError(f"stop must be a string or a list of strings, got {_kind(value)}")
    if len(strings) > MAX_STOP_STRINGS:
        raise InferenceError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(strings)}")
    if any(s == "" for s in strings):
        raise InferenceError("stop strings must not be empty")
    return tuple(strings)


def _number(name: str, value, low: float | None = None, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InferenceError(f"{name} must be a number, got {_kind(value)} {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise InferenceError(f"{name} must be {bounds}, got {value}")
    return float(value)


def _integer(name: str, value, low: int | None) -> int:
    if isinstance(value, np.integer):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InferenceError(f"{name} must be an integer, got {_kind(value)} {value!r}")
    if low is not None and value < low:
        raise InferenceError(f"{name} must be at least {low}, got {value}")
    return value


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__
