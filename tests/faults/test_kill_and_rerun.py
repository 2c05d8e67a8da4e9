"""Kill a build at random points (export, calibration, lowering, writing, publishing), corrupt a
finished plan block between runs, and re-run: every re-run ends with the artifact and plan an
uninterrupted build gives, byte for byte (issue 16, faults).

One work directory goes through the faults in turn, each run resuming from what the one before
left (that is what a user's re-run does, and it keeps the suite to one build per fault): the
state each fault leaves is checked before the next run, and the last runs must reproduce the
reference. The points are drawn from ``random.Random(SEED)`` (``harness.SEED``) and printed.
"""

from __future__ import annotations

import random
import signal
import time

from tests.conftest import read_report
from tests.faults.harness import (
    ARTIFACT,
    PLAN,
    SEED,
    differences,
    names,
    plan_prefix,
    run_cli,
    staging_leftovers,
    start_cli,
)


def _kill_after(work, seconds: float) -> tuple[int, str]:
    """Start a build; SIGKILL it from outside ``seconds`` after its staging directory appeared
    (the stages have begun: load, then export). Its exit status and stderr."""
    process = start_cli(work, "build", "model.yaml")
    deadline = time.monotonic() + 120
    while not staging_leftovers(work) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(seconds)
    process.send_signal(signal.SIGKILL)
    _, stderr = process.communicate(timeout=60)
    return process.returncode, stderr


def _calibration_faults(landed: int, blocks: int) -> list[str]:
    """Kill points in calibration that leave block ``k`` unfinished (``landed <= k < blocks``,
    ``k >= 1`` so a finished block is there to corrupt next): after the block before it landed
    (``calibrate.block`` counts the blocks this run writes), or with its temp file written."""
    return [f"atomic.block_{k:03d}.safetensors:kill" for k in range(max(landed, 1), blocks)] + [
        f"calibrate.block@{k - landed}:kill" for k in range(max(landed + 1, 1), blocks)
    ]


def _flip_a_data_byte(path) -> None:
    """Change one byte of a tensor (past the safetensors header), so the file still parses: only
    the plan's sha256 can tell."""
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little") + 8
    data[header + (len(data) - header) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def test_killed_and_interrupted_builds_resume_to_the_uninterrupted_artifact(reference, work):
    rng = random.Random(SEED)
    stages = reference.stage_seconds
    drawn = {
        # from outside, during load / export (bounded by the reference's times to end before calibration)
        "sigkill_after_s": round(rng.uniform(0.0, 0.9 * (stages["load"] + stages["capture"])), 2),
        "lowering": f"lower.pass@{rng.randint(1, reference.passes)}:int",
        "exception": rng.choice(["stage.write", "write.model", "stage.verify", "stage.finalize"]) + ":raise",
    }

    # 1. SIGKILL from outside: the staging directory stays; a plan block only if calibration began
    status, stderr = _kill_after(work, drawn["sigkill_after_s"])
    assert status == -signal.SIGKILL, (drawn, stderr)
    assert not (work / ARTIFACT).exists() and len(staging_leftovers(work)) == 1
    landed, problems = plan_prefix(reference.work, work)
    assert not problems, (drawn, problems)
    choices = _calibration_faults(landed, reference.blocks)
    assert choices, f"the kill after {drawn['sigkill_after_s']} s landed after calibration: {drawn}"

    # 2. killed in calibration: the blocks that landed are the reference's, nothing half-written
    drawn["calibration"] = rng.choice(choices)
    print(f"AQEXPORT_FAULT_SEED={SEED}: {drawn}")
    result = run_cli(work, "build", "model.yaml", fault=drawn["calibration"])
    assert result.returncode == -signal.SIGKILL, result.stderr
    landed, problems = plan_prefix(reference.work, work)
    assert 1 <= landed < reference.blocks and not problems, (drawn, problems)
    assert len(staging_leftovers(work)) == 1  # this run's; the first run's was removed
    temp_files = sorted(p.name for p in (work / PLAN).glob("*.tmp"))
    if drawn["calibration"].startswith("atomic."):  # killed with a block's temp file written
        assert temp_files == [f"block_{landed:03d}.safetensors.tmp"], drawn
    else:
        assert temp_files == [], drawn

    # ... and one of the finished blocks is corrupted on disk (it still parses)
    corrupt = drawn["corrupt_block"] = rng.randrange(landed)
    _flip_a_data_byte(work / PLAN / f"block_{corrupt:03d}.safetensors")

    # 3. Ctrl-C in lowering: the corrupted block was noticed and recomputed, the plan is complete
    result = run_cli(work, "build", "model.yaml", fault=drawn["lowering"])
    assert result.returncode == 130 and result.stderr.rstrip().endswith("aborted"), result.stderr
    assert f"block_{corrupt:03d}.safetensors' does not match its sha256" in result.stderr
    assert f"recalibrating from block {corrupt}" in result.stderr
    assert differences(reference.work, work, (PLAN,)) == [], drawn
    assert names(work) == {"model.yaml", PLAN}, drawn  # no staging left, no artifact, locks released

    # 4. an exception in a stage after calibration: nothing published, nothing left behind
    result = run_cli(work, "build", "model.yaml", fault=drawn["exception"])
    assert result.returncode == 1 and "InjectedFault" in result.stderr, result.stderr
    assert names(work) == {"model.yaml", PLAN}, drawn

    # 5. the re-run ends with the uninterrupted build's artifact and plan
    result = run_cli(work, "build", "model.yaml")
    assert result.returncode == 0, result.stderr
    assert differences(reference.work, work) == [], drawn
    assert read_report(work / ARTIFACT)["calibration"]["resumed_from_block"] == reference.blocks
    assert names(work) == {"model.yaml", ARTIFACT, PLAN}

    # 6. a forced rebuild killed while publishing: between moving the old artifact aside and the
    #    new one into place
    result = run_cli(work, "build", "--force", "model.yaml", fault="publish:kill")
    assert result.returncode == -signal.SIGKILL, result.stderr
    assert not (work / ARTIFACT).exists()
    assert {n.split("-")[0] for n in staging_leftovers(work)} == {f".{ARTIFACT}.tmp", f".{ARTIFACT}.old"}

    # 7. the next build puts the previous artifact back, finds it up to date, removes the rest
    result = run_cli(work, "build", "model.yaml")
    assert result.returncode == 0 and "up to date" in result.stderr, result.stderr
    assert "killed while publishing" in result.stderr
    assert differences(reference.work, work) == [], drawn
    assert names(work) == {"model.yaml", ARTIFACT, PLAN}  # stale lock files went with their builds
