"""A plan block that is corrupted, truncated or half-written is never read back: opening the
plan drops it and every block after it (calibration recomputes them), with one warning naming
the file; a killed writer's temp files are removed (issue 16, faults). The end-to-end case (a
corrupted block recomputed to the identical artifact) is in ``test_kill_and_rerun``."""

from __future__ import annotations

import hashlib
import json
import logging

import pytest

from aqexport.calibrate.plan import QuantPlan
from tests.test_plan_format import MODEL, RECIPE, _full_block, _saved


def _open(tmp_path) -> QuantPlan:
    return QuantPlan.open(tmp_path, RECIPE, MODEL)


def _flip(path, offset_from_end: int = 1) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def test_the_index_records_each_block_files_sha256(tmp_path):
    _saved(tmp_path, blocks=(0, 1))
    recorded = json.loads((tmp_path / "plan.json").read_text())["block_sha256"]
    for key in ("0", "1"):
        file = tmp_path / f"block_{int(key):03d}.safetensors"
        assert recorded[key] == hashlib.sha256(file.read_bytes()).hexdigest()
    assert sorted(_open(tmp_path).blocks) == [0, 1]


@pytest.mark.parametrize(
    "damage, why",
    [
        (lambda f: _flip(f), "does not match its sha256 in plan.json"),  # a tensor's byte: still parses
        (lambda f: f.write_bytes(f.read_bytes()[:100]), "does not match its sha256"),  # truncated
        (lambda f: f.unlink(), None),  # never landed: no warning, just recomputed
    ],
    ids=["flipped-byte", "truncated", "missing"],
)
def test_a_damaged_block_and_the_blocks_after_it_are_recomputed(tmp_path, caplog, damage, why):
    _saved(tmp_path, blocks=(0, 1, 2))
    damage(tmp_path / "block_001.safetensors")
    with caplog.at_level(logging.WARNING, logger="aqexport.calibrate.plan"):
        plan = _open(tmp_path)
    assert sorted(plan.blocks) == [0]  # block 2 was trained on block 1's outputs: it goes too
    warnings = [r.getMessage() for r in caplog.records]
    if why is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and "block_001.safetensors" in warnings[0] and why in warnings[0]
        assert warnings[0].endswith("recalibrating from block 1") and "\n" not in warnings[0]
    plan.add_block(_full_block(1))  # the recomputed block replaces the damaged file and the index
    assert sorted(_open(tmp_path).blocks) == [0, 1]
    assert sorted(json.loads((tmp_path / "plan.json").read_text())["block_sha256"]) == ["0", "1"]


def test_an_unparseable_block_of_a_plan_without_checksums_is_recomputed(tmp_path, caplog):
    """Plans written before ``block_sha256`` are read unchecked, but a file that does not parse
    (a truncated header) is still dropped, not a traceback."""
    _saved(tmp_path, blocks=(0, 1))
    index = tmp_path / "plan.json"
    saved = json.loads(index.read_text())
    del saved["block_sha256"]
    index.write_text(json.dumps(saved))
    (tmp_path / "block_000.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with caplog.at_level(logging.WARNING, logger="aqexport.calibrate.plan"):
        assert _open(tmp_path).blocks == {}
    assert "is not a readable safetensors file" in caplog.text


def test_a_killed_writers_temp_files_are_removed_on_open(tmp_path):
    _saved(tmp_path, blocks=(0,))
    for name in ("block_001.safetensors.tmp", "plan.json.tmp", "block_001.tmp"):
        (tmp_path / name).write_bytes(b"half")
    assert sorted(_open(tmp_path).blocks) == [0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block_000.safetensors", "plan.json", "timings.json"]


def test_block_files_get_the_usual_permissions(tmp_path):
    """Written by Python (``write_atomically``), not safetensors' 0600 ``save_file``."""
    from aqexport.artifact import current_umask

    _saved(tmp_path, blocks=(0,))
    assert (tmp_path / "block_000.safetensors").stat().st_mode & 0o777 == 0o666 & ~current_umask()
