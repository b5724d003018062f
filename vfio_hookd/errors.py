"""One error type with a named code, in the manner of firewalld's ``FirewallError``.

Every failure a user can act on is a :class:`HookdError`. It prints as ``CODE: message``,
crosses the daemon socket as ``{"code": ..., "message": ...}`` and becomes the CLI's and the
hook's one-line stderr message (libvirt shows the hook's stderr to the user, see libvirt
``docs/hooks.rst``). Anything else that escapes is a bug and is logged with its traceback.
"""

from __future__ import annotations

# Codes. Each has one meaning and one stable exit status of the CLI (EXIT_STATUS below).
PROFILE_INVALID = "PROFILE_INVALID"          # YAML profile: syntax, unknown key, wrong type/value
VM_NAME_INVALID = "VM_NAME_INVALID"          # a domain name with '/', NUL, or empty
NOT_MANAGED = "NOT_MANAGED"                  # CLI prepare/release for a VM without a profile
DOMAIN_XML_INVALID = "DOMAIN_XML_INVALID"    # the domain XML libvirt passed could not be used
DEVICE_NOT_FOUND = "DEVICE_NOT_FOUND"        # a PCI address that is not on the host
IOMMU_GROUP_INCOMPLETE = "IOMMU_GROUP_INCOMPLETE"  # an endpoint of a group is not in the profile
DEVICE_CLAIMED = "DEVICE_CLAIMED"            # another VM's record holds the device
DEVICE_BUSY = "DEVICE_BUSY"                  # processes still hold the GPU's device nodes
UNIT_FAILED = "UNIT_FAILED"                  # a systemd job did not end in "done"
MODULE_FAILED = "MODULE_FAILED"              # modprobe / module unload failed
BIND_FAILED = "BIND_FAILED"                  # a driver (un)bind did not give the expected link
VTCONSOLE_FAILED = "VTCONSOLE_FAILED"        # a vtconsole bind did not read back as written
FRAMEBUFFER_FAILED = "FRAMEBUFFER_FAILED"    # firmware framebuffer unbind/rebind failed
TIMEOUT = "TIMEOUT"                          # a wait ran past its deadline
HOST_IO = "HOST_IO"                          # an unexpected error from sysfs//dev//proc
STATE_DRIFT = "STATE_DRIFT"                  # the host no longer matches the VM's record
RELEASE_INCOMPLETE = "RELEASE_INCOMPLETE"    # one or more undos failed during release
DAEMON_UNREACHABLE = "DAEMON_UNREACHABLE"    # the hook/CLI could not talk to the daemon
BAD_REQUEST = "BAD_REQUEST"                  # a malformed request on the control socket
PERMISSION_DENIED = "PERMISSION_DENIED"      # a non-root peer on the control socket
SYSTEMD_UNAVAILABLE = "SYSTEMD_UNAVAILABLE"  # systemd's D-Bus API could not be reached
INSTALL_FAILED = "INSTALL_FAILED"            # vfio-hookd install could not finish
VM_RUNNING = "VM_RUNNING"                    # CLI release of a VM libvirt says is running
INTERNAL = "INTERNAL"                        # a bug: see the daemon's log for the traceback
RECORD_INVALID = "RECORD_INVALID"            # a record that is corrupt or of an unknown version
UNTRUSTED_FILE = "UNTRUSTED_FILE"            # a profile/record (or a directory above it) that
                                            # someone besides root owns or may write (trust.py)
DAEMON_BUSY = "DAEMON_BUSY"                  # the daemon serves its maximum of connections
DEVICE_STUCK = "DEVICE_STUCK"                # a write to a function's sysfs file never returned
PROFILE_EXISTS = "PROFILE_EXISTS"            # vfio-hookd init would overwrite a profile
CHECK_FAILED = "CHECK_FAILED"                # vfio-hookd check found at least one FAIL
DESKTOP_NOT_BACK = "DESKTOP_NOT_BACK"        # release undid everything, but the desktop seen at
                                            # prepare did not come back by deadlines.desktop_back
