"""``build.max_memory``: one clear error instead of the kernel's OOM killer.

A build holds the whole model in memory (loaded weights, the exported graph, the calibration's
copies), several times its weights at its peak. When that does not fit, Linux's OOM killer ends
the process with SIGKILL: no message, and minutes of work gone. So a build has a budget, by
default 90 % of the machine's memory, checked twice:

* **Before loading** (``check_source_fits``): the source's parameter count is read from its
  files' headers (safetensors shapes, GGUF tensor sizes; ``.bin`` files by their size), and a
  build whose weights alone, at the load dtype, on top of what the process already holds, exceed
  the budget is refused at once. That is a lower bound (a build needs more than its weights:
  1.9–2.5× at 1.2B parameters, more for small models), so it never refuses a build that would
  have fit; a 7B model's 27 GB of float32 weights on a 24 GB machine is refused in a second.
* **While building** (``MemoryGuard``): a thread reads the process's resident memory
  (``/proc/self/statm``) every ``POLL_SECONDS`` and, past the budget, signals the main thread,
  which raises ``MemoryBudgetError`` naming the stage; the staging directory is removed as for
  any failed build. The signal lands between Python bytecodes, so one large native operation
  can overshoot before it does; on a machine without ``/proc`` or off the main thread only the
  first check runs. The exception can land inside library code that catches ``Exception`` and
  goes on (torch's ONNX exporter does, registering its ops), so the guard raises it again at the
  next stage and on the way out: a build past its budget never writes its artifact.

``max_memory`` does not change the artifact, so it is not part of the build identity.
"""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from aqexport.errors import AqexportError, ConfigError
from aqexport.source_tensors import BLOCK_PREFIX, safetensors_header

__all__ = [
    "DEFAULT_FRACTION",
    "MemoryBudgetError",
    "MemoryGuard",
    "budget_bytes",
    "budget_origin",
    "check_source_fits",
    "parse_size",
    "resident_bytes",
    "source_parameters",
]

logger = logging.getLogger(__name__)

