"""Refuse an ``output.dir`` whose replacement would destroy something that is not an artifact.

A build publishes its artifact by renaming the finished staging directory over ``output.dir``
and deleting what was there (``aqexport.artifact.atomic_directory``): exactly right for the
previous artifact, and a silent ``rm -rf`` for anything else. ``output.dir: .`` or ``..`` in a
project's config, ``-o ~``, or a ``calibration.plan_dir`` placed inside ``output.dir`` would
delete the project, the home directory, or the calibration the build just finished. So before
a build starts:

* an existing ``output.dir`` must be empty or hold an artifact (its ``manifest.json``);
* ``output.dir`` must not be, or contain, anything the build reads or keeps: the config file,
  the model source, the calibration and evaluation texts, the plan directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from aqexport.errors import ConfigError

if TYPE_CHECKING:
    from aqexport.config import BuildConfig

__all__ = ["check_output_dir"]

_MANIFEST = "manifest.json"


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def _inputs(config: BuildConfig, config_path: Path) -> dict[str, Path]:
    """What the build reads or keeps, by the key that names it, as absolute resolved paths."""
    found = {"the config file": config_path, "calibration.plan_dir": config.plan_dir()}
    source = Path(config.model.source).expanduser()
    if config.model.source != "default":
        source = source if source.is_absolute() else config_path.parent / source
        if source.exists():
            found["model.source"] = source
    for key, value in (("calibration.data", config.calibration.data), ("evaluation.text", config.evaluation.text)):
        if value is not None:
            found[key] = value
    return {key: Path(value).resolve() for key, value in found.items()}


def check_output_dir(config: BuildConfig, output: Path, config_path: Path) -> None:
    """``ConfigError`` if building ``config`` into ``output`` would replace (delete) anything but
    a previous artifact (module docstring). ``config_path``: the YAML file it was read from."""
    output = Path(output).expanduser().resolve()
    for key, path in _inputs(config, Path(config_path).expanduser().resolve()).items():
        if _inside(path, output):
            raise ConfigError(
                f"output.dir '{output}' contains {key} '{path}': a build replaces output.dir whole, which would "
                "delete it",
                "set output.dir to a directory of its own (e.g. build/<model>) beside, not around, its inputs",
            )
    if output.is_dir() and not (output / _MANIFEST).is_file() and any(output.iterdir()):
        raise ConfigError(
            f"output.dir '{output}' is a non-empty directory that holds no artifact (no {_MANIFEST}): a build "
            "replaces output.dir whole, which would delete what is there",
            "set output.dir to a new or empty directory, or to a previous artifact's",
        )
