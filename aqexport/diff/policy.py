"""The CI gate of ``aqexport diff``: a policy of limits, checked against one diff report.

A diff on its own only describes; CI needs a yes or no. A policy states what a pull request may
change (perplexity at most +1 %, no new op an EP cannot run, the IO contract untouched) and
:func:`evaluate` turns a report into the ``policy`` section: the rules checked, one violation per
broken rule with a one-line message, and ``passed``.

A policy is YAML (``--policy FILE``, loaded by :func:`load_policy`) and/or command-line flags;
every rule is optional and ``None`` means "not checked", so :meth:`DiffPolicy.merged` can lay the
flags over the file (a flag wins). Unknown keys are refused: a misspelt limit that is silently
ignored is a gate that never closes.

Rules (relative values are fractions: ``0.01`` is 1 %; ``"1 %"`` / ``"1%"`` are accepted too):

* ``max_ppl_increase``: ``run.perplexity.change`` (B/A − 1) at most this; needs ``--run --text``.
* ``min_top1_agreement``: top-1 agreement of B with A at least this: over the text's positions
  when perplexity ran, else over the prompt's logits; needs ``--run``.
* ``min_weight_sqnr_db``: the lowest SQNR (dB, B against A) over the changed linears at least this.
* ``max_size_increase``: ``structure.sizes.ratio − 1`` at most this.
* ``forbid_ops``: op types that must not appear in B, as ``Op`` (any domain) or ``domain::Op``
  (``::Op`` or ``ai.onnx::Op`` for the default domain).
* ``allow_new_ops``: every op type in B but not in A must be listed (same spelling); an empty list
  forbids any new op.
* ``io_must_match``: any graph input or output added, removed, renamed or changed is a violation.
* ``require_identical``: the two sides must be identical.
* ``max_changed_linears``: at most this many linears not ``unchanged`` (changed, only in A or only
  in B).

Exit status of ``aqexport diff`` (the contract CI scripts rely on):

* **0**: no policy, or every rule passed;
* **1**: the diff ran and at least one rule was violated;
* **2**: bad input: unreadable sides, a bad policy (YAML, unknown key, wrong type), or a rule that
  needs what the report lacks (perplexity without ``--text``, weights of a description side).
  Failures that prevent the diff from being made exit 2 as well, so 1 always means "violated".
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationError

from aqexport.errors import ConfigError, explain_validation_error
from aqexport.yaml_files import read_yaml_mapping

__all__ = ["DiffPolicy", "evaluate", "io_changes", "load_policy", "top1_agreement"]

INF = "inf"
_PERCENT = re.compile(r"^\s*([-+]?\d+(?:\.\d*)?|[-+]?\.\d+)\s*%\s*$")
_DEFAULT_DOMAINS = ("", "ai.onnx")
#: Slack on a limit: ``1.1 - 1`` is 0.10000000000000009, and a 10 % limit must pass a 10 % growth.
_TOLERANCE = 1e-9


def _percent(value: Any) -> Any:
    """``"1.5 %"`` → 0.015, so a policy can be written the way people say it; anything else is
    left for pydantic to validate (and name the key if it is wrong)."""
    if isinstance(value, str):
        match = _PERCENT.match(value)
        if match:
            return float(match.group(1)) / 100.0
    return value


Relative = Annotated[float, BeforeValidator(_percent)]


class DiffPolicy(BaseModel):
    """Limits a diff must stay within; ``None`` everywhere means nothing is checked."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_ppl_increase: Relative | None = Field(None, description="relative perplexity increase B/A - 1, at most")
    min_top1_agreement: Relative | None = Field(None, ge=0.0, le=1.0, description="top-1 agreement, at least")
    min_weight_sqnr_db: float | None = Field(None, description="lowest SQNR over changed linears (dB), at least")
    max_size_increase: Relative | None = Field(None, description="relative size increase B/A - 1, at most")
    forbid_ops: list[str] | None = Field(None, description="op types that must not appear in B")
    allow_new_ops: list[str] | None = Field(None, description="op types B may add over A")
    io_must_match: bool | None = Field(None, description="graph inputs and outputs must not change")
    require_identical: bool | None = Field(None, description="the two sides must be identical")
    max_changed_linears: int | None = Field(None, ge=0, description="linears changed, at most")
    structure_must_match: bool | None = Field(
        None, description="no node added, removed, rewired or re-parametrised; same opsets and graph I/O"
    )

    _source: str = PrivateAttr("command line")

    @property
    def source(self) -> str:
        """Where the rules came from (a policy file, the command line, or both)."""
        return self._source

    def with_source(self, source: str) -> DiffPolicy:
        """A copy that says where it came from (the report's ``policy.source``)."""
        copy = self.model_copy()
        copy._source = source
        return copy

    def rules(self) -> dict[str, Any]:
        """The rules that are checked, as JSON."""
        return self.model_dump(mode="json", exclude_none=True)

    def is_empty(self) -> bool:
        return not self.rules()

    def merged(self, other: DiffPolicy) -> DiffPolicy:
        """``self`` (the file) with every rule ``other`` sets (the flags) laid over it."""
        overrides = other.rules()
        if not overrides:
            return self
        merged = self.model_copy(update=overrides)
        sources = [self.source] if not self.is_empty() else []
        return merged.with_source(" + ".join([*sources, other.source]))

    def needs_run(self) -> bool:
        """True when a rule reads the ``run`` section, so the CLI turns ``--run`` on."""
        return self.max_ppl_increase is not None or self.min_top1_agreement is not None

    def needs_text(self) -> bool:
        """True when a rule reads perplexity, which only ``--run --text`` measures."""
        return self.max_ppl_increase is not None


