"""The simulated kernel answers sysfs writes and module commands the way Linux and kmod do.

Module operations go through the product's :meth:`vfio_hookd.host.Host.modprobe` / ``rmmod``,
which run :meth:`testbed.sim.kernel.SimHost.run_command`: the errors below are the product's
reading of the exit status and message the simulated kmod gives.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time

import pytest

from testbed.sim import faults, hosts
from testbed.sim.kernel import SimHost, load_state
from vfio_hookd import errors
from vfio_hookd.host import Host

pytestmark = pytest.mark.unit

T = 2.0  # generous deadline (s) for operations that must not hang
GPU, AUDIO = "0000:01:00.0", "0000:01:00.1"
AMD_GPU, AMD_AUDIO = "0000:03:00.0", "0000:03:00.1"
EFIFB = "efi-framebuffer.0"


@pytest.fixture
def host(tmp_path) -> SimHost:
    root = str(tmp_path / "host")
    hosts.build_host(root)
    return SimHost(root)


@pytest.fixture
def amd(tmp_path) -> SimHost:
    root = str(tmp_path / "amd")
    hosts.build_host(root, "amd")
    return SimHost(root)


@contextlib.contextmanager
def holding(h: SimHost, p: str):
    """A real process (sleep) that holds host node ``p`` open as its stdin."""
    with open(h.path(p)) as f:
        proc = subprocess.Popen(["sleep", "60"], stdin=f)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def driver(h: SimHost, addr: str) -> str | None:
    return h.link_name(f"/sys/bus/pci/devices/{addr}/driver")


def to_vfio(h: SimHost, addr: str) -> None:
    h.write(f"/sys/bus/pci/devices/{addr}/driver_override", "vfio-pci", T)
    if h.link_name(f"/sys/bus/pci/devices/{addr}/driver"):
        h.write(f"/sys/bus/pci/devices/{addr}/driver/unbind", addr, T)
    h.write("/sys/bus/pci/drivers_probe", addr, T)


def give_back(h: SimHost, addr: str) -> None:
    h.write(f"/sys/bus/pci/devices/{addr}/driver_override", "\n", T)
    h.write("/sys/bus/pci/drivers/vfio-pci/unbind", addr, T)
    h.write("/sys/bus/pci/drivers_probe", addr, T)


def module_error(fn, *args) -> str:
    with pytest.raises(errors.HookdError) as exc:
        fn(*args, T)
    assert exc.value.code == errors.MODULE_FAILED
    return exc.value.message


# ---- the built hosts ------------------------------------------------------------------------
def test_sim_host_replaces_only_the_kernel_and_kmod(host, tmp_path):
    overridden = {n for n in vars(SimHost) if n in vars(Host) and not n.startswith("__")}
    # a sysfs write, a binary read the kernel answers from its state (a function's rom), and
    # a kmod command: the product's three doors to the kernel
    assert overridden == {"_write_now", "_read_bytes_now", "run_command"}
    with pytest.raises(ValueError):
        SimHost(str(tmp_path))   # no .sim/state.json: not a simulated host


def test_run_command_answers_like_kmod(host):
    assert host.run_command(["modprobe", "vfio-pci"], T) == (0, "")
    assert host.run_command(["rmmod", "nvidia"], T) == (
        1, "rmmod: ERROR: Module nvidia is in use by: nvidia_drm nvidia_modeset nvidia_uvm\n")
    rc, out = host.run_command(["modprobe", "nouveau"], T)
    assert rc == 1 and out.startswith("modprobe: FATAL: Module nouveau not found in directory "
                                      "/lib/modules/")
    faults.inject(host.root, "rmmod", "nvidia_drm", "hang", count=1)
    with pytest.raises(TimeoutError):
        host.run_command(["rmmod", "nvidia_drm"], 0.2)
    with pytest.raises(OSError):
        host.run_command(["insmod", "x.ko"], T)


def test_nvidia_host_boots_like_a_real_one(host):
    assert driver(host, GPU) == "nvidia" and driver(host, AUDIO) == "snd_hda_intel"
    assert host.resolve(f"/sys/bus/pci/devices/{GPU}/iommu_group") == "/sys/kernel/iommu_groups/1"
    assert host.listdir("/sys/kernel/iommu_groups/1/devices") == [GPU, AUDIO]
    assert host.read("/sys/module/nvidia/refcnt") == "3"
    assert host.listdir("/sys/module/nvidia/holders") == ["nvidia_drm", "nvidia_modeset", "nvidia_uvm"]
    assert host.module_builtin("drm") and not host.module_loaded("vfio_pci")
    assert host.resolve("/sys/class/drm/card0/device") == host.resolve(f"/sys/bus/pci/devices/{GPU}")
    assert "DEVNAME=dri/card0" in host.read("/sys/class/drm/card0/uevent")
    assert "Device Minor: \t 0" in host.read(f"/proc/driver/nvidia/gpus/{GPU}/information")
    assert host.read("/proc/fb") == "0 EFI VGA"
    assert host.link_name(f"/sys/bus/platform/devices/{EFIFB}/driver") == "efi-framebuffer"
    assert host.read("/sys/class/vtconsole/vtcon1/name") == "(M) frame buffer device"
    assert host.read("/sys/class/vtconsole/vtcon1/bind") == "1"
    assert host.exists("/dev/vfio/vfio") and not host.exists("/dev/vfio/1")
    for link in hosts.snapshot(host.root).items():
        if link[1][0] == "link":
            assert not link[1][1].startswith("/") and host.resolve(link[0])


def test_amd_host_has_no_firmware_framebuffer(amd):
    assert driver(amd, AMD_GPU) == "amdgpu"
    assert not amd.exists(f"/sys/bus/platform/devices/{EFIFB}")
    assert amd.read("/proc/fb") == "0 amdgpudrmfb"
    assert amd.read("/sys/class/vtconsole/vtcon1/bind") == "1"
    assert amd.listdir("/sys/module/ttm/holders") == ["amdgpu", "drm_ttm_helper"]


def test_build_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "x").write_text("")
    with pytest.raises(ValueError):
        hosts.build_host(str(tmp_path))
    with pytest.raises(ValueError):
        hosts.build_host(str(tmp_path / "new"), "intel")


# ---- PCI driver core ------------------------------------------------------------------------
def test_driver_override_stores_and_clears(host):
    p = f"/sys/bus/pci/devices/{GPU}/driver_override"
    assert host.read(p) == "(null)"
    host.write(p, "vfio-pci\n", T)
    assert host.read(p) == "vfio-pci"
    host.write(p, "\n", T)
    assert host.read(p) == "(null)"
    host.write(p, "vfio-pci", T)
    host.write(p, "", T)
    assert host.read(p) == "(null)"


def test_bind_and_unbind_errors(host):
    host.modprobe("vfio-pci", T)
    with pytest.raises(OSError) as exc:  # not bound to that driver
        host.write("/sys/bus/pci/drivers/vfio-pci/unbind", GPU, T)
    assert exc.value.errno == errno.ENODEV
    with pytest.raises(OSError) as exc:  # already has a driver
        host.write("/sys/bus/pci/drivers/nvidia/bind", GPU, T)
    assert exc.value.errno == errno.EBUSY
    host.write("/sys/bus/pci/drivers/nvidia/unbind", GPU, T)
    with pytest.raises(OSError) as exc:  # vfio-pci has no id table: needs the override
        host.write("/sys/bus/pci/drivers/vfio-pci/bind", GPU, T)
    assert exc.value.errno == errno.ENODEV
    host.write(f"/sys/bus/pci/devices/{GPU}/driver_override", "vfio-pci", T)
    with pytest.raises(OSError) as exc:  # override names another driver
        host.write("/sys/bus/pci/drivers/nvidia/bind", GPU, T)
    assert exc.value.errno == errno.ENODEV
    host.write("/sys/bus/pci/drivers/vfio-pci/bind", GPU, T)
    assert driver(host, GPU) == "vfio-pci"
    with pytest.raises(OSError) as exc:
        host.write("/sys/bus/pci/drivers_probe", "0000:09:00.0", T)
    assert exc.value.errno == errno.ENODEV


def test_unbound_function_has_no_driver_link(host):
    host.write(f"/sys/bus/pci/devices/{AUDIO}/driver/unbind", AUDIO, T)
    assert driver(host, AUDIO) is None
    assert not host.exists("/dev/snd/controlC1") and not host.exists("/sys/class/sound/card1")
    assert host.exists("/dev/snd/controlC0")  # onboard audio untouched
    with pytest.raises(FileNotFoundError):
        host.write(f"/sys/bus/pci/devices/{AUDIO}/driver/unbind", AUDIO, T)
    host.write("/sys/bus/pci/drivers_probe", AUDIO, T)  # native driver again
    assert driver(host, AUDIO) == "snd_hda_intel" and host.exists("/dev/snd/pcmC1D3p")


def test_modprobe_vfio_pci_probes_nothing_without_override(host):
    host.modprobe("vfio-pci", T)
    assert host.module_loaded("vfio_pci") and host.exists("/sys/bus/pci/drivers/vfio-pci/bind")
    assert host.listdir("/sys/module/vfio/holders") == ["vfio_iommu_type1", "vfio_pci", "vfio_pci_core"]
    assert host.read("/sys/module/vfio/refcnt") == "3"
    assert driver(host, GPU) == "nvidia" and driver(host, AUDIO) == "snd_hda_intel"
    host.write("/sys/bus/pci/drivers/nvidia/unbind", GPU, T)
    host.write("/sys/bus/pci/drivers_probe", GPU, T)
    assert driver(host, GPU) == "nvidia"


def test_override_then_probe_moves_group_to_vfio(host):
    host.modprobe("vfio-pci", T)
    to_vfio(host, GPU)
    assert driver(host, GPU) == "vfio-pci"
    assert host.exists("/dev/vfio/1")  # the group node appears with the first function
    for gone in ("/dev/nvidia0", "/dev/dri/card0", "/dev/dri/renderD128", "/sys/class/drm/card0",
                 f"/proc/driver/nvidia/gpus/{GPU}", f"/sys/bus/pci/devices/{GPU}/drm"):
        assert not host.exists(gone), gone
    assert host.exists("/dev/nvidiactl")  # the module's node stays while nvidia is loaded
    # vfio-pci took the boot VGA function: the firmware framebuffer device is removed
    assert not host.exists(f"/sys/bus/platform/devices/{EFIFB}")
    assert not host.exists(f"/sys/devices/platform/{EFIFB}")
    assert not os.path.lexists(host.path(f"/sys/bus/platform/drivers/efi-framebuffer/{EFIFB}"))
    assert host.read("/proc/fb") == ""
    to_vfio(host, AUDIO)
    assert driver(host, AUDIO) == "vfio-pci" and host.exists("/dev/vfio/1")
    assert host.listdir("/sys/bus/pci/drivers/vfio-pci")[:2] == [GPU, AUDIO]
    give_back(host, AUDIO)
    assert host.exists("/dev/vfio/1")  # GPU still on vfio-pci
    give_back(host, GPU)
    assert not host.exists("/dev/vfio/1")
    assert driver(host, GPU) == "nvidia" and driver(host, AUDIO) == "snd_hda_intel"
    for back in ("/dev/nvidia0", "/dev/dri/card0", "/sys/class/drm/renderD128", "/dev/snd/controlC1",
                 f"/proc/driver/nvidia/gpus/{GPU}/information"):
        assert host.exists(back), back


def test_probe_with_override_of_unloaded_driver_leaves_function_unbound(host):
    to_vfio(host, AUDIO)  # vfio-pci not loaded
    assert driver(host, AUDIO) is None
    host.modprobe("vfio_pci", T)  # the override now matches: the new driver probes it
    assert driver(host, AUDIO) == "vfio-pci"


# ---- modules --------------------------------------------------------------------------------
def test_rmmod_errors_like_kmod(host):
    assert module_error(host.rmmod, "nvidia").endswith(
        "rmmod: ERROR: Module nvidia is in use by: nvidia_drm nvidia_modeset nvidia_uvm")
    assert module_error(host.rmmod, "drm").endswith("rmmod: ERROR: Module drm is builtin.")
    assert module_error(host.rmmod, "vfio_pci").endswith(
        "rmmod: ERROR: Module vfio_pci is not currently loaded")
    assert "modprobe: FATAL: Module nouveau not found in directory /lib/modules/" in \
        module_error(host.modprobe, "nouveau")
    for m in ("nvidia_drm", "nvidia_modeset", "nvidia_uvm", "nvidia"):
        host.rmmod(m, T)
    assert not host.module_loaded("nvidia") and driver(host, GPU) is None
    assert not host.exists("/sys/bus/pci/drivers/nvidia") and not host.exists("/dev/nvidiactl")
    assert not host.exists("/proc/driver/nvidia")
    host.modprobe("nvidia_drm", T)  # loads nvidia and nvidia_modeset first, nvidia probes the GPU
    assert driver(host, GPU) == "nvidia" and host.exists("/dev/dri/card0")
    assert host.listdir("/sys/module/nvidia/holders") == ["nvidia_drm", "nvidia_modeset"]


def test_rmmod_of_drm_helper_removes_its_nodes_only(host):
    host.rmmod("nvidia_drm", T)
    assert driver(host, GPU) == "nvidia" and host.exists("/dev/nvidia0")
    assert not host.exists("/dev/dri/card0") and not host.exists("/sys/class/drm/card0")
    host.modprobe("nvidia_drm", T)
    assert host.exists("/dev/dri/card0") and host.exists("/sys/class/drm/renderD128")


def test_rmmod_fails_while_a_process_holds_a_node(host):
    with holding(host, "/dev/nvidia-uvm"):
        assert module_error(host.rmmod, "nvidia_uvm").endswith("Module nvidia_uvm is in use")
        assert host.read("/sys/module/nvidia_uvm/refcnt") == "1"
    host.rmmod("nvidia_uvm", T)
    assert not host.module_loaded("nvidia_uvm")
    assert host.listdir("/sys/module/nvidia/holders") == ["nvidia_drm", "nvidia_modeset"]
    assert host.read("/sys/module/nvidia/refcnt") == "2"


def test_rmmod_of_pci_driver_unbinds_its_functions(host):
    host.rmmod("snd_hda_intel", T)
    assert driver(host, AUDIO) is None and driver(host, "0000:00:1f.3") is None
    assert host.listdir("/dev/snd") == [] and host.listdir("/sys/class/sound") == []
    host.modprobe("snd-hda-intel", T)
    assert driver(host, AUDIO) == "snd_hda_intel" and host.exists("/dev/snd/controlC0")


def test_nvidia_unbind_with_a_holder_hangs_until_the_deadline(host):
    with holding(host, "/dev/dri/card0"):
        with pytest.raises(errors.HookdError) as exc:
            host.write(f"/sys/bus/pci/devices/{GPU}/driver/unbind", GPU, 0.3)
        assert exc.value.code == errors.TIMEOUT
        assert driver(host, GPU) == "nvidia"
    with holding(host, "/dev/nvidiactl"):
        with pytest.raises(errors.HookdError) as exc:
            host.write("/sys/bus/pci/drivers/nvidia/unbind", GPU, 0.3)
        assert exc.value.code == errors.TIMEOUT
    host.write("/sys/bus/pci/drivers/nvidia/unbind", GPU, T)  # no holder: returns at once
    assert driver(host, GPU) is None


def test_drm_unbind_with_a_holder_succeeds_but_pins_the_module(amd):
    with holding(amd, "/dev/dri/card0"):
        amd.write(f"/sys/bus/pci/devices/{AMD_GPU}/driver/unbind", AMD_GPU, T)
        assert driver(amd, AMD_GPU) is None and not amd.exists("/dev/dri/card0")
        assert amd.read("/proc/fb") == ""
        assert module_error(amd.rmmod, "amdgpu").endswith("Module amdgpu is in use")
        assert amd.read("/sys/module/amdgpu/refcnt") == "1"
    amd.rmmod("amdgpu", T)
    assert not amd.module_loaded("amdgpu") and not amd.exists("/sys/module/ttm/holders/amdgpu")


def test_vfio_unbind_with_the_group_open_hangs(host):
    host.modprobe("vfio-pci", T)
    to_vfio(host, AUDIO)
    with holding(host, "/dev/vfio/1"):
        with pytest.raises(errors.HookdError) as exc:
            host.write("/sys/bus/pci/drivers/vfio-pci/unbind", AUDIO, 0.3)
        assert exc.value.code == errors.TIMEOUT


# ---- firmware framebuffer and vtconsoles -----------------------------------------------------
def test_framebuffer_unbind_bind_and_fbcon(host):
    unbind = "/sys/bus/platform/drivers/efi-framebuffer/unbind"
    bind = "/sys/bus/platform/drivers/efi-framebuffer/bind"
    with pytest.raises(OSError) as exc:
        host.write(bind, EFIFB, T)
    assert exc.value.errno == errno.EBUSY
    host.write(unbind, EFIFB, T)  # fbcon still bound: its vtconsole stays
    assert host.read("/proc/fb") == "" and host.exists("/sys/class/vtconsole/vtcon1")
    with pytest.raises(OSError) as exc:
        host.write(unbind, EFIFB, T)
    assert exc.value.errno == errno.ENODEV
    host.write(bind, EFIFB, T)
    assert host.read("/proc/fb") == "0 EFI VGA"
    host.write("/sys/class/vtconsole/vtcon1/bind", "0\n", T)
    assert host.read("/sys/class/vtconsole/vtcon1/bind") == "0"
    host.write(unbind, EFIFB, T)  # last framebuffer gone, fbcon unbound: console driver leaves
    assert not os.path.lexists(host.path("/sys/class/vtconsole/vtcon1"))
    host.write(bind, EFIFB, T)  # fbcon takes over again
    assert host.read("/sys/class/vtconsole/vtcon1/bind") == "1"


def vtcons(h: SimHost) -> dict:
    return {v: (h.read(f"/sys/class/vtconsole/{v}/name"), h.read(f"/sys/class/vtconsole/{v}/bind"))
            for v in h.listdir("/sys/class/vtconsole")}


def test_vtconsole_bind_follows_vt_c_after_an_efi_boot(host):
    """vt.c: unbind hands the consoles to the first other driver, bind takes them back only
    from the boot "(S)" driver, and writes to the "(S)" driver's own bind do nothing."""
    assert vtcons(host) == {"vtcon0": ("(S) dummy device", "0"),
                            "vtcon1": ("(M) frame buffer device", "1")}
    host.write("/sys/class/vtconsole/vtcon1/bind", "0\n", T)
    assert vtcons(host) == {"vtcon0": ("(S) dummy device", "1"),
                            "vtcon1": ("(M) frame buffer device", "0")}
    host.write("/sys/class/vtconsole/vtcon0/bind", "0", T)   # boot driver: ignored
    host.write("/sys/class/vtconsole/vtcon1/bind", "0", T)   # already unbound: nothing
    assert host.read("/sys/class/vtconsole/vtcon0/bind") == "1"
    host.write("/sys/class/vtconsole/vtcon1/bind", "1", T)
    assert vtcons(host) == {"vtcon0": ("(S) dummy device", "0"),
                            "vtcon1": ("(M) frame buffer device", "1")}


