"""A real libvirtd in a private mount namespace, for the demo and the end-to-end tests.

Usage (as root)::

    python -m testbed.libvirtd --state DIR [--hook FILE ...] [--bind SRC:DST ...]
        [--cache DIR] -- COMMAND ARGS...

runs Debian 12's own ``/usr/sbin/virtlogd`` and ``/usr/sbin/libvirtd`` (libvirt 9.0, no
modular daemons; FIELD-NOTES §5) where ``qemu:///system`` and the qemu hooks are private to
COMMAND, runs COMMAND (environment passed through), stops both daemons by PID and exits with
COMMAND's exit status (128 + N if COMMAND died of signal N).

How the machine is kept untouched
---------------------------------
1. The runner re-executes itself under ``unshare --mount --propagation private`` (util-linux
   ``unshare(1)``; without ``--fork``, so the PID stays the same and signals sent to it reach the
   runner). Every mount below happens in that namespace only; with private propagation none
   of them is seen outside, and they all vanish when the namespace's last process exits.
   Before mounting anything the runner checks that its mount namespace differs from the one it
   was started in and refuses otherwise.
2. libvirt's paths are bind mounts of directories under DIR: ``/etc/libvirt`` <-
   ``DIR/etc-libvirt``, ``/run/libvirt`` <- ``DIR/run-libvirt``, ``/var/lib/libvirt`` <-
   ``DIR/lib-libvirt``, ``/var/log/libvirt`` <- ``DIR/log-libvirt``, ``/var/cache/libvirt`` <-
   ``DIR/cache-libvirt`` (or ``--cache``). ``DIR/etc-libvirt`` is seeded with a *copy* of the
   machine's top-level ``/etc/libvirt/*.conf`` only: never its domains, networks, storage
   pools or hooks, so neither a real VM nor a real passthrough hook can be started here. Then
   ``qemu.conf`` gets ``user/group "root"``, ``dynamic_ownership = 0``, ``security_driver =
   "none"`` (no AppArmor/DAC relabelling of host files), ``cgroup_controllers = [ ]`` (libvirt
   would otherwise create cgroups under the machine's ``/sys/fs/cgroup``) and ``namespaces =
   [ ]`` (see libvirt's ``qemu.conf`` comments); ``libvirtd.conf`` gets ``auth_unix_rw/ro =
   "none"``. No network is defined, so libvirt creates no bridge and no firewall rule.
3. A target that does not exist (``/run/libvirt`` on a machine where libvirtd never ran, or
   ``--bind SRC:/etc/vfio-hookd``) cannot simply be created: a ``mkdir`` on the real ``/etc``
   is visible outside any mount namespace. Instead its nearest existing ancestor A is
   *shadowed* inside the namespace: A is bind-mounted (recursively) to a staging tmpfs under
   ``DIR/mnt``, a tmpfs is mounted over A, and every entry of the original A is put back on the
   tmpfs (directories, files, sockets: an empty placeholder + a recursive bind mount of the
   original; symlinks: recreated with the same target). The new directory is then made on the
   tmpfs. Reads and writes of the existing entries still reach the real files (exactly as
   outside); only new top-level entries of A are private. A shadow of ``/`` is refused.
4. The daemons run with a minimal environment, like a service (``PATH``, ``LANG=C.UTF-8``,
   ``HOME=/root``): a hook that only works with the caller's environment fails here as it
   would on a real host. They get ``PR_SET_PDEATHSIG`` = SIGTERM (``prctl(2)``), so they stop
   even if the runner is SIGKILLed; at the normal end the runner first destroys every running
   domain (so no QEMU outlives it), then stops libvirtd, kills any QEMU left (PIDs from
   ``/run/libvirt/qemu/*.pid``) and stops virtlogd: SIGTERM, wait on a pidfd with a deadline,
   SIGKILL. A SIGKILL of the runner itself can leave a running domain's QEMU behind.
5. The runner is the child subreaper and reaps the QEMU processes libvirtd daemonizes, as
   systemd would (see :class:`_Reaper`: without it every destroy took 1.6-1.8 s here).

Readiness is event-driven: inotify (``inotify(7)`` through ctypes) on ``DIR/run-libvirt`` until
``virtlogd-admin-sock`` / ``libvirt-admin-sock`` exist (each daemon binds and listens on its
main socket before creating its admin socket: libvirt ``src/remote/remote_daemon.c``,
``src/logging/log_daemon.c``), then a ``qemu:///system`` connection, which libvirtd answers only
after its drivers are initialised (the first start probes QEMU, about 1.4 s here, and caches the
result in ``/var/cache/libvirt/qemu/capabilities``; share ``--cache`` between runs to pay that
once). Each wait also watches the daemon's pidfd, so a daemon that dies fails the run at once.

Files in DIR afterwards: ``logs/virtlogd.log``, ``logs/libvirtd.log`` (the daemons' stderr),
``log-libvirt/qemu/NAME.log`` (QEMU's log via virtlogd), ``timings.json`` (seconds:
``virtlogd_ready_s``, ``libvirtd_ready_s``, ``command_s``, ``stop_s``).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import child_env
from .pdeathsig import parent_death_signal
from .procs import stop, wait_exit

__all__ = ["run_in_private_libvirt", "main", "LIBVIRTD", "VIRTLOGD", "UNSHARE", "DEFAULT_URI"]

LIBVIRTD = "/usr/sbin/libvirtd"
VIRTLOGD = "/usr/sbin/virtlogd"
UNSHARE = "/usr/bin/unshare"
DEFAULT_URI = "qemu:///system"
REAL_LIBVIRT_ETC = "/etc/libvirt"

#: Env var marking the re-executed runner: "PID:MNTNS-INODE-OF-THE-CALLER".
ENV_MARK = "VFIO_HOOKD_LIBVIRTD_NS"

#: Environment the daemons run with (what a service would get, plus a HOME for root).
DAEMON_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
}

QEMU_CONF_EXTRA = """
# --- added by testbed.libvirtd (private test daemon; see that module) ---
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
"""

LIBVIRTD_CONF_EXTRA = """
# --- added by testbed.libvirtd (private test daemon; see that module) ---
auth_unix_ro = "none"
auth_unix_rw = "none"
"""

_MS_RDONLY = 1
_MS_BIND = 4096
_MS_REC = 16384
_IN_CREATE = 0x100
_IN_MOVED_TO = 0x80
_PR_SET_CHILD_SUBREAPER = 36

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class PrivateLibvirtError(RuntimeError):
    """The private libvirtd could not be set up, started or stopped (message says which)."""


# ---------------------------------------------------------------------------------------------
# Python API


def run_in_private_libvirt(state_dir: str | os.PathLike, command: list[str], hooks=(), binds=(),
                           env: dict | None = None, timeout_s: float = 120.0,
                           cache_dir: str | os.PathLike | None = None,
                           capture: bool = True) -> subprocess.CompletedProcess:
    """Run ``command`` next to a private libvirtd (see the module docstring) and wait for it.

    :param state_dir: the run's directory (created if missing); daemons' logs, the private
        ``/etc/libvirt`` and ``timings.json`` land there.
    :param command: argv of COMMAND; it runs inside the private mount namespace.
    :param hooks: paths of executables copied to ``/etc/libvirt/hooks/qemu.d/<basename>``
        before libvirtd starts (libvirt discovers hooks at daemon start: FIELD-NOTES §1). A
        hook is a copy: it must not depend on its own location.
    :param binds: ``(src, dst)`` pairs (or ``"SRC:DST"`` strings) bind-mounted inside.
    :param env: COMMAND's environment (default: this process's); the repository goes first
        on its ``PYTHONPATH`` (:func:`testbed.child_env`: the runner is ``python -m
        testbed.libvirtd``).
    :param timeout_s: deadline (s) for the whole run. On expiry the runner gets SIGTERM (it
        terminates COMMAND and stops the daemons), then SIGKILL after 30 s more, and
        :class:`subprocess.TimeoutExpired` is raised.
    :param cache_dir: shared ``/var/cache/libvirt`` so QEMU's capabilities are probed only once
        (first libvirtd start about 1.4 s, later about 0.15 s).
    :param capture: capture stdout/stderr as text (else inherited).
    :returns: ``CompletedProcess`` with COMMAND's exit status (or the runner's: 70 when the
        daemons could not be started, messages on stderr).
    """
    argv = [sys.executable, "-m", "testbed.libvirtd", "--state", os.fspath(state_dir)]
    for h in hooks:
        argv += ["--hook", os.fspath(h)]
    for b in binds:
        argv += ["--bind", b if isinstance(b, str) else f"{os.fspath(b[0])}:{os.fspath(b[1])}"]
    if cache_dir is not None:
        argv += ["--cache", os.fspath(cache_dir)]
    argv += ["--", *command]
    env = child_env(env)
    if not capture:
        with subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL) as proc:
            if not wait_exit(proc.pid, timeout_s):
                stop(proc, 30)
                raise subprocess.TimeoutExpired(argv, timeout_s)
        return subprocess.CompletedProcess(argv, proc.returncode)
    with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL, text=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout_s)  # select() on the pipes
        except subprocess.TimeoutExpired:
            # keep draining the pipes (so the runner never blocks on a full one) while it is
            # stopped; its end closes them
            box: dict = {}
            drain = threading.Thread(
                target=lambda: box.update(zip(("out", "err"), proc.communicate())),
                daemon=True, name="drain")
            drain.start()
            stop(proc, 30)
            drain.join(30)
            raise subprocess.TimeoutExpired(argv, timeout_s, box.get("out"),
                                            box.get("err")) from None
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


# ---------------------------------------------------------------------------------------------
# Small Linux helpers (ctypes over libc)


def _mount(src: str, dst: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    rc = _libc.mount(src.encode(), dst.encode(), fstype.encode() if fstype else None,
                     ctypes.c_ulong(flags), data.encode() if data else None)
    if rc != 0:
        err = ctypes.get_errno()
        raise PrivateLibvirtError(f"mount {src} -> {dst} ({fstype or 'bind'}): "
                                  f"{os.strerror(err)}")


class _Reaper:
    """Makes the runner the child subreaper (``prctl(2)`` ``PR_SET_CHILD_SUBREAPER``) and
    reaps the orphans that land on it, i.e. the QEMU processes libvirtd daemonizes.

    Why: libvirt's ``virDomainDestroy`` sends QEMU SIGTERM and then checks every 200 ms whether
    the PID still exists (``virProcessKillPainfullyDelay``, ``src/util/virprocess.c``); a zombie
    still exists. Under systemd, PID 1 reaps at once; where PID 1 reaps late (measured on the CI
    machines: about 1.7 s), every destroy would take 1.6-1.8 s instead of about 0.3 s.
    Our own children (:meth:`spawn`) are left to ``subprocess``; SIGCHLD is blocked while one is
    being spawned, so a child that dies at once cannot be mistaken for an orphan.
    """

    def __init__(self):
        self.ours: set[int] = set()
        _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        signal.signal(signal.SIGCHLD, self._on_sigchld)

    def spawn(self, argv, preexec=None, **kw) -> subprocess.Popen:
        def child_setup():
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            if preexec is not None:
                preexec()

        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        try:
            proc = subprocess.Popen(argv, preexec_fn=child_setup, **kw)
            self.ours.add(proc.pid)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        return proc

    def _on_sigchld(self, _signum, _frame) -> None:
        pids: set[int] = set()
        for task in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{task}/children") as f:
                    pids.update(int(p) for p in f.read().split())
            except OSError:
                continue
        for pid in pids - self.ours:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass

    def close(self) -> None:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def _mntns() -> int:
    return os.stat("/proc/self/ns/mnt").st_ino


class _DirWatch:
    """inotify(7) watch for entries appearing in one directory (IN_CREATE, IN_MOVED_TO)."""

    def __init__(self, directory: str):
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise PrivateLibvirtError(f"inotify_init1: {os.strerror(ctypes.get_errno())}")
        if _libc.inotify_add_watch(self.fd, directory.encode(), _IN_CREATE | _IN_MOVED_TO) < 0:
            os.close(self.fd)
            raise PrivateLibvirtError(f"inotify_add_watch {directory}: "
                                      f"{os.strerror(ctypes.get_errno())}")
        self.directory = directory

    def wait_for(self, name: str, proc: subprocess.Popen, what: str, deadline: float) -> None:
        """Return once ``directory/name`` exists; raise if ``proc`` exits or at ``deadline``
        (a ``time.monotonic()`` value)."""
        path = os.path.join(self.directory, name)
        pidfd = os.pidfd_open(proc.pid)
        try:
            while not os.path.lexists(path):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PrivateLibvirtError(f"{what}: {path} did not appear in time")
                ready, _, _ = select.select([self.fd, pidfd], [], [], left)
                if pidfd in ready:
                    raise PrivateLibvirtError(f"{what} exited with status {proc.wait()} "
                                              f"before creating {name}")
                if self.fd in ready:
                    try:
                        while os.read(self.fd, 65536):
                            pass
                    except BlockingIOError:
                        pass
        finally:
            os.close(pidfd)

    def close(self) -> None:
        os.close(self.fd)


def _in_thread(fn, deadline: float, watch: subprocess.Popen | None = None):
    """Run ``fn()`` in a thread; wait for it (a pipe + the optional process's pidfd, no
    polling) until ``deadline``. Returns ``fn``'s result; raises its exception,
    :class:`PrivateLibvirtError` on timeout or if ``watch`` exits first."""
    r, w = os.pipe()
    box: dict = {}

    def body():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc
        finally:
            try:
                os.write(w, b"x")
            except OSError:
                pass
            os.close(w)

    threading.Thread(target=body, daemon=True).start()
    fds = [r]
    pidfd = os.pidfd_open(watch.pid) if watch is not None else None
    if pidfd is not None:
        fds.append(pidfd)
    try:
        ready, _, _ = select.select(fds, [], [], max(0.0, deadline - time.monotonic()))
        if r not in ready:
            if pidfd is not None and pidfd in ready:
                raise PrivateLibvirtError(f"{watch.args[0]} exited with status {watch.wait()}")
            raise PrivateLibvirtError("timed out")
    finally:
        if pidfd is not None:
            os.close(pidfd)
        os.close(r)  # the thread's late write, if any, then fails harmlessly (EPIPE ignored)
    if "error" in box:
        raise box["error"]
    return box.get("value")


# ---------------------------------------------------------------------------------------------
# The private mounts


class _Mounts:
    """Builds the private view inside the (already private) mount namespace."""

    def __init__(self, state: Path):
        self.state = state
        self.staging: Path | None = None
        self.shadowed: list[str] = []
        self.bound: list[str] = []

    def _staging_dir(self) -> Path:
        if self.staging is None:
            self.staging = self.state / "mnt"
            self.staging.mkdir(exist_ok=True)
            _mount("tmpfs", str(self.staging), "tmpfs", 0, "mode=0700")
        d = self.staging / f"shadow-{len(self.shadowed)}"
        d.mkdir()
        return d

    def shadow(self, parent: str) -> None:
        """Make new entries of ``parent`` private (module docstring, point 3)."""
        if parent == "/":
            raise PrivateLibvirtError("refusing to shadow / (a mount target's parent must exist)")
        st = os.stat(parent)
        stage = self._staging_dir()
        _mount(parent, str(stage), None, _MS_BIND | _MS_REC)
        _mount("tmpfs", parent, "tmpfs", 0,
               f"mode={stat.S_IMODE(st.st_mode):o},uid={st.st_uid},gid={st.st_gid}")
        for entry in os.scandir(stage):
            src, dst = entry.path, os.path.join(parent, entry.name)
            if entry.is_symlink():
                os.symlink(os.readlink(src), dst)
                continue
            if entry.is_dir(follow_symlinks=False):
                os.mkdir(dst)
            else:
                os.close(os.open(dst, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))
            _mount(src, dst, None, _MS_BIND | _MS_REC)
        self.shadowed.append(parent)

    def ensure_target(self, dst: str, is_dir: bool) -> None:
        """Create mount point ``dst`` without touching the real file system."""
        if os.path.lexists(dst):
            return
        anc = os.path.dirname(dst)
        while not os.path.lexists(anc):
            anc = os.path.dirname(anc)
        if not os.path.isdir(anc) or os.path.islink(anc):
            raise PrivateLibvirtError(f"cannot make mount point {dst}: {anc} is not a directory")
        inside_ours = any(anc == b or anc.startswith(b.rstrip("/") + "/") for b in self.bound)
        if anc not in self.shadowed and not inside_ours:
            self.shadow(anc)  # else anc is one of our binds: creating entries there is fine
        if is_dir:
            os.makedirs(dst, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.close(os.open(dst, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))

    def bind(self, src: str, dst: str) -> None:
        self.ensure_target(dst, os.path.isdir(src))
        _mount(src, dst, None, _MS_BIND | _MS_REC)
        self.bound.append(dst)


def _canonical_target(dst: str) -> str:
    """Absolute DST with its parent's symlinks resolved (``/var/run/x`` -> ``/run/x``)."""
    if not os.path.isabs(dst):
        raise PrivateLibvirtError(f"mount target must be absolute: {dst}")
    dst = os.path.normpath(dst)
    return os.path.join(os.path.realpath(os.path.dirname(dst)), os.path.basename(dst))


