"""Calibration on the PyTorch side: quantizers, block discovery, the block-wise engine shared
by every recipe (``engine``), the rounding steps (``rounding``, ``gptq``) and the QuantPlan
(``plan``), the only object that crosses to the ONNX lowering. Which settings a method uses is
decided by its registered handler in ``aqexport.recipes``; the engine reads only
``recipe.CalibrationRecipe`` fields."""

from aqexport.calibrate.quantizer import QuantScheme, fake_quantize, quantize_params

__all__ = ["QuantScheme", "fake_quantize", "quantize_params"]