@pytest.fixture
def amd_bios(tmp_path) -> SimHost:
    root = str(tmp_path / "amd-bios")
    hosts.build_host(root, "amd", firmware="bios")
    return SimHost(root)


def test_bios_boot_layout_after_the_drm_driver_evicted_vgacon(amd_bios, tmp_path):
    """As in the BIOS guests of tests/kernel (bochs-drm on the boot VGA): vgacon retired,
    fbcon on its vtcon0, the dummy console that replaced vgacon on vtcon1; no firmware
    framebuffer. Without an evicting driver (nvidia, modeset=0) vgacon stays the console."""
    assert vtcons(amd_bios) == {"vtcon0": ("(M) frame buffer device", "1"),
                                "vtcon1": ("(M) dummy device", "0")}
    assert not amd_bios.exists(f"/sys/bus/platform/devices/{EFIFB}")
    assert amd_bios.read("/proc/fb") == "0 amdgpudrmfb"
    nv = str(tmp_path / "nv-bios")
    hosts.build_host(nv, "nvidia", firmware="bios")
    assert vtcons(SimHost(nv)) == {"vtcon0": ("(S) VGA+", "1")}
    with pytest.raises(ValueError):
        hosts.build_host(str(tmp_path / "x"), "amd", firmware="coreboot")


