"""Host shapes: vfio-hookd takes only what the VM needs (issue 7): modules shared with devices
that are not handed over stay, the desktop and the consoles stay when the GPU handed over is
not the one they use, and the record says why each step did or did not act."""

from __future__ import annotations

import pytest

from vfio_hookd import pci

pytestmark = pytest.mark.unit


def test_the_plan_names_each_module_and_why(world):
    world.profile()
    plan = world.machine.plan_prepare("win11")
    rec = world.machine.prepare("win11")
    facts = rec.step("modules").facts
    order = facts["plan"]
    assert sorted(order) == ["nvidia", "nvidia_drm", "nvidia_modeset", "nvidia_uvm"]
    # holders first: nvidia_drm before nvidia_modeset before nvidia
    assert order.index("nvidia_drm") < order.index("nvidia_modeset") < order.index("nvidia")
    assert facts["why"]["nvidia"].startswith("drives 0000:01:00.0")
    assert facts["why"]["nvidia_drm"].startswith("drives no device")
    assert facts["why"]["snd_hda_intel"].startswith("never unloaded: snd_hda_intel also drives")
    assert plan.shape.modules >= len(facts["plan"])
    world.machine.release("win11")


def test_a_module_that_drives_a_device_not_handed_over_stays(world):
    """Hand over only the audio function: snd_hda_intel is never unloaded, and nvidia, which
    drives the VGA function that stays, is not touched either."""
    order, why = pci.unload_plan(world.host, ["nvidia", "snd_hda_intel"], ["0000:01:00.1"])
    assert order == []
    assert why["nvidia"].startswith("also drives 0000:01:00.0")
    assert "snd_hda_intel" in why and why["snd_hda_intel"].startswith("never unloaded")


def test_devices_of_module_follow_the_driver_links(world):
    devs = pci.devices_of_module(world.host, "nvidia")
    assert [d.rsplit("/", 1)[1] for d in devs] == ["0000:01:00.0"]
    assert pci.devices_of_module(world.host, "no_such_module") == []


def test_the_units_step_says_why_it_stops_the_display_manager(world):
    world.profile()
    rec = world.machine.prepare("win11")
    why = rec.step("units").facts["why"]
    assert why["gdm.service"].startswith("the desktop uses the GPU: PID ")
    assert "(unit gdm.service)" in why["gdm.service"]
    assert why["nvidia-persistenced.service"] == "stop_units in the profile"
    world.machine.release("win11")
