"""Benchmark: reading the largest profile vfio-hookd allows (goal: p90 < 20 ms), and the cost
of refusing inputs at their limits (issue 9, "Bounds").

The largest allowed profile is exactly ``MAX_PROFILE_BYTES`` (64 KiB) with every key set and
every list full (``MAX_LIST_ITEMS`` = 64 items): 64 PCI addresses, 64 unit names of 250
characters, and 64 module names long enough to fill the file to the last byte. It is written
to a temporary directory and read with :func:`vfio_hookd.profile.load_profile` (open, read,
decode, YAML, validation), as the daemon reads a profile for each prepare.

Second goal: refusing any input of at most 64 KiB takes under 20 ms too (p90 of each case):
a flow list ``modules: [a, a, ...]`` filling 64 KiB (21 800 items; refused at item 65 while
parsing, before YAML builds a node), the same as a block list, 64 lists of 64 items, and 5 000
keys (refused at the first node past ``reader.MAX_NODES``). For information (no goal): the same
text with pyyaml's pure-Python loader (what the reader used before it took libyaml), a profile
one byte over, a domain XML of 1 MiB + 1 byte and an entity bomb, and a request line nested
100 000 deep.

Prints a table (ms), writes JSON (default ``/tmp/vfio-hookd-bench/profile_limits.json``) and
exits 1 when the goal is missed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as B  # noqa: E402

sys.path.insert(0, B.REPO)
from vfio_hookd import profile, server  # noqa: E402
from vfio_hookd.errors import HookdError  # noqa: E402
from vfio_hookd.paths import Paths  # noqa: E402
from vfio_hookd.profile.domain_xml import MAX_DOMAIN_XML_BYTES  # noqa: E402
from vfio_hookd.profile.model import MAX_LIST_ITEMS, MAX_PROFILE_BYTES  # noqa: E402

GOAL_P90_MS = 20.0


def largest_profile() -> str:
    """A valid profile of exactly MAX_PROFILE_BYTES bytes with every list full."""
    n = MAX_LIST_ITEMS
    head = ["devices:"] + [f"  - '0000:{i // 256:02x}:{i // 8 % 32:02x}.{i % 8}'" for i in range(n)]
    head += ["display_manager: gdm.service", "stop_units:"]
    head += [f"  - u{i:02d}{'x' * 237}.service" for i in range(n)]
    head += ["vtconsoles: auto", "framebuffer: none", "on_busy: terminate", "deadlines:"]
    head += [f"  {k}: {v}" for k, v in (("unit_stop", 60), ("unit_start", 60), ("terminate", 5),
                                         ("unbind", 10), ("module_unload", 20),
                                         ("module_load", 30))]
    head += ["modules:"]
    text = "\n".join(head) + "\n"
    room = MAX_PROFILE_BYTES - len(text.encode())
    per = room // n
    mods = []
    for i in range(n):
        size = per if i < n - 1 else room - per * (n - 1)
        mods.append(f"  - m{i:02d}" + "y" * (size - len("  - m00\n")) + "\n")
    text += "".join(mods)
    assert len(text.encode()) == MAX_PROFILE_BYTES, len(text.encode())
    return text


def timed(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def refused(fn):
    def run():
        try:
            fn()
        except HookdError:
            return
        raise AssertionError("not refused")
    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--out", default=None, help="result file (JSON)")
    opts = ap.parse_args(argv)
    note = B.busy_note()
    tmp = tempfile.mkdtemp(prefix="vfio-hookd-bench-")
    try:
        paths = Paths(config_dir=tmp, run_dir=os.path.join(tmp, "run"))
        os.makedirs(paths.profiles_dir)
        text = largest_profile()
        with open(paths.profile_path("big"), "w") as f:
            f.write(text)
        with open(paths.profile_path("over"), "w") as f:
            f.write(text + "\n")
        prof = profile.load_profile(paths, "big")
        assert (len(prof.devices), len(prof.stop_units), len(prof.modules)) == (64, 64, 64)

        def pure_python():
            import yaml
            real = getattr(yaml, "CSafeLoader", None)
            try:
                if real is not None:
                    del yaml.CSafeLoader
                profile.parse_profile(text, "big.yaml", "big")
            finally:
                if real is not None:
                    yaml.CSafeLoader = real

        flow = "modules: [" + "a, " * ((MAX_PROFILE_BYTES - 13) // 3) + "a]\n"
        block = "stop_units:\n" + "- a\n" * ((MAX_PROFILE_BYTES - 12) // 4)
        lists = "devices: [" + ", ".join(["[" + "a," * 63 + "a]"] * 64) + "]\n"
        keys = "".join(f"k{i:04d}: 1\n" for i in range((MAX_PROFILE_BYTES) // 9))
        for t in (flow, block, lists, keys):
            assert len(t.encode()) <= MAX_PROFILE_BYTES, len(t.encode())
        big_xml = "<domain>" + " " * (MAX_DOMAIN_XML_BYTES - len("<domain></domain>") + 1) + \
            "</domain>"
        bomb = ("<!DOCTYPE d [<!ENTITY a 'aaaaaaaaaa'>" + "".join(
            f"<!ENTITY {chr(98 + i)} '{('&' + chr(97 + i) + ';') * 10}'>" for i in range(8))
            + "]><domain>&i;</domain>")
        deep = b'{"op": "ping", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        cases = [
            ("largest allowed profile (64 KiB, lists of 64), load_profile",
             lambda: profile.load_profile(paths, "big")),
            ("  same text, pyyaml pure-Python loader (for comparison)", pure_python),
            ("profile of 64 KiB + 1 byte: refused", refused(lambda: profile.load_profile(paths, "over"))),
            (f"64 KiB flow list of {flow.count('a')} items: refused",
             refused(lambda: profile.parse_profile(flow, "flow.yaml", "flow"))),
            (f"64 KiB block list of {block.count('- a')} items: refused",
             refused(lambda: profile.parse_profile(block, "block.yaml", "block"))),
            ("64 lists of 64 items: refused",
             refused(lambda: profile.parse_profile(lists, "lists.yaml", "lists"))),
            (f"{keys.count(':')} keys: refused",
             refused(lambda: profile.parse_profile(keys, "keys.yaml", "keys"))),
            ("domain XML of 1 MiB + 1 byte: refused",
             refused(lambda: profile.devices_from_domain_xml(big_xml))),
            ("entity bomb (10^9 characters expanded): refused",
             refused(lambda: profile.devices_from_domain_xml(bomb))),
            ("request nested 100 000 deep: refused", refused(lambda: server.parse_request(deep))),
        ]
        results = {}
        for name, fn in cases:
            fn()   # warm-up (imports)
            results[name] = B.stats(timed(fn, opts.runs if "pure" not in name else 10))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    main_case = results[cases[0][0]]
    refusals = {n: r for n, r in results.items() if n.startswith("64") or n.endswith("keys: refused")}
    worst = max(refusals, key=lambda n: refusals[n]["p90"])
    ok_refuse = refusals[worst]["p90"] < GOAL_P90_MS
    ok = main_case["p90"] < GOAL_P90_MS and ok_refuse
    rows = [[name, r["n"], f"{r['median']:.2f}", f"{r['p90']:.2f}", f"{r['max']:.2f}"]
            for name, r in results.items()]
    print("at start: " + note)
    print(f"reader: {'libyaml (CSafeLoader)' if _has_libyaml() else 'pure-Python SafeLoader'}"
          f"; profile {len(text.encode())} bytes; ms")
    print(B.table(["input", "n", "median", "p90", "max"], rows))
    ok_read = main_case["p90"] < GOAL_P90_MS
    print(f"goal: largest allowed profile read, p90 < {GOAL_P90_MS:g} ms: "
          f"{main_case['p90']:.2f} ms -> {'PASS' if ok_read else 'FAIL'}")
    print(f"goal: every 64 KiB input refused, p90 < {GOAL_P90_MS:g} ms: slowest "
          f"{worst.strip()} {refusals[worst]['p90']:.2f} ms -> {'PASS' if ok_refuse else 'FAIL'}")
    data = {"benchmark": "profile_limits", "runs": opts.runs, "cpus": os.cpu_count(),
            "load_at_start": note, "libyaml": _has_libyaml(), "results_ms": results,
            "goals": [{"goal": f"largest allowed profile read p90 < {GOAL_P90_MS:g} ms",
                       "value_ms": main_case["p90"], "pass": ok_read},
                      {"goal": f"every 64 KiB input refused p90 < {GOAL_P90_MS:g} ms",
                       "case": worst, "value_ms": refusals[worst]["p90"], "pass": ok_refuse}],
            "pass": ok}
    print("results:", B.write_json("profile_limits", data, opts.out))
    return 0 if ok else 1


def _has_libyaml() -> bool:
    import yaml
    return hasattr(yaml, "CSafeLoader")


if __name__ == "__main__":
    sys.exit(main())
