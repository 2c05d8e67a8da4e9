"""Stop calibration at the first block where NaN or inf appears, naming the layer.

A NaN spreads: once one block's output holds one, every later block trains on it, its plan
holds NaN scales, and the artifact generates garbage that only verification (minutes later)
notices, with no hint of where it began. The engine checks each block as it goes, before the
block's plan is saved: its weights, its float output, its fake-quant output and the plan's
tensors. The first failure is one ``ConfigError`` naming the parameter or the innermost module
whose output first went non-finite; the blocks before it are already saved in the plan
directory, so a re-run (after the fix) resumes after them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from aqexport.errors import ConfigError

__all__ = ["check_fake_quant_block", "check_float_block", "check_plan_tensors"]


def _count(tensor: torch.Tensor) -> str:
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    return ", ".join(part for part in (f"{nan} NaN" if nan else "", f"{inf} inf" if inf else "") if part)


def _kept(index: int, plan_dir: Path | None) -> str:
    if index == 0 or plan_dir is None:
        return "no block was finished"
    if index == 1:
        return f"block 0 is kept in '{plan_dir}' and a re-run resumes after it"
    return f"blocks 0-{index - 1} are kept in '{plan_dir}' and a re-run resumes after them"


def _first_output(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


@torch.no_grad()
def _first_nonfinite_module(block: nn.Module, prefix: str, hidden: torch.Tensor, kwargs: dict) -> str:
    """The module (full path) whose output went non-finite first in one forward of ``block``:
    forward hooks fire as each module finishes, so the first report is the innermost, earliest."""
    found: list[str] = []

    def hook(name: str):
        def record(_module: nn.Module, _args: tuple, output: Any) -> None:
            tensor = _first_output(output)
            if not found and tensor is not None and tensor.is_floating_point() and not torch.isfinite(tensor).all():
                found.append(name)

        return record

    handles = [
        module.register_forward_hook(hook(f"{prefix}.{name}" if name else prefix))
        for name, module in block.named_modules()
    ]
    try:
        block(hidden, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else prefix


def _bad_sample(output: torch.Tensor) -> int | None:
    finite = torch.isfinite(output.reshape(output.shape[0], -1)).all(dim=1)
    bad = (~finite).nonzero()
    return int(bad[0]) if bad.numel() else None


def _first_bad_window(
    block: nn.Module, prefix: str, hidden: torch.Tensor, output: torch.Tensor, kwargs: dict
) -> tuple[int, str] | None:
    """``(window, module)`` of the first window whose ``output`` is not finite, re-run alone to
    name the module where it first went non-finite; ``None`` when all are finite."""
    sample = _bad_sample(output)
    if sample is None:
        return None
    return sample, _first_nonfinite_module(block, prefix, hidden[sample : sample + 1], kwargs)


def _diverged_fix(index: int, plan_dir: Path | None) -> str:
    return (
        "lower the recipe's learning rates (lr_transform, lr_lwc), set train_dtype: float64, or use another "
        f"recipe ({_kept(index, plan_dir)})"
    )


def check_float_block(
    block: nn.Module,
    prefix: str,
    index: int,
    hidden: torch.Tensor,
    output: torch.Tensor,
    kwargs: dict,
    plan_dir: Path | None,
) -> None:
    """The float block's weights, input and output on the calibration windows are finite."""
    for name, param in block.named_parameters():
        if not torch.isfinite(param).all():
            raise ConfigError(
                f"calibration stopped at block {index}: weight '{prefix}.{name}' holds {_count(param)} value(s)",
                f"the checkpoint is corrupt: re-download or re-convert model.source ({_kept(index, plan_dir)})",
            )
    if not torch.isfinite(hidden).all():
        raise ConfigError(
            f"calibration stopped at block {index}: its input holds {_count(hidden)} value(s) (the embedding's "
            "output or an earlier layer)",
            f"check model.source's embedding weights ({_kept(index, plan_dir)})",
        )
    bad = _first_bad_window(block, prefix, hidden, output, kwargs)
    if bad is not None:
        sample, where = bad
        raise ConfigError(
            f"calibration stopped at block {index}: the float model's output of '{where}' holds NaN/inf on "
            f"calibration window {sample} (it overflows float32)",
            f"check model.source's weights in '{where}' ({_kept(index, plan_dir)})",
        )


def check_fake_quant_block(
    block: nn.Module,
    prefix: str,
    index: int,
    hidden: torch.Tensor,
    output: torch.Tensor,
    kwargs: dict,
    plan_dir: Path | None,
) -> None:
    """The calibrated (fake-quant) block's output is finite: training did not diverge."""
    bad = _first_bad_window(block, prefix, hidden, output, kwargs)
    if bad is not None:
        sample, where = bad
        raise ConfigError(
            f"calibration of block {index} diverged: the fake-quant output of '{where}' holds NaN/inf on "
            f"calibration window {sample}",
            _diverged_fix(index, plan_dir),
        )


def check_plan_tensors(tensors: dict[str, torch.Tensor], prefix: str, index: int, plan_dir: Path | None) -> None:
    """No NaN/inf is ever saved into a plan block."""
    for name, tensor in sorted(tensors.items()):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ConfigError(
                f"calibration of block {index} diverged: its plan tensor '{name}' ({prefix}) holds "
                f"{_count(tensor)} value(s)",
                _diverged_fix(index, plan_dir),
            )
