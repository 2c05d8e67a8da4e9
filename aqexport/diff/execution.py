"""``aqexport diff --run``: run both sides on the same inputs and find where they part.

A structural diff says *what* changed between two graphs; this says *where it starts to
matter*. Both models run one prefill over the same prompt (and, with ``text``, the first
perplexity windows); every aligned intermediate value is compared (cosine, SQNR of B against
A, max-abs) in A's topological order, and the first pair whose SQNR falls below the
threshold is named: the node, its op type and the module it belongs to.

How intermediates come out. ONNX Runtime returns only graph outputs, so the wanted values
are added as extra outputs to a *serialized copy* of each graph (``ir.to_proto``; the
``GraphSide`` itself is not touched). Untyped values (those the passes created) need no
type: ORT infers it when the session is built. The proto is handed to ORT as bytes with its
initializers still external, and the session option
``session.model_external_initializers_file_folder_path`` (ORT >= 1.18; checked on 1.32) points
it at the folder of the side's ``.onnx`` so the weights are read from the artifact's own data
file, exactly as a normal session reads them. Nothing is written, the weights are never
inlined into the proto, and only one session is alive at a time (per side: the instrumented
one for the prompt's intermediates, then a plain one for the logits and perplexity, see
``_run_side``), so peak memory is one model plus the prompt-sized intermediates of A.

Only activations are exposed: values produced by a node of the main graph that depend on a
graph input. Weight-only values (a ``DequantizeLinear`` of a weight) would be whole float
weight matrices, and values inside fused kernels (GroupQueryAttention, the extra outputs
SkipSimplifiedLayerNormalization does not compute) simply have no name to ask for. At most
``MAX_EXPOSED`` values per side are exposed (the first ones in A's order; the report says when
the cap was hit). Exposing a value keeps ORT from fusing it away; the logits of such a
session were bit-identical to the normal session's on the SmolLM2 artifacts. (A bare ``.onnx``
with its weights inside is copied whole into the proto: only external weights stay on disk.)

The sessions run without ORT's CPU memory arena: the arena keeps its high-water mark (the
256-token perplexity windows) until the session dies, and the freed arena of side A was not
reused by side B's, so the two stacked (SmolLM2 pair, 4 windows of 256: 1.9 GB peak with it, 0.75 GB without, at
the same speed).

The decode is the runtime's own (``decoder_for``, ``onnx_logits_of``, ``perplexity``), with
the *growing* KV contract and an empty past: one prefill over the prompt, and each
perplexity window from an empty cache (ALGORITHMS.md §7, the same numbers ``aqexport eval``
gives). A static (npu) graph runs the prompt token by token; its intermediates are those
of the step on the last prompt token.

SQNR encoding in the report: ``sqnr_db`` is a float, or ``null`` when it is not finite. Then
``identical`` tells which: ``true`` means B equals A exactly (+inf dB, never a divergence);
``false`` means A is all zeros while B is not, or the two hold non-finite values at different
places (counted as a divergence).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from aqexport.diff.side import GraphSide
from aqexport.errors import AqexportError
from aqexport.runtime import PROVIDER_NAMES, decoder_for, perplexity, split_windows
from aqexport.runtime.decoder import OnnxDecoder
from aqexport.runtime.perplexity import PerplexityResult, onnx_logits_of
from aqexport.runtime.session import genai_facts, session_options

__all__ = ["MAX_EXPOSED", "compare_execution", "diverges", "module_of", "module_path", "tensor_metrics"]

logger = logging.getLogger(__name__)

#: Most intermediate values exposed as extra outputs per side.
MAX_EXPOSED = 2000
#: Prompt length when a side has no tokenizer (random ids, fixed seed).
RANDOM_PROMPT_TOKENS = 16
RANDOM_SEED = 0
#: Tokens beyond the last window that a text prefix must hold (see ``_text_tokens``).
TOKEN_MARGIN = 64
EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
_FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16}


# --------------------------------------------------------------------------------------------
# entry point


def compare_execution(
    a: GraphSide,
    b: GraphSide,
    value_pairs: list[tuple[str, str]],
    *,
    prompt: str = "The capital of France is",
    text: Path | None = None,
    windows: int = 4,
    seqlen: int = 256,
    threshold_db: float = 20.0,
    provider: str = "cpu",
) -> dict:
    """Run ``a`` and ``b`` on the same inputs and compare ``value_pairs`` (A name, B name, in
    A's topological order), the logits and, with ``text``, perplexity. Returns plain JSON:

    - ``inputs``: prompt (None for random ids), tokens, token_source, text, windows (actually
      scored), seqlen, provider, providers_used, notes.
    - ``coverage``: pairs given, compared, skipped, ``ignored`` counts (not_intermediate:
      initializers/graph inputs; constant: weight-only values; non_float: shapes, masks),
      cap, capped (pairs beyond the cap), instrumentation_max_abs (a, b: how far exposing
      the values moved each side's prompt logits; 0.0 normally, None when nothing was
      exposed), notes.
    - ``tensors``: per compared pair, in order: a, b, op, node, module, cosine, sqnr_db,
      max_abs, identical (and nonfinite_mismatch where non-zero).
    - ``skipped``: a, b, reason (absent value, float vs integer, different shapes).
    - ``first_residual_divergence``: the same, among residual-stream tensors only (the embedding
      output and each skip-norm's running sum): where two builds with different folded transforms
      really part, since activations inside a block differ between them by design.
    - ``first_divergence``: None, or index (into tensors), a, b, a_node, a_op, b_node, b_op,
      module, b_module, sqnr_db, cosine, max_abs of the first pair below ``threshold_db``.
    - ``logits`` (of the prompt): positions, max_abs, top1_agreement, sqnr_db, cosine,
      identical; or ``{"skipped": reason}`` when the vocabularies differ.
    - ``perplexity``: None without ``text``; else a, b, change (b/a - 1), top1_agreement over
      the text's positions, windows, seqlen, tokens.

    ``sqnr_db`` null: see the module docstring (``identical`` says whether it is +inf)."""
    for side in (a, b):
        _check_runnable(side)
    if provider not in PROVIDER_NAMES:
        raise AqexportError(f"unknown execution provider '{provider}'", f"use one of: {', '.join(PROVIDER_NAMES)}")
    inputs = _fixed_inputs(a, b, prompt, text, windows, seqlen)
    plan = _plan_pairs(a, b, value_pairs)
    run_a = _run_side(a, plan.exposed_a, inputs, provider)
    run_b = _run_side(b, plan.exposed_b, inputs, provider)
    tensors, skipped = _compare_pairs(plan, run_a, run_b)
    return {
        "inputs": {**inputs.describe(text, seqlen, provider), "providers_used": run_a.providers},
        "coverage": plan.describe(len(tensors), len(skipped) + len(plan.skipped), run_a, run_b),
        "tensors": tensors,
        "skipped": plan.skipped + skipped,
        "first_divergence": _first_divergence(tensors, plan, threshold_db),
        "first_residual_divergence": _first_divergence(tensors, plan, threshold_db, _is_residual),
        "threshold_db": threshold_db,
        "logits": _compare_logits(run_a.logits, run_b.logits),
        "perplexity": _compare_perplexity(run_a, run_b),
    }


# --------------------------------------------------------------------------------------------
# metrics


def tensor_metrics(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Cosine, SQNR (dB, B against A: signal A, noise B - A) and max-abs over float64.

    Positions where both hold the same non-finite value (an attention mask's -inf) are left
    out; non-finite values at different places make the pair undefined (``sqnr_db`` null,
    ``identical`` false), which counts as a divergence."""
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    finite = np.isfinite(x) & np.isfinite(y)
    same_special = (x == y) | (np.isnan(x) & np.isnan(y))
    mismatched = int(np.count_nonzero(~finite & ~same_special))
    x, y = x[finite], y[finite]
    diff = y - x
    noise, signal = float(diff @ diff), float(x @ x)
    norms = math.sqrt(signal) * math.sqrt(float(y @ y))
    cosine = float(x @ y) / norms if norms else (1.0 if signal == 0 and not y.any() else 0.0)
    identical = noise == 0.0 and mismatched == 0
    sqnr = None if identical or mismatched or signal == 0.0 else 10.0 * math.log10(signal / noise)
    metrics = {
        "cosine": round(cosine, 8),
        "sqnr_db": None if sqnr is None else round(sqnr, 3),
        "max_abs": float(np.abs(diff).max()) if diff.size else 0.0,
        "identical": identical,
    }
    if mismatched:
        metrics["nonfinite_mismatch"] = mismatched
    return metrics


def diverges(metrics: dict[str, Any], threshold_db: float) -> bool:
    """Below the threshold, or undefined (see ``tensor_metrics``); identical never diverges."""
    if metrics["identical"]:
        return False
    return metrics["sqnr_db"] is None or metrics["sqnr_db"] < threshold_db


# --------------------------------------------------------------------------------------------
# inputs


@dataclass
class _Inputs:
    prompt: str | None  # None when the ids are random
    prompt_ids: np.ndarray  # [S]
    source: str
    windows: np.ndarray | None  # [W, seqlen]
    notes: list[str] = field(default_factory=list)

    def describe(self, text: Path | None, seqlen: int, provider: str) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "tokens": int(self.prompt_ids.size),
            "token_source": self.source,
            "text": None if text is None else str(text),
            "windows": 0 if self.windows is None else int(self.windows.shape[0]),
            "seqlen": seqlen,
            "provider": provider,
            "notes": self.notes,
        }


def _check_runnable(side: GraphSide) -> None:
    if side.is_description or side.onnx_path is None:
        raise AqexportError(
            f"'{side.label}' is a graph description: it holds no weights to run",
            "diff --run needs two artifact directories or .onnx files",
        )


def _fixed_inputs(a: GraphSide, b: GraphSide, prompt: str, text: Path | None, windows: int, seqlen: int) -> _Inputs:
    """The prompt through the first side that has a tokenizer (both sides see the same ids);
    random ids within both vocabularies when neither has one."""
    tokenizers = [(side, _tokenizer(side)) for side in (a, b)]
    found = [(side, tok) for side, tok in tokenizers if tok is not None]
    if not found:
        if text is not None:
            raise AqexportError(
                "perplexity (--text) needs a tokenizer, and neither side has one",
                "pass artifact directories (they ship tokenizer files) or drop --text",
            )
        vocab = min(_vocab_size(a), _vocab_size(b))
        ids = np.random.default_rng(RANDOM_SEED).integers(0, vocab, RANDOM_PROMPT_TOKENS, dtype=np.int64)
        source = f"random ids (seed {RANDOM_SEED}, vocabulary {vocab}): neither side has a tokenizer"
        return _Inputs(None, ids, source, None, [source])
    side, tokenizer = found[0]
    ids = np.asarray(tokenizer(prompt)["input_ids"], dtype=np.int64)
    inputs = _Inputs(prompt, ids, f"tokenizer of '{side.label}'", None)
    if len(found) == 2 and list(found[1][1](prompt)["input_ids"]) != ids.tolist():
        inputs.notes.append(f"the tokenizers differ on the prompt: '{side.label}''s ids are fed to both")
    if text is not None:
        tokens = _text_tokens(tokenizer, Path(text), windows * seqlen)
        try:
            inputs.windows = split_windows(tokens, seqlen, windows)
        except ValueError as exc:
            raise AqexportError(str(exc), "use a longer text or a smaller --seqlen") from None
    return inputs


def _text_tokens(tokenizer: Any, path: Path, needed: int) -> np.ndarray:
    """The first ``needed`` tokens of the whole text tokenized at once (no special tokens, as
    ``aqexport eval`` does), from a prefix long enough that the cut lies ``TOKEN_MARGIN``
    tokens beyond them: tokenizers work word by word, so the tokens before are those of the
    whole text, and WikiText-2's test split (1.3 MB) is not tokenized for 1000 tokens."""
    text = path.read_text(encoding="utf-8")
    chars = max(needed * 8, 4096)
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if chars >= len(text):
            return np.asarray(ids, dtype=np.int64)
        if len(ids) >= needed + TOKEN_MARGIN:
            return np.asarray(ids[:needed], dtype=np.int64)
        chars *= 2


def _tokenizer(side: GraphSide) -> Any | None:
    """The artifact's tokenizer, or None (a bare ``.onnx``, or a directory without one)."""
    if side.directory is None:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(side.directory))
    except (OSError, ValueError) as exc:
        logger.warning("no tokenizer in '%s' (%s)", side.directory, str(exc).splitlines()[0][:120])
        return None