def load_policy(path: str | Path) -> DiffPolicy:
    """Read and validate a policy YAML; every failure is one ``ConfigError`` (exit status 2)."""
    path = Path(path)
    raw = read_yaml_mapping(
        path, "policy file", "pass the path of a policy YAML (--policy)", "rules", "examples/ci/policy.yaml"
    )
    try:
        policy = DiffPolicy.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        first = explain_validation_error(errors[0], DiffPolicy)
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ConfigError(f"{path}: {first.cause}{more}", first.fix) from None
    return policy.with_source(str(path))


# --------------------------------------------------------------------------------------------
# evaluation


def evaluate(report: dict[str, Any], policy: DiffPolicy) -> dict[str, Any]:
    """The report's ``policy`` section: source, rules, violations (rule, limit, actual, message)
    and passed. Raises ``ConfigError`` when a rule needs what the report does not hold."""
    violations: list[dict[str, Any]] = []
    for rule, check in _CHECKS.items():
        limit = getattr(policy, rule)
        if limit is not None:
            violations.extend(check(report, limit))
    return {"source": policy.source, "rules": policy.rules(), "violations": violations, "passed": not violations}


def _violation(rule: str, limit: Any, actual: Any, message: str) -> dict[str, Any]:
    return {"rule": rule, "limit": _json_number(limit), "actual": _json_number(actual), "message": message}


def _json_number(value: Any) -> Any:
    """JSON has no infinity: ``"inf"`` / ``"-inf"``, as the rest of the report writes it."""
    if isinstance(value, float) and math.isinf(value):
        return INF if value > 0 else "-inf"
    return value


