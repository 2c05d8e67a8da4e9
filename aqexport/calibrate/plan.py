"""The QuantPlan: the only object that crosses from calibration (PyTorch) to lowering (ONNX).

Per linear, keyed by its Hugging Face module path: the scheme, the integer codes of the
*transformed* weight, per-group scales and zero points (lowering uses these as they are and never
re-derives them), which norm-group transform feeds it, and a transformed bias where the out
transform changed it. Per block: the transforms in float64, their dominance margin / condition
number / inverse error, the loss curve and the block's output error.

On disk: ``plan.json`` (recipe, model identity, per-block metadata) and one
``block_NNN.safetensors`` per finished block, each written to a temp file and renamed, and
``plan.json`` rewritten after each block. A calibration killed mid-model resumes from the last
block whose file landed.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from aqexport.calibrate.outliers import OutlierSplit
from aqexport.calibrate.quantizer import QuantScheme, dequantize_codes
from aqexport.calibrate.statistics import ChannelStats
from aqexport.calibrate.structure import BlockStructure, NormGroup, OutPair, QkPair
from aqexport.errors import AqexportError

__all__ = ["BlockPlan", "LinearPlan", "QuantPlan"]

PLAN_FORMAT = 3


@dataclass
class LinearPlan:
    scheme: QuantScheme
    codes: torch.Tensor  # [out, in] uint8 / int8, of the transformed weight (PyTorch layout)
    scale: torch.Tensor  # [out, groups]
    zero: torch.Tensor  # [out, groups]
    input_transform: str | None = None  # norm path whose transform A feeds this linear (x A⁻¹)
    bias: torch.Tensor | None = None  # transformed bias, where the out or q·k transform changed it
    activation: QuantScheme | None = None  # per-token activation quantization of (x A⁻¹); None: float
    stats: ChannelStats | None = None  # fp input statistics (SmoothQuant, LLM.int8 outlier channels)
    input_shift: str | None = None  # norm path whose shift δ is subtracted from the input
    act_scale: torch.Tensor | None = None  # static per-tensor activation Δ (scalar), where calibrated
    act_zero: torch.Tensor | None = None
    outlier: OutlierSplit | None = None  # LLM.int8 input split
    outlier_weight: torch.Tensor | None = None  # [out, |O|] float columns of a static split

    def dequantize(self) -> torch.Tensor:
        return dequantize_codes(self.codes, self.scheme, self.scale, self.zero)

    def effective_weight(self) -> torch.Tensor:
        """The weight the fake-quant model multiplies by: dequantized codes, with a static
        LLM.int8 split's float columns in place of its (zero) outlier codes."""
        weight = self.dequantize()
        if self.outlier_weight is not None:
            weight[:, self.outlier.channels] = self.outlier_weight.float()
        return weight