#: The share of the machine's memory a build may use unless ``build.max_memory`` says otherwise.
DEFAULT_FRACTION = 0.9
POLL_SECONDS = 0.2
GIB = 2**30
#: The fix both refusals name.
_FIX = (
    "build on a machine with more memory, or raise build.max_memory if this machine can spare it; a local "
    "safetensors checkpoint streams one block at a time (build.stream)"
)
_UNITS = {"": GIB, "b": 1, "k": 2**10, "m": 2**20, "g": GIB, "t": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(value: str | float | int) -> int:
    """Bytes from ``16``, ``16GB``, ``16 GiB``, ``512MiB``, ``1.5T`` (binary units, a bare
    number is GiB): people write memory sizes many ways and mean powers of two."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError("must be positive")
        return int(value * GIB)
    match = _SIZE.match(str(value))
    if match is None or float(match.group(1)) <= 0:
        raise ValueError("expected a size such as 16GB, 512MiB or 16 (GiB)")
    number, unit = float(match.group(1)), match.group(2).lower()
    if not unit and match.group(3):  # "512b"
        unit = "b"
    return int(number * _UNITS[unit])


def machine_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def budget_bytes(max_memory: str | float | None) -> int | None:
    """The build's budget: ``max_memory`` as given, else ``DEFAULT_FRACTION`` of the machine's."""
    if max_memory is not None:
        return parse_size(max_memory)
    total = machine_bytes()
    return None if total is None else int(total * DEFAULT_FRACTION)


def budget_origin(max_memory: str | float | None) -> str:
    """Where the budget came from, for messages."""
    return "build.max_memory" if max_memory is not None else f"{DEFAULT_FRACTION:.0%} of this machine's memory"


def resident_bytes() -> int | None:
    """This process's resident memory now (not its peak): ``/proc/self/statm``'s second field."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def _gib(count: float) -> str:
    return f"{count / GIB:.1f} GiB"


def source_parameters(folder: Path, gguf_file: str | None) -> tuple[int, str] | None:
    """``(parameters, how they were counted)`` of a local source from its files' headers, or
    ``None`` when there is nothing to read or a file does not parse (the loader then says which
    and why, with its own checks). ``.bin`` / ``.pt`` checkpoints cannot be read without loading
    them: their bytes count as float32 parameters' (a lower bound at any dtype)."""
    try:
        return _count_parameters(folder, gguf_file)
    except Exception as error:  # noqa: BLE001 - a truncated or foreign file: the loader's error is the clear one
        logger.warning("could not count the parameters in '%s' (%s): no memory check before loading", folder, error)
        return None


def safetensors_numel(file: Path) -> int:
    """Parameters in a safetensors file, from its header alone (``source_tensors.safetensors_header``)."""
    header, _ = safetensors_header(file)
    return sum(math.prod(entry["shape"]) for entry in header.values())


def _tensor_sizes(folder: Path, gguf_file: str | None) -> Iterator[tuple[str, int]]:
    """``(tensor name, elements)`` of a GGUF file or of the folder's safetensors files, from
    their headers."""
    if gguf_file:
        from gguf import GGUFReader

        for tensor in GGUFReader(folder / gguf_file).tensors:
            yield tensor.name, int(tensor.n_elements)
        return
    for file in sorted(folder.glob("*.safetensors")):
        header, _ = safetensors_header(file)
        for name, entry in header.items():
            yield name, math.prod(entry["shape"])


def _count_parameters(folder: Path, gguf_file: str | None) -> tuple[int, str] | None:
    if gguf_file:
        return sum(count for _, count in _tensor_sizes(folder, gguf_file)), "GGUF tensor sizes"
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return sum(safetensors_numel(file) for file in files), "safetensors headers"
    pickled = [p for p in folder.iterdir() if p.suffix in {".bin", ".pt"}]
    if pickled:
        return sum(p.stat().st_size for p in pickled) // 4, "checkpoint file sizes"
    return None


def check_source_fits(
    folder: Path, gguf_file: str | None, dtype: str, max_memory: str | float | None, streamed: bool = False
) -> None:
    """Refuse, before loading, a build whose weights alone cannot fit its budget; for a streamed
    build (``aqexport.stream_choice``), the weights it holds at once (``streamed_parameters``)."""
    import torch

    budget = budget_bytes(max_memory)
    counted = source_parameters(folder, gguf_file)
    if budget is None or counted is None:
        return
    parameters, how = counted
    width = torch.finfo(getattr(torch, dtype)).bits // 8
    weights = parameters * width
    held = resident_bytes() or 0
    if streamed:  # the embedding, the head and one block at a time
        resident = streamed_parameters(folder, gguf_file) * width
        kept = f"streamed, a build still holds {_gib(resident)} of them (all but the blocks, and the largest block)"
    else:
        resident = weights
        kept = "which a build holds in memory whole (its peak is 2-3x that)"
    if held + resident <= budget:
        return
    raise ConfigError(
        f"the model has {parameters / 1e9:.2f} B parameters ({how}): {_gib(weights)} of {dtype} weights, {kept}, "
        f"on top of the {_gib(held)} this process holds; the budget is {_gib(budget)} ({budget_origin(max_memory)})",
        _FIX,
    )


def streamed_parameters(folder: Path, gguf_file: str | None = None) -> int:
    """Parameters a streamed build holds, from the checkpoint's headers: every tensor outside the
    numbered blocks, plus the largest block."""
    outside, blocks = 0, {}
    for name, count in _tensor_sizes(folder, gguf_file):
        block = BLOCK_PREFIX.match(name)
        if block is None:
            outside += count
        else:
            blocks[block.group(1)] = blocks.get(block.group(1), 0) + count
    return outside + max(blocks.values(), default=0)


class MemoryBudgetError(AqexportError):
    """Raised in the main thread by ``MemoryGuard`` when the build's memory passed its budget."""


class MemoryGuard:
    """Watch the process's resident memory during ``with``; past ``budget`` bytes, raise
    ``MemoryBudgetError`` in the main thread, naming ``stage`` (set by the caller as it goes)."""

    def __init__(self, budget: int | None, what: str) -> None:
        self.budget = budget
        self.what = what  # how the budget was set, for the message
        self._stage = "start"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._previous = None
        self._seen = 0

    def __enter__(self) -> MemoryGuard:
        armed = (
            self.budget is not None
            and resident_bytes() is not None
            and threading.current_thread() is threading.main_thread()
            and hasattr(signal, "pthread_kill")
        )
        if armed:
            self._previous = signal.signal(signal.SIGUSR1, self._raise)
            self._thread = threading.Thread(target=self._watch, name="aqexport-memory-guard", daemon=True)
            self._thread.start()
        return self

    @property
    def stage(self) -> str:
        return self._stage

    @stage.setter
    def stage(self, name: str) -> None:
        if self._seen:  # the signal's exception was swallowed on its way up: stop here instead
            raise self._error()
        self._stage = name

    def __exit__(self, _type, error, _traceback) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            signal.signal(signal.SIGUSR1, self._previous)
        if self._seen and error is None:
            raise self._error()  # swallowed in the last stage
        if self._seen and not isinstance(error, MemoryBudgetError):
            # the signal's exception, re-wrapped on its way out (torch.export turns exceptions
            # raised while it traces into its own), or whatever failed once memory had run out
            raise self._error() from error

    def _watch(self) -> None:
        main = threading.main_thread().ident
        while not self._stop.wait(POLL_SECONDS):
            held = resident_bytes() or 0
            if held > self.budget:
                self._seen = held
                signal.pthread_kill(main, signal.SIGUSR1)
                return

    def _raise(self, _signum, _frame) -> None:
        if self._stop.is_set():  # the build already finished: nothing to stop
            return
        raise self._error()

    def _error(self) -> MemoryBudgetError:
        return MemoryBudgetError(
            f"the build's resident memory reached {_gib(self._seen)} in stage {self.stage}, over its budget of "
            f"{_gib(self.budget)} ({self.what}); nothing was written",
            _FIX,
        )
