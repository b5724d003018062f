"""Run every vfio-hookd benchmark and print a summary of its goals.

``bench/run [--quick] [--out-dir DIR]``: runs ``hook_unmanaged.py``, ``prepare_release.py``,
``units_parallel.py``, ``daemon_idle.py`` and ``profile_limits.py`` one after the other
(each prints its own tables), then a summary of every goal. Results: ``DIR/<benchmark>.json`` and ``DIR/latest.json`` (all of them),
``DIR`` default ``/tmp/vfio-hookd-bench`` (never in the repo). Exit status 0 when every goal
is met, 1 otherwise. ``--quick``: fewer runs, for a smoke test (numbers less stable).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
import benchlib as B  # noqa: E402

SCRIPTS = {
    "hook_unmanaged": ([], ["--runs", "30", "--warmup", "3"]),
    "prepare_release": ([], ["--cycles", "2", "--zero-cycles", "3"]),
    "units_parallel": ([], ["--cycles", "1"]),
    "daemon_idle": ([], ["--window", "2"]),
    "profile_limits": ([], ["--runs", "10"]),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer runs (smoke test)")
    ap.add_argument("--out-dir", default=B.RESULTS_DIR, help="result directory")
    opts = ap.parse_args(argv)
    os.makedirs(opts.out_dir, exist_ok=True)
    results, summary_rows, ok_all = {}, [], True
    for name, (normal, quick) in SCRIPTS.items():
        out = os.path.join(opts.out_dir, f"{name}.json")
        if os.path.exists(out):
            os.unlink(out)   # a stale file must not pass for this run's result
        print(f"=== {name} ===", flush=True)
        t0 = time.monotonic()
        rc = subprocess.run([B.PYTHON, os.path.join(BENCH, f"{name}.py"), "--out", out,
                             *(quick if opts.quick else normal)]).returncode
        took = time.monotonic() - t0
        print(flush=True)
        try:
            with open(out) as f:
                data = json.load(f)
        except (OSError, ValueError):
            data = {"pass": False, "goals": [{"goal": f"{name} produced no result (exit {rc})",
                                              "pass": False}]}
        data["exit"] = rc
        data["took_s"] = round(took, 1)
        results[name] = data
        ok = rc == 0 and data.get("pass") is True
        ok_all &= ok
        for g in data.get("goals") or [{"goal": "(no goals reported)", "pass": False}]:
            value = (f"{g['value_ms']:.1f} ms" if "value_ms" in g else
                     f"{g['value_mib']} MiB" if "value_mib" in g else
                     f"{g['value']}" if "value" in g else "")
            summary_rows.append([name, g["goal"], value, "PASS" if g["pass"] else "FAIL"])
    print("=== summary ===")
    print(B.table(["benchmark", "goal", "measured", "result"], summary_rows))
    path = B.write_json("latest", {"quick": opts.quick, "time": time.strftime(
        "%Y-%m-%dT%H:%M:%S%z"), "pass": ok_all, "benchmarks": results},
        os.path.join(opts.out_dir, "latest.json"))
    print(f"all goals {'met' if ok_all else 'NOT met'}; results: {path}")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