def test_bios_layout_rebind_is_ignored_until_the_taker_unbinds(amd_bios):
    """With no "(S)" driver left a 1 written to fbcon's bind does nothing (vt_bind only takes
    consoles from the boot driver); unbinding the dummy console that took them hands them
    back to fbcon, the first other driver (seen on Linux 6.1, VGA-bios guest)."""
    amd_bios.write("/sys/class/vtconsole/vtcon0/bind", "0", T)
    assert vtcons(amd_bios)["vtcon1"] == ("(M) dummy device", "1")
    amd_bios.write("/sys/class/vtconsole/vtcon0/bind", "1", T)
    assert amd_bios.read("/sys/class/vtconsole/vtcon0/bind") == "0"
    amd_bios.write("/sys/class/vtconsole/vtcon1/bind", "0", T)
    assert vtcons(amd_bios) == {"vtcon0": ("(M) frame buffer device", "1"),
                                "vtcon1": ("(M) dummy device", "0")}


def test_vtconsoles_step_rebinds_through_the_taker_on_a_bios_host(amd_bios):
    """The vtconsoles step's apply + undo on the BIOS layout leaves the consoles as they were
    (its undo needs the taker unbound: the write of 1 alone is ignored)."""
    from types import SimpleNamespace
    from vfio_hookd.steps import Context, Vtconsoles
    prof = SimpleNamespace(vtconsoles=True, deadlines=SimpleNamespace(unbind=T))
    ctx = Context(vm="w", host=amd_bios, profile=prof, deadlines=prof.deadlines,
                  devices=(AMD_GPU, AMD_AUDIO),
                  drivers={}, systemd=lambda: None)
    before = vtcons(amd_bios)
    step = Vtconsoles()
    facts = step.observe(ctx)
    assert facts["plan"] == ["vtcon0"]
    step.apply(ctx, facts)
    assert facts["took_over"] == {"vtcon0": ["vtcon1"]}
    assert step.undo(ctx, facts) == []
    assert vtcons(amd_bios) == before


