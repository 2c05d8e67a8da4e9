"""What a killed build leaves beside its output is cleaned up by the next build into it (issue
16, faults): the staging directory of a build killed mid-way is removed; the previous artifact,
moved aside by a build killed while publishing, is put back. End to end in
``test_kill_and_rerun``; here the cases one by one."""

from __future__ import annotations

from aqexport.artifact import recover_interrupted


def _directory(path, **files):
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_a_killed_builds_staging_directory_is_removed(tmp_path):
    _directory(tmp_path / "out", marker="current")
    _directory(tmp_path / ".out.tmp-k1", **{"model.onnx": "half"})
    _directory(tmp_path / ".out.old-k2", marker="older")  # the output exists: a stale copy
    _directory(tmp_path / ".other.tmp-k3")  # another output's: not ours to touch
    (tmp_path / ".out.tmp-file").write_text("not a directory we made")
    done = recover_interrupted(tmp_path / "out")
    assert len(done) == 2 and all("left by a killed build" in line for line in done)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-k3", ".out.tmp-file", "out"]
    assert (tmp_path / "out" / "marker").read_text() == "current"


def test_the_previous_artifact_moved_aside_is_put_back(tmp_path):
    _directory(tmp_path / ".out.old-k1", marker="previous")
    _directory(tmp_path / ".out.tmp-k1", marker="new, verified, not yet renamed")
    done = recover_interrupted(tmp_path / "out")
    assert done[0].startswith(f"restored '{tmp_path / 'out'}' from '.out.old-k1'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (tmp_path / "out" / "marker").read_text() == "previous"


def test_nothing_to_do(tmp_path):
    assert recover_interrupted(tmp_path / "out") == []
    assert recover_interrupted(tmp_path / "missing" / "out") == []
