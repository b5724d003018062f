"""Per-VM profiles (vfio_hookd.profile): strict parsing with file:line:key errors, the example
config, domain XML hostdevs, and whether a VM is managed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vfio_hookd import errors, profile
from vfio_hookd.errors import HookdError
from vfio_hookd.paths import Paths
from vfio_hookd.profile import AUTO, Deadlines, Profile, reader, rules

pytestmark = pytest.mark.unit


def PATHS():
    return Paths.from_env()

REPO = Path(__file__).resolve().parents[1]
FILE = "/etc/vfio-hookd/vms/win10.yaml"


def parse(text: str, name: str = "win10") -> Profile:
    return profile.parse_profile(text, FILE, name)


def defaults(name: str = "win10", path: str = FILE) -> Profile:
    return Profile(name=name, path=path)


# ---- bad input: each kind gives PROFILE_INVALID naming file, line and key ------------------

BAD = [
    # id, text, line, key named in the message ("" = none), words the message must contain
    ("yaml-syntax", "on_busy: fail\ndevices: [0000:01:00.0\n", 3, "", "YAML syntax error"),
    ("yaml-tab", "devices:\n\t- 0000:01:00.0\n", 2, "", "YAML syntax error"),
    ("yaml-nul", "on_busy: fa\x00il\n", 1, "", "not allowed"),
    ("two-documents", "on_busy: fail\n---\non_busy: fail\n", 2, "", "single document"),
    ("top-list", "- devices\n- modules\n", 1, "", "must be a mapping"),
    ("top-scalar", "auto\n", 1, "", "must be a mapping"),
    ("unknown-key", "devices: auto\n\non_bsy: fail\n", 3, "",
     "unknown key 'on_bsy' (did you mean 'on_busy'?)"),
    ("unknown-key-far", "gpu_reset: yes\n", 1, "", "unknown key 'gpu_reset' (valid:"),
    ("unknown-deadline", "deadlines:\n  unit_stop: 3\n  unbnd: 3\n", 3, "deadlines",
     "unknown key 'unbnd' (did you mean 'unbind'?)"),
    ("non-string-key", "on_busy: fail\n1: 2\n", 2, "", "keys must be names"),
    ("duplicate-key", "on_busy: fail\nmodules: auto\non_busy: terminate\n", 3, "",
     "duplicate key 'on_busy' (first at line 1)"),
    ("duplicate-deadline", "deadlines:\n  unbind: 1\n  unbind: 2\n", 3, "deadlines",
     "duplicate key 'unbind'"),
    ("null-value", "vtconsoles: auto\ndevices:\n", 2, "devices", "has no value"),
    ("unsafe-tag", "devices: !!python/object/apply:os.system [true]\n", 1, "devices",
     "cannot read the value"),
    ("devices-int", "devices: 5\n", 1, "devices",
     "must be 'auto' or a list of PCI addresses such as '0000:01:00.0', got int"),
    ("devices-word", "devices: all\n", 1, "devices", "got 'all'"),
    ("devices-mapping", "devices: {gpu: 0000:01:00.0}\n", 1, "devices", "got mapping"),
    ("devices-scalar-address", "devices: 0000:01:00.0\n", 1, "devices",
     "must be a list, even for one function"),
    ("devices-empty", "devices: []\n", 1, "devices", "empty list"),
    ("devices-short-form", "devices:\n  - 0000:01:00.0\n  - 01:00.1\n", 3, "devices[1]",
     "malformed PCI address '01:00.1': expected the full form"),
    ("devices-short-quoted", "devices: ['01:00.0']\n", 1, "devices[0]", "e.g. '0000:01:00.0'"),
    ("devices-slot-range", "devices: ['0000:01:20.0']\n", 1, "devices[0]", "slot 00-1f"),
    ("devices-function-range", "devices: ['0000:01:00.8']\n", 1, "devices[0]",
     "malformed PCI address"),
    ("devices-junk", "devices: ['0000:01:00.0 ']\n", 1, "devices[0]", "malformed PCI address"),
    ("devices-item-bool", "devices:\n  - yes\n", 2, "devices[0]", "got bool"),
    ("devices-item-list", "devices:\n  - [0000:01:00.0]\n", 2, "devices[0]", "got list"),
    ("devices-duplicate", "devices:\n  - '0000:01:00.0'\n  - '0000:01:00.1'\n  - 0000:01:00.0\n",
     4, "devices[2]", "duplicate PCI address '0000:01:00.0' (also devices[0])"),
    ("devices-duplicate-case", "devices: ['0000:0A:00.0', '0000:0a:00.0']\n", 1, "devices[1]",
     "duplicate PCI address '0000:0a:00.0'"),
    ("dm-no-suffix", "display_manager: gdm\n", 1, "display_manager", "e.g. 'gdm.service'"),
    ("dm-not-service", "display_manager: graphical.target\n", 1, "display_manager",
     "not a service unit"),
    ("dm-path", "display_manager: /usr/lib/systemd/system/gdm.service\n", 1, "display_manager",
     "is a path"),
    ("dm-false", "display_manager: false\n", 1, "display_manager", "write 'none'"),
    ("dm-list", "display_manager: [gdm.service]\n", 1, "display_manager", "got list"),
    ("stop-units-string", "stop_units: nvidia-persistenced.service\n", 1, "stop_units",
     "must be a list of unit names, got string"),
    ("stop-units-no-suffix", "stop_units:\n  - nvidia-persistenced\n", 2, "stop_units[0]",
     "'nvidia-persistenced.service'"),
    ("stop-units-bad-type", "stop_units: [foo.bar]\n", 1, "stop_units[0]",
     "not a systemd unit name"),
    ("stop-units-int", "stop_units: [5]\n", 1, "stop_units[0]", "got int"),
    ("stop-units-duplicate", "stop_units: [a.service, b.service, a.service]\n", 1,
     "stop_units[2]", "duplicate unit 'a.service'"),
    ("stop-units-dm-alias", "stop_units: [display-manager.service]\n", 1, "stop_units[0]",
     "set it with 'display_manager'"),
    ("stop-units-dm-explicit", "display_manager: sddm.service\nstop_units: [sddm.service]\n", 2,
     "stop_units[0]", "is the display manager"),
    ("vtconsoles-bool", "vtconsoles: false\n", 1, "vtconsoles", "got bool (false): write 'none'"),
    ("vtconsoles-word", "vtconsoles: off\n", 1, "vtconsoles", "got bool"),
    ("vtconsoles-enum", "vtconsoles: some\n", 1, "vtconsoles",
     "must be 'auto' or 'none', got 'some'"),
    ("framebuffer-enum", "framebuffer: efi\n", 1, "framebuffer", "must be 'auto' or 'none'"),
    ("framebuffer-case", "framebuffer: Auto\n", 1, "framebuffer", "(did you mean 'auto'?)"),
    ("modules-int", "modules: 3\n", 1, "modules", "got int"),
    ("modules-scalar-name", "modules: nvidia\n", 1, "modules", "modules: ['nvidia']"),
    ("modules-empty", "modules: []\n", 1, "modules", "write 'none'"),
    ("modules-false", "modules: false\n", 1, "modules", "write 'none'"),
    ("modules-bad-name", "modules: [nvidia, 'nvidia.ko']\n", 1, "modules[1]",
     "is not a module name"),
    ("modules-vfio-pci", "modules:\n  - nvidia\n  - vfio-pci\n", 3, "modules[1]",
     "'vfio_pci' must not be unloaded: vfio-pci serves"),
    ("modules-vfio", "modules: [vfio]\n", 1, "modules[0]", "other VMs"),
    ("modules-vfio-core", "modules: [vfio_pci_core]\n", 1, "modules[0]", "must not be unloaded"),
    ("modules-snd-hda-intel", "modules: [snd-hda-intel]\n", 1, "modules[0]", "onboard audio"),
    ("modules-duplicate", "modules: [nvidia_drm, nvidia-drm]\n", 1, "modules[1]",
     "duplicate module 'nvidia_drm'"),
    ("on-busy-enum", "on_busy: kill\n", 1, "on_busy", "must be 'fail' or 'terminate'"),
    ("on-busy-typo", "on_busy: terminat\n", 1, "on_busy", "(did you mean 'terminate'?)"),
    ("on-busy-bool", "on_busy: yes\n", 1, "on_busy", "got bool"),
    ("deadlines-list", "deadlines: [5]\n", 1, "deadlines", "must be a mapping"),
    ("deadlines-number", "deadlines: 5\n", 1, "deadlines", "got int"),
    ("deadline-zero", "deadlines:\n  unbind: 0\n", 2, "deadlines.unbind", "> 0, got 0"),
    ("deadline-negative", "deadlines:\n  unit_stop: -1.5\n", 2, "deadlines.unit_stop",
     "got -1.5"),
    ("deadline-bool", "deadlines:\n  terminate: true\n", 2, "deadlines.terminate", "got bool"),
    ("deadline-string", "deadlines:\n  module_load: '30'\n", 2, "deadlines.module_load",
     "got string"),
    ("deadline-null", "deadlines:\n  module_load:\n", 2, "deadlines.module_load", "got null"),
    ("deadline-inf", "deadlines:\n  unit_start: .inf\n", 2, "deadlines.unit_start", "got inf"),
    ("deadline-nan", "deadlines:\n  unit_start: .nan\n", 2, "deadlines.unit_start", "got nan"),
    ("deadline-too-long", "deadlines:\n  unbind: 86400\n", 2, "deadlines.unbind", "at most 3600"),
]


@pytest.mark.parametrize("text,line,key,words", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_profile_is_rejected_with_file_line_and_key(text, line, key, words):
    with pytest.raises(HookdError) as exc:
        parse(text)
    err = exc.value
    assert err.code == errors.PROFILE_INVALID
    # "<file>:<line>: <key>: ..." (syntax errors: "<file>:<line>:<col>: YAML syntax error: ...")
    assert err.message.startswith(f"{FILE}:{line}:"), err.message
    if key:
        assert f":{line}: {key}: " in err.message, err.message
    assert words in err.message, err.message
    assert err.details["file"] == FILE
    assert err.details["line"] == line
    assert err.details["key"] == (key or None)
    assert "\n" not in str(err)


def test_bad_ids_are_unique():
    ids = [b[0] for b in BAD]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../etc", "nul\0name"])
def test_vm_name_that_cannot_name_a_file_is_rejected(name):
    with pytest.raises(HookdError) as exc:
        parse("", name=name)
    assert exc.value.code == errors.VM_NAME_INVALID


# ---- good input ----------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n", "---\n...\n", "~\n",
                                  "{}\n"])
def test_empty_profile_means_all_defaults(text):
    assert parse(text) == defaults()


def test_defaults_are_the_documented_ones():
    p = parse("")
    assert p.devices is None
    assert p.display_manager == AUTO
    assert p.stop_units == ()
    assert p.vtconsoles is True and p.framebuffer is True
    assert p.modules == AUTO
    assert p.on_busy == "fail"
    assert p.deadlines == Deadlines(unit_stop=100.0, unit_start=30.0, terminate=5.0, unbind=10.0,
                                    module_unload=15.0, module_load=30.0)


def test_full_profile():
    p = parse(
        "devices:\n"
        "  - '0000:0A:00.0'\n"
        "  - \"0000:0a:00.1\"\n"
        "display_manager: sddm.service\n"
        "stop_units: [nvidia-persistenced.service, 'getty@tty1.service']\n"
        "vtconsoles: none\n"
        "framebuffer: none\n"
        "modules: [nvidia-drm, nvidia_modeset, nvidia-uvm, nvidia]\n"
        "on_busy: terminate\n"
        "deadlines:\n"
        "  unit_stop: 12\n"
        "  unbind: 2.5\n")
    assert p.name == "win10" and p.path == FILE
    assert p.devices == ("0000:0a:00.0", "0000:0a:00.1")
    assert p.display_manager == "sddm.service"
    assert p.stop_units == ("nvidia-persistenced.service", "getty@tty1.service")
    assert p.vtconsoles is False and p.framebuffer is False
    assert p.modules == ("nvidia_drm", "nvidia_modeset", "nvidia_uvm", "nvidia")
    assert p.on_busy == "terminate"
    assert p.deadlines.unit_stop == 12.0 and p.deadlines.unbind == 2.5
    assert p.deadlines.unit_start == 30.0  # the others keep their defaults


def test_unquoted_addresses_are_read_as_written():
    # YAML 1.1 reads an unquoted 0000:01:00.0 as the base-60 float 60.0; the profile must not.
    p = parse("devices:\n  - 0000:01:00.0\n  - 0000:01:00.1\n")
    assert p.devices == ("0000:01:00.0", "0000:01:00.1")
    assert parse("devices: [0000:01:00.0, 0000:02:00.0]\n").devices == ("0000:01:00.0",
                                                                        "0000:02:00.0")


@pytest.mark.parametrize("text,want", [
    ("display_manager: none\n", None),
    ("display_manager: auto\n", AUTO),
    ("display_manager: display-manager.service\n", AUTO),
    ("display_manager: lightdm.service\n", "lightdm.service"),
])
def test_display_manager_values(text, want):
    assert parse(text).display_manager == want


@pytest.mark.parametrize("text,want", [
    ("modules: none\n", ()),
    ("modules: auto\n", AUTO),
    ("modules: [amdgpu]\n", ("amdgpu",)),
])
def test_modules_values(text, want):
    assert parse(text).modules == want


def test_profile_round_trips_through_a_json_record():
    p = parse("devices: ['0000:01:00.0']\ndisplay_manager: none\nmodules: none\n"
              "vtconsoles: none\nstop_units: [a.service]\ndeadlines: {terminate: 1}\n")
    data = json.loads(json.dumps(p.to_dict()))
    assert data["devices"] == ["0000:01:00.0"]
    assert data["display_manager"] == "none" and data["modules"] == "none"
    assert data["vtconsoles"] == "none" and data["framebuffer"] == "auto"
    assert data["deadlines"]["terminate"] == 1.0
    assert profile.profile_from_dict(data) == p
    assert profile.profile_from_dict(defaults().to_dict()) == defaults()


def test_from_dict_validates_like_a_file():
    data = defaults().to_dict()
    data["modules"] = ["nvidia", "snd_hda_intel"]
    with pytest.raises(HookdError) as exc:
        profile.profile_from_dict(data)
    assert exc.value.code == errors.PROFILE_INVALID
    assert exc.value.message.startswith(f"{FILE}: modules[1]: ")
    data = defaults().to_dict()
    data["on_bsy"] = "fail"
    with pytest.raises(HookdError, match="did you mean 'on_busy'"):
        profile.profile_from_dict(data)
    data = defaults().to_dict()
    data["name"] = "a/b"
    with pytest.raises(HookdError) as exc:
        profile.profile_from_dict(data)
    assert exc.value.code == errors.VM_NAME_INVALID


def test_from_dict_of_a_non_mapping_or_without_path():
    with pytest.raises(HookdError) as exc:
        profile.profile_from_dict(["devices"])
    assert exc.value.code == errors.PROFILE_INVALID
    assert exc.value.message == "profile data: must be a mapping, got list"
    assert profile.profile_from_dict({"name": "win10"}) == defaults("win10", "<record>")


# With several mistakes the first one reported is: a problem reading a key (not a name,
# duplicate, unknown) or its value, in file order; then a key without value, in file order; then
# the values, key by key in the documented order (KEYS).
FIRST = [
    ("devices: 5\non_bsy: x\n", 2, None),
    ("on_bsy: x\ndevices: !!python/object/apply:os.system [true]\n", 1, None),
    ("devices: !!python/object/apply:os.system [true]\non_bsy: x\n", 1, "devices"),
    ("deadlines:\n  unbind: 0\n  unbnd: 2\n", 3, "deadlines"),
    ("on_busy: kill\nvtconsoles:\n", 2, "vtconsoles"),
    ("on_busy: kill\ndevices: 5\n", 2, "devices"),
    ("deadlines: {unbind: 0}\nmodules: [vfio]\n", 2, "modules[0]"),
]


@pytest.mark.parametrize("text,line,key", FIRST)
def test_first_error_reported(text, line, key):
    with pytest.raises(HookdError) as exc:
        parse(text)
    assert (exc.value.details["line"], exc.value.details["key"]) == (line, key), exc.value.message


def test_deadlines_from_record_round_trips_to_dict():
    d = Deadlines(unit_stop=1.5, unit_start=2.0, terminate=3.0, unbind=4.0, module_unload=5.0,
                  module_load=6.0)
    assert Deadlines.from_record(d.to_dict()) == d
    assert Deadlines.from_record(Deadlines().to_dict()) == Deadlines()
    back = Deadlines.from_record(json.loads(json.dumps(d.to_dict())))
    assert back == d and all(type(v) is float for v in back.to_dict().values())


def test_deadlines_from_record_ignores_unknown_keys():
    data = {"unbind": 2, "gpu_reset": 9, "unbnd": 1, 5: 6, None: "x"}
    assert Deadlines.from_record(data) == Deadlines(unbind=2.0)


@pytest.mark.parametrize("bad", [0, -1, -0.5, float("inf"), float("-inf"), float("nan"), True,
                                 False, None, "10", [10], {"s": 10}])
def test_deadlines_from_record_takes_the_default_for_a_bad_value(bad):
    got = Deadlines.from_record({"unbind": bad, "terminate": 7})
    assert got == Deadlines(terminate=7.0)
    assert got.unbind == profile.DEFAULT_DEADLINES["unbind"]


def test_deadlines_from_record_keeps_what_prepare_ran_with():
    # No MAX_DEADLINE_S here: the record holds what prepare used; release waits as long.
    assert Deadlines.from_record({"unbind": 86400}).unbind == 86400.0
    assert Deadlines.from_record({"unbind": 1e-3}).unbind == 1e-3


@pytest.mark.parametrize("data", [{}, None, [], "unbind", 5])
def test_deadlines_from_record_of_nothing_usable_is_the_defaults(data):
    assert Deadlines.from_record(data) == Deadlines()


def test_from_dict_non_string_key_is_refused_like_in_a_file():
    data = defaults().to_dict()
    data[1] = 2
    with pytest.raises(HookdError) as exc:
        profile.profile_from_dict(data)
    assert exc.value.message == f"{FILE}: keys must be names such as 'devices', got 1"


def test_profile_is_frozen():
    p = defaults()
    with pytest.raises(AttributeError):
        p.on_busy = "terminate"


def test_example_config_parses_to_the_defaults():
    path = REPO / "config.example.yaml"
    p = profile.parse_profile(path.read_text(encoding="utf-8"), str(path), "example")
    assert p == defaults("example", str(path))
    # ...and documents every key and every deadline
    text = path.read_text(encoding="utf-8")
    for key in profile.KEYS + tuple(profile.DEFAULT_DEADLINES):
        assert f"\n{key}:" in text or f"\n  {key}:" in text, key


# ---- normalize_pci_address ---------------------------------------------------------------

@pytest.mark.parametrize("s,want", [
    ("0000:01:00.0", "0000:01:00.0"),
    ("0000:0A:1F.7", "0000:0a:1f.7"),
    ("ABCD:ef:00.1", "abcd:ef:00.1"),
    ("01:00.0", None),
    ("0000:01:00", None),
    ("0000:01:20.0", None),
    ("0000:01:00.8", None),
    ("00000:01:00.0", None),
    (" 0000:01:00.0", None),
    ("0000:01:00.0\n", None),
    ("", None),
    (60.0, None),
    (None, None),
])
def test_normalize_pci_address(s, want):
    assert profile.normalize_pci_address(s) == want


# ---- devices_from_domain_xml ---------------------------------------------------------------

DOMAIN_XML = """<domain type='kvm' id='3'>
  <name>win10</name>
  <uuid>6a1b8a3e-8f1c-4c3e-9a57-2d1e0c9f4b11</uuid>
  <memory unit='KiB'>16777216</memory>
  <vcpu placement='static'>8</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/win10.qcow2'/>
      <target dev='sda' bus='sata'/>
      <address type='drive' controller='0' bus='0' target='0' unit='0'/>
    </disk>
    <controller type='pci' index='1' model='pcie-root-port'>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x02' function='0x0'/>
    </controller>
    <interface type='hostdev' managed='yes'>
      <source>
        <address type='pci' domain='0x0000' bus='0x03' slot='0x10' function='0x1'/>
      </source>
    </interface>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <driver name='vfio'/>
      <source>
        <address domain='0x0000' bus='0x0a' slot='0x00' function='0x0'/>
      </source>
      <alias name='hostdev0'/>
      <address type='pci' domain='0x0000' bus='0x05' slot='0x00' function='0x0'
               multifunction='on'/>
    </hostdev>
    <hostdev mode='subsystem' type='usb' managed='yes'>
      <source>
        <vendor id='0x046d'/>
        <product id='0xc52b'/>
        <address bus='1' device='4'/>
      </source>
      <alias name='hostdev1'/>
      <address type='usb' bus='0' port='1'/>
    </hostdev>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <driver name='vfio'/>
      <source>
        <address domain='0x0000' bus='0x0a' slot='0x00' function='0x1'/>
      </source>
      <alias name='hostdev2'/>
      <address type='pci' domain='0x0000' bus='0x05' slot='0x00' function='0x1'/>
    </hostdev>
    <video>
      <model type='none'/>
    </video>
  </devices>
