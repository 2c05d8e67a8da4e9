"""Load a checkpoint's weights into the model its config describes, completely and safely.

``from_pretrained`` is forgiving in ways a compiler must not be:

* a tensor missing from the checkpoint is **randomly initialised** with a warning table on
  stderr, so a checkpoint missing a shard would compile into an artifact that generates noise;
* a tensor whose shape disagrees with ``config.json`` raises a ``RuntimeError`` pointing at
  that table ("look at the above report"), not naming the tensor in the error itself;
* a ``pytorch_model.bin`` is a pickle. transformers unpickles it with ``torch.load(...,
  weights_only=True)``, which refuses anything but tensors and plain containers, but says so
  in a multi-paragraph ``UnpicklingError`` traceback.

``load_weights`` passes ``weights_only=True`` explicitly (a pickle must never run code, whatever
a future default), asks for the loading info instead of the table, and turns each of these
into one ``ConfigError`` naming the tensor (or the pickled object) and the fix.
"""

from __future__ import annotations

import logging
import pickle
import re
from collections.abc import Callable
from typing import Any

from aqexport.errors import ConfigError

__all__ = ["load_weights"]

logger = logging.getLogger(__name__)

_GLOBAL = re.compile(r"(?:unsupported GLOBAL|Unsupported global:)\s*(?:GLOBAL\s*)?([\w.]+)")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _refuse_pickle(exc: pickle.UnpicklingError, where: str) -> ConfigError:
    found = _GLOBAL.search(str(exc))
    what = f"'{found.group(1)}'" if found else "objects other than tensors"
    return ConfigError(
        f"the pickled checkpoint (.bin) in '{where}' holds {what}, which unpickling would run or build: "
        "aqexport loads pickles as plain tensors only",
        "use the model's safetensors weights, or convert the .bin to safetensors where you trust its source",
    )


def _shape(size: Any) -> str:
    return "[" + ", ".join(str(int(d)) for d in size) + "]"


def _check_complete(info: dict[str, Any], where: str) -> None:
    """Refuse a checkpoint whose tensors disagree with the model its config builds."""
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda item: item[0])
    if mismatched:
        name, saved, wanted = mismatched[0]
        more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
        raise ConfigError(
            f"'{where}': tensor '{name}' has shape {_shape(saved)} in the checkpoint but config.json makes it "
            f"{_shape(wanted)}{more}",
            "the weights and config.json come from different models: use the config.json saved with these weights",
        )
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConfigError(
            f"'{where}' has no weights for '{missing[0]}'{more}, which config.json's model needs",
            "the checkpoint is incomplete or for another model: copy every weight file (all shards and "
            "model.safetensors.index.json) beside config.json",
        )
    unexpected = sorted(info.get("unexpected_keys") or ())
    if unexpected:
        logger.warning("'%s': %d checkpoint tensors unused (e.g. '%s')", where, len(unexpected), unexpected[0])


def load_weights(from_pretrained: Callable[..., Any], where: str) -> Any:
    """``from_pretrained(**extra)`` (a closure over the source) with every weight checked;
    ``where``: the source, as error lines name it."""
    from safetensors import SafetensorError
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load-report table is replaced by one line below
    try:
        model, info = from_pretrained(weights_only=True, ignore_mismatched_sizes=True, output_loading_info=True)
    except pickle.UnpicklingError as exc:
        raise _refuse_pickle(exc, where) from None
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ConfigError(
            f"cannot load the weights of '{where}': {_first_line(exc)}",
            "make sure model.source holds the model's complete weights (safetensors, bin or gguf)",
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    _check_complete(info, where)
    return model
