"""End to end: Debian's real libvirtd runs the installed hook on ``virsh start``/``destroy``.

Each test runs :func:`testbed.demo.run` on a fresh simulated NVIDIA host with an X11 desktop
(``demo.DEMO_HOST``, in ``tmp_path``) with
latencies off: the private libvirtd (``testbed.libvirtd``) has ``hooks/vfio-hookd`` in
its ``qemu.d`` and the default ``/etc/vfio-hookd`` and ``/run/vfio-hookd`` bound into the state
dir; the daemon runs on the simulated host (``testbed.daemon``); ``virsh`` and ``vfio-hookd
status`` are the real commands; the kernel's own changes are named by ``testbed.expected``.
They need root and the packages ``scripts/setup`` installs; anything missing makes them fail,
never skip. The QEMU capabilities cache is shared by the module.
"""

from __future__ import annotations

import json

import pytest

from testbed import demo, expected as kernel
from testbed.sim.desktops import UNITS as DESKTOP_UNITS
from vfio_hookd.steps import STEPS

GPU, AUDIO = "0000:01:00.0", "0000:01:00.1"
FB_REMOVED = kernel.fb_removed("efi-framebuffer.0")
PROC_FB = kernel.proc_fb_gone(["0 EFI VGA"])
VTCON_REMOVED = kernel.vtcon_removed("vtcon1", "(M) frame buffer device")
VTCON_TAKEOVER = kernel.vtcon_took_over("vtcon0", "(S) dummy device", ["vtcon1"])
VFIO_LOADED = kernel.vfio_left_loaded(["vfio", "vfio_iommu_type1", "vfio_pci_core", "vfio_pci"])
#: The demo host's units (``demo.DEMO_HOST``, an X11 desktop: LightDM) active before and after.
UNITS = {u: "active" for u, spec in DESKTOP_UNITS[demo.DEMO_HOST].items() if spec.get("active")}
DM = next(u for u, spec in DESKTOP_UNITS[demo.DEMO_HOST].items()
          if "display-manager.service" in spec.get("aliases", ()))

pytestmark = pytest.mark.libvirt


@pytest.fixture(scope="module")
def libvirt_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("libvirt-cache")


@pytest.fixture
def run_demo(tmp_path, libvirt_cache):
    def run(*scenarios):
        res = demo.run(tmp_path / "state", scenarios, latency=None, cache_dir=libvirt_cache,
                       capture=True, timeout_s=90)
        why = res.get("output", "") + "\n" + json.dumps(
            {k: res.get(k) for k in ("rc", "problems", "checks")}, indent=1)
        return res, why
    return run


def _starts(lines: list[str], *prefixes: str) -> bool:
    return len(lines) == len(prefixes) and all(
        e.startswith(p) for e, p in zip(lines, prefixes))


def test_start_prepares_the_host_and_destroy_gives_it_back(run_demo):
    res, why = run_demo("passthrough")
    assert res["rc"] == 0 and not res["problems"], why
    sc = res["scenarios"]["passthrough"]
    assert sc["start"]["rc"] == 0, why
    running = sc["after_start"]
    assert running["domain"][0] == "running", why
    assert running["status"]["phase"] == "prepared", why
    assert running["drivers"] == {GPU: "vfio-pci", AUDIO: "vfio-pci"}
    assert [d["driver"] for d in running["status"]["devices"]] == ["vfio-pci", "vfio-pci"]
    assert running["units"][DM] == "inactive"
    assert running["units"]["sshd.service"] == "active"     # outside seat0: untouched
    assert [s["status"] for s in running["status"]["steps"]] == ["done"] * len(STEPS), why

    assert sc["destroy"]["rc"] == 0, why
    stopped = sc["after_destroy"]
    assert stopped["status"]["phase"] == "idle", why
    assert stopped["drivers"] == {GPU: "nvidia", AUDIO: "snd_hda_intel"}
    assert [s["status"] for s in stopped["status"]["steps"]] == ["undone"] * len(STEPS), why
    cmp = stopped["compare"]
    assert cmp["unexpected"] == {}, why
    # vfio-pci took the boot VGA function: the kernel removed the firmware framebuffer, its
    # /proc/fb line and fbcon's vtconsole, whose consoles the dummy console took over (the
    # simulated kernel models vt.c's do_unbind_con_driver); vfio-pci stays loaded. Nothing
    # else may differ.
    assert _starts(cmp["expected"], FB_REMOVED, PROC_FB, VTCON_REMOVED, VTCON_TAKEOVER,
                   VFIO_LOADED), why
    assert cmp["units_equal"] and cmp["units_after"] == UNITS
    # and the same once the daemon and libvirtd are gone
    assert res["final"]["unexpected"] == {} and res["final"]["units_equal"], why
    assert res["ok"], why
    log = "\n".join(res["daemon_log"])
    assert "VM=win11 STEP=bind_vfio PHASE=preparing DURATION_MS=" in log


def test_failed_prepare_makes_virsh_start_fail_and_rolls_back(run_demo):
    res, why = run_demo("failure")
    assert not res["problems"], why
    sc = res["scenarios"]["failure"]
    assert sc["start"]["rc"] != 0, why
    assert "Hook script execution failed" in sc["start"]["stderr"], why
    assert sc["hook_error"].startswith("BIND_FAILED: step bind_vfio: 0000:01:00.0: "), why
    assert "drivers_probe" in sc["hook_error"] and "(ENODEV)" in sc["hook_error"]
    assert sc["domain"] == ["shut off", 6]  # VIR_DOMAIN_SHUTOFF_FAILED
    after = sc["after"]
    assert after["status"]["phase"] == "failed", why
    assert after["status"]["error"]["code"] == "BIND_FAILED"
    assert after["drivers"] == {GPU: "nvidia", AUDIO: "snd_hda_intel"}
    cmp = after["compare"]
    assert cmp["unexpected"] == {}, why
    # vfio-pci never got the boot VGA function: the firmware framebuffer and vtcon1 are back;
    # only the loaded vfio-pci differs.
    assert cmp["expected"] == [VFIO_LOADED], why
    assert cmp["units_equal"] and cmp["units_after"] == UNITS
    assert res["final"]["unexpected"] == {} and res["rc"] == 0 and res["ok"], why


def test_vm_without_a_profile_leaves_the_host_untouched(run_demo):
    res, why = run_demo("unmanaged")
    assert res["rc"] == 0 and not res["problems"], why
    sc = res["scenarios"]["unmanaged"]
    assert sc["start"]["rc"] == 0 and sc["start"]["stderr"] == "", why
    assert sc["domain"][0] == "running"
    assert sc["destroy"]["rc"] == 0, why
    assert sc["unchanged_while_running"] and sc["unchanged_after"], why
    assert not sc["record_exists"]
    # the daemon's socket had a stand-in while the VM started and stopped: nothing connected
    assert sc["hook_connections"] == 0, why
    assert res["final"]["expected"] == [] and res["final"]["unexpected"] == {}, why
    assert res["ok"], why