def test_full_cycle_amd_bios_returns_the_same_host(amd_bios):
    before = hosts.snapshot(amd_bios.root)
    amd_bios.write("/sys/class/vtconsole/vtcon0/bind", "0", T)
    amd_bios.modprobe("vfio-pci", T)
    to_vfio(amd_bios, AMD_GPU)
    to_vfio(amd_bios, AMD_AUDIO)
    # amdgpu's framebuffer went with it, fbcon (unbound) unregistered: the dummy console holds on
    assert vtcons(amd_bios) == {"vtcon1": ("(M) dummy device", "1")}
    amd_bios.rmmod("amdgpu", T)
    amd_bios.modprobe("amdgpu", T)
    give_back(amd_bios, AMD_AUDIO)
    give_back(amd_bios, AMD_GPU)
    # fbcon comes back on the lowest free vtconN and takes the consoles over
    assert vtcons(amd_bios) == {"vtcon0": ("(M) frame buffer device", "1"),
                                "vtcon1": ("(M) dummy device", "0")}
    after = hosts.snapshot(amd_bios.root)
    for p in [p for p in after if p.startswith(("/sys/module/vfio", "/sys/bus/pci/drivers/vfio-pci"))]:
        del after[p]
    assert after == before


def test_plain_attribute_writes(host):
    host.write(f"/sys/bus/pci/devices/{GPU}/reset_method", "bus", T)
    assert host.read(f"/sys/bus/pci/devices/{GPU}/reset_method") == "bus"
    with pytest.raises(PermissionError):
        host.write(f"/sys/bus/pci/devices/{GPU}/vendor", "0x1234", T)
    with pytest.raises(FileNotFoundError):
        host.write("/sys/class/vtconsole/vtcon7/bind", "0", T)
    assert not os.path.lexists(host.path("/sys/class/vtconsole/vtcon7"))


