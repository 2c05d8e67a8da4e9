"""ONNX-IR passes, one per module, each an ``onnx_ir.passes`` pass with stated pre/postconditions."""

from aqexport.passes.stable_names import StableNamesPass

__all__ = ["StableNamesPass"]