def _number(value: Any) -> float | None:
    """A report number (``"inf"`` strings included) as a float; None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        return float(value)  # "inf", "-inf"
    return float(value)


def _above(actual: float, limit: float) -> bool:
    """``actual > limit`` beyond float rounding (the report's ratios are computed, not typed)."""
    return actual - limit > _TOLERANCE * max(1.0, abs(limit))


def _pct(fraction: float) -> str:
    return f"{fraction * 100:+.2f} %"


def _run(report: dict[str, Any], rule: str) -> dict[str, Any]:
    run = report.get("run")
    if run is None:
        raise ConfigError(f"policy rule '{rule}' needs the run section, and the diff ran without --run", "add --run")
    return run


def _check_ppl(report: dict[str, Any], limit: float) -> list[dict[str, Any]]:
    perplexity = _run(report, "max_ppl_increase").get("perplexity")
    if perplexity is None:
        raise ConfigError(
            "policy rule 'max_ppl_increase' needs perplexity, and the diff ran without --text",
            "add --text FILE (e.g. WikiText-2's test split)",
        )
    change = _number(perplexity.get("change"))
    if change is not None and not math.isnan(change) and not _above(change, limit):
        return []
    shown = "not measured" if change is None else _pct(change)
    message = f"perplexity {shown} > max_ppl_increase {limit * 100:.2f} %"
    if perplexity.get("a") is not None and perplexity.get("b") is not None:
        message += f" ({_number(perplexity['a']):.4f} -> {_number(perplexity['b']):.4f})"
    return [_violation("max_ppl_increase", limit, change, message)]


def top1_agreement(run: dict[str, Any]) -> tuple[float | None, str]:
    """Top-1 agreement of B with A and what it was measured on: the text's positions when
    perplexity ran (many positions), else the prompt's logits; None when the logits were not
    compared (the vocabularies differ)."""
    if run.get("perplexity") is not None:
        return _number(run["perplexity"].get("top1_agreement")), "text"
    logits = run.get("logits") or {}
    return _number(logits.get("top1_agreement")), "prompt"


def _check_top1(report: dict[str, Any], limit: float) -> list[dict[str, Any]]:
    agreement, where = top1_agreement(_run(report, "min_top1_agreement"))
    if agreement is None:
        skipped = ((report.get("run") or {}).get("logits") or {}).get("skipped", "not measured")
        message = f"top-1 agreement not measured ({skipped}) < min_top1_agreement {limit * 100:.2f} %"
        return [_violation("min_top1_agreement", limit, None, message)]
    if _above(limit, agreement):
        message = f"top-1 agreement {agreement * 100:.2f} % ({where}) < min_top1_agreement {limit * 100:.2f} %"
        return [_violation("min_top1_agreement", limit, agreement, message)]
    return []


def _linear_entries(report: dict[str, Any]) -> list[dict[str, Any]]:
    return list((report.get("linears") or {}).get("linears") or [])


def _check_sqnr(report: dict[str, Any], limit: float) -> list[dict[str, Any]]:
    changed = [entry for entry in _linear_entries(report) if entry.get("status") == "changed"]
    compared = [(entry["weights"].get("sqnr_db"), entry["name"]) for entry in changed if entry.get("weights")]
    compared = [(_number(value), name) for value, name in compared if value is not None]
    if changed and not compared:
        raise ConfigError(
            "policy rule 'min_weight_sqnr_db' needs the weights of both sides, and none of the "
            f"{len(changed)} changed linear(s) could be compared (a description side holds no weights)",
            "diff two artifact directories or .onnx files, or drop min_weight_sqnr_db",
        )
    if not compared:
        return []
    lowest, name = min(compared, key=lambda item: (item[0], item[1]))
    if _above(limit, lowest):
        message = f"weight SQNR {lowest:.2f} dB at {name} < min_weight_sqnr_db {limit:.2f} dB"
        return [_violation("min_weight_sqnr_db", limit, lowest, message)]
    return []


def _check_size(report: dict[str, Any], limit: float) -> list[dict[str, Any]]:
    sizes = (report.get("structure") or {}).get("sizes") or {}
    ratio = _number(sizes.get("ratio"))
    if ratio is None:
        raise ConfigError(
            "policy rule 'max_size_increase' needs structure.sizes.ratio, and the report has none",
            "diff two sides whose sizes are known, or drop max_size_increase",
        )
    increase = ratio - 1.0
    if _above(increase, limit):
        message = f"size {_pct(increase)} > max_size_increase {limit * 100:.2f} %"
        message += f" ({sizes.get('a_bytes')} -> {sizes.get('b_bytes')} bytes)"
        return [_violation("max_size_increase", limit, increase, message)]
    return []


def _split_op(key: str) -> tuple[str | None, str]:
    """``domain::Op`` → (domain, Op) with the default domain as ""; a bare ``Op`` → (None, Op)."""
    if "::" not in key:
        return None, key
    domain, op = key.rsplit("::", 1)
    return ("" if domain in _DEFAULT_DOMAINS else domain), op


def _op_matches(pattern: str, key: str) -> bool:
    """Whether the op histogram key ``domain::Op`` is named by a policy entry."""
    want_domain, want_op = _split_op(pattern)
    domain, op = _split_op(key)
    return op == want_op and (want_domain is None or want_domain == (domain or ""))


def _ops(report: dict[str, Any], side: str) -> dict[str, int]:
    ops = ((report.get("structure") or {}).get("ops") or {}).get(side) or {}
    return {key: count for key, count in ops.items() if count}


def _check_forbidden(report: dict[str, Any], forbidden: list[str]) -> list[dict[str, Any]]:
    violations = []
    for key, count in sorted(_ops(report, "b").items()):
        names = [pattern for pattern in forbidden if _op_matches(pattern, key)]
        if names:
            message = f"forbidden op {key} in B ({count} node{'s' if count != 1 else ''}; forbid_ops: {names[0]})"
            violations.append(_violation("forbid_ops", names[0], key, message))
    return violations


def _check_new_ops(report: dict[str, Any], allowed: list[str]) -> list[dict[str, Any]]:
    ops_a = _ops(report, "a")
    violations = []
    for key, count in sorted(_ops(report, "b").items()):
        if key in ops_a or any(_op_matches(pattern, key) for pattern in allowed):
            continue
        message = f"new op {key} in B ({count} node{'s' if count != 1 else ''}) is not in allow_new_ops"
        violations.append(_violation("allow_new_ops", list(allowed), key, message))
    return violations


def _shape_text(spec: dict[str, Any] | None) -> str:
    if not spec:
        return "?"
    return f"{spec.get('dtype')} {spec.get('shape')}"


def io_changes(report: dict[str, Any]) -> list[str]:
    """Every graph input/output change as one phrase (``input 'x' added``), inputs first."""
    io = (report.get("structure") or {}).get("io") or {}
    phrases = []
    for kind, word in (("inputs", "input"), ("outputs", "output")):
        section = io.get(kind) or {}
        phrases += [f"{word} '{item['name']}' added" for item in section.get("added") or []]
        phrases += [f"{word} '{item['name']}' removed" for item in section.get("removed") or []]
        phrases += [f"{word} '{item['a']}' renamed to '{item['b']}'" for item in section.get("renamed") or []]
        phrases += [
            f"{word} '{item['name']}' changed: {_shape_text(item.get('a'))} -> {_shape_text(item.get('b'))}"
            for item in section.get("changed") or []
        ]
    return phrases


def _check_io(report: dict[str, Any], must_match: bool) -> list[dict[str, Any]]:
    if not must_match:
        return []
    return [_violation("io_must_match", True, phrase, f"{phrase} (io_must_match)") for phrase in io_changes(report)]


def _check_identical(report: dict[str, Any], required: bool) -> list[dict[str, Any]]:
    if not required or report.get("identical"):
        return []
    return [_violation("require_identical", True, False, "the two sides differ (require_identical)")]


def _check_changed_linears(report: dict[str, Any], limit: int) -> list[dict[str, Any]]:
    changed = [entry["name"] for entry in _linear_entries(report) if entry.get("status") != "unchanged"]
    if len(changed) > limit:
        count = f"{len(changed)} linear{'' if len(changed) == 1 else 's'}"
        message = f"{count} changed > max_changed_linears {limit} (first: {changed[0]})"
        return [_violation("max_changed_linears", limit, len(changed), message)]
    return []


def _check_structure(report: dict[str, Any], required: bool) -> list[dict[str, Any]]:
    """The golden check: the graph's shape pinned, its weight bytes free to move (a different
    CPU may round a calibration differently in the last bit; it must not change the graph)."""
    if not required:
        return []
    structure = report.get("structure") or {}
    nodes = structure.get("nodes") or {}
    phrases = [f"node '{n['name'] or n['op']}' ({n['op']}) added" for n in nodes.get("added") or []]
    phrases += [f"node '{n['name'] or n['op']}' ({n['op']}) removed" for n in nodes.get("removed") or []]
    phrases += [f"node '{n['a']}' changed: {'; '.join(n['changes'])}" for n in nodes.get("changed") or []]
    phrases += io_changes(report)
    opsets = structure.get("opsets") or {}
    if opsets.get("a") != opsets.get("b"):
        phrases.append(f"opsets {opsets.get('a')} -> {opsets.get('b')}")
    return [_violation("structure_must_match", True, p, f"{p} (structure_must_match)") for p in phrases]


_CHECKS = {
    "require_identical": _check_identical,
    "structure_must_match": _check_structure,
    "io_must_match": _check_io,
    "forbid_ops": _check_forbidden,
    "allow_new_ops": _check_new_ops,
    "max_size_increase": _check_size,
    "max_changed_linears": _check_changed_linears,
    "min_weight_sqnr_db": _check_sqnr,
    "max_ppl_increase": _check_ppl,
    "min_top1_agreement": _check_top1,
}
