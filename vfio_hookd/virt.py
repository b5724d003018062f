"""A thin client of a libvirt daemon: the CLI asks it for a domain's XML and state; the demo and
the end-to-end tests define, start and destroy domains with it.

This is the only module that imports libvirt-python (Debian ``python3-libvirt``), and it does so
lazily, in :class:`Libvirt`, so that the hook and the daemon never pay its import cost (about
33 ms, FIELD-NOTES §4). The hook itself must never call libvirt (libvirt ``docs/hooks.rst``:
"A hook script must not call back into libvirt"); this module is for the *client* side: the
demo and the tests define, start and destroy domains and watch the hook's effect (their small
domain XML is in the repository's ``testbed/domains.py``, not here).

Errors: every libvirt failure becomes :class:`VirtError` carrying libvirt's own message text. When
a qemu hook exits non-zero, libvirt puts the hook's stderr in that text (FIELD-NOTES §1:
``Hook script execution failed: internal error: Child process (...) unexpected exit status 1:
<stderr>``), so a vfio-hookd ``CODE: message`` line can be found in :attr:`VirtError.message`.
"""

from __future__ import annotations

__all__ = ["VirtError", "Libvirt", "STATE_NAMES"]

#: virDomainState (libvirt ``include/libvirt/libvirt-domain.h``) -> the word ``virsh domstate``
#: prints for it (libvirt ``tools/virsh-domain-monitor.c``).
STATE_NAMES = {
    0: "no state", 1: "running", 2: "idle", 3: "paused", 4: "in shutdown", 5: "shut off",
    6: "crashed", 7: "pmsuspended",
}


class VirtError(Exception):
    """A libvirt call failed.

    :ivar message: libvirt's error message, one line (``str(err)`` is the same text); for a
        start aborted by a qemu hook it contains the hook's stderr.
    :ivar libvirt_code: libvirt's ``virErrorNumber`` (e.g. 1 ``VIR_ERR_INTERNAL_ERROR``, 42
        ``VIR_ERR_NO_DOMAIN``), or ``None`` when the failure did not come from libvirt.
    """

    def __init__(self, message: str, libvirt_code: int | None = None):
        self.message = " ".join(str(message).split())
        self.libvirt_code = libvirt_code
        super().__init__(self.message)


class Libvirt:
    """A connection to a libvirt daemon (libvirt-python ``virConnect``).

    :param uri: connection URI; ``qemu:///system`` reaches ``/run/libvirt/libvirt-sock``, which
        inside the repository's ``testbed/libvirtd.py`` is the private daemon's socket.
    :param readonly: open a read-only connection (``virConnectOpenReadOnly``: queries only,
        e.g. for ``vfio-hookd init`` and ``check``).
    :raises VirtError: the daemon cannot be reached (``libvirt.open`` failed) or
        libvirt-python is not installed (``apt-get install python3-libvirt``, see
        ``scripts/setup``).

    Domains are addressed by name. Every method raises :class:`VirtError` with libvirt's
    message on failure. Calls block until the daemon answers; a call on a domain whose qemu hook
    is running blocks until the hook exits (FIELD-NOTES §1: libvirt hooks have no timeout).
    """

    def __init__(self, uri: str = "qemu:///system", readonly: bool = False):
        try:
            import libvirt  # noqa: PLC0415 - lazy on purpose, see module docstring
        except ImportError as exc:
            raise VirtError(f"libvirt-python is not installed ({exc}); run scripts/setup") from exc
        self._lv = libvirt
        # libvirt-python's default handler prints every error on stderr as well; we raise them.
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        self.uri = uri
        self._conn = None
        self._conn = self._call(libvirt.openReadOnly if readonly else libvirt.open, uri)

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except self._lv.libvirtError as exc:
            raise VirtError(exc.get_error_message() or str(exc), exc.get_error_code()) from exc

    def _dom(self, name: str):
        return self._call(self._conn.lookupByName, name)

    def version(self) -> int:
        """The hypervisor's version as ``major * 1_000_000 + minor * 1000 + micro`` (QEMU 7.2.0
        is ``7002000``; ``virConnectGetVersion``)."""
        return self._call(self._conn.getVersion)

    def xml_desc(self, name: str) -> str:
        """The domain XML of ``name`` (str; ``virDomainGetXMLDesc`` with no flags: the live XML
        of a running domain, else the persistent one)."""
        return self._call(self._dom(name).XMLDesc, 0)

    def define(self, xml: str) -> None:
        """Define (persist) a domain from its XML (``virDomainDefineXML``); redefining an
        existing name replaces its inactive config."""
        self._call(self._conn.defineXML, xml)

    def start(self, name: str) -> None:
        """Start a defined domain (``virDomainCreate``, i.e. ``virsh start``).

        Returns once QEMU runs and the ``prepare``, ``start`` and ``started`` hooks have exited
        0. :raises VirtError: the start failed; when a hook exited non-zero, ``message``
        contains that hook's stderr, and libvirt has already run ``stopped end`` and
        ``release end failed``.
        """
        self._call(self._dom(name).create)

    def destroy(self, name: str) -> None:
        """Kill the domain's QEMU at once (``virDomainDestroy``); returns after the ``stopped``
        and ``release end destroyed`` hooks have run."""
        self._call(self._dom(name).destroy)

    def undefine(self, name: str) -> None:
        """Remove an inactive domain's persistent config (``virDomainUndefine``)."""
        self._call(self._dom(name).undefine)

    def state(self, name: str) -> str:
        """The domain's state as ``virsh domstate`` words: ``"running"``, ``"shut off"``,
        ``"paused"``, ... (see :data:`STATE_NAMES`)."""
        return self.state_reason(name)[0]

    def state_reason(self, name: str) -> tuple[str, int]:
        """``(state word, reason code)`` from ``virDomainGetState``; e.g. ``("shut off", 6)``
        for ``VIR_DOMAIN_SHUTOFF_FAILED`` after a hook aborted the start, ``("shut off", 2)``
        for ``VIR_DOMAIN_SHUTOFF_DESTROYED``."""
        st, reason = self._call(self._dom(name).state)
        return STATE_NAMES.get(st, f"state {st}"), reason

    def active_names(self) -> list[str]:
        """Names of the running (active) domains (``virConnectListAllDomains`` with
        ``VIR_CONNECT_LIST_DOMAINS_ACTIVE``)."""
        doms = self._call(self._conn.listAllDomains, self._lv.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
        return sorted(d.name() for d in doms)

    def close(self) -> None:
        """Close the connection; further calls fail. Closing twice is harmless."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except self._lv.libvirtError:
                pass

    def __enter__(self) -> "Libvirt":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()
