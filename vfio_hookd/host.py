"""The one layer through which vfio-hookd reads and writes the host.

Every access to sysfs, ``/dev``, ``/proc/driver``, ``/proc/fb``, kernel modules and the process
table goes through a :class:`Host`. Paths are always given as absolute host paths
(``"/sys/bus/pci/drivers_probe"``) and resolved under :attr:`Host.root`, so the same code runs on
the real host (root ``/``) and, in the repository's tests, on a simulated host (a subclass kept
outside the product that answers writes and module commands the way the kernel and kmod do).

Kernel behaviour relied on: ``Documentation/ABI/testing/sysfs-bus-pci`` (driver_override, bind,
unbind, drivers_probe), ``Documentation/ABI/stable/sysfs-module`` (refcnt, holders). A sysfs
write that the kernel blocks (e.g. unbinding an NVIDIA GPU someone holds, see FIELD-NOTES §2) is
run in a helper thread and abandoned at its deadline (:mod:`vfio_hookd.deadline`): the step fails
with ``TIMEOUT`` instead of hanging libvirt.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import subprocess
import threading
import time

from . import errors
from .deadline import run_with_deadline


class Host:
    """Access to a host rooted at ``root``.

    :param root: directory that stands for ``/`` (str). ``"/"`` is the real machine.
    :param proc: the process table to scan for device-node holders (str, default ``"/proc"``;
        on the simulated host too, since its holders are real processes).
    """

    def __init__(self, root: str = "/", proc: str = "/proc"):
        self.root = os.path.abspath(root)
        self.proc = proc
        self._writes: dict[int, dict] = {}   # writes in progress, by sequence number
        self._writes_lock = threading.Lock()
        self._seq = itertools.count(1)

    # ---- paths and plain reads -------------------------------------------------------------
    def path(self, p: str) -> str:
        """The real filesystem path (str) of host path ``p`` (absolute, e.g. ``/sys/...``)."""
        if not p.startswith("/"):
            raise ValueError(f"host paths are absolute: {p!r}")
        return p if self.root == "/" else self.root + p

    def exists(self, p: str) -> bool:
        """True if ``p`` exists (a dangling link counts as absent)."""
        return os.path.exists(self.path(p))

    def read(self, p: str) -> str:
        """Text of ``p`` with the trailing newline removed.

        :raises FileNotFoundError: absent; other ``OSError`` as the kernel reports it.
        """
        with open(self.path(p), encoding="utf-8", errors="replace") as f:
            return f.read().rstrip("\n")

    def read_bytes(self, p: str, limit: int) -> bytes:
        """The bytes of ``p`` up to EOF, at most ``limit`` (a binary sysfs attribute such as a
        function's ``rom``, which the kernel answers from its state and hands out in chunks).

        :raises OSError: as the kernel reports it (``EINVAL``, ``EIO``, ...).
        """
        return self._read_bytes_now(p, limit)

    def _read_bytes_now(self, p: str, limit: int) -> bytes:
        chunks, got = [], 0
        with open(self.path(p), "rb", buffering=0) as f:
            while got < limit:
                chunk = f.read(min(65536, limit - got))
                if not chunk:
                    break
                chunks.append(chunk)
                got += len(chunk)
        return b"".join(chunks)

    def read_or(self, p: str, default: str | None = None) -> str | None:
        """Like :meth:`read` but ``default`` when ``p`` is absent or unreadable."""
        try:
            return self.read(p)
        except OSError:
            return default

    def listdir(self, p: str) -> list[str]:
        """Sorted entries of directory ``p``; ``[]`` when it is absent."""
        try:
            return sorted(os.listdir(self.path(p)))
        except FileNotFoundError:
            return []

    def subdirs(self, p: str) -> list[str]:
        """Sorted names of the real (not symlinked) subdirectories of ``p``; ``[]`` if absent."""
        base = self.path(p)
        return [e for e in self.listdir(p)
                if os.path.isdir(f"{base}/{e}") and not os.path.islink(f"{base}/{e}")]

    def stat(self, p: str) -> os.stat_result | None:
        """``os.stat`` of ``p`` (symlinks followed: owner, mode, ``st_mtime``/``st_ctime`` in
        s since the epoch), or None when it is absent or cannot be read."""
        try:
            return os.stat(self.path(p))
        except OSError:
            return None

    def link_name(self, p: str) -> str | None:
        """Last path component of the target of symlink ``p`` (e.g. the driver name of
        ``/sys/bus/pci/devices/ADDR/driver``), or None when ``p`` is not a link."""
        try:
            return os.path.basename(os.readlink(self.path(p)))
        except OSError:
            return None

    def resolve(self, p: str) -> str:
        """Host path (str) of ``p`` with symlinks resolved, kept inside :attr:`root`."""
        real = os.path.realpath(self.path(p))
        if self.root == "/":
            return real
        if real != self.root and not real.startswith(self.root + "/"):
            raise errors.HookdError(errors.HOST_IO, f"{p} resolves outside the host root")
        return real[len(self.root):] or "/"

    # ---- writes ----------------------------------------------------------------------------
    def write(self, p: str, data: str, timeout_s: float) -> None:
        """Write ``data`` to sysfs attribute ``p`` in one ``write(2)``, within ``timeout_s`` (s).

        :raises HookdError: ``TIMEOUT`` when the write has not returned by the deadline (the
            writing thread is abandoned; the kernel may still complete it).
        :raises OSError: the kernel's answer (``ENODEV``, ``EBUSY``, ...), unchanged.
        """
        key = next(self._seq)
        entry = {"path": p, "data": data.strip(), "abandoned": False,
                 "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        with self._writes_lock:
            self._writes[key] = entry

        def write() -> None:
            try:
                self._write_now(p, data)
            finally:   # returned, also long after its deadline: no longer stuck
                with self._writes_lock:
                    self._writes.pop(key, None)
        try:
            run_with_deadline(write, timeout_s, f"write {p}")
        except TimeoutError:
            with self._writes_lock:
                if key in self._writes:
                    entry["abandoned"] = True
            raise errors.HookdError(
                errors.TIMEOUT,
                f"writing {data.strip() or repr(data)!s} to {p} did not return within "
                f"{timeout_s:g} s") from None

    def stuck_writes(self) -> list[dict]:
        """The writes abandoned at their deadline that have not returned yet: each leaves a
        thread stuck in the kernel. ``[{"path", "data", "since"}]`` (``since``: UTC, ISO 8601).
        An entry goes once its write returns."""
        with self._writes_lock:
            return [{k: e[k] for k in ("path", "data", "since")}
                    for e in self._writes.values() if e["abandoned"]]

    def _write_now(self, p: str, data: str) -> None:
        fd = os.open(self.path(p), os.O_WRONLY)
        try:
            os.write(fd, data.encode())
        finally:
            os.close(fd)

    # ---- kernel modules ---------------------------------------------------------------------
    def module_loaded(self, name: str) -> bool:
        """True if module ``name`` (underscored) is in the kernel, built-in or loadable."""
        return self.exists(f"/sys/module/{name}")

    def module_builtin(self, name: str) -> bool:
        """True if ``name`` is built into the kernel: present without ``refcnt`` (sysfs-module)."""
        return self.exists(f"/sys/module/{name}") and not self.exists(f"/sys/module/{name}/refcnt")

    def modprobe(self, name: str, timeout_s: float) -> None:
        """Load module ``name`` and its dependencies (``modprobe NAME``).

        :raises HookdError: ``MODULE_FAILED`` with modprobe's message, ``TIMEOUT``.
        """
        self._run(["modprobe", name], timeout_s, f"loading module {name}")

    def rmmod(self, name: str, timeout_s: float) -> None:
        """Unload module ``name`` only, not its dependencies (``rmmod NAME``).

        :raises HookdError: ``MODULE_FAILED`` (e.g. "Module nvidia is in use"), ``TIMEOUT``.
        """
        self._run(["rmmod", name], timeout_s, f"unloading module {name}")

    def _run(self, argv: list[str], timeout_s: float, what: str) -> None:
        """Run a kmod command; turn its exit status and message into a :class:`HookdError`."""
        try:
            returncode, output = self.run_command(argv, timeout_s)
        except TimeoutError:
            raise errors.HookdError(errors.TIMEOUT,
                                    f"{what} did not finish within {timeout_s:g} s") from None
        except OSError as exc:
            raise errors.HookdError(errors.MODULE_FAILED, f"{what}: {exc}") from None
        if returncode != 0:
            # kmod names the cause first ("Error running install command ...") and the
            # consequence last ("could not insert ...: Invalid argument"): keep both
            lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
            msg = "; ".join(ln for ln in lines if "ERROR" in ln or "FATAL" in ln) or \
                (lines[-1] if lines else f"exit status {returncode}")
            raise errors.HookdError(errors.MODULE_FAILED, f"{what}: {msg}")

    def run_command(self, argv: list[str], timeout_s: float) -> tuple[int, str]:
        """Run ``argv`` (``modprobe``/``rmmod``) with no input; ``(exit status, stderr or
        stdout)``.

        :raises TimeoutError: it did not finish within ``timeout_s`` (s). A command stuck in
            the kernel (D state) ignores SIGKILL until the kernel lets go: it is reaped if it
            goes within a second, else left (as a stuck write's thread is left).
        :raises OSError: it could not be started.
        """
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
            raise TimeoutError(f"{argv[0]} did not finish within {timeout_s:g} s") from None
        return proc.returncode, err or out

    # ---- device nodes and the processes that hold them ---------------------------------------
    def node_identity(self, p: str) -> tuple | None:
        """Identity of device node ``p``: ``("c", st_rdev)`` for a character device,
        ``("f", st_dev, st_ino)`` for a regular file (the simulated host's nodes); None if absent."""
        try:
            st = os.stat(self.path(p))
        except OSError:
            return None
        return identity_of(st)


def identity_of(st: os.stat_result) -> tuple:
    """Identity tuple of a stat result (see :meth:`Host.node_identity`)."""
    if stat.S_ISCHR(st.st_mode):
        return ("c", st.st_rdev)
    return ("f", st.st_dev, st.st_ino)


def oserror_text(exc: OSError) -> str:
    """Short text for an ``OSError`` from sysfs: ``"No such device (ENODEV)"``."""
    name = errno.errorcode.get(exc.errno or 0, "")
    return f"{exc.strerror or exc} ({name})" if name else str(exc)
