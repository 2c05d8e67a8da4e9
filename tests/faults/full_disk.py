"""Builds whose output and plan live on a small tmpfs, grown between runs: the driver of
``test_full_disk``, run in a private mount namespace (``unshare --mount``, or with
``--user --map-root-user`` where this user may not mount), so the tmpfs never outlives it and
nothing outside it sees the mount.

``python -m tests.faults.full_disk SPEC.json`` with SPEC: ``mount`` (an empty directory: the
work directory, mounted over), ``config`` (the ``model.yaml`` text, written onto the tmpfs),
``phases`` (``[[label, size in KiB], ...]``: the tmpfs is (re)mounted at that size and the build
run, so a later, larger phase is "space was freed"), ``copy_to`` (where the plan and artifact
are copied after each phase, since the tmpfs goes with the namespace) and ``result`` (the JSON
written there: per phase the exit status, stderr and every path on the tmpfs).

``simulate: true`` (only where no tmpfs can be mounted at all) runs the phases on the normal
disk with ``AQEXPORT_FAULT=<point>:enospc`` from each phase's third field instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.faults.harness import ARTIFACT, PLAN, child_env, cli_command


def _mount(mount: Path, kib: int, first: bool) -> None:
    options = f"size={kib}k" if first else f"remount,size={kib}k"
    command = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)]
    subprocess.run(command if first else ["mount", "-o", options, str(mount)], check=True)


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    mount, copy_to = Path(spec["mount"]), Path(spec["copy_to"])
    results = []
    for number, (label, kib, *fault) in enumerate(spec["phases"]):
        if not spec.get("simulate"):
            _mount(mount, kib, first=number == 0)
        if number == 0:
            (mount / "model.yaml").write_text(spec["config"])
        run = subprocess.run(
            cli_command("build", str(mount / "model.yaml")),
            cwd=mount,
            env=child_env(fault[0] if spec.get("simulate") and fault else None),
            capture_output=True,
            text=True,
        )
        for name in (PLAN, ARTIFACT):
            if (mount / name).is_dir():
                shutil.copytree(mount / name, copy_to / label / name)
        results.append(
            {
                "label": label,
                "returncode": run.returncode,
                "stderr": run.stderr,
                "paths": sorted(p.relative_to(mount).as_posix() for p in mount.rglob("*")),
            }
        )
    Path(spec["result"]).write_text(json.dumps(results, indent=1))


def namespace_prefix(probe: Path) -> list[str] | None:
    """The ``unshare`` command line under which this process may mount a tmpfs (tried on
    ``probe``, an empty directory), or ``None``."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return None
    for prefix in (
        ["unshare", "--mount", "--propagation", "private"],
        ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private"],
    ):
        try:
            probed = subprocess.run(
                [*prefix, "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                capture_output=True,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probed.returncode == 0:
            return prefix
    return None


def run_driver(prefix: list[str], spec: dict, spec_path: Path) -> list[dict]:
    spec_path.write_text(json.dumps(spec))
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    command = [*prefix, sys.executable, "-m", "tests.faults.full_disk", str(spec_path)]
    done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(Path(spec["result"]).read_text())


if __name__ == "__main__":
    main(sys.argv[1])
