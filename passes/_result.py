"""What an aqexport pass returns: onnx_ir's ``PassResult`` plus what the pass did.

A pass object is configuration only (a plan, a target, a table size); everything it counts
lives in one ``call`` and comes back here, so a reused instance never reports an earlier
model's work and the build reads results without knowing which pass produced them:

* ``stats``: what this pass did to this model (counts, placements), recorded per pass in the
  manifest's ``passes`` list by ``aqexport.lowering.run_passes``;
* ``manifest``: contributions to named sections of ``manifest.json`` (``{"fusions": {...}}``),
  merged over all passes by ``run_passes`` and written by the pipeline as they are.

Both must be plain JSON values (dicts, lists, strings, numbers).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import onnx_ir as ir

__all__ = ["StatsPassResult"]


@dataclasses.dataclass
class StatsPassResult(ir.passes.PassResult):
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    manifest: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