def _vocab_size(side: GraphSide) -> int:
    """From the logits output's last dimension, else the embedding table fed by ``input_ids``."""
    graph = side.model.graph
    for output in graph.outputs:
        if output.name == "logits" and output.shape is not None and isinstance(output.shape[-1], int):
            return int(output.shape[-1])
    for node in graph:
        if node.op_type in ("Gather", "GatherBlockQuantized") and len(node.inputs) > 1:
            table, ids = node.inputs[0], node.inputs[1]
            if ids is not None and ids.name == "input_ids" and table is not None and table.shape is not None:
                if isinstance(table.shape[0], int):
                    return int(table.shape[0])
    raise AqexportError(
        f"cannot tell the vocabulary size of '{side.label}' (no static logits shape or embedding table)",
        "pass an artifact directory, whose tokenizer gives the prompt's ids",
    )


# --------------------------------------------------------------------------------------------
# which values to expose


@dataclass
class _Pair:
    a: str
    b: str
    node_a: ir.Node
    node_b: ir.Node


@dataclass
class _Plan:
    pairs: list[_Pair]
    skipped: list[dict[str, str]]
    ignored: dict[str, int]
    capped: int  # pairs beyond the cap (0: not capped)
    total: int

    @property
    def exposed_a(self) -> list[str]:
        return list(dict.fromkeys(pair.a for pair in self.pairs))

    @property
    def exposed_b(self) -> list[str]:
        return list(dict.fromkeys(pair.b for pair in self.pairs))

    def describe(self, compared: int, skipped: int, run_a: _SideRun, run_b: _SideRun) -> dict[str, Any]:
        notes = [note for note in (run_a.note, run_b.note) if note]
        for label, run in (("A", run_a), ("B", run_b)):
            if run.instrumentation_max_abs:
                notes.append(
                    f"exposing {label}'s intermediates changed its prompt logits by up to "
                    f"{run.instrumentation_max_abs:.3g} (ORT fused less): the tensors come from that run, "
                    "logits and perplexity from the graph as built"
                )
        if self.capped:
            notes.append(f"only the first {MAX_EXPOSED} candidate values were exposed; {self.capped} more not compared")
        return {
            "pairs": self.total,
            "compared": compared,
            "skipped": skipped,
            "ignored": self.ignored,
            "cap": MAX_EXPOSED,
            "capped": self.capped,
            "instrumentation_max_abs": {"a": run_a.instrumentation_max_abs, "b": run_b.instrumentation_max_abs},
            "notes": notes,
        }


