"""Runs inside the kernel tests' desktop guest as a service of its real systemd (PID 1; the
guest's root is this machine's root over 9p under a tmpfs overlay, ``desktop_root.sh``): a
real desktop on the guest's GPU, and vfio-hookd installed as a user installs it, handing that
GPU over and giving the desktop back (issue 8, FIELD-NOTES §8). Never run it on a real host.

``python desktop_runner.py OUTDIR``: reads ``OUTDIR/boot.json`` (``scenarios``: the variants of
:data:`VARIANTS` in run order, ``gpu_addr``, ``audio_addr``, ``repo``), writes one
``OUTDIR/results/<variant>.json`` per variant (``{"ok": bool, "error": str|null, "wall_s":
float, ...}``) and ``OUTDIR/results/setup.json`` (the install, the unit's exposure score), its
log to ``OUTDIR/runner.log``, the guest's journal to ``OUTDIR/journal.txt``, and ends the boot
through ``isa-debug-exit`` (0: every variant passed, 1: one failed).

A variant is a desktop as users run it, started by the guest's systemd:

- ``x11``: LightDM as ``display-manager.service``, autologin of alice into an X session (Xorg,
  modesetting, one ``xterm``);
- ``wayland``: greetd as ``display-manager.service``, its ``initial_session`` runs weston (DRM
  backend, pixman) as alice; its greeter (``default_session``) is weston as ``_greetd``;
- ``greeter``: greetd showing only its greeter (weston as ``_greetd``, a session of class
  greeter), nobody logged in;
- ``nodm``: no display manager: ``getty@tty1`` logs alice in (``--autologin``) and her
  ``~/.bash_profile`` runs weston on tty1;
- ``libvirt``: ``x11`` driven by a real libvirtd in the guest (``virsh start`` of a domain with
  both functions as ``<hostdev>``, ``virsh destroy``) through the installed hook;
- ``x11-fault``, ``wayland-fault``: that desktop, and a prepare that fails at its last step
  (``bind_vfio``: vfio-pci cannot be loaded) must roll back to the same state.

The profile names the devices, plus :data:`PROFILE_EXTRA` of the variant (written before each
variant). ``wayland`` also isolates the CPUs (``host_cpus: "0"``: ``AllowedCPUs`` of
``system.slice``, ``user.slice``, ``init.scope`` read back from the real systemd while
prepared, and as before after the release). ``x11`` asks ``inhibit: sleep``: while prepared, the guest's real logind lists
vfio-hookd's ``block`` lock on ``sleep`` held by the daemon's PID (``ListInhibitors``); after
``systemctl restart vfio-hookd.service`` it lists it again, held by the new daemon; after the
release it is gone (:func:`check_inhibitor`).

In every variant alice's user instance runs PipeWire + WirePlumber (+ pipewire-pulse), which
open the HDA function's nodes (alice is in ``audio``), and alice has a second session that is
not on seat0: ``ssh alice@localhost`` to the guest's real sshd (class user, no seat), opened
once and checked alive after each prepare and release.

Per variant: a snapshot before (:func:`snapshot`: the kernel tree of
``guest_runner.tree``, seat0's sessions by user/class/type/state, the system's and alice's
active units, which command holds which node of the functions) -> ``vfio-hookd prepare`` (the
CLI, talking to the daemon under systemd) -> both functions on vfio-pci, no process holds a
node of them, alice's other session alive -> ``vfio-hookd release`` -> the desktop back
(:func:`wait_desktop`) -> the snapshot equals the one before, except the kernel's own
documented changes (``testbed.expected``), PIDs, and for greetd its greeter instead of the
once-per-boot ``initial_session`` (FIELD-NOTES §8: greetd's policy, accepted and reported).
This is the test harness: where nothing tells it when a desktop is up (a compositor opening
a node) it polls with a deadline.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
VM = "desk"
PROFILE_DIR = "/etc/vfio-hookd/vms"
ALICE = "alice"
#: The desktop variants and their display manager unit (None: getty@tty1, no DM).
VARIANTS = {"x11": "lightdm.service", "x11-fault": "lightdm.service",
            "wayland": "greetd.service", "wayland-fault": "greetd.service",
            "greeter": "greetd.service", "nodm": None, "libvirt": "lightdm.service",
            "package": "greetd.service"}
#: Per-variant profile keys, after the devices (written before each variant). ``wayland`` also
#: isolates the guest's CPUs (2 vCPUs: the host keeps CPU 0, the VM gets CPU 1) and asks for
#: the performance governor (the QEMU guest has no cpufreq: reported, not an error); ``x11``
#: also holds a logind sleep inhibitor lock while prepared.
PROFILE_EXTRA = {"wayland": 'host_cpus: "0"\ncpu_governor: performance\n', "x11": "inhibit: sleep\n"}
#: The units the cpu_isolation step confines (vfio_hookd.steps.cpus.UNITS).
CPU_UNITS = ("system.slice", "user.slice", "init.scope")
#: How long a desktop may take to come up or back under TCG (s; FIELD-NOTES §8: LightDM's
#: session +2.8 s and audio +6.8 s after start, the measured worst x3 for a loaded machine).
DESKTOP_TIMEOUT_S = 90.0
#: How long the holders of the functions' nodes must stay the same before a snapshot (s): the
#: user's audio server opens and closes nodes for a while after the session starts.
STABLE_S = 3.0
WESTON = "weston --backend=drm-backend.so --use-pixman"
#: Units whose being active is no part of the desktop: D-Bus-activated services that exit when
#: idle, and the test's own units.
VOLATILE_UNITS = re.compile(r"^(session-\d+\.scope|systemd-hostnamed\.service|"
                            r"systemd-localed\.service|systemd-timedated\.service|"
                            r"vh-desktop-runner\.service|run-.*\.(scope|service)|"
                            r"packagekit\.service|polkit\.service|.*\.device|"
                            r"systemd-fsckd\.service|modprobe@.*\.service|"
                            r"user-runtime-dir@\d+\.service|user@\d+\.service|"
                            r"user-\d+\.slice)$")


class Fail(Exception):
    """A check of a variant failed."""


def check(cond, what: str) -> None:
    if not cond:
        raise Fail(what)


class Log:
    def __init__(self, path: str):
        self.f = open(path, "a", buffering=1)
        self.t0 = time.monotonic()

    def __call__(self, msg: str) -> None:
        line = f"[{time.monotonic() - self.t0:7.2f}] {msg}"
        print(line, flush=True)
        self.f.write(line + "\n")


LOG: Log


def run(*argv, check_rc=False, timeout=120, **kw) -> subprocess.CompletedProcess:
    t = time.monotonic()
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, **kw)
    LOG(f"$ {' '.join(argv)} -> {r.returncode} in {time.monotonic() - t:.2f} s"
        + (f": {r.stderr.strip()[:600]}" if r.returncode else ""))
    if check_rc and r.returncode != 0:
        raise Fail(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()[:800]}")
    return r


def wait_for(what: str, fn, timeout_s: float, every_s: float = 0.1):
    """Poll ``fn()`` until it returns a true value, at most ``timeout_s`` (the harness's own
    wait where no event exists); returns it. :raises Fail: naming ``what`` and the last value."""
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise Fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


# ---- observations -----------------------------------------------------------------------------
def sessions() -> list[dict]:
    """Every logind session: ``{id, user, class, type, state, seat, remote, service, leader}``
    (``loginctl show-session``, org.freedesktop.login1(5))."""
    r = subprocess.run(["loginctl", "list-sessions", "--no-legend"], capture_output=True,
                       text=True)
    out = []
    for line in r.stdout.splitlines():
        sid = line.split()[0] if line.split() else None
        if not sid:
            continue
        p = subprocess.run(["loginctl", "show-session", sid, "-p", "Name", "-p", "Class",
                            "-p", "Type", "-p", "State", "-p", "Seat", "-p", "Remote",
                            "-p", "Service", "-p", "Leader", "-p", "VTNr"],
                           capture_output=True, text=True)
        kv = dict(x.split("=", 1) for x in p.stdout.splitlines() if "=" in x)
        if not kv:
            continue
        out.append({"id": sid, "user": kv.get("Name"), "class": kv.get("Class"),
                    "type": kv.get("Type"), "state": kv.get("State"), "seat": kv.get("Seat"),
                    "remote": kv.get("Remote"), "service": kv.get("Service"),
                    "leader": kv.get("Leader"), "vt": kv.get("VTNr")})
    return out


def seat0(sess: list[dict] | None = None) -> list[tuple]:
    """seat0's sessions as sorted ``(user, class, type, state)`` tuples (no IDs or PIDs)."""
    return sorted((s["user"], s["class"], s["type"], s["state"])
                  for s in (sess if sess is not None else sessions()) if s["seat"] == "seat0")


