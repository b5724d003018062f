"""Shared helpers of the benchmark scripts in ``bench/`` (not a test module, not product code).

Everything here works on a simulated host in a temporary directory (``testbed.sim``): the
environment variables ``VFIO_HOOKD_CONFIG`` / ``VFIO_HOOKD_RUN`` of this process and of every
child point into it, the daemon acts on the simulated host (``testbed.daemon``) and talks to
the simulated systemd on a private bus, so nothing touches the real ``/sys``, ``/dev`` or
``/etc``. Every process started here is stopped by its PID.

- :class:`SimEnv`: temp dirs + simulated host (+ its private bus and fake systemd) + profile.
- :class:`DaemonProc`: the daemon on the simulated host in a subprocess
  (:class:`testbed.daemon.DaemonProcess`), ready when it sends ``READY=1`` to
  ``$NOTIFY_SOCKET`` (no sleeping), optionally through ``bench/_daemon_shim.py``.
- :func:`spawn_time_ms`: wall time (ms) of one fork+exec+wait of a command, stdin from a pipe.
- :func:`stats`, :func:`table`, :func:`write_json`: summaries, text tables, result files.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from testbed import child_env  # noqa: E402
from testbed.daemon import DaemonProcess  # noqa: E402
from testbed.domains import tiny_domain_xml  # noqa: E402

HOOK = os.path.join(REPO, "hooks", "vfio-hookd")
#: Interpreter for the daemon and the CLI: the repo's venv (the team's rule), else this one.
VENV_PYTHON = os.path.join(REPO, ".venv", "bin", "python")
PYTHON = VENV_PYTHON if os.path.exists(VENV_PYTHON) else sys.executable
#: Default directory for result files (outside the repo: no junk in the work tree).
RESULTS_DIR = os.environ.get("VFIO_HOOKD_BENCH_OUT") or "/tmp/vfio-hookd-bench"



def domain_xml(name: str, devices=("0000:01:00.0", "0000:01:00.1")) -> bytes:
    """The domain XML libvirt hands the hook (stdin), with the GPU's functions as hostdevs."""
    return tiny_domain_xml(name, devices).encode()


