"""The QuantPlan: the only object that crosses from calibration (PyTorch) to lowering (ONNX).

Per linear, keyed by its Hugging Face module path: the scheme, the integer codes of the
*transformed* weight, per-group scales and zero points (lowering uses these as they are and never
re-derives them), which norm-group transform feeds it, and a transformed bias where the out
transform changed it. Per block: the transforms in float64, their dominance margin / condition
number / inverse error, the loss curve and the block's output error.

On disk (format ``PLAN_FORMAT`` = 6): ``plan.json`` holds ``format``, ``recipe``, ``model``,
``blocks_path`` and ``blocks`` (per block index, the block's scalar fields: structure, reports,
loss curve, and per linear its schemes, input transform / shift, ``has_bias``, stats tokens / τ,
outlier mode / threshold / channel count; per ``dict[str, Tensor]`` field its keys). One
``block_NNN.safetensors`` per finished block holds every tensor, named by its field path:
``linears.<linear>.codes|scale|zero|bias|act_scale|act_zero|outlier_weight``,
``linears.<linear>.stats.absmax|shift|outliers``, ``linears.<linear>.outlier.channels``,
``norm_transforms.<norm>``, ``norm_shifts.<norm>``, ``out_transform``, ``qk_transform``,
``norm_structures.<norm>.scales|factors.<i>`` (format 5: the form of each norm-side transform,
``aqexport.calibrate.norm_forms.NormStructure``; a format-4 plan, written before forms existed,
is read with no structures, i.e. every transform what its matrix is: dense or diagonal). Format 6
stores a diagonal ``A`` as its diagonal, a ``[d]`` vector (the default form of weight-only
presets: 32 KiB a norm at hidden 4096 instead of a 128 MiB float64 matrix, 8 GiB of zeros in a 7B
plan); format 5 stored every ``A`` as ``[d, d]`` and is read as it is, since every reader of
``norm_transforms`` (``fold.compact_norm_transform``, ``aqexport.transform_algebra``) takes both.
Each block file is written to a temp file, flushed and renamed
(``aqexport.atomic_files.write_atomically``), and ``plan.json`` rewritten the same way after
each block, so a calibration killed mid-model resumes from the last block whose file landed.

**Checksums.** ``plan.json`` also holds ``block_sha256`` (per block index, the sha256 of its
file's bytes), checked when the plan is opened: a block file that is missing, fails its sha256
or does not parse (a flipped byte, a truncated copy, a disk error) is dropped *with every block
after it*, and calibration recomputes from there, logging one warning naming the file. The later
blocks go too because each was trained on the outputs of the blocks before it: recomputing is
bit-identical (the engine seeds each block by its index) when nothing else changed, and
recomputing the rest keeps the plan consistent even when something did. A plan written before
``block_sha256`` existed (no key) loads its parseable blocks unchecked; an older aqexport
ignores the key, so it is no format change. Leftover ``*.tmp`` files of a killed writer are
removed on open (the caller holds the plan directory's lock, ``build_cache.plan_lock``). A full
disk while writing is one ``AqexportError`` line naming the plan directory; the blocks already
written stay.

``plan.json`` and the block files hold nothing that differs between two calibrations of the
same inputs: each block's wall time (``BlockPlan.seconds``) goes to ``timings.json`` beside
them (``{"blocks": {index: seconds}}``), so two runs write byte-identical plan files. A plan
without ``timings.json`` (or a format-5 ``plan.json`` written before it, which kept
``seconds`` in its blocks) loads as before; a block with no recorded time reads 0 seconds.

The schema is declared once, by the dataclass fields below: :mod:`plan_schema` walks them to
split a block into tensors and JSON and to rebuild it, and each field's ``stored(...)`` metadata
declares the dtype a tensor is saved in. Writing, indexing and loading can therefore not drift
apart, and a loaded block holds exactly the dtypes and values the engine applied, which keeps a
resumed calibration bit-identical to an uninterrupted one.

The format version is checked on load: a ``plan.json`` of another (or no) format is refused
with one line instead of being misread, since the tensor names and metadata layout change
with it. Bump ``PLAN_FORMAT`` whenever a field of these dataclasses (or of the nested
``QuantScheme``, ``ChannelStats``, ``OutlierSplit``, ``BlockStructure``) changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from aqexport import faults
from aqexport.atomic_files import TMP_SUFFIX, out_of_space, write_atomically
from aqexport.calibrate.norm_forms import NormStructure
from aqexport.calibrate.outliers import OutlierSplit
from aqexport.calibrate.plan_schema import FieldSpec, SchemaError, from_record, stored, to_record
from aqexport.calibrate.quantizer import QuantScheme, dequantize_codes
from aqexport.calibrate.statistics import ChannelStats
from aqexport.calibrate.structure import BlockStructure
from aqexport.errors import AqexportError

__all__ = ["PLAN_FORMAT", "BlockPlan", "BlockStore", "LinearPlan", "PlanLinears", "QuantPlan"]

PLAN_FORMAT = 6
TIMINGS_FILE = "timings.json"
INDEX_FILE = "plan.json"
_NO_SPACE_FIX = (
    "free space there, or set calibration.plan_dir to a larger filesystem, then re-run: the blocks already "
    "finished are kept"
)

logger = logging.getLogger(__name__)
_WALL_TIME = "seconds"  # the BlockPlan field kept out of plan.json (it differs run to run)


def _block_seconds(path: Path) -> dict[str, float]:
    """``timings.json``'s seconds per block index (a string); {} if absent or unreadable: wall
    times are a report, never a reason to refuse a plan."""
    try:
        blocks = json.loads(path.read_text()).get("blocks", {})
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(blocks, dict):
        return {}
    return {str(k): float(v) for k, v in blocks.items() if isinstance(v, int | float)}


def _from_format_4(block_meta: dict[str, Any]) -> dict[str, Any]:
    """Format 4 predates ``BlockPlan.norm_structures``: its transforms are plain matrices."""
    return {**block_meta, "norm_structures": {}}


def _as_saved(block_meta: dict[str, Any]) -> dict[str, Any]:
    """Format 5 differs from 6 only in a tensor's shape, which every reader takes as it is."""
    return block_meta


