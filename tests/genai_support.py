"""Import onnxruntime-genai, installing it if missing; skip only where it cannot be installed."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest


def require_genai():
    try:
        return importlib.import_module("onnxruntime_genai")
    except ImportError:
        pass
    # --no-deps: it needs onnxruntime, which is already here; letting pip resolve could pull a
    # second ORT build (onnxruntime and onnxruntime-gpu must never share an environment).
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "onnxruntime-genai"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        pytest.skip(f"onnxruntime-genai cannot be installed here: {proc.stderr.strip()[-300:]}")
    importlib.invalidate_caches()
    return importlib.import_module("onnxruntime_genai")


def genai_greedy(artifact, prompt_tokens: list[int], max_new_tokens: int) -> list[int]:
    og = require_genai()
    model = og.Model(str(artifact))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_tokens) + max_new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt_tokens)
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(prompt_tokens) :]


def genai_greedy_batch(artifact, padded_ids, max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of a batch of already padded prompts (``[B, S]``)."""
    import numpy as np

    og = require_genai()
    model = og.Model(str(artifact))
    params = og.GeneratorParams(model)
    batch, width = padded_ids.shape
    params.set_search_options(max_length=width + max_new_tokens, do_sample=False, batch_size=batch)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(padded_ids, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [[int(t) for t in generator.get_sequence(row)][width:] for row in range(batch)]