def active_units() -> list[str]:
    r = subprocess.run(["systemctl", "list-units", "--state=active", "--no-legend", "--plain",
                        "--all"], capture_output=True, text=True)
    return sorted(u for u in (line.split()[0] for line in r.stdout.splitlines() if line.split())
                  if not VOLATILE_UNITS.match(u))


def user_units(user: str = ALICE) -> list[str]:
    """Active units of ``user``'s systemd instance (``systemctl --user`` on its bus), or
    ``["(no user instance)"]``."""
    uid = pwd.getpwnam(user).pw_uid
    bus = f"/run/user/{uid}/bus"
    if not os.path.exists(bus):
        return ["(no user instance)"]
    r = subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={uid}", "--init-groups",
                        "systemctl", "--user", "list-units", "--state=active", "--no-legend",
                        "--plain", "--all"], capture_output=True, text=True,
                       env={"PATH": os.environ["PATH"], "XDG_RUNTIME_DIR": f"/run/user/{uid}",
                            "DBUS_SESSION_BUS_ADDRESS": f"unix:path={bus}"})
    # sound.target of a user instance follows the sound card, not the desktop: udev's
    # 99-systemd.rules gives controlC* SYSTEMD_USER_WANTS=sound.target, which an instance acts
    # on when the card appears while it runs (a release re-adds the card; at boot the card
    # predates the instance) and which stops with the card (StopWhenUnneeded=yes)
    return sorted(u for u in (line.split()[0] for line in r.stdout.splitlines() if line.split())
                  if not u.endswith(".device") and not VOLATILE_UNITS.match(u)
                  and u != "sound.target")


def proc_user(pid: str) -> str:
    try:
        uid = os.stat(f"/proc/{pid}").st_uid
        return pwd.getpwuid(uid).pw_name
    except (OSError, KeyError):
        return "?"


def holders(paths: list[str]) -> dict:
    """``{node: sorted ["comm (user)", ...]}``: which commands hold which of ``paths`` open,
    through a file descriptor or a mapping (``/proc/PID/fd``, ``/proc/PID/maps``); a node
    already removed shows as ``NODE (deleted)``."""
    want = set(paths)
    out: dict = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        found = set()
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    t = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                base = t[:-len(" (deleted)")] if t.endswith(" (deleted)") else t
                if base in want:
                    found.add(t)
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    parts = line.split(None, 5)
                    if len(parts) == 6:
                        t = parts[5].strip()
                        base = t[:-len(" (deleted)")] if t.endswith(" (deleted)") else t
                        if base in want:
                            found.add(t)
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        for t in found:
            out.setdefault(t, set()).add(f"{comm} ({proc_user(pid)})")
    return {k: sorted(v) for k, v in sorted(out.items())}


def holder_pids(paths: list[str]) -> dict:
    """``{node: ["PID comm (user)", ...]}`` (evidence for the log and the result)."""
    want = set(paths)
    out: dict = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            ts = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        for t in ts:
            if t.replace(" (deleted)", "") in want:
                out.setdefault(t, []).append(f"{pid} {comm} ({proc_user(pid)})")
    return out


class Guest:
    """What the run shares: the configuration, the functions, the guest_runner helpers."""

    def __init__(self, out: str, cfg: dict):
        self.out = out
        self.cfg = cfg
        self.repo = cfg["repo"]
        self.gpu, self.audio = cfg["gpu_addr"], cfg["audio_addr"]
        self.funcs = (self.gpu, self.audio)
        import guest_runner as gr
        self.gr = gr
        self.nodes_before: list[str] = []
        self.ssh: subprocess.Popen | None = None
        self.ssh_session: dict | None = None
        self.lv: subprocess.Popen | None = None
        self.lv_t0 = 0.0

    def function_nodes(self) -> list[str]:
        return [n for a in self.funcs for n in self.gr.function_nodes(a)] + \
            sorted(f"/dev/{e}" for e in os.listdir("/dev") if re.fullmatch(r"fb\d+", e))

    def snapshot(self) -> dict:
        """The state compared before and after (see the module's docstring)."""
        nodes = self.function_nodes()
        sess = sessions()
        return {"tree": self.gr.tree(self.funcs), "units": active_units(),
                "user_units": user_units(), "seat0": seat0(sess), "holders": holders(nodes),
                "sessions": sess}

    #: the command the CLI runs as: the checkout's (``vfio-hookd install``'s PATH entry), or
    #: the package's ``/usr/bin/vfio-hookd`` once the ``package`` variant installed it
    command = "vfio-hookd"

    def cli(self, *args, timeout=600) -> subprocess.CompletedProcess:
        return run(self.command, *args, timeout=timeout)

    def status(self) -> dict:
        r = self.cli("status", VM, "--json")
        check(r.returncode == 0, f"vfio-hookd status failed: {r.stderr.strip()}")
        return json.loads(r.stdout)["vms"][VM]


def step_times(st: dict) -> dict:
    return {s["name"]: {"apply_ms": s.get("duration_ms"), "undo_ms": s.get("undo_ms"),
                        "status": s.get("status"), "notes": s.get("notes") or []}
            for s in st.get("steps", [])}


# ---- setup: the second session, vfio-hookd installed ------------------------------------------
def wait_devices(g: Guest) -> None:
    """The GPU's card and the HDA function's control node, created by udev's coldplug."""
    wait_for("the GPU's DRM card and the HDA control node (udev coldplug)",
             lambda: any("/card" in n for n in g.gr.function_nodes(g.gpu))
             and any("/controlC" in n for n in g.gr.function_nodes(g.audio)), 120, 0.2)
    g.nodes_before = g.function_nodes()


