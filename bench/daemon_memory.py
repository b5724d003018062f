"""Benchmark: the daemon's memory, file descriptors and threads over many prepare/release
cycles of the same VM (issue 9: 1000 cycles grow VmRSS by less than 100 KiB in all, with fds
and threads flat).

The daemon (unchanged: ``python -m testbed.daemon``, the product's ``run()`` on the simulated
host) on a fresh simulated NVIDIA host with its fake systemd on a private bus, zero simulated
latencies. Each cycle is one ``prepare`` and one ``release`` request on the control socket (the
hook's protocol, without spawning the hook: its cost is not the daemon's). ``VmRSS``, open fds
(``/proc/PID/fd``) and threads are read once the daemon is ready (cycle 0, before any request),
after ``--warmup`` cycles, every tenth of the run, and after ``--cycles`` cycles in all
(counted from cycle 0: the warm-up is part of them). The goal is the growth from cycle 0 (the
total); the growth after the warm-up is printed beside it for information. Prints a table,
writes JSON, exits 1 when a goal is missed. Stops everything it started by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as B  # noqa: E402

VM = "win11"
GOAL_GROWTH_KIB = 100


def request(path: str, payload: dict) -> dict:
    """One request on the daemon's socket; its final answer (after ``accepted``)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(120)
        s.connect(path)
        s.sendall(json.dumps(payload).encode() + b"\n")
        f = s.makefile("rb")
        while True:
            msg = json.loads(f.readline())
            if not msg.get("accepted"):
                return msg


def sample(pid: int) -> dict:
    """VmRSS (KiB), open fds and threads of ``pid`` once every thread sleeps (the last
    request's thread has ended)."""
    B.wait_all_sleeping(pid)
    st = B.proc_status(pid)
    return {"rss_kib": B.rss_kib(pid), "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": int(st["Threads"])}


def main(argv: list[str] | None = None) -> int:
    from testbed.sim.faults import REALISTIC
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cycles", type=int, default=1000, help="cycles in all (default 1000)")
    ap.add_argument("--warmup", type=int, default=10,
                    help="cycles after which the post-warm-up growth is measured (default 10)")
    ap.add_argument("--out", help="JSON result file (default under /tmp/vfio-hookd-bench)")
    opts = ap.parse_args(argv)
    env = B.SimEnv(latency={k: 0.0 for k in REALISTIC})
    daemon = None
    data: dict = {"benchmark": "daemon_memory", "cycles": opts.cycles, "warmup": opts.warmup}
    try:
        env.write_profile(VM)
        daemon = B.DaemonProc(env)
        sock = os.path.join(env.env["VFIO_HOOKD_RUN"], "vfio-hookd.sock")
        xml = B.domain_xml(VM, env.devices).decode()

        def cycle() -> None:
            for payload in ({"op": "prepare", "vm": VM, "xml": xml},
                            {"op": "release", "vm": VM, "reason": "destroyed"}):
                answer = request(sock, payload)
                if not answer.get("ok"):
                    raise RuntimeError(f"{payload['op']} failed: {answer}")
        # the daemon's warm-up (its D-Bus connections, after READY=1) is part of cycle 0;
        # its end is a log line, read every 50 ms until 30 s (no event for it)
        end = time.monotonic() + 30
        while "systemd-logind" not in daemon.read_log() and time.monotonic() < end:
            time.sleep(0.05)
        data["start"] = sample(daemon.pid)
        t0 = time.monotonic()
        marks = []
        step = max(1, opts.cycles // 10)
        for i in range(opts.cycles):
            cycle()
            n = i + 1
            if n == opts.warmup:
                data["before"] = sample(daemon.pid)
            if n % step == 0 or n in (1, opts.warmup):
                marks.append(dict(sample(daemon.pid), cycle=n))
        data["seconds"] = round(time.monotonic() - t0, 1)
        data["after"] = sample(daemon.pid)
        data["marks"] = marks
    finally:
        if daemon is not None:
            data["daemon_exit"] = daemon.stop()
        env.close()
    z = data["start"]
    b, a = data.get("before", z), data["after"]
    total = a["rss_kib"] - z["rss_kib"]
    growth = a["rss_kib"] - b["rss_kib"]
    rows = [[m["cycle"], m["rss_kib"], m["fds"], m["threads"]] for m in data["marks"]]
    print(f"daemon over {opts.cycles} prepare/release cycles from cycle 0 ({data['seconds']} s)")
    print(B.table(["cycle", "VmRSS KiB", "fds", "threads"],
                  [[0, z["rss_kib"], z["fds"], z["threads"]]] + rows))
    first = next((m for m in data["marks"] if m["cycle"] == 1), None)
    if first is not None:   # the first request's working set: vfio_hookd.memory
        data["growth_first_request_kib"] = first["rss_kib"] - z["rss_kib"]
        data["growth_after_first_kib"] = a["rss_kib"] - first["rss_kib"]
        print(f"info: the first request: {data['growth_first_request_kib']} KiB; the "
              f"{opts.cycles - 1} cycles after it: {data['growth_after_first_kib']} KiB")
    after_n = opts.cycles - min(opts.warmup, opts.cycles)
    print(f"info: growth after a {opts.warmup}-cycle warm-up, over the {after_n} cycles after "
          f"it: {growth} KiB ({growth * 1024 / max(1, after_n):.0f} B/cycle)")
    data["growth_after_warmup_kib"] = growth
    data["growth_total_kib"] = total
    goals = [
        {"goal": f"VmRSS growth over {opts.cycles} cycles from cycle 0 < {GOAL_GROWTH_KIB} KiB",
         "value": f"{total} KiB ({total * 1024 / max(1, opts.cycles):.0f} B/cycle)",
         "pass": total < GOAL_GROWTH_KIB},
        {"goal": "open fds flat", "value": f"{z['fds']} -> {b['fds']} -> {a['fds']}",
         "pass": a["fds"] <= b["fds"]},
        {"goal": "threads flat", "value": f"{z['threads']} -> {b['threads']} -> {a['threads']}",
         "pass": a["threads"] <= b["threads"]},
    ]
    for g in goals:
        print(f"goal: {g['goal']}: {g['value']} -> {'PASS' if g['pass'] else 'FAIL'}")
    ok = all(g["pass"] for g in goals)
    data.update(goals=goals, **{"pass": ok})
    print("results:", B.write_json("daemon_memory", data, opts.out))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