</domain>
"""


def test_devices_from_domain_xml_takes_pci_hostdev_sources_only():
    # Not the USB hostdev, not the guest-side <address type='pci'>, not the SR-IOV interface.
    assert profile.devices_from_domain_xml(DOMAIN_XML) == ("0000:0a:00.0", "0000:0a:00.1")


def test_devices_from_domain_xml_without_hostdevs_is_empty():
    assert profile.devices_from_domain_xml("<domain><name>x</name><devices/></domain>") == ()
    assert profile.devices_from_domain_xml("<domain><name>x</name></domain>") == ()


@pytest.mark.parametrize("attrs,want", [
    ("domain='0x0000' bus='0x01' slot='0x00' function='0x0'", "0000:01:00.0"),
    ("domain='0' bus='10' slot='0x1f' function='7'", "0000:0a:1f.7"),   # decimal
    ("domain='0x0000' bus='010' slot='0' function='0'", "0000:08:00.0"),  # octal, as strtoul
])
def test_devices_from_domain_xml_reads_numbers_like_libvirt(attrs, want):
    xml = (f"<domain><devices><hostdev mode='subsystem' type='pci'><source>"
           f"<address {attrs}/></source></hostdev></devices></domain>")
    assert profile.devices_from_domain_xml(xml) == (want,)


@pytest.mark.parametrize("xml,words", [
    ("<domain><devices><hostdev", "not well-formed XML"),
    ("", "not well-formed XML"),
    ("<network><name>default</name></network>", "root element is <network>"),
    ("<domain><devices><hostdev mode='subsystem' type='pci'><source/></hostdev></devices>"
     "</domain>", "has no <source><address"),
    ("<domain><devices><hostdev mode='subsystem' type='pci'><source>"
     "<address domain='0x0000' bus='0x01' slot='0x00'/></source></hostdev></devices></domain>",
     "<source><address function=...> is missing"),
    ("<domain><devices><hostdev mode='subsystem' type='pci'><source>"
     "<address domain='0x0000' bus='0xzz' slot='0x00' function='0x0'/></source></hostdev>"
     "</devices></domain>", "<source><address bus=...> is '0xzz'"),
    ("<domain><devices><hostdev mode='subsystem' type='pci'><source>"
     "<address domain='0x0000' bus='0x01' slot='0x20' function='0x0'/></source></hostdev>"
     "</devices></domain>", "slot=...> is '0x20'"),
])
def test_devices_from_domain_xml_rejects_bad_xml(xml, words):
    with pytest.raises(HookdError) as exc:
        profile.devices_from_domain_xml(xml, source="domain XML of win10")
    assert exc.value.code == errors.DOMAIN_XML_INVALID
    assert exc.value.message.startswith("domain XML of win10: ")
    assert words in exc.value.message, exc.value.message


def test_devices_from_domain_xml_names_the_hostdev():
    xml = DOMAIN_XML.replace("function='0x1'/>\n      </source>\n      <alias name='hostdev2'/>",
                             "function='0x9'/>\n      </source>\n      <alias name='hostdev2'/>")
    assert xml != DOMAIN_XML
    with pytest.raises(HookdError, match=r"<hostdev mode='subsystem' type='pci'> \(hostdev #3\)"):
        profile.devices_from_domain_xml(xml)


# ---- files: is_managed / load_profile -----------------------------------------------------

@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.setenv("VFIO_HOOKD_CONFIG", str(tmp_path))
    (tmp_path / "vms").mkdir()
    return tmp_path / "vms"


def test_is_managed_exactly_when_the_profile_exists(config):
    assert not profile.is_managed(PATHS(), "win10")
    (config / "win10.yaml").write_text("")
    assert profile.is_managed(PATHS(), "win10")
    assert not profile.is_managed(PATHS(), "win11")
    assert not profile.is_managed(PATHS(), "win10.yaml")


@pytest.mark.parametrize("name", ["", "a/b", "x\0y", ".."])
def test_is_managed_is_false_for_names_that_cannot_name_a_file(config, name):
    assert profile.is_managed(PATHS(), name) is False


def test_dangling_symlink_counts_as_managed_and_fails_loudly(config):
    os.symlink(config / "missing.yaml", config / "win10.yaml")
    assert profile.is_managed(PATHS(), "win10")
    with pytest.raises(HookdError) as exc:
        profile.load_profile(PATHS(), "win10")
    assert exc.value.code == errors.PROFILE_INVALID
    assert "symbolic link" in exc.value.message


def test_load_profile(config):
    path = config / "win10.yaml"
    path.write_text("on_busy: terminate\n")
    p = profile.load_profile(PATHS(), "win10")
    assert p.path == str(path) and p.name == "win10" and p.on_busy == "terminate"


def test_load_profile_errors_name_the_real_file(config):
    path = config / "win10.yaml"
    path.write_text("on_busy: fail\ndevices: ['01:00.0']\n")
    with pytest.raises(HookdError) as exc:
        profile.load_profile(PATHS(), "win10")
    assert exc.value.message.startswith(f"{path}:2: devices[0]: ")


def test_load_profile_of_unmanaged_vm(config):
    with pytest.raises(HookdError) as exc:
        profile.load_profile(PATHS(), "win10")
    assert exc.value.code == errors.NOT_MANAGED
    assert str(config / "win10.yaml") in exc.value.message


def test_load_profile_bad_name(config):
    with pytest.raises(HookdError) as exc:
        profile.load_profile(PATHS(), "a/b")
    assert exc.value.code == errors.VM_NAME_INVALID


def test_load_profile_unreadable(config):
    (config / "win10.yaml").mkdir()
    with pytest.raises(HookdError) as exc:
        profile.load_profile(PATHS(), "win10")
    assert exc.value.code == errors.PROFILE_INVALID
    assert "cannot be read" in exc.value.message


def test_load_profile_not_utf8(config):
    (config / "win10.yaml").write_bytes(b"on_busy: \xff\n")
    with pytest.raises(HookdError) as exc:
        profile.load_profile(PATHS(), "win10")
    assert exc.value.code == errors.PROFILE_INVALID
    assert "not UTF-8" in exc.value.message


def test_importing_profile_does_not_import_yaml_or_xml():
    code = ("import sys, vfio_hookd.profile; "
            "print(sorted(m for m in ('yaml', 'xml.etree.ElementTree', 'difflib') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=30)
    assert out.stdout.strip() == "[]"


def test_importing_the_profile_package_imports_neither_yaml_nor_xml_etree():
    code = ("import vfio_hookd.profile, sys; "
            "print('yaml' in sys.modules, 'xml.etree.ElementTree' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=30)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("module", ["model", "reader", "rules", "files", "domain_xml"])
def test_each_profile_module_imports_alone_and_cheaply(module):
    # Alone in a fresh interpreter: an import cycle between the modules would fail here.
    code = (f"import sys, vfio_hookd.profile.{module}; "
            "print(sorted(m for m in ('yaml', 'xml.etree.ElementTree', 'difflib') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=30)
    assert out.stdout.strip() == "[]"


def test_profile_modules_stay_small():
    for path in (REPO / "vfio_hookd" / "profile").glob("*.py"):
        assert len(path.read_text(encoding="utf-8").splitlines()) < 400, path.name


# ---- the rule table and the reader -------------------------------------------------------

def test_rule_table_is_in_the_documented_order_and_matches_profile():
    assert tuple(r.key for r in rules.RULES) == profile.KEYS
    assert rules.SECTIONS == {"deadlines", "hugepages"}
    assert {r.key: r.keys for r in rules.RULES if r.keys} == {
        "deadlines": tuple(profile.DEFAULT_DEADLINES), "hugepages": ("pages", "size")}
    want = defaults()
    assert rules.defaults() == {k: getattr(want, k) for k in profile.KEYS}


def test_reader_records_lines_of_keys_items_and_section_keys():
    text = ("# comment\n"
            "devices:\n"
            "  - 0000:01:00.0\n"
            "  - '0000:01:00.1'\n"
            "on_busy: fail\n"
            "deadlines:\n"
            "  unbind: 2\n")
    fields = reader.read_yaml(text, FILE, rules.SECTIONS)
    assert [(f.key, f.line) for f in fields] == [("devices", 2), ("on_busy", 5),
                                                 ("deadlines", 6)]
    devices, on_busy, deadlines = fields
    assert devices.item_lines == [3, 4]
    assert devices.item_texts == ["0000:01:00.0", "0000:01:00.1"]
    assert devices.value == [60.0, "0000:01:00.1"]  # YAML 1.1; the rules use the text
    assert on_busy.text == "fail"
    assert [(f.key, f.value, f.line) for f in deadlines.sub] == [("deadlines.unbind", 2, 7)]


def test_reader_gives_a_dict_the_same_structure_without_lines():
    text = "devices: ['0000:01:00.0']\non_busy: fail\ndeadlines: {unbind: 2}\n"
    data = {"devices": ["0000:01:00.0"], "on_busy": "fail", "deadlines": {"unbind": 2}}

    def shape(fields):
        return [(f.name, f.key, f.value, [(s.key, s.value) for s in f.sub or ()])
                for f in fields]

    from_yaml = reader.read_yaml(text, FILE, rules.SECTIONS)
    from_dict = reader.read_data(data, FILE, rules.SECTIONS)
    assert shape(from_yaml) == shape(from_dict)
    assert all(f.line is None and f.item_lines is None for f in from_dict)
    assert rules.build(from_yaml, FILE, "win10") == rules.build(from_dict, FILE, "win10")


def test_reader_keeps_what_the_rules_judge():
    # Unknown, repeated and non-name keys and unreadable values are kept for the rules.
    text = "on_bsy: x\non_bsy: y\n1: 2\ndevices: !!python/object/apply:os.system [true]\n"
    fields = reader.read_yaml(text, FILE, rules.SECTIONS)
    assert [(f.name, f.shown, f.line) for f in fields] == [
        ("on_bsy", "on_bsy", 1), ("on_bsy", "on_bsy", 2), (None, "1", 3),
        ("devices", "devices", 4)]
    assert fields[3].problem and fields[3].problem_line == 4 and fields[3].value is None