#: Older formats this aqexport still reads, each with the upgrade of one block's metadata; a
#: resumed plan is rewritten in ``PLAN_FORMAT`` as its next block lands.
_UPGRADES = {4: _from_format_4, 5: _as_saved, PLAN_FORMAT: _as_saved}

_F32, _F64 = stored(torch.float32), stored(torch.float64)


@dataclass
class LinearPlan:
    scheme: QuantScheme
    codes: torch.Tensor  # [out, in] uint8 / int8, of the transformed weight (PyTorch layout)
    scale: torch.Tensor = field(metadata=_F32)  # [out, groups]
    zero: torch.Tensor = field(metadata=_F32)  # [out, groups]
    input_transform: str | None = None  # norm path whose transform A feeds this linear (x A⁻¹)
    # transformed bias, where the out or q·k transform changed it
    bias: torch.Tensor | None = field(default=None, metadata=stored(torch.float64, flag="has_bias"))
    activation: QuantScheme | None = None  # per-token activation quantization of (x A⁻¹); None: float
    # fp input statistics (SmoothQuant, LLM.int8 outlier channels)
    stats: ChannelStats | None = field(
        default=None,
        metadata=stored(
            fields={
                "absmax": FieldSpec(torch.float32),
                "shift": FieldSpec(torch.float32),
                "outliers": FieldSpec(torch.int64),
            }
        ),
    )
    input_shift: str | None = None  # norm path whose shift δ is subtracted from the input
    # static per-tensor activation Δ and zero point (scalars), where calibrated
    act_scale: torch.Tensor | None = field(default=None, metadata=stored(torch.float32, shape=()))
    act_zero: torch.Tensor | None = field(default=None, metadata=stored(torch.float32, shape=()))
    # LLM.int8 input split; plan.json records the number of static channels
    outlier: OutlierSplit | None = field(
        default=None, metadata=stored(fields={"channels": FieldSpec(torch.int64, count=True)})
    )
    # [out, |O|] float columns of a static split
    outlier_weight: torch.Tensor | None = field(default=None, metadata=_F32)

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
    norm_transforms: dict[str, torch.Tensor] = field(metadata=_F64)  # norm path -> A (float64)
    out_transform: torch.Tensor | None = field(metadata=_F64)  # [kv_heads, d, d] float64
    structure: BlockStructure
    matrix_reports: dict[str, dict[str, float]] = field(default_factory=dict)
    loss_curve: list[float] = field(default_factory=list)
    output_mse: float = 0.0
    seconds: float = 0.0
    # [kv_heads, d, d] float64, already folded into q/k codes
    qk_transform: torch.Tensor | None = field(default=None, metadata=_F64)
    # norm path -> δ (float64)
    norm_shifts: dict[str, torch.Tensor] = field(default_factory=dict, metadata=_F64)
    static_activations: bool = False
    # norm path -> form, s₀ and learned factors of the norm-side transform (lowering reads these)
    norm_structures: dict[str, NormStructure] = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        """What goes to ``block_NNN.safetensors``."""
        return to_record(self)[0]

    def metadata(self) -> dict[str, Any]:
        """What goes to ``plan.json`` under ``blocks.<index>``: every scalar field but the wall
        time (``seconds``, which goes to ``timings.json``)."""
        meta = to_record(self)[1]
        del meta[_WALL_TIME]
        return meta

    @classmethod
    def from_saved(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], seconds: float = 0.0) -> BlockPlan:
        """The block ``metadata()`` and ``tensors()`` describe; ``seconds`` from ``timings.json``
        (an older plan.json that still holds it wins)."""
        return from_record(cls, "", {_WALL_TIME: seconds, **meta}, tensors)