def open_ssh_session(g: Guest) -> dict:
    """alice's second session, not on seat0: ``ssh alice@localhost`` with a key to the guest's
    real sshd (``ssh.service``), left running a ``sleep``. Returns its logind session."""
    home = "/home/alice/.ssh"
    os.makedirs(home, exist_ok=True)
    key = "/root/vh-alice-key"
    if not os.path.exists(key):
        run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key, check_rc=True)
    shutil.copyfile(key + ".pub", f"{home}/authorized_keys")
    for p in (home, f"{home}/authorized_keys"):
        os.chown(p, 1000, 1000)
    os.chmod(home, 0o700)
    run("systemctl", "start", "ssh.service", check_rc=True)
    g.ssh = subprocess.Popen(
        ["ssh", "-T", "-i", key, "-o", "StrictHostKeyChecking=no", "-o", "BatchMode=yes",
         "-o", "UserKnownHostsFile=/dev/null", "alice@127.0.0.1",
         "echo session=$XDG_SESSION_ID; exec sleep infinity"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=open(f"{g.out}/ssh.log", "w"),
        text=True)
    line = g.ssh.stdout.readline().strip()
    check(line.startswith("session="), f"ssh alice@localhost: no session line ({line!r}, "
          f"exit {g.ssh.poll()}; see ssh.log)")
    sid = line.split("=", 1)[1]
    s = [x for x in sessions() if x["id"] == sid]
    check(s, f"logind has no session {sid!r} for the ssh login: {sessions()}")
    s = s[0]
    check(s["user"] == ALICE and s["class"] == "user" and not s["seat"] and s["remote"] == "yes",
          f"the ssh session is not a remote user session without seat: {s}")
    g.ssh_session = s
    LOG(f"alice's ssh session: {s}")
    return s


def ssh_alive(g: Guest) -> None:
    sid = g.ssh_session["id"]
    s = [x for x in sessions() if x["id"] == sid]
    check(g.ssh.poll() is None, f"alice's ssh client exited ({g.ssh.returncode})")
    check(s and s[0]["state"] in ("active", "online"),
          f"alice's non-seat session {sid} is gone or not alive: {s}")


#: alice's user units that use the GPU's audio function (stopped by a prepare, issue 8).
AUDIO_USER_UNITS = re.compile(r"^(pipewire|pipewire-pulse|wireplumber)\.(service|socket)$")


def outside_seat0_kept(g: Guest, before: dict) -> None:
    """Nothing outside seat0 was stopped by the prepare: sshd, alice's user instance, and her
    user units that do not touch the GPU (her audio server's may be stopped, issue 8)."""
    check(unit_state("ssh.service").find("ActiveState=active") >= 0,
          f"ssh.service after prepare: {unit_state('ssh.service')}")
    check(unit_state("user@1000.service").find("ActiveState=active") >= 0,
          f"alice's user instance after prepare: {unit_state('user@1000.service')}")
    now = set(user_units())
    gone = [u for u in before["user_units"] if u not in now and not AUDIO_USER_UNITS.match(u)]
    check(not gone, f"alice's user units that do not touch the GPU were stopped: {gone}")


def desktop_check_back(st: dict) -> None:
    """``status --json`` shows the desktop-back check as its own entry after a release
    (issue 8: ``"desktop"``), and it says the desktop is back."""
    d = st.get("desktop")
    check(isinstance(d, dict), f"status --json has no \"desktop\" check for the VM after "
          f"release (keys: {sorted(st)})")
    check(d.get("check") == "back", f"status --json desktop check after release: {d}")


def install(g: Guest) -> dict:
    """``vfio-hookd install``, then ``systemctl enable --now vfio-hookd.socket
    vfio-hookd.service`` under the guest's systemd; the profile names only the devices;
    ``systemd-analyze security vfio-hookd.service``."""
    out = {}
    r = run("vfio-hookd", "install", check_rc=True)
    out["install"] = r.stdout.strip()
    t = time.monotonic()
    run("systemctl", "enable", "--now", "vfio-hookd.socket", "vfio-hookd.service", check_rc=True)
    out["enable_now_s"] = round(time.monotonic() - t, 2)
    r = run("systemctl", "show", "vfio-hookd.service", "-p", "ActiveState", "-p", "SubState",
            "-p", "MainPID", "-p", "ExecMainStartTimestampMonotonic")
    out["service"] = r.stdout.strip()
    check("ActiveState=active" in r.stdout, f"vfio-hookd.service not active: {r.stdout}")
    write_profile(g, None)
    r = run("systemd-analyze", "security", "vfio-hookd.service", "--no-pager", timeout=300)
    with open(f"{g.out}/systemd-analyze-security.txt", "w") as f:
        f.write(r.stdout + r.stderr)
    m = re.search(r"Overall exposure level for vfio-hookd.service: ([0-9.]+) (\S+)", r.stdout)
    out["exposure"] = f"{m.group(1)} {m.group(2)}" if m else None
    LOG(f"systemd-analyze security: {out['exposure']}")
    return out


def write_profile(g: Guest, variant: str | None) -> None:
    """The VM's profile: the devices, and :data:`PROFILE_EXTRA` of ``variant``."""
    os.makedirs(PROFILE_DIR, exist_ok=True)
    with open(f"{PROFILE_DIR}/{VM}.yaml", "w") as f:
        # profile_extra: only for trying the harness by hand (the plan never sets it)
        f.write(f"devices: [{', '.join(repr(a) for a in g.funcs)}]\n"
                + g.cfg.get("profile_extra", "") + PROFILE_EXTRA.get(variant, ""))


def cpu_state() -> dict:
    """What real systemd says of the CPU units: ``systemctl show -p AllowedCPUs -p
    EffectiveCPUs``, the cgroup's ``cpuset.cpus`` (absent while systemd has not enabled the
    cpuset controller for it) and ``cpuset.cpus.effective``, the root's subtree_control."""
    out: dict = {}
    for unit in CPU_UNITS:
        r = run("systemctl", "show", "-p", "AllowedCPUs", "-p", "EffectiveCPUs", unit)
        props = dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)
        cg = {}
        for f in ("cpuset.cpus", "cpuset.cpus.effective"):
            try:
                with open(f"/sys/fs/cgroup/{unit}/{f}") as fh:
                    cg[f] = fh.read().strip()
            except OSError:
                cg[f] = None
        out[unit] = {**props, **cg}
    with open("/sys/fs/cgroup/cgroup.subtree_control") as fh:
        out["subtree_control"] = fh.read().split()
    return out


def cpus_prepared(st: dict, res: dict) -> None:
    """While prepared: AllowedCPUs is the profile's ``host_cpus`` on each unit (and the
    cgroup file agrees); the governor step reports the CPUs without cpufreq."""
    now = cpu_state()
    res["cpus"]["prepared"] = now
    for unit in CPU_UNITS:
        check(now[unit].get("AllowedCPUs") == "0", f"{unit}: AllowedCPUs while prepared: {now[unit]}")
        check(now[unit].get("cpuset.cpus") == "0", f"{unit}: cpuset.cpus while prepared: {now[unit]}")
    gov = next((s for s in st.get("steps", []) if s["name"] == "cpu_governor"), {})
    res["cpus"]["governor_step"] = {k: gov.get(k) for k in ("status", "skipped", "duration_ms")}
    check(gov.get("status") == "done" and any("no cpufreq" in x for x in gov.get("skipped") or []),
          f"cpu_governor did not report the CPUs without cpufreq: {gov}")