CPU_TUNING_FAILED = "CPU_TUNING_FAILED"      # AllowedCPUs or a cpufreq governor could not be set
                                            # or given back (steps cpu_isolation, cpu_governor)
HUGEPAGES_SHORT = "HUGEPAGES_SHORT"          # the kernel allocated fewer hugepages than the VM
                                            # needs (the part it did allocate is given back)
INHIBIT_FAILED = "INHIBIT_FAILED"            # logind did not give the sleep inhibitor lock the
                                            # profile asks for (not running, refused, no answer)
ROM_INVALID = "ROM_INVALID"                  # rom dump: no valid expansion ROM image (rom.py)
ROM_UNRELIABLE = "ROM_UNRELIABLE"            # rom dump: the kernel would not hand out the
                                            # card's own ROM now (shadow copy, a driver on it)

#: The CLI's exit status for each code: explicit and stable (a new code gets a new number;
#: no number is ever reused). 0 is success, 1 an unexpected bug outside the error path.
EXIT_STATUS = {
    PROFILE_INVALID: 2, VM_NAME_INVALID: 3, NOT_MANAGED: 4, DOMAIN_XML_INVALID: 5,
    DEVICE_NOT_FOUND: 6, IOMMU_GROUP_INCOMPLETE: 7, DEVICE_CLAIMED: 8, DEVICE_BUSY: 9,
    UNIT_FAILED: 10, MODULE_FAILED: 11, BIND_FAILED: 12, VTCONSOLE_FAILED: 13,
    FRAMEBUFFER_FAILED: 14, TIMEOUT: 15, HOST_IO: 16, STATE_DRIFT: 17, RELEASE_INCOMPLETE: 18,
    DAEMON_UNREACHABLE: 19, BAD_REQUEST: 20, PERMISSION_DENIED: 21, SYSTEMD_UNAVAILABLE: 22,
    INSTALL_FAILED: 23, VM_RUNNING: 24, INTERNAL: 25, RECORD_INVALID: 26,
    UNTRUSTED_FILE: 27, DEVICE_STUCK: 28, DAEMON_BUSY: 29, PROFILE_EXISTS: 30,
    CHECK_FAILED: 31, DESKTOP_NOT_BACK: 32, CPU_TUNING_FAILED: 33, HUGEPAGES_SHORT: 34,
    INHIBIT_FAILED: 35, ROM_INVALID: 36, ROM_UNRELIABLE: 37,
}
CODES = tuple(EXIT_STATUS)


class HookdError(Exception):
    """A failure the user can act on.

    :param code: one of the module-level code strings (e.g. ``DEVICE_BUSY``).
    :param message: one line saying what happened and, where possible, what to do next.
    :param details: optional JSON-serialisable facts (e.g. the holders' PIDs) for ``--json``.

    ``str(err)`` is ``"CODE: message"``; :meth:`to_dict` / :meth:`from_dict` carry it over the
    daemon socket unchanged.
    """

    def __init__(self, code: str, message: str, details: dict | None = None):
        if code not in CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = " ".join(str(message).split())  # always one line
        self.details = details or {}

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    @property
    def exit_status(self) -> int:
        """Process exit status for this code (:data:`EXIT_STATUS`, 2..)."""
        return EXIT_STATUS[self.code]

    def to_dict(self) -> dict:
        """``{"code": str, "message": str, "details": dict}``."""
        return {"code": self.code, "message": self.message, "details": self.details}

    @classmethod
    def from_dict(cls, data: dict) -> "HookdError":
        """Rebuild an error sent by :meth:`to_dict`; an unknown code becomes ``INTERNAL``."""
        code = data.get("code")
        msg = str(data.get("message", ""))
        if code not in CODES:
            code, msg = INTERNAL, f"{data.get('code')}: {msg}"
        return cls(code, msg, data.get("details") or {})