def _show(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


_MISSING = object()


def _differences(path: str, saved: Any, wanted: Any) -> list[str]:
    """``path.key: saved != wanted`` for each differing leaf (long values: the key alone)."""
    if isinstance(saved, dict) and isinstance(wanted, dict):
        keys = [*saved, *(k for k in wanted if k not in saved)]
        return [d for k in keys for d in _differences(f"{path}.{k}", saved.get(k, _MISSING), wanted.get(k, _MISSING))]
    if saved == wanted:
        return []
    shown = ["(missing)" if v is _MISSING else _show(v) for v in (saved, wanted)]
    if max(len(s) for s in shown) > 40:
        return [path]
    return [f"{path}: {shown[0]} != {shown[1]}"]


class BlockStore(MutableMapping[int, BlockPlan]):
    """A plan's blocks by index, in index order, holding at most ``KEPT`` of them in memory once
    they are in their files: the plan holds a byte of codes per weight (6.5 GB for a 7B model),
    more than a streamed build holds of the model (``aqexport.streamed_model``). A block written
    to (or read from) its file keeps its ``plan.json`` metadata and wall time here and is read
    back, its sha256 checked, when asked for; a block with no file (a plan with no directory)
    stays in memory. Callers that walk every block (lowering, the reports) therefore hold one
    block at a time, as long as they do not keep the blocks themselves."""

    KEPT = 2

    def __init__(self) -> None:
        self._held: dict[int, BlockPlan] = {}  # blocks without a file
        self._filed: dict[int, tuple[Path, str, dict[str, Any], float]] = {}  # file, sha256, meta, seconds
        self._recent: OrderedDict[int, BlockPlan] = OrderedDict()

    def file(self, index: int, path: Path, sha256: str, block: BlockPlan) -> None:
        """``block`` is in ``path`` now: keep its metadata, read it back from there when asked.
        Not kept among the recent blocks: calibration files each block as it finishes, and the
        two it kept (a 7B model's: 2 × 470 MiB) sat beside the next block's training."""
        self._held.pop(index, None)
        self._recent.pop(index, None)
        self._filed[index] = (path, sha256, block.metadata(), block.seconds)

    def metadata(self, index: int) -> tuple[dict[str, Any], float]:
        """A block's ``plan.json`` metadata and wall time, without reading its tensors."""
        if index in self._filed:
            return self._filed[index][2], self._filed[index][3]
        block = self._held[index]
        return block.metadata(), block.seconds

    def _remember(self, index: int, block: BlockPlan) -> None:
        self._recent[index] = block
        self._recent.move_to_end(index)
        while len(self._recent) > self.KEPT:
            self._recent.popitem(last=False)

    def __getitem__(self, index: int) -> BlockPlan:
        if index in self._held:
            return self._held[index]
        if index in self._recent:
            self._recent.move_to_end(index)
            return self._recent[index]
        path, sha256, meta, seconds = self._filed[index]  # KeyError: no such block
        read = _read_block(path, sha256)
        if isinstance(read, str):
            raise AqexportError(
                f"{read or repr(str(path)) + ' is gone'}: the plan's block {index} changed during the build",
                "rebuild; do not modify calibration.plan_dir while a build reads it",
            )
        block = BlockPlan.from_saved(meta, read[0], seconds)
        self._remember(index, block)
        return block

    def __setitem__(self, index: int, block: BlockPlan) -> None:
        self._filed.pop(index, None)
        self._recent.pop(index, None)
        self._held[index] = block

    def __delitem__(self, index: int) -> None:
        found = [store.pop(index, None) for store in (self._held, self._filed, self._recent)]
        if found[0] is None and found[1] is None:
            raise KeyError(index)

    def __iter__(self) -> Iterator[int]:
        return iter(sorted({*self._held, *self._filed}))

    def __len__(self) -> int:
        return len(self._held) + len(self._filed)

    def __contains__(self, index: object) -> bool:
        return index in self._held or index in self._filed


class PlanLinears(Mapping[str, LinearPlan]):
    """Every planned linear by its full module path (``model.layers.3.mlp.up_proj``), read
    block by block from the plan's ``BlockStore`` as it is walked."""

    def __init__(self, plan: QuantPlan) -> None:
        self._plan = plan

    def _split(self, path: str) -> tuple[int, str] | None:
        prefix = f"{self._plan.blocks_path}."
        index, _, name = path.removeprefix(prefix).partition(".")
        if not path.startswith(prefix) or not index.isdigit():
            return None
        return int(index), name

    def __getitem__(self, path: str) -> LinearPlan:
        split = self._split(path)
        if split is None or split[0] not in self._plan.blocks:
            raise KeyError(path)
        return self._plan.blocks[split[0]].linears[split[1]]

    def __iter__(self) -> Iterator[str]:
        for index in self._plan.blocks:
            meta, _ = self._plan.blocks.metadata(index)
            for name in meta["linears"]:
                yield f"{self._plan.blocks_path}.{index}.{name}"

    def __len__(self) -> int:
        return sum(len(self._plan.blocks.metadata(index)[0]["linears"]) for index in self._plan.blocks)

    def items(self):  # one block read per block, not one per linear
        for index in self._plan.blocks:
            for name, entry in self._plan.blocks[index].linears.items():
                yield f"{self._plan.blocks_path}.{index}.{name}", entry

    def values(self):
        return (entry for _, entry in self.items())


@dataclass
class QuantPlan:
    recipe: dict[str, Any]
    model: dict[str, Any]
    directory: Path | None = None
    blocks_path: str = ""
    blocks: BlockStore = field(default_factory=BlockStore)
    # sha256 of each block's file bytes (written or read), for plan.json's block_sha256
    _block_sha256: dict[int, str] = field(default_factory=dict, repr=False)

    def linears(self) -> PlanLinears:
        """Every planned linear by its full module path (``model.layers.3.mlp.up_proj``), read
        block by block (``BlockStore``): walk it, do not copy it into a dict."""
        return PlanLinears(self)

    def add_block(self, block: BlockPlan) -> None:
        self.blocks[block.index] = block
        if self.directory is not None:
            self._write_block(block)
            self._write_index()
            self.blocks.file(
                block.index, self.directory / _block_file(block.index), self._block_sha256[block.index], block
            )
            faults.point("calibrate.block")

    def _write_block(self, block: BlockPlan) -> None:
        data = save(block.tensors())
        self._block_sha256[block.index] = hashlib.sha256(data).hexdigest()
        self._write(_block_file(block.index), data)

    def _write_index(self) -> None:
        recorded = {i: self.blocks.metadata(i) for i in self.blocks}
        blocks = {str(i): meta for i, (meta, _) in recorded.items()}
        timings = {"blocks": {str(i): seconds for i, (_, seconds) in recorded.items()}}
        payload = {
            "format": PLAN_FORMAT,
            "recipe": self.recipe,
            "model": self.model,
            "blocks_path": self.blocks_path,
            "blocks": blocks,
            "block_sha256": {str(i): self._block_sha256[i] for i in sorted(self.blocks) if i in self._block_sha256},
        }
        for name, content in ((TIMINGS_FILE, timings), (INDEX_FILE, payload)):  # the index last
            self._write(name, json.dumps(content, indent=1).encode())

    def _write(self, name: str, data: bytes) -> None:
        try:
            write_atomically(self.directory / name, data)
        except OSError as error:
            full = out_of_space(error, self.directory, _NO_SPACE_FIX)
            if full is None:
                raise
            raise full from error

    def save(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        written = []
        for index in self.blocks:
            block = self.blocks[index]
            self._write_block(block)
            written.append(block)
        self._write_index()
        for block in written:
            self.blocks.file(
                block.index, self.directory / _block_file(block.index), self._block_sha256[block.index], block
            )

    @classmethod
    def open(cls, directory: Path, recipe: dict[str, Any], model: dict[str, Any]) -> QuantPlan:
        """A new plan in ``directory``, or the partial one there if it was made by the same
        recipe for the same model (resume); anything else there is an error, never overwritten."""
        directory = Path(directory)
        index = directory / INDEX_FILE
        for stale in directory.glob(f"*{TMP_SUFFIX}"):  # a killed writer's: never read back
            stale.unlink(missing_ok=True)
        if not index.exists():
            directory.mkdir(parents=True, exist_ok=True)
            return cls(recipe, model, directory)
        fresh = f"recalibrate into a fresh plan_dir, or remove '{directory}'"
        try:
            saved = json.loads(index.read_text())
        except ValueError as error:
            raise AqexportError(f"'{index}' is not valid JSON ({error})", fresh) from error
        found = saved.get("format") if isinstance(saved, dict) else None
        if found not in _UPGRADES:
            version = "has no plan format" if found is None else f"is plan format {_show(found)}"
            formats = [str(f) for f in sorted(_UPGRADES)]
            readable = f"{', '.join(formats[:-1])} and {formats[-1]}"
            raise AqexportError(f"'{index}' {version}, this aqexport reads plan formats {readable}", fresh)
        if saved.get("recipe") != recipe or saved.get("model") != model:
            differences = _differences("recipe", saved.get("recipe"), recipe) + _differences(
                "model", saved.get("model"), model
            )
            shown = ", ".join(differences[:6]) + (f" and {len(differences) - 6} more" if len(differences) > 6 else "")
            raise AqexportError(
                f"'{directory}' holds a plan for another recipe or model (plan.json vs this build: {shown})",
                "remove it, or point the build at a fresh directory",
            )
        plan = cls(recipe, model, directory, saved.get("blocks_path", ""))
        seconds = _block_seconds(directory / TIMINGS_FILE)
        recorded = saved.get("block_sha256")
        recorded = recorded if isinstance(recorded, dict) else {}
        for key in sorted(saved["blocks"], key=int):
            file = directory / _block_file(int(key))
            read = _read_block(file, recorded.get(key))
            if isinstance(read, str):  # this block and every later one are recomputed
                if read:
                    logger.warning("%s: recalibrating from block %s", read, key)
                break
            tensors, digest = read
            try:
                block = BlockPlan.from_saved(_UPGRADES[found](saved["blocks"][key]), tensors, seconds.get(key, 0.0))
            except SchemaError as error:
                raise AqexportError(f"'{file}' does not match '{index}' ({error})", fresh) from error
            plan._block_sha256[int(key)] = digest
            plan.blocks.file(int(key), file, digest, block)
        return plan


def _block_file(index: int) -> str:
    return f"block_{index:03d}.safetensors"


def _read_block(file: Path, sha256: str | None) -> tuple[dict[str, torch.Tensor], str] | str:
    """``(tensors, sha256 of the bytes)`` of a block file that is there, matches its recorded
    ``sha256`` (if any) and parses; else why not ("" for a file that never landed)."""
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        return ""
    except OSError as error:
        return f"'{file}' is unreadable ({error.strerror})"
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256:
        return f"'{file}' does not match its sha256 in {INDEX_FILE} (corrupted or changed)"
    try:
        return load(data), digest
    except (SafetensorError, ValueError) as error:
        return f"'{file}' is not a readable safetensors file ({error})"
