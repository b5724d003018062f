"""Run vfio-hookd's daemon with measuring wrappers (benchmarks only; never installed).

``python bench/_daemon_shim.py --root DIR`` is ``python -m testbed.daemon --root DIR`` (the
product's daemon on the simulated host ``DIR``) whose process also appends one JSON line per
event to ``$VFIO_HOOKD_BENCH_SHIM_LOG``:

- ``{"ev": "latency", "key": K, "configured_s": S, "slept_ms": MS}``: each simulated kernel
  latency the fake kernel actually slept (:meth:`testbed.sim.kernel.SimHost._latency`);
  ``slept_ms`` is measured around the original method (so it includes reading faults.json).
- ``{"ev": "unit", "verb": "stop"|"start", "units": [U, ...], "unit": "U, ...",
  "configured_s": S, "ms": MS}``: each batch of systemd jobs the daemon queued and awaited
  together (``Systemd._jobs``, behind :meth:`vfio_hookd.systemd.Systemd.stop_all` /
  ``start_all`` / ``stop`` / ``start``); ``configured_s`` is the latency the fake systemd
  gives that batch (:func:`testbed.sim.units.batch_latency`: the jobs of unordered units
  overlap, so the slowest unit's stop/start latency), which it always incurs (the units
  step only stops active units and starts inactive ones).
- ``{"ev": "kernelop", "op": "write"|"modprobe"|"rmmod", "target": T, "ms": MS, "step": S}``:
  each operation answered by the fake kernel (``SimHost._write_now`` -- run by
  ``Host.write`` in its helper thread --, and ``SimHost.run_command`` for ``modprobe NAME`` /
  ``rmmod NAME``), latency included: ``ms`` minus the latency is the fake kernel's own
  bookkeeping (state file load and save under its lock, fault rules, refcounts from a
  ``/proc`` scan), not the daemon's.
- ``{"ev": "request", "op": OP, "ms": MS, "ok": bool}``: time of one request inside the daemon
  (:meth:`vfio_hookd.daemon.Daemon.dispatch`, from the parsed request to the result).
- ``{"ev": "step", "step": NAME, "method": "observe"|"apply"|"undo", "ms": MS}``: each step
  method call. ``latency`` and ``unit`` events carry ``"step"``: the step running when they
  happened (the benchmark sends one request at a time, so one global marker is exact).

The wrappers add one small ``write(2)`` per event; nothing else in the daemon changes.

Experiment (not the product's behaviour): with ``VFIO_HOOKD_BENCH_PRELOAD=1`` the modules the
first request imports lazily (yaml, vfio_hookd.profile, pydbus + gi, vfio_hookd.systemd,
psutil, vfio_hookd.procs) are imported before the daemon starts, to measure what a preload
would save on the first request.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

_LOG = os.environ["VFIO_HOOKD_BENCH_SHIM_LOG"]
_ROOT = {"root": "/"}   # the simulated host (--root), for the fake systemd's latencies
_lock = threading.Lock()
_current = {"step": None}   # the step method running now (one request at a time in the bench)


def _emit(event: dict) -> None:
    line = (json.dumps(event) + "\n").encode()
    with _lock:
        fd = os.open(_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


def _install() -> None:
    from vfio_hookd import daemon, systemd
    from testbed.sim import faults, kernel, units as sim_units

    orig_latency = kernel.SimHost._latency

    @functools.wraps(orig_latency)
    def latency(self, key):
        configured = faults.latency(self.root, key)
        t0 = time.perf_counter()
        orig_latency(self, key)
        if configured > 0:
            _emit({"ev": "latency", "key": key, "configured_s": configured,
                   "step": _current["step"],
                   "slept_ms": round((time.perf_counter() - t0) * 1000, 3)})

    kernel.SimHost._latency = latency

    def kernel_wrapper(orig):
        @functools.wraps(orig)
        def wrapped(self, target, *args):
            step = _current["step"]
            # _write_now(path, data) / run_command([modprobe|rmmod, NAME], timeout_s)
            op, name = ("write", target) if isinstance(target, str) else (target[0], target[-1])
            t0 = time.perf_counter()
            try:
                return orig(self, target, *args)
            finally:
                _emit({"ev": "kernelop", "op": op, "target": name, "step": step,
                       "ms": round((time.perf_counter() - t0) * 1000, 3)})
        return wrapped

    kernel.SimHost._write_now = kernel_wrapper(kernel.SimHost._write_now)
    kernel.SimHost.run_command = kernel_wrapper(kernel.SimHost.run_command)

    orig_jobs = systemd.Systemd._jobs

    @functools.wraps(orig_jobs)
    def jobs(self, method, verb, units, timeout_s):
        kind = {"stopping": "stop", "starting": "start"}.get(verb, verb)
        configured = sim_units.batch_latency(_ROOT["root"], list(units), kind)
        t0 = time.perf_counter()
        try:
            return orig_jobs(self, method, verb, units, timeout_s)
        finally:
            _emit({"ev": "unit", "verb": kind, "units": list(units), "unit": ", ".join(units),
                   "configured_s": configured, "step": _current["step"],
                   "ms": round((time.perf_counter() - t0) * 1000, 3)})

    systemd.Systemd._jobs = jobs

    orig_dispatch = daemon.Daemon.dispatch

    @functools.wraps(orig_dispatch)
    def dispatch(self, req, send=lambda m: None):
        t0 = time.perf_counter()
        ok = False
        try:
            result = orig_dispatch(self, req, send)
            ok = True
            return result
        finally:
            _emit({"ev": "request", "op": req.get("op"), "ok": ok,
                   "ms": round((time.perf_counter() - t0) * 1000, 3)})

    daemon.Daemon.dispatch = dispatch

    from vfio_hookd import steps

    def step_wrapper(step, method, orig):
        @functools.wraps(orig)
        def wrapped(*args, **kwargs):
            _current["step"] = step.name
            t0 = time.perf_counter()
            try:
                return orig(*args, **kwargs)
            finally:
                _current["step"] = None
                _emit({"ev": "step", "step": step.name, "method": method,
                       "ms": round((time.perf_counter() - t0) * 1000, 3)})
        return wrapped

    for step in steps.STEPS:   # the instances the machine iterates over
        for method in ("observe", "apply", "undo"):
            setattr(step, method, step_wrapper(step, method, getattr(step, method)))


def _preload() -> None:
    import psutil  # noqa: F401
    import pydbus  # noqa: F401
    import yaml  # noqa: F401
    from gi.repository import Gio, GLib  # noqa: F401

    from vfio_hookd import procs, profile, systemd  # noqa: F401


if __name__ == "__main__":
    if os.environ.get("VFIO_HOOKD_BENCH_PRELOAD") == "1":
        _preload()
    args = sys.argv[1:]
    _ROOT["root"] = args[args.index("--root") + 1] if "--root" in args else "/"
    _install()
    from testbed.daemon import main
    sys.exit(main(args))
