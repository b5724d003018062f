"""Benchmark: the libvirt hook for a VM without a profile (goal: median <= 15 ms).

The hook ``hooks/vfio-hookd`` is executed the way libvirtd runs it: fork + exec of the file
(its ``#!/usr/bin/python3 -IS`` line picks the interpreter) with the arguments
``NAME prepare begin -`` and the domain XML on stdin through a pipe; ``NAME`` has no profile
under ``$VFIO_HOOKD_CONFIG/vms`` (a temporary directory), so the hook must exit 0 at once.

For comparison, in the same interleaved rounds (so machine load hits all alike):

- ``/usr/bin/python3 -IS -c pass``: the interpreter's own floor;
- a bash dispatcher (the shape of the single-GPU guides' ``qemu`` hook scripts: a ``case`` on
  the operation and a test for a per-VM file), run as a file with ``#!/bin/bash``;
- ``/bin/true``: the cost of fork+exec+wait of this harness itself;
- the hook for a VM that has a profile but an operation it ignores (``start begin``).

Prints a table (ms), writes JSON (default ``/tmp/vfio-hookd-bench/hook_unmanaged.json``) and
exits 1 when the median of the hook for the unmanaged VM exceeds the goal or any run failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as B  # noqa: E402

GOAL_MEDIAN_MS = 15.0

BASH_DISPATCHER = """#!/bin/bash
# A bash hook dispatcher like the single-GPU guides' /etc/libvirt/hooks/qemu (for comparison).
case "$2/$3" in
  prepare/begin|release/end) ;;
  *) exit 0 ;;
esac
[ -f "${VFIO_HOOKD_CONFIG:-/etc/vfio-hookd}/vms/$1.yaml" ] || exit 0
exit 0
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=200, help="measured runs per command (default 200)")
    ap.add_argument("--warmup", type=int, default=10, help="unmeasured runs per command first")
    ap.add_argument("--out", help="JSON result file (default under /tmp/vfio-hookd-bench)")
    opts = ap.parse_args(argv)

    note = B.busy_note()   # before this benchmark's own load
    tmp = tempfile.mkdtemp(prefix="vfio-hookd-bench-hook-")
    try:
        config = os.path.join(tmp, "etc")
        os.makedirs(os.path.join(config, "vms"))
        with open(os.path.join(config, "vms", "win11.yaml"), "w") as f:
            f.write('devices: ["0000:01:00.0", "0000:01:00.1"]\n')
        dispatcher = os.path.join(tmp, "qemu-dispatcher.sh")
        with open(dispatcher, "w") as f:
            f.write(BASH_DISPATCHER)
        os.chmod(dispatcher, 0o755)
        run = os.path.join(tmp, "run")   # no socket: the hook must not need the daemon
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C",
               "VFIO_HOOKD_CONFIG": config, "VFIO_HOOKD_RUN": run}
        xml = B.domain_xml("gaming")
        cases = [
            ("hook, VM without profile (prepare begin)", [B.HOOK, "gaming", "prepare", "begin", "-"]),
            ("hook, managed VM, ignored op (start begin)", [B.HOOK, "win11", "start", "begin", "-"]),
            ("/usr/bin/python3 -IS -c pass", ["/usr/bin/python3", "-IS", "-c", "pass"]),
            ("bash dispatcher script", [dispatcher, "gaming", "prepare", "begin", "-"]),
            ("/bin/true (harness floor)", ["/bin/true"]),
        ]
        times: dict[str, list[float]] = {name: [] for name, _ in cases}
        failures: dict[str, int] = {name: 0 for name, _ in cases}
        for i in range(opts.warmup + opts.runs):
            for name, cmd in cases:
                ms, rc = B.spawn_time_ms(cmd, xml, env)
                if rc != 0:
                    failures[name] += 1
                if i >= opts.warmup:
                    times[name].append(ms)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    results = {name: dict(B.stats(t), failed_runs=failures[name]) for name, t in times.items()}
    hook = results[cases[0][0]]
    ok = hook["median"] <= GOAL_MEDIAN_MS and not any(failures.values())
    rows = [[name, r["n"], f"{r['median']:.2f}", f"{r['p90']:.2f}", f"{r['min']:.2f}",
             f"{r['max']:.2f}", r["failed_runs"]] for name, r in results.items()]
    print("at start: " + note)
    print(f"hook dispatch time, {opts.runs} runs each (+{opts.warmup} warm-up), interleaved; ms")
    print(B.table(["command", "n", "median", "p90", "min", "max", "exit!=0"], rows))
    verdict = "PASS" if ok else "FAIL"
    print(f"goal: hook median for a VM without a profile <= {GOAL_MEDIAN_MS:g} ms: "
          f"{hook['median']:.2f} ms -> {verdict}")
    data = {"benchmark": "hook_unmanaged", "runs": opts.runs, "warmup": opts.warmup,
            "cpus": os.cpu_count(), "load_at_start": note, "results_ms": results,
            "goals": [{"goal": f"hook median (VM without profile) <= {GOAL_MEDIAN_MS:g} ms",
                       "value_ms": hook["median"], "pass": ok}],
            "pass": ok}
    print("results:", B.write_json("hook_unmanaged", data, opts.out))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