def _plan_pairs(a: GraphSide, b: GraphSide, value_pairs: list[tuple[str, str]]) -> _Plan:
    """Keep the pairs worth running: activations of the main graph with a float type (or no
    type yet: ORT infers it), in the order given, at most ``MAX_EXPOSED``. Weights, constant
    subexpressions and integer/boolean plumbing (shapes, masks) are counted, not listed."""
    producers_a, producers_b = _producers(a.model.graph), _producers(b.model.graph)
    dynamic_a, dynamic_b = _input_dependent(a.model.graph), _input_dependent(b.model.graph)
    plan = _Plan([], [], {"not_intermediate": 0, "constant": 0, "non_float": 0}, 0, len(value_pairs))
    for name_a, name_b in value_pairs:
        found_a, found_b = producers_a.get(name_a), producers_b.get(name_b)
        if found_a is None or found_b is None:
            side, name = ("A", name_a) if found_a is None else ("B", name_b)
            graph = a.model.graph if found_a is None else b.model.graph
            if name in graph.initializers or name in {v.name for v in graph.inputs}:
                plan.ignored["not_intermediate"] += 1
            else:
                plan.skipped.append(_skip(name_a, name_b, f"no node of {side}'s main graph produces '{name}'"))
            continue
        if name_a not in dynamic_a or name_b not in dynamic_b:
            plan.ignored["constant"] += 1
            continue
        reason = _dtype_mismatch(found_a[1], found_b[1])
        if reason == "non_float":
            plan.ignored["non_float"] += 1
        elif reason:
            plan.skipped.append(_skip(name_a, name_b, reason))
        elif len(plan.pairs) >= MAX_EXPOSED:
            plan.capped += 1
        else:
            plan.pairs.append(_Pair(name_a, name_b, found_a[0], found_b[0]))
    return plan


