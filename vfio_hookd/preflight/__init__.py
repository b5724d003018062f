"""``vfio-hookd check [VM]``: a preflight that changes nothing, in the manner of libvirt's
``virt-host-validate``: one line per check, ``PASS`` / ``WARN`` / ``FAIL`` with what to do.

- :mod:`.host_checks`: the IOMMU (ACPI DMAR/IVRS table, IOMMU units, groups, kernel command
  line), vfio-pci, the libvirt hook (installed, executable, seen by the running libvirt
  daemon), vfio-hookd's socket and service, SELinux's ``virt_hooks_unconfined``.
- :mod:`.vm_checks`: for a VM: its profile, its functions, their IOMMU group, the domain XML's
  hostdevs and ``managed``, who holds the GPU now and what a prepare would do about each, the
  display manager, ``reset_method``, ``power_state``, AMD cards with the reset bug.

Every read goes through the :class:`~vfio_hookd.host.Host` (so the repository's simulated host
can model healthy and broken hosts) or the systemd client. Nothing is written.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"


@dataclass
class Check:
    """One check's result.

    :ivar name: its stable name (str, e.g. ``"iommu.groups"``, ``"vm.holders"``): scripts and
        tests key on it.
    :ivar status: ``"PASS"``, ``"WARN"`` or ``"FAIL"``.
    :ivar message: what was found (one line).
    :ivar fix: what to do (a command where there is one), or None.
    """
    name: str
    status: str
    message: str
    fix: str | None = None

    def line(self) -> str:
        """``"FAIL  hook.loaded: ... -> do: systemctl restart libvirtd.service"``."""
        text = f"{self.status}  {self.name}: {self.message}"
        return text + (f" -> do: {self.fix}" if self.fix else "")


def run_checks(host, paths, systemd, vm: str | None = None, xml: str | None = None,
               xml_problem: str | None = None) -> list[Check]:
    """All checks of the host, then of ``vm`` (if given).

    :param host: the :class:`~vfio_hookd.host.Host`.
    :param paths: the :class:`~vfio_hookd.paths.Paths` (profiles, the control socket).
    :param systemd: a :class:`vfio_hookd.systemd.Systemd` (read-only use); its
        ``SYSTEMD_UNAVAILABLE`` becomes a ``WARN`` of the checks that need it.
    :param xml: the domain XML of ``vm`` (str) or None when it could not be had; then
        ``xml_problem`` says why (str).
    :returns: the :class:`Check` list, in the order printed.
    """
    from . import host_checks, vm_checks
    checks = host_checks.run(host, paths, systemd)
    if vm is not None:
        checks += vm_checks.run(host, paths, systemd, vm, xml, xml_problem)
    return checks


def failed(checks: list[Check]) -> list[Check]:
    """The checks that ``FAIL``."""
    return [c for c in checks if c.status == FAIL]


def to_json(checks: list[Check], vm: str | None) -> dict:
    """``{"vm", "ok", "counts": {"PASS", "WARN", "FAIL"}, "checks": [{"name", "status",
    "message", "fix"}]}``; ``ok`` is True when nothing ``FAIL``\\ s."""
    counts = {s: sum(1 for c in checks if c.status == s) for s in (PASS, WARN, FAIL)}
    return {"vm": vm, "ok": counts[FAIL] == 0, "counts": counts,
            "checks": [asdict(c) for c in checks]}