@dataclass
class BlockPlan:
    index: int
    linears: dict[str, LinearPlan]
    norm_transforms: dict[str, torch.Tensor]  # norm path -> A (float64)
    out_transform: torch.Tensor | None  # [kv_heads, d, d] float64
    structure: BlockStructure
    matrix_reports: dict[str, dict[str, float]] = field(default_factory=dict)
    loss_curve: list[float] = field(default_factory=list)
    output_mse: float = 0.0
    seconds: float = 0.0
    qk_transform: torch.Tensor | None = None  # [kv_heads, d, d] float64, already folded into q/k codes
    norm_shifts: dict[str, torch.Tensor] = field(default_factory=dict)  # norm path -> δ (float64)
    static_activations: bool = False

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, entry in self.linears.items():
            out[f"linear.{name}.codes"] = entry.codes
            out[f"linear.{name}.scale"] = entry.scale.float()
            out[f"linear.{name}.zero"] = entry.zero.float()
            if entry.bias is not None:
                out[f"linear.{name}.bias"] = entry.bias.double()
            if entry.act_scale is not None:
                out[f"linear.{name}.act_scale"] = entry.act_scale.float().reshape(())
                out[f"linear.{name}.act_zero"] = entry.act_zero.float().reshape(())
            if entry.outlier is not None and entry.outlier.channels is not None:
                out[f"linear.{name}.outlier_channels"] = entry.outlier.channels.long()
                out[f"linear.{name}.outlier_weight"] = entry.outlier_weight.float()
            if entry.stats is not None:
                out[f"linear.{name}.act_absmax"] = entry.stats.absmax.float()
                out[f"linear.{name}.act_shift"] = entry.stats.shift.float()
                out[f"linear.{name}.act_outliers"] = entry.stats.outliers.long()
        for norm, matrix in self.norm_transforms.items():
            out[f"norm.{norm}.transform"] = matrix.double()
        for norm, shift in self.norm_shifts.items():
            out[f"norm.{norm}.shift"] = shift.double()
        if self.out_transform is not None:
            out["out.transform"] = self.out_transform.double()
        if self.qk_transform is not None:
            out["qk.transform"] = self.qk_transform.double()
        return {k: v.contiguous() for k, v in out.items()}

    def metadata(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "linears": {
                name: {
                    "scheme": asdict(e.scheme),
                    "activation": None if e.activation is None else asdict(e.activation),
                    "input_transform": e.input_transform,
                    "input_shift": e.input_shift,
                    "has_bias": e.bias is not None,
                    "stats": None if e.stats is None else {"tokens": e.stats.tokens, "threshold": e.stats.threshold},
                    "outlier": None
                    if e.outlier is None
                    else {
                        "mode": e.outlier.mode,
                        "threshold": e.outlier.threshold,
                        "channels": None if e.outlier.channels is None else len(e.outlier.channels),
                    },
                }
                for name, e in self.linears.items()
            },
            "structure": asdict(self.structure),
            "matrix_reports": self.matrix_reports,
            "loss_curve": self.loss_curve,
            "output_mse": self.output_mse,
            "seconds": self.seconds,
            "static_activations": self.static_activations,
        }

    @classmethod
    def from_saved(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> BlockPlan:
        s = meta["structure"]
        structure = BlockStructure(
            tuple(
                NormGroup(g["norm"], tuple(g["linears"]), g["weight_offset"], g["has_bias"]) for g in s["norm_groups"]
            ),
            OutPair(**s["out_pair"]) if s["out_pair"] else None,
            tuple(s["linears"]),
            QkPair(**s["qk_pair"]) if s.get("qk_pair") else None,
        )

        def stats(name: str, info: dict) -> ChannelStats | None:
            if not info.get("stats"):
                return None
            return ChannelStats(
                tensors[f"linear.{name}.act_absmax"],
                tensors[f"linear.{name}.act_shift"],
                tensors[f"linear.{name}.act_outliers"],
                info["stats"]["tokens"],
                info["stats"]["threshold"],
            )

        def outlier(name: str, info: dict) -> OutlierSplit | None:
            if not info.get("outlier"):
                return None
            return OutlierSplit(
                info["outlier"]["mode"], info["outlier"]["threshold"], tensors.get(f"linear.{name}.outlier_channels")
            )

        linears = {
            name: LinearPlan(
                QuantScheme(**info["scheme"]),
                tensors[f"linear.{name}.codes"],
                tensors[f"linear.{name}.scale"],
                tensors[f"linear.{name}.zero"],
                info["input_transform"],
                tensors.get(f"linear.{name}.bias"),
                QuantScheme(**info["activation"]) if info.get("activation") else None,
                stats(name, info),
                info.get("input_shift"),
                tensors.get(f"linear.{name}.act_scale"),
                tensors.get(f"linear.{name}.act_zero"),
                outlier(name, info),
                tensors.get(f"linear.{name}.outlier_weight"),
            )
            for name, info in meta["linears"].items()
        }

        def by_norm(suffix: str) -> dict[str, torch.Tensor]:
            return {
                k[len("norm.") : -len(suffix)]: v
                for k, v in tensors.items()
                if k.startswith("norm.") and k.endswith(suffix)
            }

        return cls(
            meta["index"],
            linears,
            by_norm(".transform"),
            tensors.get("out.transform"),
            structure,
            meta["matrix_reports"],
            meta["loss_curve"],
            meta["output_mse"],
            meta["seconds"],
            tensors.get("qk.transform"),
            by_norm(".shift"),
            meta.get("static_activations", False),
        )


@dataclass
class QuantPlan:
    recipe: dict[str, Any]
    model: dict[str, Any]
    directory: Path | None = None
    blocks_path: str = ""
    blocks: dict[int, BlockPlan] = field(default_factory=dict)

    def linears(self) -> dict[str, LinearPlan]:
        """Every planned linear by its full module path (``model.layers.3.mlp.up_proj``)."""
        return {
            f"{self.blocks_path}.{index}.{name}": entry
            for index, block in sorted(self.blocks.items())
            for name, entry in block.linears.items()
        }

    def add_block(self, block: BlockPlan) -> None:
        self.blocks[block.index] = block
        if self.directory is not None:
            self._write_block(block)
            self._write_index()

    def _write_block(self, block: BlockPlan) -> None:
        path = self.directory / f"block_{block.index:03d}.safetensors"
        tmp = path.with_suffix(".tmp")
        save_file(block.tensors(), str(tmp))
        os.replace(tmp, path)

    def _write_index(self) -> None:
        payload = {
            "format": PLAN_FORMAT,
            "recipe": self.recipe,
            "model": self.model,
            "blocks_path": self.blocks_path,
            "blocks": {str(i): b.metadata() for i, b in sorted(self.blocks.items())},
        }
        tmp = self.directory / "plan.json.tmp"
        tmp.write_text(json.dumps(payload, indent=1))
        os.replace(tmp, self.directory / "plan.json")

    def save(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        for block in self.blocks.values():
            self._write_block(block)
        self._write_index()

    @classmethod
    def open(cls, directory: Path, recipe: dict[str, Any], model: dict[str, Any]) -> QuantPlan:
        """A new plan in ``directory``, or the partial one there if it was made by the same
        recipe for the same model (resume); anything else there is an error, never overwritten."""
        directory = Path(directory)
        index = directory / "plan.json"
        if not index.exists():
            directory.mkdir(parents=True, exist_ok=True)
            return cls(recipe, model, directory)
        saved = json.loads(index.read_text())
        if saved.get("recipe") != recipe or saved.get("model") != model:
            raise AqexportError(
                f"'{directory}' holds a plan for another recipe or model",
                "remove it, or point the build at a fresh directory",
            )
        plan = cls(recipe, model, directory, saved.get("blocks_path", ""))
        for key, meta in saved["blocks"].items():
            file = directory / f"block_{int(key):03d}.safetensors"
            if file.exists():
                plan.blocks[int(key)] = BlockPlan.from_saved(meta, load_file(str(file)))
        return plan
