"""Benchmark: the idle daemon (no periodic wake-ups; resident memory <= 45 MB).

vfio-hookd's daemon (unchanged: ``python -m testbed.daemon``, the product's ``run()`` with the
simulated host) on a fresh simulated NVIDIA host with its fake systemd, ready at ``READY=1``. Measured twice: right after the start,
and after one prepare/release cycle through the hook (``win11 prepare begin -`` /
``win11 release end -``, the default NVIDIA profile; zero simulated latencies, which do not
matter here), when the lazy imports (yaml, gi/pydbus, psutil) and the systemd connection exist:

- wake-ups: once every thread is asleep (blocked in the kernel), the context switches (``voluntary_ctxt_switches`` + ``nonvoluntary_ctxt_switches``)
  of every thread, from ``/proc/PID/task/TID/status``, at the start and at the end of an idle
  window (default 5 s). Goal: no thread present at both ends gains any, and no thread appears.
  The window is the measurement itself (the daemon is left alone for it), not a wait for an
  event.
- memory: ``VmRSS`` from ``/proc/PID/status``. Goal: <= 45 MB (MiB, 46080 KiB) both times.

Prints a table, writes JSON (default ``/tmp/vfio-hookd-bench/daemon_idle.json``), exits 1 when
a goal is missed. Stops the daemon and the simulated host's processes by PID.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as B  # noqa: E402

GOAL_RSS_KIB = 45 * 1024
VM = "win11"


def idle_window(pid: int, seconds: float) -> dict:
    """Context switches of ``pid``'s threads over an idle window of ``seconds``, which starts
    once every thread is asleep (so the main thread's last step into ``accept(2)`` after
    READY=1, or a request thread's exit, is not counted as an idle wake-up)."""
    waits = B.wait_all_sleeping(pid)
    before = B.thread_switches(pid)
    threading.Event().wait(seconds)   # the measurement window: nothing to wait for
    after = B.thread_switches(pid)
    threads = []
    for tid in sorted(set(before) | set(after)):
        b, a = before.get(tid), after.get(tid)
        entry = {"tid": tid, "name": (a or b)["name"],
                 "present": "both" if a and b else ("appeared" if a else "ended"),
                 "blocked_in": waits.get(tid, {}).get("wchan"),
                 "syscall": waits.get(tid, {}).get("syscall")}
        if a and b:
            entry["voluntary"] = a["voluntary"] - b["voluntary"]
            entry["nonvoluntary"] = a["nonvoluntary"] - b["nonvoluntary"]
        threads.append(entry)
    grown = sum(t.get("voluntary", 0) + t.get("nonvoluntary", 0) for t in threads)
    appeared = [t for t in threads if t["present"] == "appeared"]
    return {"window_s": seconds, "threads": threads, "switches": grown,
            "appeared": len(appeared), "ok": grown == 0 and not appeared}


def main(argv: list[str] | None = None) -> int:
    from testbed.sim.faults import REALISTIC
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--window", type=float, default=5.0, help="idle window (s, default 5)")
    ap.add_argument("--out", help="JSON result file (default under /tmp/vfio-hookd-bench)")
    opts = ap.parse_args(argv)

    env = B.SimEnv(latency={k: 0.0 for k in REALISTIC})
    daemon = None
    data: dict = {"benchmark": "daemon_idle", "cpus": os.cpu_count()}
    try:
        env.write_profile(VM)
        daemon = B.DaemonProc(env)
        pid = daemon.pid
        data["after_start"] = {"rss_kib": B.rss_kib(pid)}
        data["after_start"].update(idle_window(pid, opts.window))
        data["after_start"]["rss_kib_end"] = B.rss_kib(pid)
        xml = B.domain_xml(VM, env.devices)
        cycle = {}
        for d, args in (("prepare", ["prepare", "begin", "-"]), ("release", ["release", "end", "-"])):
            ms, rc = B.spawn_time_ms([B.HOOK, VM, *args], xml, env.env)
            cycle[d] = {"wall_ms": round(ms, 1), "exit": rc}
        data["cycle"] = cycle
        if any(c["exit"] != 0 for c in cycle.values()):
            print("prepare/release failed; daemon log:\n" + daemon.read_log()[-4000:],
                  file=sys.stderr)
            data["pass"] = False
            print("results:", B.write_json("daemon_idle", data, opts.out))
            return 1
        data["after_cycle"] = {"rss_kib": B.rss_kib(pid)}
        data["after_cycle"].update(idle_window(pid, opts.window))
        data["after_cycle"]["rss_kib_end"] = B.rss_kib(pid)
        data["status_after"] = {k: v for k, v in B.proc_status(pid).items()
                                if k in ("VmRSS", "RssAnon", "RssFile", "VmHWM", "Threads")}
    finally:
        if daemon is not None:
            data["daemon_exit"] = daemon.stop()
        env.close()

    rows = []
    for when in ("after_start", "after_cycle"):
        m = data[when]
        rows.append([when.replace("_", " "), f"{m['rss_kib'] / 1024:.1f}",
                     f"{m['rss_kib_end'] / 1024:.1f}", len(m["threads"]), m["switches"],
                     m["appeared"]])
    print(f"idle daemon: VmRSS (MiB) and context switches over {opts.window:g} s idle")
    print(B.table(["when", "RSS", "RSS at end", "threads", "switches", "new threads"], rows))
    for when in ("after_start", "after_cycle"):
        print(f"  threads {when.replace('_', ' ')}: " + ", ".join(
            f"{t['tid']} {t['name']} (in {t['blocked_in']}/syscall {t['syscall']}, {t['present']}"
            + (f", +{t['voluntary']}/+{t['nonvoluntary']}" if t["present"] == "both" else "")
            + ")" for t in data[when]["threads"]))
    print(f"  after the cycle: {data['status_after']}")
    goals = []
    for when in ("after_start", "after_cycle"):
        m = data[when]
        peak = max(m["rss_kib"], m["rss_kib_end"])
        goals.append({"goal": f"{when}: no wake-ups in {opts.window:g} s idle",
                      "value": m["switches"], "pass": m["ok"]})
        goals.append({"goal": f"{when}: VmRSS <= 45 MiB", "value_mib": round(peak / 1024, 1),
                      "pass": peak <= GOAL_RSS_KIB})
    for g in goals:
        val = f"{g['value_mib']} MiB" if "value_mib" in g else f"{g['value']} switches"
        print(f"goal: {g['goal']}: {val} -> {'PASS' if g['pass'] else 'FAIL'}")
    ok = all(g["pass"] for g in goals)
    data.update(goals=goals, **{"pass": ok})
    print("results:", B.write_json("daemon_idle", data, opts.out))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
