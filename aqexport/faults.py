"""A test hook: make this process fail at a named point, for the fault-injection tests only.

Off unless the environment variable ``AQEXPORT_FAULT`` is set (``point`` then costs one dict
lookup). Its value is ``<point>[@<n>]:<action>``: at the ``n``-th time (default the first) the
code reaches ``faults.point("<point>")``, the process does ``<action>``:

* ``kill``: SIGKILL itself (nothing runs after it: no ``finally``, no cleanup), like ``kill -9``
  or the OOM killer;
* ``int``: SIGINT itself, like Ctrl-C (``KeyboardInterrupt``, cleanup runs);
* ``raise``: raise ``InjectedFault``, an exception inside whatever stage is running;
* ``enospc``: raise ``OSError(ENOSPC)``, a full disk where no small filesystem can be mounted;
* ``stop``: SIGSTOP itself, holding whatever it holds (locks, open files) until a SIGCONT, so a
  test can start a second process beside it at a known point.

The points, each placed where an interruption leaves a different state on disk:

* ``stage.<name>``: before each build stage runs (``load``, ``capture``, ``calibrate``,
  ``lower``, ``write``, ``verify``, ``finalize``; ``aqexport.pipeline``);
* ``atomic.<file name>``: the temp file of a file written with
  ``aqexport.atomic_files.write_atomically`` (plan blocks ``block_NNN.safetensors``, ``plan.json``,
  ``timings.json``) is on disk, not yet renamed into place;
* ``calibrate.block``: a plan block and the index naming it have landed (after block ``n``);
* ``lower.pass``: after each lowering pass (``aqexport.lowering.run_passes``);
* ``write.model``: ``model.onnx`` and its external data are in the staging directory, the
  tokenizer and the rest not yet;
* ``publish``: the previous artifact was renamed aside, the new one not yet into place.

The tests (``tests/faults/``) pick points and counts from a seeded RNG, kill or interrupt a
build there, re-run it and compare the artifact with an uninterrupted build's byte for byte.
"""

from __future__ import annotations

import errno
import os
import signal

__all__ = ["ENV", "InjectedFault", "point"]

ENV = "AQEXPORT_FAULT"

_reached: dict[str, int] = {}


class InjectedFault(RuntimeError):
    """The exception ``AQEXPORT_FAULT=<point>:raise`` raises."""


def point(name: str) -> None:
    """Fail here if ``AQEXPORT_FAULT`` names this point (see the module docstring)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    where, _, action = spec.partition(":")
    target, _, nth = where.partition("@")
    if target != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] != int(nth or 1):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "int":
        # a Ctrl-C. A process started from a non-interactive shell's background job inherits SIGINT
        # ignored (Python then installs no KeyboardInterrupt handler), so restore it first
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.raise_signal(signal.SIGINT)
    elif action == "raise":
        raise InjectedFault(f"fault injected at {name} ({ENV}={spec})")
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"<{ENV} at {name}>")
    elif action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    else:
        raise ValueError(f"{ENV}={spec!r}: unknown action {action!r} (kill, int, raise, enospc, stop)")