def _seed_etc(etc: Path, hooks: list[str]) -> None:
    etc.mkdir(parents=True, exist_ok=True)
    for conf in sorted(Path(REAL_LIBVIRT_ETC).glob("*.conf")):
        text = conf.read_text()
        if conf.name == "qemu.conf":
            text += QEMU_CONF_EXTRA
        elif conf.name == "libvirtd.conf":
            text += LIBVIRTD_CONF_EXTRA
        (etc / conf.name).write_text(text)
    for name, extra in (("qemu.conf", QEMU_CONF_EXTRA), ("libvirtd.conf", LIBVIRTD_CONF_EXTRA)):
        if not (etc / name).exists():
            (etc / name).write_text(extra)
    hookdir = etc / "hooks" / "qemu.d"
    hookdir.mkdir(parents=True, exist_ok=True)
    for hook in hooks:
        dst = hookdir / os.path.basename(hook)
        shutil.copyfile(hook, dst)
        os.chmod(dst, 0o755)


# ---------------------------------------------------------------------------------------------
# The runner


class _Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


def _log(msg: str) -> None:
    print(f"private-libvirtd: {msg}", file=sys.stderr, flush=True)


def _destroy_all(uri: str) -> list[str]:
    from vfio_hookd.virt import Libvirt  # noqa: PLC0415 - libvirt only where needed

    with Libvirt(uri) as lv:
        names = lv.active_names()
        for name in names:
            lv.destroy(name)
        return names