# ---- numbers ------------------------------------------------------------------------------------
def percentile(values: list[float], p: float) -> float:
    """The ``p``-th percentile (0..100) of ``values``, linear interpolation between ranks."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def stats(values: list[float]) -> dict:
    """``{"n", "min", "median", "p90", "max", "mean"}`` of ``values`` (same unit), rounded."""
    return {"n": len(values), "min": round(min(values), 2),
            "median": round(statistics.median(values), 2), "p90": round(percentile(values, 90), 2),
            "max": round(max(values), 2), "mean": round(statistics.fmean(values), 2)}


def table(headers: list[str], rows: list[list]) -> str:
    """A plain text table (str) with right-aligned columns except the first."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = []
    for n, r in enumerate(cells):
        out.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])
                             for i, c in enumerate(r)))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_json(name: str, data: dict, out: str | None = None) -> str:
    """Write ``data`` to ``out`` or ``RESULTS_DIR/<name>.json``; return the path."""
    path = out or os.path.join(RESULTS_DIR, f"{name}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


# ---- processes ----------------------------------------------------------------------------------
def spawn_time_ms(argv: list[str], stdin_data: bytes, env: dict) -> tuple[float, int]:
    """Run ``argv`` once the way libvirt runs a hook (fork+exec, stdin a pipe holding
    ``stdin_data``, stdout/stderr to /dev/null) and return ``(wall ms, exit status)``.

    The clock runs from just before ``posix_spawn`` to the return of ``waitpid``.
    """
    r, w = os.pipe()
    os.write(w, stdin_data)   # below the pipe buffer (64 KiB): never blocks
    os.close(w)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        t0 = time.perf_counter()
        pid = os.posix_spawn(argv[0], argv, env, file_actions=[
            (os.POSIX_SPAWN_DUP2, r, 0), (os.POSIX_SPAWN_DUP2, devnull, 1),
            (os.POSIX_SPAWN_DUP2, devnull, 2)])
        _, status = os.waitpid(pid, 0)
        t1 = time.perf_counter()
    finally:
        os.close(r)
        os.close(devnull)
    return (t1 - t0) * 1000.0, os.waitstatus_to_exitcode(status)


class SimEnv:
    """A temporary config/run/host tree with a simulated host of ``variant``.

    :param variant: ``"nvidia"`` (default) or ``"amd"``.
    :param latency: per-operation latencies (s) for :func:`testbed.sim.make_host`.
    :param bus: also start the private D-Bus bus with the fake systemd (needed for prepare).
    :param units: ``{unit id: {key: value}}`` merged into the variant's ``units.json`` before
        the fake systemd starts (e.g. ``{"gdm.service": {"stop_s": 0.8}}``: per-unit
        latencies and ordering, :mod:`testbed.sim.units`).
    :param run_on_tmpfs: put the run directory (records, socket, locks) on ``/dev/shm`` when it
        is a tmpfs, as ``/run`` is on a systemd host (records are fsync'ed on every save, which
        costs milliseconds on a disk but nothing on tmpfs); else under the temp dir.

    Attributes: ``tmp``, ``config``, ``run``, ``root`` (str paths), ``bus`` (SimBus or None),
    ``env`` (dict: the environment for children). :meth:`close` stops the bus and removes the
    tree. Also sets the ``VFIO_HOOKD_*`` variables in this process's ``os.environ``.
    """

    def __init__(self, variant: str = "nvidia", latency: dict | None = None, bus: bool = True,
                 run_on_tmpfs: bool = True, units: dict | None = None):
        from testbed import sim
        self.tmp = tempfile.mkdtemp(prefix="vfio-hookd-bench-")
        self.config = os.path.join(self.tmp, "etc")
        self.root = os.path.join(self.tmp, "host")
        self._run_tmp = None
        if run_on_tmpfs and fs_type("/dev/shm") == "tmpfs":
            self._run_tmp = tempfile.mkdtemp(prefix="vfio-hookd-bench-run-", dir="/dev/shm")
            self.run = os.path.join(self._run_tmp, "run")
        else:
            self.run = os.path.join(self.tmp, "run")
        self.run_fs = None
        for d in (os.path.join(self.config, "vms"), self.run, self.root):
            os.makedirs(d)
        self.run_fs = fs_type(self.run)
        self.env = child_env(VFIO_HOOKD_CONFIG=self.config, VFIO_HOOKD_RUN=self.run,
                             VFIO_HOOKD_LOG="stderr")
        self.env.pop("NOTIFY_SOCKET", None)
        os.environ.update(VFIO_HOOKD_CONFIG=self.config, VFIO_HOOKD_RUN=self.run)
        self.variant = variant
        self.devices = sim.DEVICES[variant]
        self.bus = None
        try:
            sim.make_host(self.root, variant, latency)
            if units:
                table_path = os.path.join(self.root, ".sim", "units.json")
                with open(table_path) as f:
                    table = json.load(f)
                for uid, extra in units.items():
                    table[uid] = dict(table.get(uid) or {}, **extra)
                with open(table_path, "w") as f:
                    json.dump(table, f, indent=1)
            if bus:
                from testbed.sim.bus import SimBus
                self.bus = SimBus(self.root)
                self.env["DBUS_SYSTEM_BUS_ADDRESS"] = self.bus.address
        except BaseException:
            self.close()
            raise

    def set_latency(self, values: dict) -> None:
        """Replace the per-operation latencies (s) of the simulated host."""
        from testbed.sim import faults
        faults.set_latency(self.root, values)

    def write_profile(self, vm: str = "win11", text: str | None = None) -> str:
        """Write ``<config>/vms/<vm>.yaml``; default: the issue's NVIDIA host profile (both
        functions, ``stop_units: [nvidia-persistenced.service]``). Returns the path."""
        if text is None:
            text = "devices: [{}]\n".format(", ".join(f'"{a}"' for a in self.devices))
            if self.variant == "nvidia":
                text += "stop_units: [nvidia-persistenced.service]\n"
        path = os.path.join(self.config, "vms", f"{vm}.yaml")
        with open(path, "w") as f:
            f.write(text)
        return path

    def close(self) -> None:
        if self.bus is not None:
            self.bus.stop()
            self.bus = None
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self._run_tmp:
            shutil.rmtree(self._run_tmp, ignore_errors=True)


def fs_type(path: str) -> str:
    """File system type (str, e.g. ``"tmpfs"``, ``"ext4"``) of the mount holding ``path``,
    from ``/proc/self/mountinfo`` (longest mount point that is a prefix); ``"?"`` if unknown."""
    path = os.path.realpath(path)
    best, kind = "", "?"
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                mnt = left.split()[4]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, kind = mnt, right.split()[0]
    except OSError:
        pass
    return kind


class DaemonProc(DaemonProcess):
    """The daemon on ``simenv``'s simulated host in a subprocess (``python -m testbed.daemon
    --root ROOT`` with the venv's interpreter), ready at ``READY=1``; its log in
    ``simenv.tmp/daemon.log``.

    :param shim: run it through ``bench/_daemon_shim.py`` (records the simulated latencies it
        incurs and each request's time inside the daemon to ``shim_log``).
    :param ready_timeout_s: how long the start may take (s).
    :param preload: with ``shim``: import the lazily imported modules before the start (an
        experiment, see ``bench/_daemon_shim.py``).
    :raises testbed.daemon.DaemonError: the daemon did not send READY=1 in time (its log is
        in the message).
    """

    def __init__(self, simenv: SimEnv, shim: bool = False, ready_timeout_s: float = 30.0,
                 preload: bool = False):
        self.simenv = simenv
        env = dict(simenv.env)
        self.shim_log = os.path.join(simenv.tmp, "shim.jsonl") if shim else None
        argv = None
        if shim:
            env["VFIO_HOOKD_BENCH_SHIM_LOG"] = self.shim_log
            if preload:
                env["VFIO_HOOKD_BENCH_PRELOAD"] = "1"
            argv = [PYTHON, os.path.join(BENCH, "_daemon_shim.py"), "--root", simenv.root]
        self._shim_offset = 0
        super().__init__(simenv.root, env=env, argv=argv, python=PYTHON,
                         log_path=os.path.join(simenv.tmp, "daemon.log"),
                         ready_timeout_s=ready_timeout_s, cwd=simenv.tmp)

    def shim_events(self) -> list[dict]:
        """Events the shim wrote since the last call (list of dicts), oldest first."""
        if not self.shim_log or not os.path.exists(self.shim_log):
            return []
        with open(self.shim_log) as f:
            f.seek(self._shim_offset)
            data = f.read()
        # only whole lines: the shim writes one line per event with one write(2)
        end = data.rfind("\n") + 1
        self._shim_offset += len(data[:end].encode())
        return [json.loads(line) for line in data[:end].splitlines() if line]


def cli_json(simenv: SimEnv, *args: str) -> dict:
    """``vfio-hookd <args> --json`` parsed (through the daemon when it runs).

    :raises RuntimeError: non-zero exit (with stderr).
    """
    r = subprocess.run([PYTHON, "-m", "vfio_hookd", *args, "--json"], env=simenv.env,
                       capture_output=True, text=True, timeout=60, cwd=simenv.tmp)
    if r.returncode != 0:
        raise RuntimeError(f"vfio-hookd {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
    return json.loads(r.stdout)


def proc_status(pid: int) -> dict:
    """``/proc/PID/status`` as ``{field: text}``."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def rss_kib(pid: int) -> int:
    """VmRSS of ``pid`` in KiB (``/proc/PID/status``, proc(5))."""
    return int(proc_status(pid)["VmRSS"].split()[0])


def thread_switches(pid: int) -> dict[int, dict]:
    """Per thread of ``pid``: ``{tid: {"name", "voluntary", "nonvoluntary"}}`` from
    ``/proc/PID/task/TID/status`` (``voluntary_ctxt_switches``, ``nonvoluntary_ctxt_switches``;
    proc(5)). Threads that end while being read are left out."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            st = {}
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    k, _, v = line.partition(":")
                    st[k] = v.strip()
        except (FileNotFoundError, ProcessLookupError):
            continue
        out[int(tid)] = {"name": st.get("Name", "?"),
                         "voluntary": int(st["voluntary_ctxt_switches"]),
                         "nonvoluntary": int(st["nonvoluntary_ctxt_switches"])}
    return out


def thread_waits(pid: int) -> dict[int, dict]:
    """Per thread of ``pid``: ``{tid: {"name", "state", "wchan", "syscall"}}`` -- the scheduler
    state (``R``, ``S``, ``D``, ... from ``/proc/PID/task/TID/stat``), the kernel function it
    sleeps in (``wchan``) and the system call it is blocked in (first field of ``syscall``: its
    number, e.g. 288 = accept4, 7 = poll on x86_64; ``running`` when in user space; proc(5))."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        base = f"/proc/{pid}/task/{tid}"
        try:
            with open(f"{base}/stat") as f:
                stat = f.read()
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            state = stat[stat.rindex(")") + 2:].split()[0]
            wchan = syscall = "?"
            try:
                with open(f"{base}/wchan") as f:
                    wchan = f.read().strip() or "0"
                with open(f"{base}/syscall") as f:
                    syscall = f.read().split()[0]
            except OSError:
                pass
        except (FileNotFoundError, ProcessLookupError, ValueError):   # the thread ended
            continue
        out[int(tid)] = {"name": name, "state": state, "wchan": wchan, "syscall": syscall}
    return out


def wait_all_sleeping(pid: int, deadline_s: float = 10.0) -> dict[int, dict]:
    """Wait until every thread of ``pid`` is asleep (state ``S``: blocked in the kernel) and
    return :func:`thread_waits`. Linux offers no event for "this thread blocked", so the
    thread states are read every 5 ms until the ``deadline_s`` (s).

    :raises TimeoutError: some thread still not asleep at the deadline.
    """
    end = time.monotonic() + deadline_s
    while True:
        waits = thread_waits(pid)
        if waits and all(t["state"] == "S" for t in waits.values()):
            return waits
        if time.monotonic() > end:
            raise TimeoutError(f"threads of {pid} not all asleep within {deadline_s:g} s: {waits}")
        time.sleep(0.005)   # polling the thread states (no event exists); not a settle delay


def busy_note() -> str:
    """A line naming the load average against the CPU count, with a warning when other work
    competes for the CPUs (the timings then overstate the product's own cost)."""
    load = os.getloadavg()[0]
    cpus = os.cpu_count() or 1
    warn = load > 0.5 * cpus
    return (f"load average {load:.2f} on {cpus} CPUs"
            + (" -- WARNING: the machine is busy, timings are inflated; re-run when idle"
               if warn else ""))