# ---- faults and latency ---------------------------------------------------------------------
def test_write_fault_fails_count_times(host):
    faults.inject(host.root, "write", "/sys/bus/pci/drivers_probe", "fail", errno.ENOMEM, count=1)
    with pytest.raises(OSError) as exc:
        host.write("/sys/bus/pci/drivers_probe", GPU, T)
    assert exc.value.errno == errno.ENOMEM
    host.write("/sys/bus/pci/drivers_probe", GPU, T)  # spent


def test_write_fault_matches_the_resolved_path(host):
    faults.inject(host.root, "write", "/sys/bus/pci/drivers/nvidia/unbind", "hang", count=1)
    with pytest.raises(errors.HookdError) as exc:
        host.write(f"/sys/bus/pci/devices/{GPU}/driver/unbind", GPU, 0.2)
    assert exc.value.code == errors.TIMEOUT
    assert driver(host, GPU) == "nvidia"


def test_module_faults(host):
    faults.inject(host.root, "modprobe", "vfio_pci", "fail", errno.EIO, count=1)
    assert module_error(host.modprobe, "vfio-pci").endswith(
        "modprobe: ERROR: could not insert 'vfio_pci': Input/output error")
    host.modprobe("vfio-pci", T)
    faults.inject(host.root, "rmmod", "nvidia_drm", "hang")
    with pytest.raises(errors.HookdError) as exc:
        host.rmmod("nvidia_drm", 0.2)
    assert exc.value.code == errors.TIMEOUT
    faults.clear(host.root)
    host.rmmod("nvidia_drm", T)