def _kill_leftover_qemu(run_dir: Path) -> None:
    for pidfile in (run_dir / "qemu").glob("*.pid"):
        try:
            pid = int(pidfile.read_text().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"qemu" not in f.read():
                    continue
            os.kill(pid, signal.SIGKILL)
        except (ValueError, OSError):
            continue
        _log(f"killed leftover QEMU pid {pid}")
        wait_exit(pid, 10)   # reaped by the _Reaper


def _require_private_ns() -> None:
    """Raise unless this process is the re-executed runner in a mount namespace of its own
    (a different one than the caller's, recorded in :data:`ENV_MARK`)."""
    pid_s, _, ns_s = os.environ.get(ENV_MARK, "").partition(":")
    if pid_s != str(os.getpid()) or not ns_s.isdigit() or int(ns_s) == _mntns():
        raise PrivateLibvirtError("refusing to mount: not in a private mount namespace")


def _inside(args) -> int:
    _require_private_ns()
    state = Path(args.state).resolve()
    for d in ("etc-libvirt", "run-libvirt", "lib-libvirt", "log-libvirt", "logs"):
        (state / d).mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache).resolve() if args.cache else state / "cache-libvirt"
    cache.mkdir(parents=True, exist_ok=True)
    for exe in (LIBVIRTD, VIRTLOGD):
        if not os.access(exe, os.X_OK):
            raise PrivateLibvirtError(f"{exe} is missing: run scripts/setup")
    _seed_etc(state / "etc-libvirt", args.hook)

    targets = [
        (str(state / "etc-libvirt"), "/etc/libvirt"),
        (str(state / "run-libvirt"), "/run/libvirt"),
        (str(state / "lib-libvirt"), "/var/lib/libvirt"),
        (str(state / "log-libvirt"), "/var/log/libvirt"),
        (str(cache), "/var/cache/libvirt"),
    ]
    if os.path.realpath("/var/run") != "/run":
        targets.append((str(state / "run-libvirt"), "/var/run/libvirt"))
    for spec in args.bind:
        src, sep, dst = spec.partition(":")
        if not sep or not src or not dst:
            raise PrivateLibvirtError(f"--bind wants SRC:DST, got {spec!r}")
        if not os.path.exists(src):
            raise PrivateLibvirtError(f"--bind source does not exist: {src}")
        targets.append((os.path.abspath(src), dst))
    targets = [(src, _canonical_target(dst)) for src, dst in targets]

    mounts = _Mounts(state)
    for src, dst in sorted(targets, key=lambda t: t[1].count("/")):
        mounts.bind(src, dst)
    if mounts.shadowed:
        _log(f"shadowed (new entries private): {', '.join(mounts.shadowed)}")

    timings: dict[str, float] = {}
    daemons: dict[str, subprocess.Popen] = {}
    cmd_proc: subprocess.Popen | None = None
    interrupted: list[int] = []

    def on_signal(signum, _frame):
        interrupted.append(signum)
        if cmd_proc is not None and cmd_proc.poll() is None:
            cmd_proc.send_signal(signum)
        else:
            raise _Interrupted(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)

    run_dir = state / "run-libvirt"
    status = 70
    reaper = _Reaper()
    try:
        watch = _DirWatch(str(run_dir))
        try:
            for name, exe, sock in (("virtlogd", VIRTLOGD, "virtlogd-admin-sock"),
                                    ("libvirtd", LIBVIRTD, "libvirt-admin-sock")):
                t0 = time.monotonic()
                log = open(state / "logs" / f"{name}.log", "ab")
                try:
                    daemons[name] = reaper.spawn(
                        [exe, "--pid-file", str(state / "logs" / f"{name}.pid")],
                        preexec=parent_death_signal(signal.SIGTERM), stdin=subprocess.DEVNULL,
                        stdout=log, stderr=subprocess.STDOUT, env=DAEMON_ENV, cwd="/",
                        start_new_session=True)
                finally:
                    log.close()
                deadline = t0 + args.ready_timeout
                watch.wait_for(sock, daemons[name], name, deadline)
                if name == "libvirtd":
                    from vfio_hookd.virt import Libvirt  # noqa: PLC0415

                    def probe():
                        with Libvirt(args.uri) as lv:
                            return lv.version()

                    try:
                        _in_thread(probe, deadline, watch=daemons[name])
                    except PrivateLibvirtError as exc:
                        raise PrivateLibvirtError(f"libvirtd not ready: {exc}") from None
                timings[f"{name}_ready_s"] = round(time.monotonic() - t0, 3)
        finally:
            watch.close()
        _log(f"ready: virtlogd {timings['virtlogd_ready_s']} s, "
             f"libvirtd {timings['libvirtd_ready_s']} s (pids {daemons['virtlogd'].pid}, "
             f"{daemons['libvirtd'].pid})")
        (state / "logs" / "daemons.json").write_text(
            json.dumps({n: p.pid for n, p in daemons.items()}))

        env = {k: v for k, v in os.environ.items() if k != ENV_MARK}
        t0 = time.monotonic()
        cmd_proc = reaper.spawn(args.command, env=env)
        rc = cmd_proc.wait()
        timings["command_s"] = round(time.monotonic() - t0, 3)
        status = rc if rc >= 0 else 128 - rc
    except _Interrupted as exc:
        _log(f"interrupted by signal {exc.signum} before COMMAND ran")
        status = 128 + exc.signum
    except (PrivateLibvirtError, OSError) as exc:
        _log(f"error: {exc} (logs in {state / 'logs'})")
        status = 70
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # finish the cleanup whatever arrives now
        t0 = time.monotonic()
        lvd = daemons.get("libvirtd")
        if lvd is not None and lvd.poll() is None and "libvirtd_ready_s" in timings:
            try:
                left = _in_thread(lambda: _destroy_all(args.uri), time.monotonic() + 15, lvd)
                if left:
                    _log(f"destroyed domains still running: {', '.join(left)}")
            except Exception as exc:  # noqa: BLE001 - cleanup goes on
                _log(f"could not destroy running domains: {exc}")
        if lvd is not None:
            stop(lvd)
        _kill_leftover_qemu(run_dir)
        if "virtlogd" in daemons:
            stop(daemons["virtlogd"])
        timings["stop_s"] = round(time.monotonic() - t0, 3)
        reaper.close()
        (state / "timings.json").write_text(json.dumps(timings, indent=1) + "\n")
    return status


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m testbed.libvirtd",
        description="Run COMMAND next to a real libvirtd in a private mount namespace.")
    p.add_argument("--state", required=True, help="state directory (created if missing)")
    p.add_argument("--hook", action="append", default=[], metavar="FILE",
                   help="install FILE into /etc/libvirt/hooks/qemu.d/ (repeatable)")
    p.add_argument("--bind", action="append", default=[], metavar="SRC:DST",
                   help="bind-mount SRC on DST inside the namespace (repeatable)")
    p.add_argument("--cache", metavar="DIR", help="shared /var/cache/libvirt (default in --state)")
    p.add_argument("--uri", default=DEFAULT_URI, help=argparse.SUPPRESS)
    p.add_argument("--ready-timeout", type=float, default=30.0, metavar="S",
                   help="deadline for each daemon to answer (default 30 s)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m testbed.libvirtd``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.command[:1] == ["--"]:
        args.command = args.command[1:]
    if not args.command:
        _parser().error("COMMAND missing (after --)")
    if os.geteuid() != 0:
        _log("must run as root (it mounts and runs the system libvirtd)")
        return 77
    mark = os.environ.get(ENV_MARK, "")
    if mark.partition(":")[0] != str(os.getpid()):
        if not os.access(UNSHARE, os.X_OK):
            _log(f"{UNSHARE} is missing: run scripts/setup")
            return 70
        env = dict(os.environ, **{ENV_MARK: f"{os.getpid()}:{_mntns()}"})
        os.execve(UNSHARE, [UNSHARE, "--mount", "--propagation", "private", "--",
                            sys.executable, "-m", "testbed.libvirtd", *argv], env)
    try:
        return _inside(args)
    except PrivateLibvirtError as exc:
        _log(f"error: {exc}")
        return 70


if __name__ == "__main__":
    sys.exit(main())
