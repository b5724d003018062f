"""Every input is bounded (issue 9): each limit accepted at the limit and refused one past it,
with the error code and a message naming the limit. Profiles, domain XML, and the daemon's
requests (read and dispatched in this process: no daemon process)."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading

import pytest

from vfio_hookd import daemon as daemon_mod
from vfio_hookd import server as server_mod
from vfio_hookd import errors, profile
from vfio_hookd.errors import HookdError
from vfio_hookd.paths import MAX_VM_NAME_BYTES
from vfio_hookd.profile.domain_xml import MAX_DOMAIN_XML_BYTES
from vfio_hookd.profile.model import MAX_LIST_ITEMS, MAX_PROFILE_BYTES

from conftest import write_profile

pytestmark = pytest.mark.unit
FILE = "/etc/vfio-hookd/vms/win10.yaml"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def refused(fn, *args, code=errors.PROFILE_INVALID) -> HookdError:
    with pytest.raises(HookdError) as exc:
        fn(*args)
    assert exc.value.code == code, exc.value
    return exc.value


# ---- profile size -----------------------------------------------------------------------------

def padded(size: int, body: str = "on_busy: terminate\n") -> str:
    """A valid profile of exactly ``size`` bytes: ``body`` then a comment filling the rest."""
    pad = size - len(body.encode()) - 3
    return body + "#" + "c" * pad + "\n\n"


def test_a_profile_of_exactly_the_limit_is_read(paths):
    text = padded(MAX_PROFILE_BYTES)
    assert len(text.encode()) == MAX_PROFILE_BYTES
    assert profile.parse_profile(text, FILE, "win10").on_busy == "terminate"
    path = paths.profile_path("win10")
    with open(path, "w") as f:
        f.write(text)
    assert profile.load_profile(paths, "win10").on_busy == "terminate"


def test_a_profile_one_byte_over_the_limit_is_refused_by_size(paths):
    text = padded(MAX_PROFILE_BYTES + 1)
    err = refused(profile.parse_profile, text, FILE, "win10")
    assert err.message.startswith(f"{FILE}: is larger than {MAX_PROFILE_BYTES} bytes (64 KiB)")
    path = paths.profile_path("win10")
    with open(path, "w") as f:
        f.write(text)
    err = refused(profile.load_profile, paths, "win10")
    assert err.message.startswith(f"{path}: is larger than {MAX_PROFILE_BYTES} bytes")


def test_a_huge_profile_is_refused_without_reading_it_all(paths, monkeypatch):
    path = paths.profile_path("win10")
    with open(path, "wb") as f:
        f.truncate(1 << 30)   # 1 GiB, sparse: reading it whole would be the bug
    reads = []
    from vfio_hookd.profile import files
    real_open = files.open_trusted

    def spy_open(p, *a, **kw):   # profiles are opened by trust.open_trusted
        f = real_open(p, *a, **kw)
        if p == path:
            real_read = f.read
            f.read = lambda n=-1: reads.append(n) or real_read(n)
        return f

    monkeypatch.setattr(files, "open_trusted", spy_open)
    refused(profile.load_profile, paths, "win10")
    assert reads == [MAX_PROFILE_BYTES + 1]


def test_the_size_limit_counts_utf8_bytes():
    body = "# " + "é" * (MAX_PROFILE_BYTES // 2) + "\n"   # fewer characters than bytes
    assert len(body) <= MAX_PROFILE_BYTES < len(body.encode())
    refused(profile.parse_profile, body, FILE, "win10")


# ---- profile lists ------------------------------------------------------------------------------

def addresses(n: int) -> list[str]:
    return [f"0000:{i // 256:02x}:{i // 8 % 32:02x}.{i % 8}" for i in range(n)]


LISTS = {
    "devices": lambda n: addresses(n),
    "stop_units": lambda n: [f"unit{i}.service" for i in range(n)],
    "modules": lambda n: [f"mod{i}" for i in range(n)],
}


def yaml_list(key: str, items: list[str]) -> str:
    return "on_busy: fail\n" + f"{key}:\n" + "".join(f"  - '{x}'\n" for x in items)


@pytest.mark.parametrize("key", LISTS)
def test_a_list_of_exactly_the_limit_is_read(key):
    items = LISTS[key](MAX_LIST_ITEMS)
    got = getattr(profile.parse_profile(yaml_list(key, items), FILE, "win10"), key)
    assert list(got) == items and len(got) == MAX_LIST_ITEMS


@pytest.mark.parametrize("key", LISTS)
def test_a_list_one_past_the_limit_is_refused_at_its_line(key):
    items = LISTS[key](MAX_LIST_ITEMS + 1)
    err = refused(profile.parse_profile, yaml_list(key, items), FILE, "win10")
    assert err.message == (f"{FILE}:2: {key}: has more than {MAX_LIST_ITEMS} items (the "
                           f"{MAX_LIST_ITEMS + 1}th at line {MAX_LIST_ITEMS + 3}); a profile "
                           f"list may have at most {MAX_LIST_ITEMS}")
    assert err.details == {"file": FILE, "line": 2, "key": key}


@pytest.mark.parametrize("case", ["flow", "block", "nested", "section", "in-a-list"])
def test_a_long_list_is_refused_while_parsing_before_its_nodes_are_built(case, monkeypatch):
    """A 64 KiB profile holding a list of ~21 000 items is refused at the 65th item: no YAML
    node of it is composed (pyyaml's composer is never called) and the parser stops there."""
    import yaml
    n = 21_000
    text, key, line = {
        "flow": ("modules: [" + "a, " * n + "a]\n", "modules", 1),
        "block": ("on_busy: fail\nstop_units:\n" + "- a\n" * 16_000, "stop_units", 2),
        "nested": ("devices: [[" + "a," * n + "a]]\n", "devices[0]", 1),
        "section": ("deadlines:\n  unbind: [" + "1," * n + "1]\n", "deadlines.unbind", 2),
        "in-a-list": ("devices:\n  - [a, b]\n  - [" + "a," * n + "a]\n", "devices[1]", 3),
    }[case]
    assert len(text.encode()) <= MAX_PROFILE_BYTES
    cls = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    counts = {"events": 0, "composed": 0}

    class Loader(cls):
        def get_event(self):
            counts["events"] += 1
            return super().get_event()

        def get_single_node(self):
            counts["composed"] += 1
            return super().get_single_node()
    monkeypatch.setattr(yaml, cls.__name__, Loader)
    err = refused(profile.parse_profile, text, FILE, "win10")
    assert err.details == {"file": FILE, "line": line, "key": key}
    assert f"{FILE}:{line}: {key}: has more than {MAX_LIST_ITEMS} items" in err.message
    assert counts["composed"] == 0
    assert counts["events"] < 4 * MAX_LIST_ITEMS


def test_a_document_of_many_small_nodes_is_refused_while_parsing(monkeypatch):
    """Lists of at most 64 items each, nested (64 lists of 64), or thousands of keys: more
    nodes than any profile needs is refused at the first node too many, before composing."""
    from vfio_hookd.profile import reader
    many_lists = "devices: [" + ", ".join(["[" + "a," * 63 + "a]"] * 64) + "]\n"
    many_keys = "".join(f"k{i}: 1\n" for i in range(5000))
    for text in (many_lists, many_keys):
        assert len(text.encode()) <= MAX_PROFILE_BYTES
        err = refused(profile.parse_profile, text, FILE, "win10")
        assert f"the profile has more than {reader.MAX_NODES} values" in err.message
        assert err.details["key"] is None and err.details["line"] >= 1


def test_the_largest_allowed_profile_fits_the_node_bound():
    """Every list full with the keys of today stays far below MAX_NODES."""
    sys.path.insert(0, os.path.join(REPO, "bench"))
    from profile_limits import largest_profile
    prof = profile.parse_profile(largest_profile(), FILE, "win10")
    assert len(prof.devices) == len(prof.stop_units) == len(prof.modules) == MAX_LIST_ITEMS


@pytest.mark.parametrize("key", LISTS)
def test_a_list_from_a_record_is_bounded_too(key):
    data = {"name": "win10", "path": FILE, key: LISTS[key](MAX_LIST_ITEMS + 1)}
    err = refused(profile.profile_from_dict, data)
    assert f"at most {MAX_LIST_ITEMS}" in err.message


def test_a_duplicate_is_still_named_with_its_first_index():
    items = addresses(MAX_LIST_ITEMS - 1) + ["0000:00:01.2"]
    err = refused(profile.parse_profile, yaml_list("devices", items), FILE, "win10")
    assert "duplicate PCI address '0000:00:01.2' (also devices[10])" in err.message


def test_a_long_value_is_cut_in_the_message():
    err = refused(profile.parse_profile, "on_busy: " + "x" * 60000 + "\n", FILE, "win10")
    assert len(err.message) < 700 and "more characters" in err.message


# ---- domain XML --------------------------------------------------------------------------------

HOSTDEV = ("<devices><hostdev mode='subsystem' type='pci'><source>"
           "<address domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>"
           "</source></hostdev></devices>")


def domain_of(size: int) -> str:
    head = f"<domain type='kvm'>{HOSTDEV}<!--"
    tail = "--></domain>"
    return head + "x" * (size - len(head) - len(tail)) + tail


def test_domain_xml_of_exactly_the_limit_is_read():
    xml = domain_of(MAX_DOMAIN_XML_BYTES)
    assert len(xml.encode()) == MAX_DOMAIN_XML_BYTES
    assert profile.devices_from_domain_xml(xml) == ("0000:01:00.0",)


def test_domain_xml_one_byte_over_the_limit_is_refused():
    err = refused(profile.devices_from_domain_xml, domain_of(MAX_DOMAIN_XML_BYTES + 1),
                  code=errors.DOMAIN_XML_INVALID)
    assert f"larger than {MAX_DOMAIN_XML_BYTES} bytes (1 MiB)" in err.message


BOMB = """<?xml version="1.0"?>
<!DOCTYPE domain [
 <!ENTITY a "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa">
 <!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">
 <!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">
 <!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">
 <!ENTITY e "&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;">
 <!ENTITY f "&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;">
 <!ENTITY g "&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;">
]>
<domain><name>&g;</name></domain>
"""


@pytest.mark.parametrize("xml", [
    BOMB,
    '<!DOCTYPE domain SYSTEM "file:///etc/passwd"><domain/>',
    '<!DOCTYPE domain [<!ENTITY x SYSTEM "file:///etc/passwd">]><domain>&x;</domain>',
    "<!DOCTYPE domain><domain/>",
], ids=["entity-bomb", "external-dtd", "external-entity", "bare-doctype"])
def test_domain_xml_with_a_dtd_is_refused_unread(xml):
    err = refused(profile.devices_from_domain_xml, xml, code=errors.DOMAIN_XML_INVALID)
    assert "DTD or entity declarations" in err.message


def test_domain_xml_with_many_duplicate_hostdevs_keeps_one():
    one = HOSTDEV[len("<devices>"):-len("</devices>")]
    xml = "<domain><devices>" + one * 5000 + "</devices></domain>"
    assert profile.devices_from_domain_xml(xml) == ("0000:01:00.0",)


# ---- requests --------------------------------------------------------------------------------

@pytest.fixture
def served(world):
    """An in-process :class:`~vfio_hookd.daemon.Daemon` on the simulated host (not bound)."""
    world.profile("win11")
    return daemon_mod.Daemon(world.host, world.paths, world.machine)


def ask(d, req: dict) -> HookdError | dict:
    try:
        return d.dispatch(server_mod.parse_request(json.dumps(req).encode()))
    except HookdError as exc:
        return exc


def nested(depth: int) -> dict:
    v: object = 1
    for _ in range(depth - 1):
        v = [v]
    return {"op": "ping", "extra": v}


def test_request_nesting_at_the_limit_is_read():
    req = server_mod.parse_request(json.dumps(nested(server_mod.MAX_JSON_DEPTH)).encode())
    assert req["op"] == "ping"


@pytest.mark.parametrize("depth", [server_mod.MAX_JSON_DEPTH + 1, 100_000])
def test_request_nesting_past_the_limit_is_a_bad_request(depth):
    line = b'{"op": "ping", "x": ' + b"[" * depth + b"]" * depth + b"}"
    err = refused(server_mod.parse_request, line, code=errors.BAD_REQUEST)
    assert f"deeper than {server_mod.MAX_JSON_DEPTH} levels" in err.message


def test_vm_name_at_the_limit_passes_the_name_check(served):
    name = "é" * (MAX_VM_NAME_BYTES // 2)
    assert ask(served, {"op": "prepare", "vm": name}).code == errors.NOT_MANAGED
    err = ask(served, {"op": "prepare", "vm": name + "x"})
    assert err.code == errors.VM_NAME_INVALID and str(MAX_VM_NAME_BYTES) in err.message


def test_a_long_bad_vm_name_is_cut_in_the_message(served):
    err = ask(served, {"op": "status", "vm": "a/" + "b" * 100_000})
    assert err.code == errors.VM_NAME_INVALID and len(err.message) < 300


def test_xml_at_the_limit_passes_and_one_past_is_refused(served):
    xml = domain_of(MAX_DOMAIN_XML_BYTES)
    assert ask(served, {"op": "prepare", "vm": "nobody", "xml": xml}).code == errors.NOT_MANAGED
    err = ask(served, {"op": "prepare", "vm": "nobody", "xml": xml + " "})
    assert err.code == errors.DOMAIN_XML_INVALID and "1 MiB" in err.message


def test_reason_at_the_limit_passes_and_one_past_is_refused(served, world):
    before = world.snapshot()
    reason = "r" * daemon_mod.MAX_REASON_CHARS
    assert ask(served, {"op": "release", "vm": "win11", "reason": reason}) == \
        {"vm": "win11", "phase": "idle"}
    err = ask(served, {"op": "release", "vm": "win11", "reason": reason + "r"})
    assert err.code == errors.BAD_REQUEST and "'reason'" in err.message
    assert world.snapshot() == before


@pytest.mark.parametrize("req,field", [
    ({"op": "prepare", "vm": 5}, "vm"),
    ({"op": "prepare", "vm": ["win11"]}, "vm"),
    ({"op": "release"}, "vm"),
    ({"op": "status", "vm": {}}, "vm"),
    ({"op": "prepare", "vm": "win11", "xml": ["<domain/>"]}, "xml"),
    ({"op": "release", "vm": "win11", "reason": 1.5}, "reason"),
    ({"op": "release", "vm": "win11", "reason": "a\nb"}, "reason"),
])
def test_a_field_of_the_wrong_type_is_a_bad_request_naming_it(served, world, req, field):
    before = world.snapshot()
    err = ask(served, req)
    assert err.code == errors.BAD_REQUEST and f"field {field!r}" in err.message
    assert world.snapshot() == before


def test_a_request_one_byte_over_the_limit_is_refused(world):
    a, b = socket.socketpair()
    line = b'{"op": "ping", "pad": "' + b"x" * server_mod.MAX_REQUEST + b'"}\n'
    t = threading.Thread(target=lambda: (a.sendall(line), a.close()), daemon=True)
    t.start()
    try:
        err = refused(daemon_mod.Daemon(world.host, world.paths, world.machine)._read_request, b, code=errors.BAD_REQUEST)
        assert f"larger than {server_mod.MAX_REQUEST} bytes" in err.message
    finally:
        b.close()
        t.join(10)


def test_a_request_of_exactly_the_limit_is_read(world):
    a, b = socket.socketpair()
    head, tail = b'{"op": "ping", "pad": "', b'"}'
    line = head + b"x" * (server_mod.MAX_REQUEST - len(head) - len(tail) - 1) + tail + b"\n"
    assert len(line) == server_mod.MAX_REQUEST
    t = threading.Thread(target=lambda: (a.sendall(line), a.close()), daemon=True)
    t.start()
    try:
        assert daemon_mod.Daemon(world.host, world.paths, world.machine)._read_request(b)["op"] == "ping"
    finally:
        b.close()
        t.join(10)
