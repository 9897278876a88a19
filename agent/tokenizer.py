"""Text in and out of a causal-lm portfolio through its tokenizer.json.

The `tokenizers` package (not transformers) reads the file; it is optional: without it, or
without a tokenizer in the portfolio, the agent takes token ids only.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from agent.portfolio import PortfolioError
from agent.runtime import InferenceError

NO_TOKENIZER = "this portfolio ships no tokenizer; send input_ids"
INSTALL_TOKENIZERS = "text input needs the 'tokenizers' package: pip install tokenizers (or send input_ids)"


class TextCodec:
    """Text to token ids and back, as the model was trained to read and write them."""

    def __init__(self, tokenizer: Any):
        self._tokenizer = tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """add_special_tokens=False for text that already holds them, such as a rendered chat template."""
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def token_text(self, token_id: int | None) -> str | None:
        """A token's text as the vocabulary spells it ("</s>"), or None."""
        return None if token_id is None else self._tokenizer.id_to_token(token_id)

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)


def tokenizers_installed() -> bool:
    return importlib.util.find_spec("tokenizers") is not None


def load_tokenizer(path: Path) -> TextCodec:
    """InferenceError when `tokenizers` is not installed; PortfolioError when the file is not a tokenizer."""
    if not tokenizers_installed():
        raise InferenceError(INSTALL_TOKENIZERS)
    from tokenizers import Tokenizer

    try:
        return TextCodec(Tokenizer.from_file(str(path)))
    except Exception as error:  # tokenizers raises bare Exceptions for unreadable or malformed files
        raise PortfolioError(
            f"{Path(path).name}: not a readable tokenizers file ({error}); re-export the portfolio"
        ) from None


def optional_codec(tokenizer_path: Path | None) -> TextCodec | None:
    """The portfolio's codec, or None when it ships no tokenizer or `tokenizers` is not installed."""
    if tokenizer_path is None or not tokenizers_installed():
        return None
    return load_tokenizer(tokenizer_path)


def prompt_ids(prompt: str | list[int], tokenizer_path: Path | None, codec: TextCodec | None) -> list[int]:
    """Token ids for a prompt given as text or as ids (ids are checked by generate)."""
    if not isinstance(prompt, str):
        return prompt
    if tokenizer_path is None:
        raise InferenceError(NO_TOKENIZER)
    if codec is None:
        raise InferenceError(INSTALL_TOKENIZERS)
    return codec.encode(prompt)