def _producers(graph: ir.Graph) -> dict[str, tuple[ir.Node, ir.Value]]:
    return {value.name: (node, value) for node in graph for value in node.outputs if value.name}


def _input_dependent(graph: ir.Graph) -> set[str]:
    """Names of the values that depend on a graph input (ONNX keeps nodes topologically sorted)."""
    dynamic = {value.name for value in graph.inputs}
    for node in graph:
        if any(value is not None and value.name in dynamic for value in node.inputs):
            dynamic.update(value.name for value in node.outputs if value.name)
    return dynamic


def _dtype_mismatch(value_a: ir.Value, value_b: ir.Value) -> str | None:
    """None when comparable; ``"non_float"`` when neither is a float; else a reason to skip."""
    float_a = value_a.dtype is None or value_a.dtype in _FLOAT_TYPES
    float_b = value_b.dtype is None or value_b.dtype in _FLOAT_TYPES
    if not float_a and not float_b:
        return "non_float"
    if float_a != float_b:
        return f"dtype {value_a.dtype} vs {value_b.dtype}"
    return None


def _skip(name_a: str, name_b: str, reason: str) -> dict[str, str]:
    return {"a": name_a, "b": name_b, "reason": reason}


# --------------------------------------------------------------------------------------------
# running one side


@dataclass
class _SideRun:
    values: dict[str, np.ndarray]
    logits: np.ndarray  # [S, V] of the prompt, from the plain session
    perplexity: PerplexityResult | None = None
    text_argmax: list[np.ndarray] = field(default_factory=list)
    note: str | None = None
    providers: list[str] = field(default_factory=list)
    instrumentation_max_abs: float | None = None  # exposed vs plain session, prompt logits


