"""Benchmark: the units step stops and starts its units together (goal: < 1.2 s each way).

Issue 8: "The display manager and ``stop_units`` are stopped together: every stop job enqueued
before any is awaited, as ``systemctl stop A B`` does [...], then all awaited; release starts
them together the same way. The units step then costs about the slowest unit, not the sum."

Set-up: the default NVIDIA simulated host (:mod:`testbed.sim`) with every kernel latency 0
and two units that take 800 ms each to stop and to start (``stop_s``/``start_s`` in its
``units.json``, :mod:`testbed.sim.units`): the display manager ``gdm.service`` (found through
``display-manager.service``: it holds the GPU) and ``nvidia-persistenced.service`` in
``stop_units``. Its fake systemd on a private bus runs jobs of different units concurrently,
as systemd does; the two units are not ordered to each other.

Measured, in ms:

- **units step** of a prepare (its ``duration_ms``) and of a release (its ``undo_ms``), from
  ``vfio-hookd status --json`` after each direction ran through the hook as libvirt runs it
  (``win11 prepare begin -``, ``win11 release end -``) against the daemon (a fresh daemon;
  ``--cycles`` prepare/release cycles, the first cold). The goal is checked on the median of
  the cycles: each direction < 1200 ms (serial would be 1600 ms plus overhead).
- for comparison, on the same fake systemd before the daemon starts, with the product's own
  client (:class:`vfio_hookd.systemd.Systemd`): the two units stopped and started one after
  the other (``stop`` + ``stop``, ``start`` + ``start``: the old serial way) and as one batch
  (``stop_all``, ``start_all``).

Prints a table, writes JSON (default ``/tmp/vfio-hookd-bench/units_parallel.json``) and exits 1
when a goal is missed or any request failed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as B  # noqa: E402

GOAL_MS = 1200.0
UNIT_S = 0.8
VM = "win11"
UNITS = ["gdm.service", "nvidia-persistenced.service"]


def client_times(env: B.SimEnv) -> dict:
    """Serial and batched stop/start of :data:`UNITS` with the product's client (ms)."""
    from vfio_hookd.systemd import Systemd
    out = {}
    with Systemd(env.bus.address) as sd:
        sd.connect()
        t0 = time.perf_counter()
        for u in UNITS:
            sd.stop(u, 30)
        out["serial_stop_ms"] = (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        for u in reversed(UNITS):
            sd.start(u, 30)
        out["serial_start_ms"] = (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        sd.stop_all(UNITS, 60)
        out["batch_stop_ms"] = (time.perf_counter() - t0) * 1000
        t0 = time.perf_counter()
        sd.start_all(list(reversed(UNITS)), 60)
        out["batch_start_ms"] = (time.perf_counter() - t0) * 1000
        if any(sd.active_state(u) != "active" for u in UNITS):
            raise RuntimeError("the units did not come back active")
    return {k: round(v, 1) for k, v in out.items()}


def units_step_ms(env: B.SimEnv, key: str) -> float | None:
    """The units step's ``key`` (``duration_ms`` / ``undo_ms``) from ``status --json``."""
    steps = B.cli_json(env, "status", VM)["vms"][VM]["steps"]
    return next(s[key] for s in steps if s["name"] == "units")


def main(argv: list[str] | None = None) -> int:
    from testbed.sim.faults import REALISTIC
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=3, help="prepare/release cycles (default 3)")
    ap.add_argument("--out", help="JSON result file (default under /tmp/vfio-hookd-bench)")
    opts = ap.parse_args(argv)
    if opts.cycles < 1:
        ap.error("at least one cycle")

    note = B.busy_note()   # before this benchmark's own load
    per_unit = {"stop_s": UNIT_S, "start_s": UNIT_S}
    env = B.SimEnv(latency={k: 0.0 for k in REALISTIC}, units={u: per_unit for u in UNITS})
    daemon = None
    data = {"benchmark": "units_parallel", "cpus": os.cpu_count(), "load_at_start": note,
            "unit_latency_s": UNIT_S, "units": UNITS, "cycles": []}
    error = None
    try:
        data["client"] = client_times(env)
        env.write_profile(VM)   # devices + stop_units: [nvidia-persistenced.service]
        daemon = B.DaemonProc(env)
        xml = B.domain_xml(VM, env.devices)
        for _ in range(opts.cycles):
            cycle = {}
            for direction, argv_, key in (("prepare", ["prepare", "begin", "-"], "duration_ms"),
                                          ("release", ["release", "end", "-"], "undo_ms")):
                wall, rc = B.spawn_time_ms([B.HOOK, VM, *argv_], xml, env.env)
                cycle[direction] = {"exit": rc, "hook_wall_ms": round(wall, 1),
                                    "units_step_ms": units_step_ms(env, key)}
                if rc != 0:
                    error = f"{direction} exited {rc}; daemon log:\n" + daemon.read_log()[-4000:]
            data["cycles"].append(cycle)
            if error:
                break
    finally:
        if daemon is not None:
            daemon.stop()
        env.close()
    if error:
        print(error, file=sys.stderr)
        data["pass"] = False
        print("results:", B.write_json("units_parallel", data, opts.out))
        return 1

    print("at start: " + note)
    print(f"two units ({', '.join(UNITS)}), each {UNIT_S * 1000:.0f} ms to stop and to start, "
          f"not ordered to each other; every other latency 0")
    print()
    c = data["client"]
    print(B.table(["product's systemd client (ms)", "stop both", "start both"], [
        ["serial (one job awaited before the next)", c["serial_stop_ms"], c["serial_start_ms"]],
        ["batch (stop_all / start_all)", c["batch_stop_ms"], c["batch_start_ms"]]]))
    print()
    rows = []
    for i, cyc in enumerate(data["cycles"]):
        rows.append([f"{'cold' if i == 0 else f'warm {i}'}", cyc["prepare"]["units_step_ms"],
                     cyc["prepare"]["hook_wall_ms"], cyc["release"]["units_step_ms"],
                     cyc["release"]["hook_wall_ms"]])
    print(B.table(["cycle (ms)", "prepare: units step", "prepare: hook", "release: units step",
                   "release: hook"], rows))
    print()
    goals = []
    for direction in ("prepare", "release"):
        vals = [cyc[direction]["units_step_ms"] for cyc in data["cycles"]]
        med = round(statistics.median(vals), 1)
        goals.append({"goal": f"{direction}: units step, 2 units x {UNIT_S * 1000:.0f} ms, "
                              f"median < {GOAL_MS:g} ms (serial: "
                              f"{2 * UNIT_S * 1000:.0f} ms + overhead)",
                      "value_ms": med, "max_ms": max(vals), "pass": med < GOAL_MS})
    for g in goals:
        print(f"goal: {g['goal']}: {g['value_ms']:.1f} ms (max {g['max_ms']:.1f}) -> "
              f"{'PASS' if g['pass'] else 'FAIL'}")
    ok = all(g["pass"] for g in goals)
    data.update(goals=goals, **{"pass": ok})
    print("results:", B.write_json("units_parallel", data, opts.out))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
