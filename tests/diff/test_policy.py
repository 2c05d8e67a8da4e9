"""``aqexport.diff.policy``: every rule passes and fails on hand-written reports, with the exact
message CI shows; bad policy files are one ``ConfigError`` naming the key."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from aqexport.diff.policy import DiffPolicy, evaluate, load_policy
from aqexport.errors import AqexportError, ConfigError

EXAMPLE_POLICY = Path(__file__).resolve().parents[2] / "examples" / "ci" / "policy.yaml"


def _side(label: str, total: int) -> dict[str, Any]:
    return {
        "label": label,
        "kind": "artifact",
        "files": {"model.onnx": 1000},
        "total_bytes": total,
        "bytes_by_dtype": {"uint8": total - 1000, "float32": 1000},
    }


def _linear(name: str, status: str, sqnr: Any, changes: list[str]) -> dict[str, Any]:
    scheme = {"format": "matmul_nbits", "bits": 4, "block_size": 128, "granularity": "blocked", "packed": False}
    weights = None if sqnr is None else {"max_abs": 0.01, "rel_error": 0.05, "sqnr_db": sqnr}
    return {
        "name": name,
        "status": status,
        "a": scheme,
        "b": dict(scheme),
        "changes": changes,
        "weights": weights,
        "scales": None,
        "outliers": None,
    }


def changed_report() -> dict[str, Any]:
    """A quantized A against a B that moved one linear, added an op and an output, grew 10 %."""
    return {
        "schema": "aqexport.diff",
        "version": 1,
        "a": _side("base/artifact", 100_000),
        "b": _side("head/artifact", 110_000),
        "identical": False,
        "alignment": {
            "by_rule": {"name": 10, "structure": 1, "position": 0},
            "renamed": [{"a": "/n/old", "b": "/n/new", "op": "Add", "rule": "structure"}],
            "unmatched": {"a": [], "b": []},
        },
        "structure": {
            "nodes": {
                "added": [
                    {"name": "/model/GatherBlockQuantized", "op": "GatherBlockQuantized", "domain": "com.microsoft"}
                ],
                "removed": [{"name": "/model/Gather", "op": "Gather", "domain": ""}],
                "changed": [{"a": "/n/old", "b": "/n/new", "op": "Add", "changes": ["input 1 renamed"]}],
                "unchanged": 9,
            },
            "ops": {
                "a": {"com.microsoft::MatMulNBits": 4, "::Gather": 1, "::Add": 5},
                "b": {"com.microsoft::MatMulNBits": 4, "com.microsoft::GatherBlockQuantized": 1, "::Add": 5},
                "delta": {"::Gather": -1, "com.microsoft::GatherBlockQuantized": 1},
            },
            "opsets": {"a": {"": 21, "com.microsoft": 1}, "b": {"": 21, "com.microsoft": 1}},
            "io": {
                "inputs": {"added": [], "removed": [], "changed": []},
                "outputs": {
                    "added": [{"name": "hidden", "dtype": "float32", "shape": ["batch", "seq", 576]}],
                    "removed": [],
                    "changed": [
                        {
                            "name": "logits",
                            "a": {"dtype": "float32", "shape": ["batch", "seq", 49152]},
                            "b": {"dtype": "float16", "shape": ["batch", "seq", 49152]},
                        }
                    ],
                },
            },
            "initializers": {
                "added": [],
                "removed": [],
                "changed": [{"name": "model.layers.0.mlp.down_proj.weight_Q4", "changes": ["values"]}],
                "unchanged": 20,
            },
            "sizes": {"a_bytes": 100_000, "b_bytes": 110_000, "ratio": 1.1},
        },
        "linears": {
            "linears": [
                _linear("model.layers.0.self_attn.q_proj", "unchanged", "inf", []),
                _linear("model.layers.0.mlp.down_proj", "changed", 18.25, ["codes changed", "scales changed"]),
                _linear("model.layers.0.mlp.up_proj", "changed", 31.5, ["codes changed"]),
            ],
            "transforms": {
                "folded": [],
                "affine_inverse_nodes": {"only_a": [], "only_b": [], "common": 0},
                "form": {"a": None, "b": None},
            },
            "embedding": {
                "name": None,
                "a": None,
                "b": None,
                "status": None,
                "changes": [],
                "weights": None,
                "scales": None,
            },
            "lm_head": {"name": None, "a": None, "b": None, "status": None},
            "summary": {
                "changed": 2,
                "unchanged": 1,
                "only_a": 0,
                "only_b": 0,
                "min_sqnr_db": 18.25,
                "min_sqnr_linear": "model.layers.0.mlp.down_proj",
            },
        },
        "run": {
            "inputs": {"prompt": "The capital of France is", "tokens": 6, "provider": "cpu", "notes": []},
            "coverage": {"compared": 2, "skipped": 0, "notes": []},
            "tensors": [
                {
                    "a": "x0",
                    "b": "x0",
                    "op": "Add",
                    "node": "/model/layers.0/Add",
                    "module": "model.layers.0",
                    "cosine": 1.0,
                    "sqnr_db": None,
                    "max_abs": 0.0,
                    "identical": True,
                },
                {
                    "a": "x1",
                    "b": "x1",
                    "op": "MatMulNBits",
                    "node": "/model/layers.0/mlp/down_proj/MatMulNBits",
                    "module": "model.layers.0.mlp.down_proj",
                    "cosine": 0.99,
                    "sqnr_db": 12.5,
                    "max_abs": 0.3,
                    "identical": False,
                },
            ],
            "skipped": [],
            "first_divergence": {
                "index": 1,
                "a": "x1",
                "b": "x1",
                "a_node": "/model/layers.0/mlp/down_proj/MatMulNBits",
                "a_op": "MatMulNBits",
                "b_node": "/model/layers.0/mlp/down_proj/MatMulNBits",
                "b_op": "MatMulNBits",
                "module": "model.layers.0.mlp.down_proj",
                "b_module": "model.layers.0.mlp.down_proj",
                "sqnr_db": 12.5,
                "cosine": 0.99,
                "max_abs": 0.3,
            },
            "threshold_db": 20.0,
            "logits": {
                "positions": 6,
                "max_abs": 0.5,
                "top1_agreement": 5 / 6,
                "sqnr_db": 24.0,
                "cosine": 0.999,
                "identical": False,
            },
            "perplexity": {
                "a": 20.0,
                "b": 20.64,
                "change": 0.032,
                "top1_agreement": 0.975,
                "windows": 4,
                "seqlen": 256,
                "tokens": 1024,
            },
        },
        "mobile": None,
        "policy": None,
    }


def _messages(report: dict[str, Any], **rules: Any) -> list[str]:
    return [v["message"] for v in evaluate(report, DiffPolicy(**rules))["violations"]]


# --------------------------------------------------------------------------------------------
# each rule, passing and failing


def test_max_ppl_increase() -> None:
    report = changed_report()
    assert _messages(report, max_ppl_increase=0.05) == []
    assert _messages(report, max_ppl_increase=0.01) == [
        "perplexity +3.20 % > max_ppl_increase 1.00 % (20.0000 -> 20.6400)"
    ]


def test_max_ppl_increase_needs_text() -> None:
    report = changed_report()
    report["run"]["perplexity"] = None
    with pytest.raises(ConfigError, match="--text"):
        evaluate(report, DiffPolicy(max_ppl_increase=0.01))


def test_min_top1_agreement_prefers_the_text() -> None:
    report = changed_report()
    assert _messages(report, min_top1_agreement=0.95) == []
    assert _messages(report, min_top1_agreement=0.99) == ["top-1 agreement 97.50 % (text) < min_top1_agreement 99.00 %"]


def test_min_top1_agreement_falls_back_to_the_prompt() -> None:
    report = changed_report()
    report["run"]["perplexity"] = None
    assert _messages(report, min_top1_agreement=0.8) == []
    assert _messages(report, min_top1_agreement=0.9) == [
        "top-1 agreement 83.33 % (prompt) < min_top1_agreement 90.00 %"
    ]


def test_top1_not_measured_is_a_violation() -> None:
    report = changed_report()
    report["run"]["perplexity"] = None
    report["run"]["logits"] = {"skipped": "logits shape [6, 10] vs [6, 12]"}
    assert _messages(report, min_top1_agreement=0.9) == [
        "top-1 agreement not measured (logits shape [6, 10] vs [6, 12]) < min_top1_agreement 90.00 %"
    ]


def test_run_rules_need_the_run_section() -> None:
    report = changed_report()
    report["run"] = None
    for rule in ({"max_ppl_increase": 0.01}, {"min_top1_agreement": 0.9}):
        with pytest.raises(AqexportError, match="needs the run section"):
            evaluate(report, DiffPolicy(**rule))


def test_min_weight_sqnr_db() -> None:
    report = changed_report()
    assert _messages(report, min_weight_sqnr_db=15) == []
    assert _messages(report, min_weight_sqnr_db=20) == [
        "weight SQNR 18.25 dB at model.layers.0.mlp.down_proj < min_weight_sqnr_db 20.00 dB"
    ]


def test_min_weight_sqnr_ignores_unchanged_and_reads_inf() -> None:
    report = changed_report()
    for entry in report["linears"]["linears"]:
        entry["status"], entry["weights"]["sqnr_db"] = "unchanged", "inf"
    assert _messages(report, min_weight_sqnr_db=200) == []
    report["linears"]["linears"][1].update(status="changed")  # changed scheme, identical weights
    assert _messages(report, min_weight_sqnr_db=200) == []


def test_min_weight_sqnr_without_weights_is_bad_input() -> None:
    report = changed_report()
    for entry in report["linears"]["linears"]:
        entry["weights"] = None  # a golden-description side
    with pytest.raises(ConfigError, match="min_weight_sqnr_db"):
        evaluate(report, DiffPolicy(min_weight_sqnr_db=20))


def test_max_size_increase() -> None:
    report = changed_report()
    assert _messages(report, max_size_increase=0.1) == []
    assert _messages(report, max_size_increase=0.05) == [
        "size +10.00 % > max_size_increase 5.00 % (100000 -> 110000 bytes)"
    ]


def test_forbid_ops_by_name_and_domain() -> None:
    report = changed_report()
    assert _messages(report, forbid_ops=["Gather", "ai.onnx::GatherBlockQuantized"]) == []
    assert _messages(report, forbid_ops=["GatherBlockQuantized"]) == [
        "forbidden op com.microsoft::GatherBlockQuantized in B (1 node; forbid_ops: GatherBlockQuantized)"
    ]
    assert _messages(report, forbid_ops=["ai.onnx::Add"]) == [
        "forbidden op ::Add in B (5 nodes; forbid_ops: ai.onnx::Add)"
    ]


def test_allow_new_ops() -> None:
    report = changed_report()
    assert _messages(report, allow_new_ops=["com.microsoft::GatherBlockQuantized"]) == []
    assert _messages(report, allow_new_ops=["GatherBlockQuantized"]) == []
    assert _messages(report, allow_new_ops=[]) == [
        "new op com.microsoft::GatherBlockQuantized in B (1 node) is not in allow_new_ops"
    ]


def test_io_must_match() -> None:
    report = changed_report()
    assert _messages(report, io_must_match=False) == []
    assert _messages(report, io_must_match=True) == [
        "output 'hidden' added (io_must_match)",
        "output 'logits' changed: float32 ['batch', 'seq', 49152] -> float16 ['batch', 'seq', 49152] (io_must_match)",
    ]
    report["structure"]["io"]["outputs"] = {"added": [], "removed": [], "renamed": [], "changed": []}
    assert _messages(report, io_must_match=True) == []
    report["structure"]["io"]["inputs"]["renamed"] = [{"a": "attention_mask", "b": "mask"}]
    assert _messages(report, io_must_match=True) == ["input 'attention_mask' renamed to 'mask' (io_must_match)"]


def test_require_identical() -> None:
    report = changed_report()
    assert _messages(report, require_identical=True) == ["the two sides differ (require_identical)"]
    report["identical"] = True
    assert _messages(report, require_identical=True) == []


def test_max_changed_linears() -> None:
    report = changed_report()
    assert _messages(report, max_changed_linears=2) == []
    assert _messages(report, max_changed_linears=1) == [
        "2 linears changed > max_changed_linears 1 (first: model.layers.0.mlp.down_proj)"
    ]


def test_section_shape_and_inf_is_a_string() -> None:
    report = changed_report()
    report["structure"]["sizes"]["ratio"] = float("inf")
    section = evaluate(report, DiffPolicy(max_size_increase=0.5, require_identical=False).with_source("p.yaml"))
    assert section["source"] == "p.yaml"
    assert section["rules"] == {"max_size_increase": 0.5, "require_identical": False}
    assert section["passed"] is False
    assert section["violations"][0]["actual"] == "inf"
    assert set(section["violations"][0]) == {"rule", "limit", "actual", "message"}
    assert evaluate(copy.deepcopy(report), DiffPolicy())["passed"] is True


# --------------------------------------------------------------------------------------------
# the policy itself


def test_needs_run() -> None:
    assert not DiffPolicy().needs_run()
    assert not DiffPolicy(min_weight_sqnr_db=20, forbid_ops=["X"]).needs_run()
    assert DiffPolicy(max_ppl_increase=0.01).needs_run()
    assert DiffPolicy(min_top1_agreement=0.9).needs_run()
    assert DiffPolicy(max_ppl_increase=0.01).needs_text()
    assert not DiffPolicy(min_top1_agreement=0.9).needs_text()


def test_merged_flags_override_the_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("max_ppl_increase: 1 %\nforbid_ops: [Gather]\n")
    merged = load_policy(path).merged(DiffPolicy(max_ppl_increase=0.02, io_must_match=True))
    assert merged.rules() == {"max_ppl_increase": 0.02, "forbid_ops": ["Gather"], "io_must_match": True}
    assert merged.source == f"{path} + command line"
    assert load_policy(path).merged(DiffPolicy()).source == str(path)


def test_unknown_key_is_named(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("max_ppl_increse: 0.01\n")
    with pytest.raises(ConfigError, match="unknown key 'max_ppl_increse'") as info:
        load_policy(path)
    assert "max_ppl_increase" in info.value.fix
    assert info.value.exit_code == 2


def test_wrong_type_is_named(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("max_changed_linears: many\n")
    with pytest.raises(ConfigError, match="bad value for 'max_changed_linears'"):
        load_policy(path)
    path.write_text("min_top1_agreement: 1.5\n")
    with pytest.raises(ConfigError, match="min_top1_agreement"):
        load_policy(path)


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("forbid_ops: [Gather\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_policy(path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_policy(path)
    with pytest.raises(ConfigError, match="not found"):
        load_policy(tmp_path / "absent.yaml")


def test_empty_file_checks_nothing(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("# nothing yet\n")
    assert load_policy(path).is_empty()


def test_example_policy_loads() -> None:
    policy = load_policy(EXAMPLE_POLICY)
    assert policy.needs_run() and not policy.is_empty()
    assert set(yaml.safe_load(EXAMPLE_POLICY.read_text())) == set(policy.rules())
