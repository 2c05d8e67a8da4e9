"""aqexport: compile Hugging Face causal LMs into quantized ONNX artifacts for ONNX Runtime."""

__version__ = "0.1.0"
