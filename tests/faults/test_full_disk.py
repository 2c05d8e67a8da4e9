"""A build whose output and plan live on a small tmpfs: the disk fills during calibration, then
(grown a little) while the artifact is written, then (grown enough) the build finishes. Each
failure is one ``error:`` line naming the full filesystem and the fix, exit status 1, no
traceback; it leaves no half-written artifact, temp directory, temp file or lock behind, and
keeps the plan's finished blocks; the last run ends with the uninterrupted build's artifact and
plan, byte for byte (issue 16, faults).

The tmpfs is mounted in a private mount namespace (``full_disk.py``). Only where neither
``unshare --mount`` nor ``unshare --user --map-root-user --mount`` can mount one, the same
phases run on the normal disk with ``AQEXPORT_FAULT=...:enospc`` (a simulated full disk at the
same points), and the test says so.
"""

from __future__ import annotations

import warnings

from tests.faults.full_disk import namespace_prefix, run_driver
from tests.faults.harness import ARTIFACT, PLAN, config_text, differences, error_lines, plan_prefix


def _kib(size: int) -> int:
    """What a file of ``size`` bytes takes on a tmpfs: whole 4 KiB pages."""
    return -(-size // 4096) * 4


def _phases(reference) -> list[list]:
    plan, artifact = reference.plan_bytes, reference.artifact_bytes
    blocks = [_kib(plan[f"block_{i:03d}.safetensors"]) for i in range(reference.blocks)]
    index = _kib(plan["plan.json"]) + _kib(plan["timings.json"])
    fixed = 4 + 8 + 2 * index  # model.yaml, the two lock files, the index and its temp copy
    whole_artifact = sum(_kib(size) for size in artifact.values())
    return [
        # block 0 lands, block 1's temp file does not fit
        ["calibration", fixed + blocks[0] + blocks[1] // 2, "atomic.block_001.safetensors:enospc"],
        # the whole plan fits, a third of the artifact does
        ["artifact", fixed + sum(blocks) + whole_artifact // 3, "write.model:enospc"],
        ["freed", fixed + sum(blocks) + 3 * whole_artifact + 1024],
    ]


def test_a_full_disk_is_one_line_and_the_rerun_after_freeing_space_is_identical(reference, work, tmp_path_factory):
    prefix = namespace_prefix(tmp_path_factory.mktemp("mount-probe"))
    if prefix is None:
        warnings.warn("no tmpfs can be mounted here: ENOSPC simulated with AQEXPORT_FAULT", stacklevel=1)
    (work / "model.yaml").unlink()  # the driver writes it onto the tmpfs mounted over `work`
    copies = tmp_path_factory.mktemp("full-disk-copies")
    spec = {
        "mount": str(work),
        "config": config_text(reference.model_dir),
        "phases": _phases(reference),
        "copy_to": str(copies),
        "result": str(copies / "result.json"),
        "simulate": prefix is None,
    }
    calibration, artifact, freed = run_driver(prefix or [], spec, copies / "spec.json")
    print(f"tmpfs phases (label, KiB, simulated fault) {spec['phases']} under {prefix}")

    for phase, full in ((calibration, PLAN), (artifact, None)):
        stderr = phase["stderr"]
        assert phase["returncode"] == 1 and "Traceback" not in stderr, stderr
        (line,) = error_lines(stderr)
        where = str(work / full) if full else str(work)
        assert line.startswith(f"error: no space left on the filesystem of '{where}'"), line
        assert "fix: free space there" in line and ("calibration.plan_dir" if full else "output.dir") in line
        on_disk = set(phase["paths"])  # no artifact, staging directory, temp file or lock file
        assert {p for p in on_disk if not p.startswith(f"{PLAN}/")} == {"model.yaml", PLAN}, on_disk
        assert not [p for p in on_disk if p.endswith(".tmp")], on_disk

    landed, problems = plan_prefix(reference.work, copies / "calibration")
    assert (landed, problems) == (1, []), "the block that landed before the disk filled is kept"
    assert differences(reference.work, copies / "artifact", (PLAN,)) == [], "the plan finished before"
    assert freed["returncode"] == 0, freed["stderr"]
    assert differences(reference.work, copies / "freed") == []
    assert {p.split("/")[0] for p in freed["paths"]} == {"model.yaml", ARTIFACT, PLAN}  # nothing else left
