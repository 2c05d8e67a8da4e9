"""ONNX Runtime side of aqexport: sessions, KV-cache decoding, generation, perplexity.

Knows ONNX Runtime and the artifact's I/O contract, nothing of calibration or PyTorch.
"""

from aqexport.runtime.decoder import OnnxDecoder
from aqexport.runtime.generate import GenerationResult, generate
from aqexport.runtime.perplexity import PerplexityResult, perplexity, split_windows
from aqexport.runtime.session import PROVIDER_NAMES, SessionInfo, create_session, prefill_session
from aqexport.runtime.static_decoder import StaticDecoder, decoder_for

__all__ = [
    "GenerationResult",
    "OnnxDecoder",
    "PROVIDER_NAMES",
    "PerplexityResult",
    "SessionInfo",
    "StaticDecoder",
    "create_session",
    "decoder_for",
    "generate",
    "perplexity",
    "prefill_session",
    "split_windows",
]
