"""Calibration windows: random windows of the calibration text (the reference's protocol)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch

from aqexport.errors import ConfigError

__all__ = ["calibration_windows"]


@functools.lru_cache(maxsize=2)
def _token_ids(tokenizer: Any, path: str, stamp: tuple[int, int]) -> torch.Tensor:
    """The whole text's ids, once per build: calibration, the LM head's Hessian and the report's
    per-linear errors each draw windows from it (``stamp``: the file's mtime and size, so an
    edited file is read again)."""
    ids = tokenizer(Path(path).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(tokenizer: Any, path: Path, samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``samples`` windows of ``seqlen`` tokens at random offsets (seeded), as [N, L] int64.
    A text too short for one window is bad input (``ConfigError``), found before any block runs."""
    status = Path(path).stat()
    ids = _token_ids(tokenizer, str(path), (status.st_mtime_ns, status.st_size))
    if ids.numel() <= seqlen:
        raise ConfigError(
            f"calibration.data '{path}' has {ids.numel()} tokens, too few for one window of {seqlen} "
            "(calibration.seqlen)",
            "use a longer calibration text"
            + (f", or set calibration.seqlen below {ids.numel()}" if ids.numel() > 16 else ""),
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (samples,), generator=generator)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