def _run_side(side: GraphSide, exposed: list[str], inputs: _Inputs, provider: str) -> _SideRun:
    """Two sessions, one after the other: the instrumented one for the prefill's
    intermediates, then the plain one, as ``aqexport run``/``eval`` would have it, for the
    logits and perplexity. Exposing a value can keep ORT from fusing (an activation
    ``DequantizeLinear`` into an integer kernel), so the figures a user compares against
    ``aqexport eval`` come from the graph as built; the instrumented logits' distance from the
    plain ones is reported. A session costs 0.2 s to create on SmolLM2, and is dropped before
    the next is made, so the sides never hold weights together."""
    values, recorded_logits, note = _record(side, exposed, inputs, provider) if exposed else ({}, None, None)
    session = _plain_session(side, provider)
    decoder = _decoder(session, side)
    run = _SideRun(values, _prefill(decoder, side, inputs.prompt_ids), note=note, providers=session.get_providers())
    if recorded_logits is not None:
        run.instrumentation_max_abs = float(np.abs(recorded_logits - run.logits).max(initial=0.0))
    if inputs.windows is not None:
        run.perplexity = perplexity(_argmax_keeping(onnx_logits_of(decoder), run.text_argmax), inputs.windows)
    return run


def _record(
    side: GraphSide, exposed: list[str], inputs: _Inputs, provider: str
) -> tuple[dict[str, np.ndarray], np.ndarray | None, str | None]:
    """The exposed values and logits of one prefill over the prompt; none, with a note, if
    ORT refuses the extra outputs (logits and perplexity are still worth comparing)."""
    try:
        session = _session(side, exposed, provider)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/RuntimeException types
        note = f"'{side.label}': ORT refused the extra outputs ({_first_line(exc)}); logits only"
        logger.warning(note)
        return {}, None, note
    recording = _RecordingSession(session, [value.name for value in side.model.graph.outputs], exposed)
    decoder = _decoder(recording, side)
    recording.recording = True
    logits = _prefill(decoder, side, inputs.prompt_ids)
    return recording.recorded, logits, None


def _prefill(decoder: OnnxDecoder, side: GraphSide, ids: np.ndarray) -> np.ndarray:
    """Logits [S, V] of ``ids`` after an empty past."""
    batch = ids[None]
    try:
        logits, _ = decoder.step(batch, np.ones_like(batch), decoder.empty_past(1), np.arange(ids.size)[None])
    except ValueError as exc:  # a static graph's context too short, a bad feed
        raise AqexportError(f"cannot run '{side.label}': {exc}", "use a shorter --prompt") from None
    return logits[0]


def _argmax_keeping(logits_of: Callable[[np.ndarray], np.ndarray], kept: list[np.ndarray]) -> Callable:
    """``logits_of`` that also keeps each window's argmax (tokens, not logits: top-1 agreement
    over the text without holding [W, S, V] logits of A until B runs)."""

    def run(window: np.ndarray) -> np.ndarray:
        logits = logits_of(window)
        kept.append(logits.argmax(-1))
        return logits

    return run


def _plain_session(side: GraphSide, provider: str) -> ort.InferenceSession:
    try:
        return _session(side, [], provider)
    except Exception as exc:
        raise _cannot_load(side, exc) from None