def cpus_released(res: dict) -> list[str]:
    """After release: each unit's AllowedCPUs is what it was before, and its processes may
    run on every online CPU again (``cpuset.cpus.effective``, where the cgroup has it).
    What else differs (systemd keeping the cpuset controller enabled) is noted, not failed."""
    before, after = res["cpus"]["before"], cpu_state()
    res["cpus"]["after"] = after
    with open("/sys/devices/system/cpu/online") as fh:
        online = fh.read().strip()
    wrong = [f"{u}: AllowedCPUs {before[u].get('AllowedCPUs')!r} before, "
             f"{after[u].get('AllowedCPUs')!r} after" for u in CPU_UNITS
             if before[u].get("AllowedCPUs") != after[u].get("AllowedCPUs")]
    wrong += [f"{u}: cpuset.cpus.effective {after[u]['cpuset.cpus.effective']!r} after release "
              f"(online: {online})" for u in CPU_UNITS
              if after[u]["cpuset.cpus.effective"] not in (None, online)]
    res["cpus"]["differences"] = {k: [before[k], after[k]] for k in before if before[k] != after[k]}
    return [f"CPU units after release: {'; '.join(wrong)}"] if wrong else []


# ---- logind's inhibitor locks -----------------------------------------------------------------
def inhibitors() -> list[list]:
    """``[[what, who, why, mode, uid, pid]]``: logind's ``ListInhibitors`` (busctl, JSON)."""
    r = run("busctl", "call", "--json=short", "org.freedesktop.login1",
            "/org/freedesktop/login1", "org.freedesktop.login1.Manager", "ListInhibitors",
            check_rc=True)
    return json.loads(r.stdout)["data"][0]


def ours() -> list[list]:
    """vfio-hookd's locks among :func:`inhibitors`."""
    return [i for i in inhibitors() if i[1] == "vfio-hookd"]


def daemon_pid() -> int:
    r = run("systemctl", "show", "-p", "MainPID", "--value", "vfio-hookd.service")
    return int(r.stdout.strip() or 0)


def check_inhibitor(g: Guest, res: dict) -> None:
    """While prepared with ``inhibit: sleep``: logind lists one ``block`` lock on ``sleep``
    of who ``vfio-hookd`` held by the daemon; ``systemctl restart vfio-hookd.service`` -> it
    is listed again, held by the new daemon (taken before ``READY=1``). logind drops a lock
    when it sees its FIFO closed, and tells no one: where a lock must go, the harness polls
    ``ListInhibitors`` with a deadline."""
    out = res.setdefault("inhibitor", {})
    pid = daemon_pid()
    locks = ours()
    out["prepared"] = {"daemon_pid": pid, "locks": locks,
                       "block_inhibited": run("busctl", "get-property",
                                              "org.freedesktop.login1", "/org/freedesktop/login1",
                                              "org.freedesktop.login1.Manager",
                                              "BlockInhibited").stdout.strip(),
                       "systemd_inhibit_list": run("systemd-inhibit", "--list",
                                                   "--no-pager").stdout}
    check([(i[0], i[3], i[5]) for i in locks] == [("sleep", "block", pid)],
          f"logind's locks of vfio-hookd while prepared: {locks} (daemon PID {pid})")
    check(f"VM {VM} holds the GPU" in locks[0][2], f"why: {locks[0][2]!r}")
    st = g.status().get("inhibitor") or {}
    check(st.get("held") is True and st.get("what") == "sleep", f"status inhibitor: {st}")
    t0 = time.monotonic()
    run("systemctl", "restart", "vfio-hookd.service", check_rc=True)
    out["restart_s"] = round(time.monotonic() - t0, 2)
    new = daemon_pid()
    check(new and new != pid, f"vfio-hookd.service MainPID {new} after the restart (was {pid})")
    out["listed_at_restart_return"] = ours()
    locks = wait_for("only the new daemon's lock", lambda: (
        lambda l: l if [(i[0], i[3], i[5]) for i in l] == [("sleep", "block", new)] else None)(
        ours()), 10.0, every_s=0.2)
    out["restarted"] = {"daemon_pid": new, "locks": locks}
    st = g.status().get("inhibitor") or {}
    check(st.get("held") is True, f"status inhibitor after the restart: {st}")


def check_inhibitor_gone(res: dict) -> None:
    """After the release: vfio-hookd's lock is gone from logind's list."""
    t0 = time.monotonic()
    wait_for("vfio-hookd's lock gone", lambda: ours() == [], 10.0, every_s=0.2)
    res["inhibitor"]["gone_after_release_s"] = round(time.monotonic() - t0, 2)
    res["inhibitor"]["after_release"] = inhibitors()


# ---- desktops ---------------------------------------------------------------------------------
def alias_dm(unit: str | None) -> None:
    link = "/etc/systemd/system/display-manager.service"
    if os.path.lexists(link):
        os.unlink(link)
    if unit:
        os.symlink(f"/lib/systemd/system/{unit}", link)


def write_greetd(initial: bool) -> None:
    """greetd: weston as its greeter (``default_session`` as ``_greetd``, a session of class
    greeter), and with ``initial`` weston as alice once per boot (``initial_session``)."""
    with open("/etc/greetd/config.toml", "w") as f:
        f.write(f'[terminal]\nvt = 7\n\n[default_session]\ncommand = "{WESTON}"\n'
                f'user = "_greetd"\n')
        if initial:
            f.write(f'\n[initial_session]\ncommand = "{WESTON}"\nuser = "{ALICE}"\n')


def write_lightdm() -> None:
    os.makedirs("/etc/lightdm/lightdm.conf.d", exist_ok=True)
    with open("/etc/lightdm/lightdm.conf.d/50-vh.conf", "w") as f:
        f.write(f"[Seat:*]\nautologin-user={ALICE}\nautologin-user-timeout=0\n"
                "autologin-session=vh-xterm\nuser-session=vh-xterm\n")
    with open("/usr/share/xsessions/vh-xterm.desktop", "w") as f:
        f.write("[Desktop Entry]\nName=xterm\nExec=/usr/bin/xterm\nType=Application\n")


def write_getty() -> None:
    d = "/etc/systemd/system/getty@tty1.service.d"
    os.makedirs(d, exist_ok=True)
    with open(f"{d}/autologin.conf", "w") as f:
        f.write("[Service]\nExecStart=\nExecStart=-/sbin/agetty -o '-p -f -- \\\\u' --noclear "
                f"--autologin {ALICE} %I $TERM\n")
    with open("/home/alice/.bash_profile", "w") as f:
        f.write(f'if [ "$(tty)" = /dev/tty1 ]; then exec {WESTON} >/tmp/weston-tty1.log 2>&1; fi\n')
    os.chown("/home/alice/.bash_profile", 1000, 1000)


def expected_desktop(variant: str) -> dict:
    """What "the desktop is up" means for ``variant``: ``unit`` active, a seat0 session
    ``(user, class, type)``, the command holding the card. Type None: whatever the session
    was registered as. weston does not change it, and greetd 0.9 registers its sessions as
    ``tty`` unless the command's environment says otherwise (seen in the guest: alice's
    weston from greetd's initial_session is a ``tty`` session), as does a login on tty1."""
    if variant in ("x11", "x11-fault", "libvirt"):
        return {"unit": "lightdm.service", "session": (ALICE, "user", "x11"), "card": "Xorg"}
    if variant in ("wayland", "wayland-fault"):
        return {"unit": "greetd.service", "session": (ALICE, "user", None),
                "card": "weston"}
    if variant == "greeter":
        return {"unit": "greetd.service", "session": ("_greetd", "greeter", None),
                "card": "weston"}
    return {"unit": "getty@tty1.service", "session": (ALICE, "user", None), "card": "weston"}


