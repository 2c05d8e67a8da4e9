"""Name initializers and nodes after the Hugging Face module paths they came from.

The dynamo exporter names initializers after the *wrapper's* state dict
(``model.model.layers.0.self_attn.q_proj.weight`` under ``KVCacheWrapper.model``) and nodes
``node_<fx name>_<counter>``, which changes whenever an unrelated op is added upstream. A
QuantPlan is keyed by Hugging Face module path and ``aqexport diff`` compares graphs by name, so
both need names that only change when the model changes.

Rewrite rules:

1. An initializer whose name starts with ``strip_prefix`` loses that prefix
   (``model.model.layers.0...`` -> ``model.layers.0...``). Names that would collide are left
   alone (logged), never overwritten.
2. An initializer the exporter's constant folder derived from exactly one parameter (the
   ``Transpose`` of a linear weight into ONNX's ``MatMul`` layout ``[in, out]``) takes that
   parameter's name, and records it under ``aqexport.derived_from``: it *is* that weight, laid
   out for ``MatMul``, and the QuantPlan looks weights up by module path.
3. A node whose ``pkg.torch.onnx.name_scopes`` metadata names a module path is renamed
   ``/<module path with '/' separators>/<OpType>``, with ``_<k>`` appended from the second node of
   the same op type in the same module, in graph order (``/model/layers.0/self_attn/q_proj/MatMul``,
   the convention of Optimum and ONNX Runtime's tools).
4. Nodes without that metadata (shape arithmetic the exporter adds), and nodes of the
   top-level model object itself, keep their names.

Precondition: a graph produced by ``torch.onnx.export(dynamo=True)`` (nothing to check cheaply:
a graph without the exporter's metadata keeps its names). Postcondition (``ensures``): every
folded weight is named (an initializer derived from exactly one parameter, rule 2, has that
parameter's stripped name, or its name is taken by the parameter itself); the module-path node
names (``/…``) are unique. Values and outputs are untouched.
"""

from __future__ import annotations

import ast
import collections
import logging

import onnx_ir as ir

from aqexport.passes._contract import BUG_FIX, PostconditionFailed
from aqexport.passes._result import StatsPassResult

__all__ = ["DERIVED_FROM_KEY", "StableNamesPass"]

logger = logging.getLogger(__name__)

_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
_FOLDED_FROM_KEY = "pkg.onnxscript.optimizer.folded_from"
DERIVED_FROM_KEY = "aqexport.derived_from"


class StableNamesPass(ir.passes.InPlacePass):
    def __init__(self, strip_prefix: str = "model.") -> None:
        super().__init__()
        self.strip_prefix = strip_prefix

    def call(self, model: ir.Model) -> StatsPassResult:
        initializers = list(model.graph.initializers.values())
        renamed_initializers = sum(self._try_rename_initializer(v, model.graph) for v in initializers)
        counters: collections.Counter[tuple[str, str]] = collections.Counter()
        taken = {node.name for node in model.graph}
        renamed_nodes = sum(self._try_rename_node(node, counters, taken) for node in model.graph)
        logger.info("stable names: %d initializers, %d nodes renamed", renamed_initializers, renamed_nodes)
        stats = {"initializers": renamed_initializers, "nodes": renamed_nodes}
        return StatsPassResult(model, modified=renamed_initializers + renamed_nodes > 0, stats=stats)

    def ensures(self, model: ir.Model) -> None:
        graph = model.graph
        for value in graph.initializers.values():
            source = self._single_source(value)
            if source is not None and source[len(self.strip_prefix) :] not in graph.initializers:
                raise PostconditionFailed(f"the weight folded from '{source}' is still named '{value.name}'", BUG_FIX)
        names = [node.name for node in graph if node.name and node.name.startswith("/")]
        if len(names) != len(set(names)):
            duplicates = sorted({name for name in names if names.count(name) > 1})
            raise PostconditionFailed(f"node names not unique: {duplicates[:5]}", BUG_FIX)

    def _try_rename_initializer(self, value: ir.Value, graph: ir.Graph) -> bool:
        name = value.name or ""
        source = name
        if not name.startswith(self.strip_prefix):
            source = self._single_source(value)
            if source is None:
                return False
            value.metadata_props[DERIVED_FROM_KEY] = source
        new_name = source[len(self.strip_prefix) :]
        if new_name in graph.initializers:
            logger.debug("keeping %s: %s already exists", name, new_name)
            return False
        value.name = new_name
        return True

    def _single_source(self, value: ir.Value) -> str | None:
        raw = value.metadata_props.get(_FOLDED_FROM_KEY)
        if not raw:
            return None
        try:
            sources = [s for s in ast.literal_eval(raw) if s.startswith(self.strip_prefix)]
        except (ValueError, SyntaxError):
            return None
        return sources[0] if len(sources) == 1 else None

    def _try_rename_node(self, node: ir.Node, counters: collections.Counter[tuple[str, str]], taken: set[str]) -> bool:
        module_path = self._module_path(node)
        if module_path is None:
            return False
        key = (module_path, node.op_type)
        index = counters[key]
        counters[key] += 1
        base = f"/{'/'.join(self._split(module_path))}/{node.op_type}"
        new_name = base if index == 0 else f"{base}_{index}"
        while new_name in taken and new_name != node.name:
            counters[key] += 1
            new_name = f"{base}_{counters[key]}"
        taken.discard(node.name)
        taken.add(new_name)
        node.name = new_name
        return True

    def _module_path(self, node: ir.Node) -> str | None:
        raw = node.metadata_props.get(_SCOPES_KEY)
        if not raw:
            return None
        try:
            scopes = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return None
        # The last entry is the fx node itself; the ones before are nested module paths.
        modules = [s for s in scopes[:-1] if s]
        if not modules:
            return None
        path = modules[-1]
        wrapper = self.strip_prefix.rstrip(".")
        if path == wrapper:
            return None
        if path.startswith(self.strip_prefix):
            path = path[len(self.strip_prefix) :]
        return path

    @staticmethod
    def _split(module_path: str) -> list[str]:
        """``model.layers.0.self_attn`` -> ``[model, layers.0, self_attn]``: indices stay with their list."""
        parts: list[str] = []
        for piece in module_path.split("."):
            if piece.isdigit() and parts:
                parts[-1] = f"{parts[-1]}.{piece}"
            else:
                parts.append(piece)
        return parts