def test_latency_is_the_kernels_time(host):
    faults.set_latency(host.root, {"unbind": 0.1})
    start = time.monotonic()
    host.write("/sys/bus/pci/drivers/snd_hda_intel/unbind", AUDIO, T)
    assert time.monotonic() - start >= 0.1
    with pytest.raises(errors.HookdError):  # and a deadline shorter than it fires
        host.write("/sys/bus/pci/drivers/snd_hda_intel/unbind", "0000:00:1f.3", 0.02)


# ---- whole cycles ---------------------------------------------------------------------------
def test_full_cycle_nvidia_returns_the_host_but_the_firmware_framebuffer(host):
    before = hosts.snapshot(host.root)
    # prepare, in the product's order: vtconsole, framebuffer, modules, vfio-pci
    host.write("/sys/class/vtconsole/vtcon1/bind", "0", T)
    host.write("/sys/bus/platform/drivers/efi-framebuffer/unbind", EFIFB, T)
    for m in ("nvidia_drm", "nvidia_modeset", "nvidia_uvm", "nvidia"):
        host.rmmod(m, T)
    assert not [p for p in os.listdir(host.path("/dev")) if p.startswith("nvidia")]
    assert host.link_name(f"/sys/bus/pci/devices/{GPU}/driver") is None
    host.modprobe("vfio-pci", T)
    to_vfio(host, GPU)
    to_vfio(host, AUDIO)
    # nvidia will not load while its only GPU is on vfio-pci (nv.c: no device probed)
    assert "No such device" in module_error(host.modprobe, "nvidia")
    assert not host.module_loaded("nvidia")
    # release, in reverse: functions back first (the GPU stays unbound), then the modules
    give_back(host, AUDIO)
    give_back(host, GPU)
    assert host.link_name(f"/sys/bus/pci/devices/{GPU}/driver") is None
    for m in ("nvidia", "nvidia_uvm", "nvidia_modeset", "nvidia_drm"):
        host.modprobe(m, T)
    assert host.link_name(f"/sys/bus/pci/devices/{GPU}/driver") == "nvidia"
    with pytest.raises(OSError) as exc:  # the kernel removed the device
        host.write("/sys/bus/platform/drivers/efi-framebuffer/bind", EFIFB, T)
    assert exc.value.errno == errno.ENODEV
    with pytest.raises(FileNotFoundError):  # fbcon left with the last framebuffer
        host.write("/sys/class/vtconsole/vtcon1/bind", "1", T)
    after = hosts.snapshot(host.root)
    removed = set(before) - set(after)
    added = set(after) - set(before)
    changed = {p for p in set(before) & set(after) if before[p] != after[p]}
    assert removed and all(EFIFB in p or "vtcon1" in p for p in removed)
    assert added and all(p.startswith(("/sys/module/vfio", "/sys/bus/pci/drivers/vfio-pci"))
                         for p in added)
    # fbcon left with the last framebuffer: the boot console (dummycon) keeps the consoles
    boot_vtcon = "/sys/devices/virtual/vtconsole/vtcon0/bind"
    assert changed == {"/proc/fb", boot_vtcon} and after["/proc/fb"] == ("file", "")
    assert after[boot_vtcon] == ("file", "1\n")


