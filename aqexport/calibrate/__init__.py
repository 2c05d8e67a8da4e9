"""Calibration: quantizers and (in later versions) the block-wise AffineQuant engine."""

from aqexport.calibrate.quantizer import QuantScheme, fake_quantize, quantize_params

__all__ = ["QuantScheme", "fake_quantize", "quantize_params"]