def desktop_up(g: Guest, want: dict, audio: bool) -> dict | None:
    """The desktop ``want`` (:func:`expected_desktop`) as it is now, or None while it is not up:
    its unit active, the seat0 session (any type for a compositor started from a tty), the
    card held by the expected command, and with ``audio`` the control node held by someone."""
    r = subprocess.run(["systemctl", "is-active", want["unit"]], capture_output=True, text=True)
    if r.stdout.strip() != "active":
        return None
    s0 = seat0()
    u, c, t = want["session"]
    if not any(x[0] == u and x[1] == c and (t is None or x[2] == t) and x[3] == "active"
               for x in s0):
        return None
    h = holders(g.function_nodes())
    card = [n for n in h if "/dri/card" in n and not n.endswith("(deleted)")]
    if not any(hh.startswith(want["card"] + " ") for n in card for hh in h[n]):
        return None
    if audio and not any("/snd/" in n for n in h):
        return None
    return {"seat0": s0, "holders": h}


def wait_desktop(g: Guest, want: dict, audio: bool, timeout_s: float = DESKTOP_TIMEOUT_S) -> dict:
    """Wait until :func:`desktop_up`, then until the holders stayed the same for
    :data:`STABLE_S` (polled: a compositor or audio server opening a node sends no event)."""
    t0 = time.monotonic()
    try:
        wait_for(f"the desktop {want} (audio held: {audio})",
                 lambda: desktop_up(g, want, audio), timeout_s, 0.25)
    except Fail as exc:
        audio = [u for u in ("pipewire.service", "pipewire-pulse.service",
                             "wireplumber.service") if u not in user_units()]
        raise Fail(f"{exc}; now: seat0={seat0()}, holders={holders(g.function_nodes())}, "
                   f"{want['unit']}: {unit_state(want['unit'])}, alice's audio units not "
                   f"active: {audio}") from None
    up_s = time.monotonic() - t0
    last, since = None, time.monotonic()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        cur = (seat0(), holders(g.function_nodes()))
        if cur != last:
            last, since = cur, time.monotonic()
        elif time.monotonic() - since >= STABLE_S:
            break
        time.sleep(0.5)
    return {"up_s": round(up_s, 2), "stable_s": round(time.monotonic() - t0, 2)}


def unit_state(unit: str) -> str:
    r = subprocess.run(["systemctl", "show", unit, "-p", "ActiveState", "-p", "SubState",
                        "-p", "Result"], capture_output=True, text=True)
    return " ".join(r.stdout.split())


def stop_desktop(g: Guest) -> None:
    """End whatever desktop runs (DM or getty@tty1) and wait until seat0 has no session."""
    run("systemctl", "stop", "display-manager.service", "getty@tty1.service")
    wait_for("seat0 without sessions", lambda: not seat0(), 60, 0.2)


def alice_systemctl(*args) -> subprocess.CompletedProcess:
    """``systemctl --user ARGS`` in alice's user instance (her bus in /run/user/1000)."""
    return run("setpriv", "--reuid=1000", "--regid=1000", "--init-groups", "systemctl",
               "--user", *args, env={"PATH": os.environ["PATH"],
                                     "XDG_RUNTIME_DIR": "/run/user/1000",
                                     "DBUS_SESSION_BUS_ADDRESS": "unix:path=/run/user/1000/bus"})


def restore_audio() -> list[str]:
    """The variant's precondition: alice's audio server runs (an earlier variant may have
    left it stopped). Starts the audio units that are not active; returns them."""
    active = set(user_units())
    missing = [u for u in ("pipewire.service", "pipewire-pulse.service", "wireplumber.service")
               if u not in active]
    if missing:
        LOG(f"precondition: alice's {missing} not active (left so by an earlier variant): "
            f"starting them")
        alice_systemctl("start", *missing)
    return missing


def start_desktop(g: Guest, variant: str, res: dict) -> dict:
    """Configure and start ``variant``'s desktop; wait until it is up (with alice's audio,
    except on the greeter, whose user's audio follows the seat's ACL). What had to be put
    back first goes to ``res["precondition"]``."""
    stop_desktop(g)
    res["precondition"] = {"audio_started": restore_audio()}
    dm = VARIANTS[variant]
    if dm == "lightdm.service":
        write_lightdm()
    elif dm == "greetd.service":
        write_greetd(initial=variant != "greeter")
        # greetd runs initial_session once per boot (/run/greetd.run): the harness sets up
        # each variant as on a fresh boot of greetd (the product never touches this file)
        if os.path.exists("/run/greetd.run"):
            os.unlink("/run/greetd.run")
    else:
        write_getty()
    alias_dm(dm)
    run("systemctl", "daemon-reload", check_rc=True)
    run("systemctl", "start", dm or "getty@tty1.service", check_rc=True)
    want = expected_desktop(variant)
    times = wait_desktop(g, want, audio=variant != "greeter")
    LOG(f"{variant}: desktop up in {times}")
    return times


# ---- comparison -------------------------------------------------------------------------------
def compare(g: Guest, before: dict, after: dict, notes, greetd_policy: bool) -> tuple:
    """``(left, expected, accepted)``: differences that are not the kernel's own
    (``guest_runner.compare``), expected kernel lines, and what greetd's policy explains
    (``greetd_policy``: alice's initial_session replaced by the greeter, FIELD-NOTES §8)."""
    left, expected = g.gr.compare({"tree": before["tree"], "units": before["units"]},
                                  {"tree": after["tree"], "units": after["units"]}, notes)
    accepted = []
    for key in ("seat0", "holders", "user_units"):
        if before[key] != after[key]:
            left[key] = [before[key], after[key]]
    if greetd_policy:
        # the greeter's user (its runtime directory's mount, seen by the system and by
        # alice's instance alike) comes with the greeter
        mount = f"run-user-{pwd.getpwnam('_greetd').pw_uid}.mount"
        for key in ("units", "user_units"):
            if key in left:
                b, a = (set(x) for x in left[key])
                if (a ^ b) and (a ^ b) <= {mount}:
                    accepted.append(f"{key}: {sorted(a - b)} added, {sorted(b - a)} gone: the "
                                    f"greeter's user instance")
                    del left[key]
    if greetd_policy and "seat0" in left:
        b, a = left["seat0"]
        greeter = [x for x in a if x[:2] == ("_greetd", "greeter")]
        if b and all(x[0] == ALICE for x in b) and greeter and len(a) == 1:
            accepted.append(f"seat0: {b} -> {a}: greetd shows its greeter after a restart "
                            f"(initial_session runs once per boot)")
            del left["seat0"]
            if "holders" in left:
                hb, ha = left["holders"]
                strip = lambda h: {n: sorted({re.sub(r" \(.*\)$", "", x) for x in v
                                              if not x.startswith(("systemd", "pipewire",
                                                                   "wireplumber"))})
                                   for n, v in h.items() if "/dri/" in n}
                if strip(hb) == strip(ha):
                    accepted.append(f"holders: {hb} -> {ha}: the greeter's compositor and "
                                    f"user instance instead of alice's")
                    del left["holders"]
    return left, expected, accepted


# ---- variants ---------------------------------------------------------------------------------
def steps_of(st: dict) -> dict:
    return {s["name"]: s["status"] for s in st.get("steps", [])}


