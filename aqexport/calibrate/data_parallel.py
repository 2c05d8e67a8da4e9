"""Data-parallel calibration: the windows of one training step shared among ``torchrun`` ranks.

Design (issue 17, "across machines"). Calibration trains one decoder block at a time; nearly
all of its time is the forward and backward of the fake-quant block over calibration windows,
epochs × samples of them, against a few forward passes for the fp targets, the statistics and
the propagation. So the training step is what is split:

* ``calibration.windows_per_step`` windows make one optimizer step (default 1, the schedule
  plans have always had). The step's gradient is the mean of its windows' loss gradients,
  whoever computes them: rank ``r`` of ``N`` takes the step's windows ``r, r + N, …``, takes
  each one's gradient on its own, sums them in float64 (``StepGradients``), and the ranks' sums
  (LWC logits, transforms, shifts: one flat buffer, one ``all_reduce``) are added. Every rank
  then takes the same AdamW step and the same dominance guard, so the parameters never diverge
  and nothing is broadcast. One process with the same ``windows_per_step`` computes the same
  sums, so the plan does not depend on how many ranks made it (``tests/test_data_parallel.py``).
* Everything else is replicated: every rank catches the block inputs, runs the fp targets and
  statistics, freezes the block, runs the rounding step (GPTQ's Hessians) and propagates all
  windows. That costs one forward per window per block on every rank, which the measured
  compute/communication ratio (``benchmarks/data_parallel.py``) shows is the small part; sharding
  it too would need the statistics, Hessians and static ranges all-reduced as well.
* Rank 0 writes the plan (and ``report.json``); the other ranks hold theirs in memory. Resume
  works as for one process: the other ranks read the finished blocks rank 0 found.

Processes and their group come from torch's launcher (``torchrun``), never a scheduler of our
own. The backend is gloo: calibration runs on the CPU today (NCCL would need the block and its
windows on a GPU, which the engine does not do yet).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from aqexport.errors import ConfigError

__all__ = ["SINGLE_PROCESS", "DataParallel", "StepGradients", "from_environment", "refuse_ranks"]


@dataclass(frozen=True)
class DataParallel:
    """This process's place among the ranks calibrating one plan."""

    rank: int = 0
    world: int = 1

    @property
    def writes(self) -> bool:
        """Only rank 0 writes the plan and the report."""
        return self.rank == 0

    def share(self, step: list[int]) -> list[int]:
        """This rank's windows of one step (dealt in turn, so shares differ by at most one)."""
        return step[self.rank :: self.world]

    def install_gradients(self, gradients: StepGradients) -> None:
        """Set each parameter's ``.grad`` to the step's gradient: the float64 sums of every rank
        (one ``all_reduce`` of one flat buffer) cast to the parameter's dtype; ``None`` where
        no window of the step reached the parameter, as a lone ``backward`` would leave it."""
        totals, reached = gradients.totals, gradients.reached
        if self.world > 1:
            flat = torch.cat([total.reshape(-1) for total in totals] + [reached])
            dist.all_reduce(flat)
            *totals, reached = flat.split([total.numel() for total in totals] + [len(totals)])
        for param, total, count in zip(gradients.parameters, totals, reached.tolist(), strict=True):
            param.grad = total.view_as(param).to(param.dtype) if count else None

    def sum(self, value: float) -> float:
        """A number summed over the ranks (the epoch's loss)."""
        if self.world == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(total)
        return float(total)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


class StepGradients:
    """One step's per-window gradients summed in float64. A handful of float32 gradients add up
    exactly in float64, in any order, so the float32 gradient a step ends with does not depend on
    which rank took which window or in what order the ranks' sums were added: the plan is the
    same for 1 or N ranks (given per-window gradients computed alike: same code, same threads).
    Summing in float32 instead left differences of a few ulps that AdamW turns into ~1e-4 in
    parameters whose gradients are near zero (``m/√v`` is ±1 whatever the size)."""

    def __init__(self, parameters: list[nn.Parameter]) -> None:
        self.parameters = parameters
        self.totals = [torch.zeros_like(param, dtype=torch.float64) for param in parameters]
        #: how many windows' gradients reached each parameter
        self.reached = torch.zeros(len(parameters), dtype=torch.float64)

    def add(self, gradients: tuple[torch.Tensor | None, ...]) -> None:
        for i, gradient in enumerate(gradients):
            if gradient is not None:
                self.totals[i] += gradient
                self.reached[i] += 1


SINGLE_PROCESS = DataParallel()
COLLECTIVE_TIMEOUT = timedelta(hours=6)


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def refuse_ranks(command: str, instead: str) -> None:
    """One clear error for a command that would run once per rank and write the same files."""
    if _world_size() > 1:
        raise ConfigError(f"{command} runs in one process, and this is one of {_world_size()} torchrun ranks", instead)


def from_environment(windows_per_step: int) -> DataParallel:
    """This process's rank from ``torchrun``'s environment (one process without it), joining
    the gloo process group the first time. Fewer windows per step than ranks would leave ranks
    idle every step: one clear error instead."""
    world = _world_size()
    if world == 1:
        return SINGLE_PROCESS
    if windows_per_step < world:
        raise ConfigError(
            f"calibration.windows_per_step is {windows_per_step} but {world} ranks share each step's windows",
            f"set calibration.windows_per_step to {world} or a multiple of it",
        )
    if not dist.is_initialized():
        # Rank 0 measures the float model's perplexity before calibrating while the others wait at
        # the plan's barrier: on a large model that outlasts gloo's 30-minute default.
        dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    return DataParallel(dist.get_rank(), dist.get_world_size())
