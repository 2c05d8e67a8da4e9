"""Shared by the fake-quant benchmarks: SmolLM2 loaded once, its float state, the calibration
windows of the config defaults and the perplexity windows (WikiText-2 test, 40 × 512)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aqexport.calibrate.data import calibration_windows
from aqexport.capture import CacheLayout, cache_layout
from aqexport.config import CalibrationSpec, ModelSpec
from aqexport.reference import torch_logits_of
from aqexport.runtime import perplexity, split_windows
from aqexport.sources import LoadedModel, load_model
from aqexport.verify import tokenize_text

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikitext-2"


@dataclass
class FakeQuantBench:
    defaults: CalibrationSpec
    loaded: LoadedModel
    layout: CacheLayout
    fp_state: dict[str, Any]
    windows: torch.Tensor  # perplexity windows
    calibration: torch.Tensor  # calibration windows

    @classmethod
    def smollm2(cls) -> FakeQuantBench:
        defaults = CalibrationSpec(data=DATA / "valid.txt")
        loaded = load_model(ModelSpec(source="default"))
        tokenizer = loaded.tokenizer
        return cls(
            defaults,
            loaded,
            cache_layout(loaded.model),
            copy.deepcopy(loaded.model.state_dict()),
            split_windows(tokenize_text(tokenizer, DATA / "test.txt"), 512, 40),
            calibration_windows(tokenizer, DATA / "valid.txt", defaults.samples, defaults.seqlen, defaults.seed),
        )

    def reset(self) -> torch.nn.Module:
        """The model back to its float weights (calibration makes it the fake-quant model)."""
        self.loaded.model.load_state_dict(self.fp_state)
        return self.loaded.model

    def perplexity(self) -> float:
        return perplexity(torch_logits_of(self.loaded.model), self.windows).perplexity