def rollback_outcome(g: Guest, want: dict, before: dict, st: dict) -> str:
    """After a prepare that failed: did its rollback give the desktop back, equal to
    ``before``? One line for the failure message (the variant fails anyway)."""
    greetd = want["unit"] == "greetd.service"
    try:
        wait_desktop(g, expected_desktop("greeter") if greetd else want,
                     audio=not greetd and want["session"][1] != "greeter")
    except Fail as exc:
        return f"the desktop did not come back: {exc}"
    notes = [n for s in st.get("steps", []) for n in (s.get("notes") or [])]
    left, _, accepted = compare(g, before, g.snapshot(), notes, greetd)
    return (f"desktop back, state equal to before{' (accepted: ' + '; '.join(accepted) + ')' if accepted else ''}"
            if not left else f"desktop back but the state differs: {json.dumps(left)}")


def prepare_timed(g: Guest) -> dict:
    """``vfio-hookd prepare``; the wall time and the time from the request until the GPU is on
    vfio-pci (its driver link polled every 10 ms: the harness's own measure)."""
    t0 = time.monotonic()
    p = subprocess.Popen(["vfio-hookd", "prepare", VM], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    to_vfio = None
    while p.poll() is None:
        if to_vfio is None and g.gr.driver(g.gpu) == "vfio-pci":
            to_vfio = time.monotonic() - t0
        time.sleep(0.01)
    out, err = p.communicate()
    wall = time.monotonic() - t0
    if to_vfio is None and g.gr.driver(g.gpu) == "vfio-pci":
        to_vfio = wall
    LOG(f"vfio-hookd prepare {VM} -> {p.returncode} in {wall:.2f} s: {err.strip()[:800]}")
    return {"rc": p.returncode, "stderr": err.strip(), "wall_s": round(wall, 2),
            "request_to_vfio_s": None if to_vfio is None else round(to_vfio, 2)}


def evidence(g: Guest) -> dict:
    """What the guest shows now, for a failure message: seat0, the holders with PIDs, alice's
    user units, the DM's state."""
    return {"seat0": seat0(), "holders": holder_pids(g.nodes_before),
            "alice_units": [u for u in user_units() if "pipewire" in u or "wireplumber" in u],
            "display-manager": unit_state("display-manager.service")}


def v_desktop(g: Guest, variant: str, res: dict) -> None:
    """prepare -> checks -> release -> desktop back -> equal (see the module's docstring)."""
    res["desktop_up"] = start_desktop(g, variant, res)
    want = expected_desktop(variant)
    before = g.snapshot()
    res["before"] = {k: before[k] for k in ("seat0", "holders", "user_units")}
    g.nodes_before = g.function_nodes()
    pre_evidence = holder_pids(g.nodes_before)
    res["holders_before_pids"] = pre_evidence
    cpus = "host_cpus:" in PROFILE_EXTRA.get(variant, "")
    if cpus:
        res["cpus"] = {"before": cpu_state()}
    p = prepare_timed(g)
    res["prepare"] = p
    st = g.status()
    res["prepare_steps"] = step_times(st)
    if p["rc"] != 0:
        res["after_failed_prepare"] = evidence(g)
        rb = rollback_outcome(g, want, before, st)
        res["rollback"] = rb
        raise Fail(f"prepare failed: {p['stderr'][:600]} (holders before prepare: "
                   f"{json.dumps(pre_evidence)}; steps {steps_of(st)}; the rollback: {rb})")
    for a in g.funcs:
        check(g.gr.driver(a) == "vfio-pci", f"{a} on {g.gr.driver(a)} after prepare")
    h = holders(g.nodes_before)
    check(not h, f"processes still hold nodes of the functions after prepare: "
          f"{json.dumps(holder_pids(g.nodes_before))}")
    ssh_alive(g)
    outside_seat0_kept(g, before)
    if cpus:
        cpus_prepared(st, res)
    res["after_prepare"] = {"seat0": seat0(), "user_units": user_units(),
                            "dm": unit_state("display-manager.service")}
    inhibit = "inhibit:" in PROFILE_EXTRA.get(variant, "")
    if inhibit:
        check_inhibitor(g, res)
    t0 = time.monotonic()
    r = g.cli("release", VM)
    res["release_wall_s"] = round(time.monotonic() - t0, 2)
    st = g.status()
    res["release_steps"] = step_times(st)
    res["desktop_check"] = st.get("desktop")
    check(r.returncode == 0, f"release failed: {r.stderr.strip()[:600]}")
    if inhibit:
        check_inhibitor_gone(res)
    late = []      # failures that do not stop the variant's other observations
    try:
        desktop_check_back(st)
    except Fail as exc:
        late.append(str(exc))
    if cpus:
        late.extend(cpus_released(res))
    back_want = dict(want)
    greetd = want["unit"] == "greetd.service"
    if greetd:
        back_want = expected_desktop("greeter")
    try:
        wait_desktop(g, back_want, audio=variant not in ("greeter",) and not greetd)
    except Fail as exc:
        raise Fail(f"desktop not back after release: {exc}") from None
    res["release_until_desktop_s"] = round(time.monotonic() - t0, 2)
    ssh_alive(g)
    after = g.snapshot()
    notes = [n for s in st.get("steps", []) for n in (s.get("notes") or [])]
    left, expected, accepted = compare(g, before, after, notes, greetd)
    res["expected_differences"], res["accepted_by_dm_policy"] = expected, accepted
    if left:
        late.append(f"state after release differs from before prepare: {json.dumps(left)}")
    check(not late, "; ".join(late))


def v_fault(g: Guest, variant: str, res: dict) -> None:
    """That desktop, and vfio-pci cannot be loaded (``install vfio_pci /bin/false`` in
    /etc/modprobe.d, as ``guest_runner.sc_fault``): prepare fails at ``bind_vfio``, its last
    step, after the units and modules steps, and the rollback gives the same state back."""
    res["desktop_up"] = start_desktop(g, variant, res)
    want = expected_desktop(variant)
    for m in ("vfio_pci", "vfio_pci_core", "vfio_iommu_type1", "vfio"):
        if m in g.gr.modules():
            run("rmmod", m)
    check("vfio_pci" not in g.gr.modules(), "could not unload vfio_pci for the test")
    conf = "/etc/modprobe.d/zz-vfio-hookd-kernel-test.conf"
    with open(conf, "w") as f:
        f.write("install vfio_pci /bin/false\n")
    try:
        before = g.snapshot()
        res["before"] = {k: before[k] for k in ("seat0", "holders", "user_units")}
        g.nodes_before = g.function_nodes()
        pre_evidence = holder_pids(g.nodes_before)
        t0 = time.monotonic()
        p = prepare_timed(g)
        res["prepare"] = p
        st = g.status()
        res["prepare_steps"] = step_times(st)
        check(p["rc"] != 0, "prepare succeeded although vfio-pci cannot load")
        if not p["stderr"].startswith("MODULE_FAILED: step bind_vfio"):
            res["after_failed_prepare"] = evidence(g)
            rb = rollback_outcome(g, want, before, st)
            res["rollback"] = rb
            raise Fail(f"prepare did not fail at its last step (bind_vfio) but: "
                       f"{p['stderr'][:600]}; steps {steps_of(st)}; holders before prepare "
                       f"{json.dumps(pre_evidence)}; the rollback: {rb}")
        try:
            wait_desktop(g, want if want["unit"] != "greetd.service"
                         else expected_desktop("greeter"),
                         audio=want["unit"] != "greetd.service")
        except Fail as exc:
            raise Fail(f"desktop not back after the rollback: {exc}") from None
        res["rollback_until_desktop_s"] = round(time.monotonic() - t0, 2)
        ssh_alive(g)
        after = g.snapshot()
        notes = [n for s in st.get("steps", []) for n in (s.get("notes") or [])]
        left, expected, accepted = compare(g, before, after, notes,
                                           want["unit"] == "greetd.service")
        res["expected_differences"], res["accepted_by_dm_policy"] = expected, accepted
        check(not left, f"state after the rollback differs from before: {json.dumps(left)}")
    finally:
        os.unlink(conf)


def v_libvirt(g: Guest, variant: str, res: dict) -> None:
    """The X11 desktop, driven by Debian's libvirtd in the guest (``/usr/sbin/libvirtd`` with
    the guest's overlay configuration, the hook installed by ``vfio-hookd install``): ``virsh
    start --paused`` of a domain holding both functions as ``<hostdev managed='no'>`` (a
    start proves the hook prepared: libvirt refuses unmanaged functions not on vfio-pci),
    then ``virsh destroy``; the desktop back and equal."""
    from testbed.domains import tiny_domain_xml
    check(g.lv is not None, "libvirtd was not started by the setup")
    lv = g.lv
    res["desktop_up"] = start_desktop(g, variant, res)
    want = expected_desktop(variant)
    try:
        def virsh(*a, timeout=300):
            return run("virsh", "-q", "-c", "qemu:///system", *a, timeout=timeout,
                       env=dict(os.environ, LC_ALL="C"))
        wait_for("libvirtd's socket", lambda: os.path.exists("/run/libvirt/libvirt-sock")
                 or lv.poll() is not None, 120, 0.1)
        check(virsh("version").returncode == 0, "libvirtd does not answer")
        res["libvirtd_ready_s"] = round(time.monotonic() - g.lv_t0, 2)
        xml = "/tmp/desk.xml"
        with open(xml, "w") as f:
            f.write(tiny_domain_xml(VM, g.funcs, managed=False))
        check(virsh("define", xml).returncode == 0, "virsh define failed")
        before = g.snapshot()
        res["before"] = {k: before[k] for k in ("seat0", "holders", "user_units")}
        g.nodes_before = g.function_nodes()
        pre_evidence = holder_pids(g.nodes_before)
        t0 = time.monotonic()
        r = virsh("start", VM, "--paused")
        res["virsh_start_s"] = round(time.monotonic() - t0, 2)
        st = g.status()
        res["prepare_steps"] = step_times(st)
        if r.returncode != 0:
            res["after_failed_prepare"] = evidence(g)
            rb = rollback_outcome(g, want, before, st)
            res["rollback"] = rb
            raise Fail(f"virsh start failed: {' '.join(r.stderr.split())[:700]} (holders "
                       f"before: {json.dumps(pre_evidence)}; steps {steps_of(st)}; the "
                       f"rollback: {rb})")
        for a in g.funcs:
            check(g.gr.driver(a) == "vfio-pci", f"{a} on {g.gr.driver(a)} while the domain runs")
        check(not holders(g.nodes_before), f"nodes still held while the domain runs: "
              f"{json.dumps(holder_pids(g.nodes_before))}")
        ssh_alive(g)
        outside_seat0_kept(g, before)
        t0 = time.monotonic()
        r = virsh("destroy", VM)
        res["virsh_destroy_s"] = round(time.monotonic() - t0, 2)
        check(r.returncode == 0, f"virsh destroy failed: {r.stderr.strip()}")
        st = g.status()
        res["release_steps"] = step_times(st)
        res["desktop_check"] = st.get("desktop")
        late = []
        try:
            desktop_check_back(st)
        except Fail as exc:
            late.append(str(exc))
        try:
            wait_desktop(g, want, audio=True)
        except Fail as exc:
            raise Fail(f"desktop not back after virsh destroy: {exc}") from None
        res["release_until_desktop_s"] = round(time.monotonic() - t0, 2)
        ssh_alive(g)
        after = g.snapshot()
        notes = [n for s in st.get("steps", []) for n in (s.get("notes") or [])]
        left, expected, _ = compare(g, before, after, notes, False)
        res["expected_differences"] = expected
        if left:
            late.append(f"state after virsh destroy differs from before start: "
                        f"{json.dumps(left)}")
        check(not late, "; ".join(late))
    finally:
        run("virsh", "-q", "-c", "qemu:///system", "undefine", VM)
        from testbed.procs import stop as stop_process
        stop_process(lv, 60)
        g.lv = None


def start_libvirtd(g: Guest) -> None:
    """Debian's ``/usr/sbin/libvirtd`` (``libvirt_conf()`` of ``guest_runner``: root QEMU, no
    relabelling, no cgroups or namespaces, QEMU's log to a file) as the runner's child, started
    in the setup after ``vfio-hookd install`` (libvirt finds hooks when it starts, FIELD-NOTES
    §1): its first probe of QEMU takes a minute under TCG and overlaps the other variants."""
    qemu_conf, libvirtd_conf = g.gr.libvirt_conf()
    for d in ("/etc/libvirt/qemu", "/var/lib/libvirt/qemu", "/var/log/libvirt/qemu",
              "/var/cache/libvirt/qemu", "/run/libvirt"):
        os.makedirs(d, exist_ok=True)
    with open("/etc/libvirt/qemu.conf", "w") as f:
        f.write(qemu_conf)
    with open("/etc/libvirt/libvirtd.conf", "w") as f:
        f.write(libvirtd_conf)
    check(os.path.exists("/etc/libvirt/hooks/qemu.d/vfio-hookd"),
          "vfio-hookd install did not put the hook into /etc/libvirt/hooks/qemu.d")
    g.lv_t0 = time.monotonic()
    g.lv = subprocess.Popen(["/usr/sbin/libvirtd"], stdin=subprocess.DEVNULL,
                            stdout=open(f"{g.out}/libvirtd.log", "ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    LOG(f"libvirtd started (pid {g.lv.pid})")


# ---- the Debian package (issue 10) under the guest's real systemd ------------------------------
INSTALLED_BY_CLI = ("/etc/systemd/system/vfio-hookd.service", "/etc/systemd/system/vfio-hookd.socket",
                    "/etc/libvirt/hooks/qemu.d/vfio-hookd", "/usr/local/bin/vfio-hookd")
PKG_HOOK = "/etc/libvirt/hooks/qemu.d/vfio-hookd"


def _unit_is(unit: str, verb: str) -> str:
    return run("systemctl", verb, unit).stdout.strip()


def v_package(g: Guest, variant: str, res: dict) -> None:
    """The .deb that ``scripts/build-deb`` made on the host (``cfg["deb"]``), installed with
    dpkg in place of ``vfio-hookd install``'s files, under real systemd: its maintainer
    scripts enable and start the socket and the service (dh_installsystemd), the hook is in
    qemu.d, ``vfio-hookd check`` runs from the installed files, a prepare and a release of the
    desktop left by the previous variant go through the packaged daemon (desktop back), a
    removal is refused while the VM holds its GPU, ``dpkg -r`` takes the hook and the daemon
    away and keeps the profile, ``dpkg -P`` keeps ``/etc/vfio-hookd`` while it holds it."""
    deb = g.cfg.get("deb")
    check(bool(deb) and os.path.exists(deb), f"no .deb to install: {deb!r} (scripts/build-deb)")
    before = g.snapshot()
    run("systemctl", "disable", "--now", "vfio-hookd.socket", "vfio-hookd.service", check_rc=True)
    for p in INSTALLED_BY_CLI:
        if os.path.lexists(p):
            os.unlink(p)
    run("systemctl", "daemon-reload", check_rc=True)
    t = time.monotonic()
    r = run("dpkg", "-i", deb, timeout=300)
    res["dpkg_install_s"] = round(time.monotonic() - t, 2)
    check(r.returncode == 0, f"dpkg -i: {r.returncode}: {r.stdout[-2000:]} {r.stderr[-2000:]}")
    g.command = "/usr/bin/vfio-hookd"
    for unit in ("vfio-hookd.socket", "vfio-hookd.service"):
        res[unit] = (_unit_is(unit, "is-enabled"), _unit_is(unit, "is-active"))
        check(res[unit] == ("enabled", "active"), f"{unit} after dpkg -i: {res[unit]}")
    check(os.path.realpath(PKG_HOOK) == "/usr/libexec/vfio-hookd/qemu-hook",
          f"{PKG_HOOK} -> {os.path.realpath(PKG_HOOK) if os.path.lexists(PKG_HOOK) else None}")
    r = g.cli("check", VM)
    res["check"] = {"rc": r.returncode, "out": r.stdout.strip().splitlines()}
    check(r.returncode in (0, 31), f"vfio-hookd check: {r.returncode} {r.stderr.strip()}")
    for name in ("hook.installed", "daemon.socket", "daemon.service", "vm.profile",
                 "vm.iommu_group", "vm.display_manager", "vm.holders"):
        check(re.search(rf"^PASS +{re.escape(name)}:", r.stdout, re.M),
              f"vfio-hookd check from the package: no PASS {name}:\n{r.stdout}")
    t = time.monotonic()
    r = g.cli("prepare", VM)
    res["prepare"] = {"rc": r.returncode, "wall_s": round(time.monotonic() - t, 2)}
    check(r.returncode == 0, f"prepare through the packaged daemon: {r.stderr.strip()}")
    for a in g.funcs:
        check(g.gr.driver(a) == "vfio-pci", f"{a} on {g.gr.driver(a)} after prepare")
    r = run("dpkg", "-r", "vfio-hookd", timeout=300)
    res["remove_while_prepared"] = r.returncode
    check(r.returncode != 0 and os.path.exists("/usr/bin/vfio-hookd"),
          f"dpkg -r while the VM holds its GPU: {r.returncode} {r.stdout[-800:]}")
    t = time.monotonic()
    r = g.cli("release", VM)
    res["release"] = {"rc": r.returncode, "wall_s": round(time.monotonic() - t, 2)}
    check(r.returncode == 0, f"release through the packaged daemon: {r.stderr.strip()}")
    st = g.status()
    res["desktop_check"] = st.get("desktop")
    desktop_check_back(st)
    wait_desktop(g, expected_desktop("greeter"), audio=False)
    after = g.snapshot()
    notes = [n for s in st.get("steps", []) for n in (s.get("notes") or [])]
    left, expected, accepted = compare(g, before, after, notes, greetd_policy=True)
    res["expected_differences"], res["accepted_by_dm_policy"] = expected, accepted
    check(not left, f"state after the packaged prepare/release differs: {json.dumps(left)[:3000]}")
    r = run("dpkg", "-r", "vfio-hookd", timeout=300)
    check(r.returncode == 0, f"dpkg -r: {r.returncode} {r.stdout[-800:]} {r.stderr[-800:]}")
    res["after_remove"] = {u: _unit_is(u, "is-active") for u in ("vfio-hookd.socket",
                                                                 "vfio-hookd.service")}
    check(set(res["after_remove"].values()) <= {"inactive", "unknown"},
          f"units after dpkg -r: {res['after_remove']}")
    check(not os.path.lexists(PKG_HOOK) and not os.path.exists("/usr/bin/vfio-hookd"),
          "dpkg -r left the hook or the program")
    check(os.path.exists(f"{PROFILE_DIR}/{VM}.yaml"), "dpkg -r removed the user's profile")
    r = run("dpkg", "-P", "vfio-hookd", timeout=300)
    check(r.returncode == 0 and os.path.exists(f"{PROFILE_DIR}/{VM}.yaml"),
          f"dpkg -P: {r.returncode}, profile kept: {os.path.exists(f'{PROFILE_DIR}/{VM}.yaml')}")


def run_variant(g: Guest, variant: str) -> dict:
    res: dict = {"variant": variant}
    t = time.monotonic()
    LOG(f"== variant {variant}")
    try:
        write_profile(g, variant)
        if variant.endswith("-fault"):
            v_fault(g, variant, res)
        elif variant == "libvirt":
            v_libvirt(g, variant, res)
        elif variant == "package":
            v_package(g, variant, res)
        else:
            v_desktop(g, variant, res)
        res.update(ok=True, error=None)
    except Exception as exc:
        res.update(ok=False, error=f"{type(exc).__name__}: {exc}" if not isinstance(exc, Fail)
                   else str(exc), traceback=traceback.format_exc())
        LOG(f"{variant} FAILED: {res['error']}")
        # leave no half-prepared guest to the next variant
        try:
            # a failed prepare whose rollback was incomplete leaves phase "failed" (the next
            # prepare answers STATE_DRIFT until a release): release that too
            st = g.status()
            if st.get("phase") not in ("idle", None):
                g.cli("release", VM, "--force")
        except Exception as exc2:
            LOG(f"cleanup after {variant}: {exc2}")
    res["wall_s"] = round(time.monotonic() - t, 2)
    return res


def write_json(g: Guest, name: str, obj: dict) -> None:
    with open(f"{g.out}/results/{name}.json", "w") as f:
        json.dump(obj, f, indent=1, default=list)


def verdict(ok: bool) -> None:
    """End the boot: the journal to the share, then isa-debug-exit (port 0xf4)."""
    subprocess.run(f"journalctl -b --no-pager -o short-monotonic > /vfio-out/journal.txt 2>&1",
                   shell=True, timeout=300)
    os.sync()
    with open("/dev/port", "r+b", buffering=0) as f:
        f.seek(0xf4)
        f.write(b"\x00" if ok else b"\x01")


def main(argv: list[str] | None = None) -> int:
    global LOG
    argv = sys.argv[1:] if argv is None else argv
    out = argv[0]
    with open(os.path.join(out, "boot.json")) as f:
        cfg = json.load(f)
    sys.path.insert(0, cfg["repo"])
    sys.path.insert(1, HERE)
    LOG = Log(os.path.join(out, "runner.log"))
    os.makedirs(os.path.join(out, "results"), exist_ok=True)
    ok = False
    try:
        g = Guest(out, cfg)
        setup: dict = {"ok": True}
        up = float(open("/proc/uptime").read().split()[0])
        setup["runner_started_s"] = up
        LOG(f"runner started {up:.1f} s after the kernel; variants {cfg['scenarios']}")
        try:
            r = run("systemctl", "is-system-running", "--wait", timeout=300)
            setup["system_state"] = r.stdout.strip()
            wait_devices(g)
            open_ssh_session(g)
            setup.update(install(g))
            if "libvirt" in cfg["scenarios"]:
                start_libvirtd(g)
        except Exception as exc:
            setup.update(ok=False, error=str(exc), traceback=traceback.format_exc())
            LOG(f"setup FAILED: {exc}")
        setup["setup_done_s"] = float(open("/proc/uptime").read().split()[0])
        write_json(g, "setup", setup)
        ok = setup["ok"]
        if setup["ok"]:
            for v in cfg["scenarios"]:
                res = run_variant(g, v)
                write_json(g, v, res)
                ok = ok and res["ok"]
    except Exception:
        LOG(traceback.format_exc())
        ok = False
    finally:
        verdict(ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