def _cannot_load(side: GraphSide, exc: Exception) -> AqexportError:
    return AqexportError(
        f"ONNX Runtime cannot load '{side.label}': {_first_line(exc)}",
        "check that the model loads with 'aqexport run', and that this onnxruntime has its ops",
    )


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


def _session(side: GraphSide, exposed: list[str], provider: str) -> ort.InferenceSession:
    """A session on a serialized copy of ``side``'s graph with ``exposed`` as extra outputs,
    its initializers read from the side's own external data file (module docstring)."""
    assert side.onnx_path is not None
    proto = ir.to_proto(side.model)
    outputs = {output.name for output in proto.graph.output}
    for name in exposed:
        if name not in outputs:
            proto.graph.output.add(name=name)  # no type: ORT infers it
    quantization = (side.manifest or {}).get("quantization", {})
    options = session_options(int(quantization.get("accuracy_level", 0) or 0), quantization.get("weight_format"))
    options.add_session_config_entry(EXTERNAL_FOLDER_KEY, str(side.onnx_path.resolve().parent))
    options.enable_cpu_mem_arena = False
    providers = list(dict.fromkeys([PROVIDER_NAMES[provider], "CPUExecutionProvider"]))
    providers = [name for name in providers if name in ort.get_available_providers()]
    return ort.InferenceSession(proto.SerializeToString(), sess_options=options, providers=providers)


class _RecordingSession:
    """The session as the decoder sees it: only the graph's own outputs. While ``recording``
    is set, each run also fetches the exposed values and keeps the last run's (the prefill;
    for a static graph, the step on the last prompt token)."""

    def __init__(self, session: ort.InferenceSession, own: list[str], exposed: list[str]) -> None:
        self._session = session
        self._own = [meta for meta in session.get_outputs() if meta.name in set(own)]
        self._own_names = [meta.name for meta in self._own]
        self._exposed = exposed
        self.recording = False
        self.recorded: dict[str, np.ndarray] = {}

    def get_outputs(self) -> list:
        return self._own

    def run(self, names: list[str] | None, feeds: dict[str, np.ndarray], run_options: Any = None) -> list:
        names = list(names or self._own_names)
        if not self.recording:
            return self._session.run(names, feeds, run_options)
        extra = [name for name in self._exposed if name not in names]
        fetched = dict(zip(names + extra, self._session.run(names + extra, feeds, run_options)))
        self.recorded = {name: fetched[name] for name in self._exposed}
        return [fetched[name] for name in names]

    def __getattr__(self, name: str) -> Any:  # get_inputs, get_modelmeta, get_providers
        return getattr(self._session, name)


def _decoder(session: ort.InferenceSession | _RecordingSession, side: GraphSide) -> OnnxDecoder:
    """The runtime's decoder on the growing KV contract (empty past; no shared buffers, whose
    IO binding would not fetch the exposed values). Builder graphs leave the head size
    symbolic: it comes from ``genai_config.json`` (as ``aqexport run`` does)."""
    try:
        return decoder_for(session, genai_facts(side.directory)[0], "growing")  # type: ignore[arg-type]
    except ValueError as exc:
        raise AqexportError(f"cannot run '{side.label}': {exc}", "pass the artifact directory") from None


# --------------------------------------------------------------------------------------------
# comparing


def _compare_pairs(plan: _Plan, run_a: _SideRun, run_b: _SideRun) -> tuple[list[dict], list[dict]]:
    """Metrics of every pair both runs produced as floats of equal shape (float16 against
    float32 is fine: both are compared in float64)."""
    tensors, skipped = [], []
    for pair in plan.pairs:
        x, y = run_a.values.get(pair.a), run_b.values.get(pair.b)
        if x is None or y is None:
            skipped.append(_skip(pair.a, pair.b, "not produced by the run (ORT refused the extra outputs)"))
            continue
        float_x, float_y = np.issubdtype(x.dtype, np.floating), np.issubdtype(y.dtype, np.floating)
        if not float_x and not float_y:
            plan.ignored["non_float"] += 1
            continue
        if float_x != float_y:
            skipped.append(_skip(pair.a, pair.b, f"dtype {x.dtype} vs {y.dtype}"))
            continue
        if x.shape != y.shape:
            skipped.append(_skip(pair.a, pair.b, f"shape {list(x.shape)} vs {list(y.shape)}"))
            continue
        entry = {"a": pair.a, "b": pair.b, "op": pair.node_a.op_type, "node": pair.node_a.name}
        entry["module"] = module_of(pair.node_a)
        tensors.append({**entry, **tensor_metrics(x, y)})
    return tensors, skipped


