"""Text corpora as token windows: random ones for calibration, consecutive ones for evaluation."""
from __future__ import annotations

from pathlib import Path

import torch

from exporter.errors import ExportError

_LINES_PER_BATCH = 2000


def read_corpus(path: Path) -> str:
    """The whole file as UTF-8 text."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"corpus {path} does not exist or is not a file: give a UTF-8 text file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ExportError(
            f"corpus {path} is not UTF-8 text (bad byte at offset {error.start}): convert it to UTF-8"
        ) from error


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """All token ids of `text`, with no special tokens added.

    Lines are tokenized in batches (fast, and memory stays small); a token never spans a line break,
    which for word-level BPE vocabularies changes nothing but the odd whitespace token.
    """
    lines = text.splitlines(keepends=True)
    ids: list[int] = []
    for start in range(0, len(lines), _LINES_PER_BATCH):
        batch = lines[start:start + _LINES_PER_BATCH]
        for line_ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            ids.extend(line_ids)
    return torch.tensor(ids, dtype=torch.int64)


def token_windows(
    tokenizer, text: str, context: int, count: int | None, seed: int | None, *, name: str = "text"
) -> torch.Tensor:
    """int64 input_ids windows shaped [count, context].

    With a seed (calibration): `count` windows at random offsets, reproducible for that seed.
    Without (evaluation): the first `count` non-overlapping windows, or all of them when count is None.
    `name` is how errors refer to the corpus (its file name).
    """
    if context < 2:
        raise ExportError(f"context length must be at least 2 tokens, got {context}")
    if count is not None and count < 1:
        raise ExportError(f"window count must be at least 1, got {count}")
    ids = tokenize(tokenizer, text)
    if ids.numel() < context:
        raise ExportError(
            f"corpus {name} has {ids.numel()} tokens, fewer than the context length {context}; "
            "give a longer file or a smaller --context"
        )
    if seed is not None:
        if count is None:
            raise ExportError("random calibration windows need a count: pass the number of windows")
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, ids.numel() - context + 1, (count,), generator=generator)
        return torch.stack([ids[s:s + context] for s in starts.tolist()])

    available = ids.numel() // context
    if count is not None and count > available:
        raise ExportError(
            f"corpus {name} holds {available} windows of {context} tokens, not {count}; "
            "give a longer file, fewer windows or a smaller --context"
        )
    taken = available if count is None else count
    return ids[: taken * context].view(taken, context).clone()