def test_full_cycle_amd_returns_the_same_host(amd):
    before = hosts.snapshot(amd.root)
    amd.write("/sys/class/vtconsole/vtcon1/bind", "0", T)
    amd.modprobe("vfio-pci", T)
    to_vfio(amd, AMD_GPU)
    to_vfio(amd, AMD_AUDIO)
    assert not os.path.lexists(amd.path("/sys/class/vtconsole/vtcon1"))
    amd.rmmod("amdgpu", T)
    amd.modprobe("amdgpu", T)
    give_back(amd, AMD_AUDIO)
    give_back(amd, AMD_GPU)
    assert amd.read("/sys/class/vtconsole/vtcon1/bind") == "1"  # amdgpu's fb brought fbcon back
    amd.write("/sys/class/vtconsole/vtcon1/bind", "1", T)
    after = hosts.snapshot(amd.root)
    for p in [p for p in after if p.startswith(("/sys/module/vfio", "/sys/bus/pci/drivers/vfio-pci"))]:
        del after[p]
    assert after == before


def test_state_records_node_identities(host):
    st = load_state(host.root)
    assert st["live"]["/dev/dri/card0"]["module"] == "nvidia_drm"
    ident = tuple(st["live"]["/dev/nvidia0"]["id"])
    assert host.node_identity("/dev/nvidia0") == ident