def module_of(node: ir.Node) -> str | None:
    """The module a node belongs to: from its stable name; else from the weight it reads
    (``model.layers.0.input_layernorm.weight[_folded]``: the passes' fused norms have no
    stable name);
    else from the node that feeds it (a RotaryEmbedding after the packed q/k/v projection)."""
    found = module_path(node.name)
    if found:
        return found
    for value in node.inputs:
        match = _WEIGHT_NAME.match(value.name or "") if value is not None and value.is_initializer() else None
        if match:
            return match.group(1)
    first = node.inputs[0] if node.inputs else None
    producer = first.producer() if first is not None else None
    return module_path(producer.name) if producer is not None else None


#: ``model.layers.0.input_layernorm.weight`` and the passes' renamings (``..._folded``)
_WEIGHT_NAME = re.compile(r"^((?:model|lm_head)(?:\.\w+)*?)\.(?:weight|bias)(?:_\w+)?$")


def module_path(node_name: str | None) -> str | None:
    """``/model/layers.3/mlp/down_proj/MatMulNBits`` -> ``model.layers.3.mlp.down_proj``: the
    exporter's stable names are the module path plus the op; other names have none."""
    if not node_name or not node_name.startswith(("/model/", "/lm_head/")):
        return None
    parts = node_name.strip("/").split("/")[:-1]
    return ".".join(parts) or None


def _is_residual(pair: _Pair) -> bool:
    """A tensor of the residual stream between blocks: the embedding lookup's output and the
    running sum a skip-RMSNorm writes (its fourth output). Transforms are folded *inside* a block
    (a norm's weight, the next linear's input), so two builds with different transforms compute
    different but equivalent activations there; the residual stream is the same quantity in both,
    which makes its first divergence the layer where quantization error really took over."""
    node = pair.node_a
    if node.op_type in ("SkipSimplifiedLayerNormalization", "SkipLayerNormalization"):
        return len(node.outputs) > 3 and node.outputs[3].name == pair.a
    return node.op_type in ("Gather", "GatherBlockQuantized") and "embed" in (node.name or "")


def _first_divergence(
    tensors: list[dict], plan: _Plan, threshold_db: float, among: Callable[[_Pair], bool] | None = None
) -> dict[str, Any] | None:
    pairs = {(pair.a, pair.b): pair for pair in plan.pairs}
    for index, entry in enumerate(tensors):
        pair = pairs[(entry["a"], entry["b"])]
        if (among is None or among(pair)) and diverges(entry, threshold_db):
            return {
                "index": index,
                "a": pair.a,
                "b": pair.b,
                "a_node": pair.node_a.name,
                "a_op": pair.node_a.op_type,
                "b_node": pair.node_b.name,
                "b_op": pair.node_b.op_type,
                "module": entry["module"],
                "b_module": module_of(pair.node_b),
                "sqnr_db": entry["sqnr_db"],
                "cosine": entry["cosine"],
                "max_abs": entry["max_abs"],
            }
    return None


def _compare_logits(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    if a.shape != b.shape:
        return {"skipped": f"logits shape {list(a.shape)} vs {list(b.shape)}"}
    metrics = tensor_metrics(a, b)
    return {
        "positions": int(a.shape[0]),
        "max_abs": metrics["max_abs"],
        "top1_agreement": float(np.mean(a.argmax(-1) == b.argmax(-1))),
        "sqnr_db": metrics["sqnr_db"],
        "cosine": metrics["cosine"],
        "identical": metrics["identical"],
    }


def _compare_perplexity(run_a: _SideRun, run_b: _SideRun) -> dict[str, Any] | None:
    if run_a.perplexity is None or run_b.perplexity is None:
        return None
    ppl_a, ppl_b = run_a.perplexity.perplexity, run_b.perplexity.perplexity
    agree = np.concatenate([x == y for x, y in zip(run_a.text_argmax, run_b.text_argmax)])
    return {
        "a": ppl_a,
        "b": ppl_b,
        "change": ppl_b / ppl_a - 1.0,
        "top1_agreement": float(agree.mean()),
        "windows": run_a.perplexity.windows,
        "seqlen": run_a.perplexity.seqlen,
        "tokens": run_a.perplexity.tokens,
    }
