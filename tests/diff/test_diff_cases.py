"""``aqexport diff`` end to end, one case per test, each asserting the exact report section.

The graphs are small hand-built ONNX models saved with external data (as artifacts are), so
each test runs the real command line: open, align, compare, gate, render.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from aqexport.cli import main

K, N, BLOCK = 32, 8, 16
LINEAR = "model.layers.0.mlp.down_proj"


def _pack(codes: np.ndarray) -> np.ndarray:
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def _tensors(seed: int = 0, block: int = BLOCK) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    blocks = K // block
    codes = rng.integers(0, 16, (N, blocks, block), dtype=np.uint8)
    return {
        "weight": _pack(codes),
        "scales": rng.uniform(0.01, 0.1, (N * blocks,)).astype(np.float32),
        "zeros": _pack(np.full((N, blocks + blocks % 2), 8, np.uint8)).reshape(-1),
        "bias": rng.standard_normal(N).astype(np.float32),
    }


def _init(name: str, array: np.ndarray) -> ir.Value:
    return ir.Value(name=name, const_value=ir.tensor(array, name=name))


def build_model(
    tensors: dict[str, np.ndarray] | None = None,
    *,
    block: int = BLOCK,
    input_name: str = "input_ids_embeds",
    add_op: str = "Add",
    add_name: str = "/model/layers.0/mlp/Add",
    outliers: list[int] | None = None,
) -> ir.Model:
    tensors = tensors or _tensors(block=block)
    x = ir.Value(name=input_name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", K]))
    inits = [
        _init(f"{LINEAR}.weight_Q4", tensors["weight"]),
        _init(f"{LINEAR}.weight_scales", tensors["scales"]),
        _init(f"{LINEAR}.weight_zero_points", tensors["zeros"]),
        _init("model.layers.0.mlp.bias", tensors["bias"]),
    ]
    matmul = ir.node(
        "MatMulNBits",
        [x, *inits[:3]],
        {"K": K, "N": N, "bits": 4, "block_size": block, "accuracy_level": 4},
        domain="com.microsoft",
        name=f"/{LINEAR.replace('.', '/').replace('layers/0', 'layers.0')}/MatMulNBits",
    )
    nodes = [matmul]
    hidden = matmul.outputs[0]
    if outliers is not None:  # LLM.int8(): the outlier columns in float beside the int path
        channels = _init(f"{LINEAR}.outlier_channels", np.array(outliers, np.int64))
        columns = _init(f"{LINEAR}.weight_outliers", np.ones((len(outliers), N), np.float32))
        inits += [channels, columns]
        base = "/model/layers.0/mlp/down_proj"
        gather = ir.node("Gather", [x, channels], {"axis": -1}, name=f"{base}/Gather_outliers")
        outlier_mm = ir.node("MatMul", [gather.outputs[0], columns], name=f"{base}/MatMul_outliers")
        add = ir.node("Add", [hidden, outlier_mm.outputs[0]], name=f"{base}/Add_outliers")
        nodes += [gather, outlier_mm, add]
        hidden = add.outputs[0]
    last = ir.node(add_op, [hidden, inits[3]], name=add_name)
    last.outputs[0].name = "y"
    last.outputs[0].dtype = ir.DataType.FLOAT
    last.outputs[0].shape = ir.Shape(["batch", N])
    nodes.append(last)
    graph = ir.Graph(
        [x],
        [last.outputs[0]],
        nodes=nodes,
        initializers=inits,
        opset_imports={"": 21, "com.microsoft": 1},
        name="tiny",
    )
    return ir.Model(graph, ir_version=10)


def save(model: ir.Model, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model.onnx"
    ir.save(model, path, external_data="model.onnx.data", size_threshold_bytes=0)
    return path


def diff_json(tmp_path: Path, a: ir.Model | Path, b: ir.Model | Path, *extra: str) -> tuple[int, dict]:
    paths = [save(m, tmp_path / name) if isinstance(m, ir.Model) else m for name, m in (("a", a), ("b", b))]
    out = tmp_path / "report.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["diff", str(paths[0]), str(paths[1]), "--json", "-o", str(out), *extra])
    return exit_info.value.code, json.loads(out.read_text())


def _empty_structure_changes(report: dict) -> bool:
    nodes = report["structure"]["nodes"]
    return not (nodes["added"] or nodes["removed"] or nodes["changed"])


def test_identical_graphs_give_an_empty_diff(tmp_path):
    code, report = diff_json(tmp_path, build_model(), build_model(), "--require-identical")
    assert code == 0 and report["identical"] is True
    assert report["structure"]["nodes"] == {"added": [], "removed": [], "changed": [], "unchanged": 2}
    assert report["structure"]["initializers"]["changed"] == []
    assert report["structure"]["ops"]["delta"] == {}
    assert report["alignment"] == {
        "by_rule": {"name": 2, "structure": 0, "position": 0},
        "renamed": [],
        "unmatched": {"a": [], "b": []},
    }
    assert report["linears"]["summary"]["changed"] == 0
    assert report["policy"]["passed"] is True and report["policy"]["violations"] == []


def test_one_changed_scale(tmp_path):
    changed = _tensors()
    changed["scales"] = changed["scales"].copy()
    before = float(changed["scales"][3])
    changed["scales"][3] = before * 1.5
    code, report = diff_json(tmp_path, build_model(), build_model(changed))
    assert code == 0 and report["identical"] is False
    assert _empty_structure_changes(report)
    [entry] = report["structure"]["initializers"]["changed"]
    assert entry["name"] == f"{LINEAR}.weight_scales"
    assert entry["changes"] == [
        f"values: max abs {before * 0.5:.6g} (max |a| {float(_tensors()['scales'].max()):.6g}), 1 of 16 differ"
    ]
    [linear] = report["linears"]["linears"]
    assert linear["name"] == LINEAR and linear["status"] == "changed"
    assert linear["scales"]["max_rel_change"] == pytest.approx(0.5, rel=1e-6)
    assert linear["scales"]["zero_points_changed"] == 0


def test_one_swapped_op(tmp_path):
    code, report = diff_json(tmp_path, build_model(), build_model(add_op="Mul"), "--forbid-op", "Mul")
    assert code == 1
    assert report["structure"]["nodes"]["changed"] == [
        {
            "a": "/model/layers.0/mlp/Add",
            "b": "/model/layers.0/mlp/Add",
            "op": "Add",
            "rule": "name",
            "changes": ["op Add -> Mul"],
        }
    ]
    assert report["structure"]["ops"]["delta"] == {"::Add": -1, "::Mul": 1}
    assert [v["rule"] for v in report["policy"]["violations"]] == ["forbid_ops"]


def test_a_changed_input_name(tmp_path):
    code, report = diff_json(tmp_path, build_model(), build_model(input_name="inputs_embeds"), "--io-must-match")
    assert code == 1
    assert report["structure"]["io"]["inputs"] == {
        "added": [],
        "removed": [],
        "renamed": [{"a": "input_ids_embeds", "b": "inputs_embeds"}],
        "changed": [],
    }
    assert _empty_structure_changes(report)  # the consumer reads the renamed input: not rewired
    assert [v["rule"] for v in report["policy"]["violations"]] == ["io_must_match"]


def test_a_renamed_node_with_the_same_structure_is_a_rename(tmp_path):
    code, report = diff_json(tmp_path, build_model(), build_model(add_name="node_Add_42"))
    assert code == 0
    assert report["alignment"]["renamed"] == [
        {"a": "/model/layers.0/mlp/Add", "b": "node_Add_42", "op": "Add", "rule": "structure"}
    ]
    assert report["alignment"]["by_rule"] == {"name": 1, "structure": 1, "position": 0}
    assert _empty_structure_changes(report)


def test_an_added_outlier_channel(tmp_path):
    code, report = diff_json(tmp_path, build_model(outliers=[3]), build_model(outliers=[3, 17]))
    assert code == 0
    [linear] = report["linears"]["linears"]
    assert linear["outliers"] == {"added": [17], "removed": []}
    assert "outlier channels +1 -0" in linear["changes"]
    [entry] = [e for e in report["structure"]["initializers"]["changed"] if e["name"].endswith("outlier_channels")]
    assert entry["changes"] == ["shape [1] -> [2]"]


def test_a_block_size_change(tmp_path):
    code, report = diff_json(tmp_path, build_model(), build_model(block=32), "--require-identical")
    assert code == 1
    [linear] = report["linears"]["linears"]
    assert "block_size 16 -> 32" in linear["changes"]
    [node] = report["structure"]["nodes"]["changed"]
    assert node["changes"] == ["attribute block_size: 16 -> 32"]


def test_against_a_golden_description(tmp_path):
    golden = tmp_path / "golden.json"
    save(build_model(), tmp_path / "a")
    main(["diff", "--describe", str(tmp_path / "a"), "-o", str(golden)])
    code, report = diff_json(tmp_path, golden, save(build_model(), tmp_path / "same"), "--require-identical")
    assert code == 0 and report["identical"] is True and report["a"]["kind"] == "description"
    code, report = diff_json(
        tmp_path, golden, save(build_model(add_op="Mul"), tmp_path / "other"), "--require-identical"
    )
    assert code == 1 and report["structure"]["nodes"]["changed"][0]["changes"] == ["op Add -> Mul"]


def _error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def _expect_bad_input(a: Path, b: Path, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["diff", str(a), str(b)])
    assert exit_info.value.code == 2
    return _error_line(capsys)


def test_a_corrupted_onnx_file_is_one_line_exit_2(tmp_path, capsys):
    good = save(build_model(), tmp_path / "good")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    assert "is not a readable ONNX model" in _expect_bad_input(bad, good, capsys)


def test_a_truncated_onnx_file_is_one_line_exit_2(tmp_path, capsys):
    good = save(build_model(), tmp_path / "good")
    truncated = tmp_path / "cut" / "model.onnx"
    truncated.parent.mkdir()
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (truncated.parent / "model.onnx.data").write_bytes((good.parent / "model.onnx.data").read_bytes())
    assert "is not a readable ONNX model" in _expect_bad_input(good, truncated, capsys)


def test_missing_or_truncated_external_data_is_one_line_exit_2(tmp_path, capsys):
    good = save(build_model(), tmp_path / "good")
    missing = save(build_model(), tmp_path / "missing")
    (missing.parent / "model.onnx.data").unlink()
    assert "references external data 'model.onnx.data', which is missing" in _expect_bad_input(good, missing, capsys)
    short = save(build_model(), tmp_path / "short")
    data = short.parent / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:10])
    assert "is truncated" in _expect_bad_input(good, short, capsys)


def test_structure_must_match_lets_weights_move_but_not_the_graph(tmp_path):
    changed = _tensors()
    changed["bias"] = changed["bias"] + 1.0
    code, report = diff_json(tmp_path / "w", build_model(), build_model(changed), "--structure-must-match")
    assert code == 0 and report["identical"] is False and report["policy"]["passed"] is True
    code, report = diff_json(tmp_path / "g", build_model(), build_model(add_op="Mul"), "--structure-must-match")
    assert code == 1
    assert [v["message"] for v in report["policy"]["violations"]] == [
        "node '/model/layers.0/mlp/Add' changed: op Add -> Mul (structure_must_match)"
    ]


def test_a_tampered_artifact_directory_is_refused_unless_no_verify(tmp_path, capsys):
    from aqexport.artifact import file_hashes, write_json

    directories = []
    for name in ("a", "b"):
        directory = save(build_model(), tmp_path / name).parent
        write_json(directory / "manifest.json", {"files": file_hashes(directory)})
        directories.append(directory)
    data = directories[1] / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert "model.onnx.data changed" in _expect_bad_input(*directories, capsys)
    with pytest.raises(SystemExit) as exit_info:
        main(["diff", *map(str, directories), "--no-verify", "--json", "-o", str(tmp_path / "r.json")])
    assert exit_info.value.code == 0
    assert json.loads((tmp_path / "r.json").read_text())["identical"] is False


def test_a_zero_limit_from_the_command_line_is_a_limit(tmp_path):
    """``--max-changed-linears 0`` (or ``--max-ppl-increase 0``) gates; 0 is not "not given"."""
    changed = _tensors()
    changed["scales"] = changed["scales"] * 2
    code, report = diff_json(tmp_path, build_model(), build_model(changed), "--max-changed-linears", "0")
    assert code == 1 and report["policy"]["rules"] == {"max_changed_linears": 0}


def test_a_renamed_and_changed_initializer_is_paired_by_role(tmp_path):
    """A norm weight that absorbed a transform is renamed ``…_folded`` and changes value: one
    rename plus one value change, not a removed and an added tensor and a rewired node."""
    model_b = build_model()
    bias = model_b.graph.initializers.pop("model.layers.0.mlp.bias")
    bias.name = "model.layers.0.mlp.bias_folded"
    bias.const_value = ir.tensor(bias.const_value.numpy() * 2, name=bias.name)
    model_b.graph.register_initializer(bias)
    code, report = diff_json(tmp_path, build_model(), model_b)
    initializers = report["structure"]["initializers"]
    assert initializers["renamed"] == [
        {"a": "model.layers.0.mlp.bias", "b": "model.layers.0.mlp.bias_folded", "rule": "role"}
    ]
    assert initializers["added"] == [] and initializers["removed"] == []
    assert [c["name"] for c in initializers["changed"]] == ["model.layers.0.mlp.bias"]
    assert _empty_structure_changes(report)
