"""Property tests (hypothesis) of the three readers of outside input (issue 9): whatever comes
in, the answer is a result or the reader's own error code, never an exception escaping and
never ``INTERNAL``; a refused request leaves the simulated host untouched.

Deterministic for CI: ``derandomize=True`` (examples derived from the test itself) and no
example database; the counts (``max_examples``) keep the whole file well under 30 s.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from vfio_hookd import daemon as daemon_mod
from vfio_hookd import errors, profile
from vfio_hookd.errors import HookdError
from vfio_hookd.profile.model import KEYS

pytestmark = pytest.mark.unit

# hypothesis keeps a Unicode table cache in its home directory: outside the checkout
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "vfio-hookd-hypothesis"))

#: Generated inputs per property (the total is reported by the suite's summary).
EXAMPLES = {"request_bytes": 150, "request_json": 300, "profile_text": 400,
            "profile_data": 400, "xml_text": 300, "xml_tree": 400}


def _settings(name: str):
    return settings(max_examples=EXAMPLES[name], derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow, HealthCheck.data_too_large])


SCALARS = (st.none() | st.booleans() | st.integers() | st.floats()
           | st.text(max_size=12) | st.sampled_from(["auto", "none", "fail", "0000:01:00.0"]))
JSON = st.recursive(SCALARS, lambda c: st.lists(c, max_size=4)
                    | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=24)
NAMES = st.sampled_from(["win11", "nobody", "a/b", "", ".", "..", "x\0y", "é" * 126,
                         "y" * 251]) | st.text(max_size=20)


# ---- requests: read + dispatch on a Daemon over the simulated host ------------------------------

def _xmls():
    return st.sampled_from([
        "<domain/>", "not xml", "<!DOCTYPE d [<!ENTITY a 'b'>]><domain>&a;</domain>",
        "<domain><devices><hostdev type='pci'><source><address domain='0' bus='0x01' "
        "slot='0' function='7'/></source></hostdev></devices></domain>"]) | st.text(max_size=40)


REQUESTS = st.fixed_dictionaries(
    {"op": st.sampled_from(["prepare", "release", "status", "ping", "boom"]) | JSON},
    optional={"vm": NAMES | JSON, "xml": _xmls() | JSON, "reason": st.text(max_size=300) | JSON})


@pytest.fixture
def served(world):
    """The daemon of the simulated host; ``win11`` has a profile taking ``devices: auto``, so
    that a prepare depends on the request's domain XML."""
    from conftest import write_profile
    write_profile(world.dirs, "win11", "devices: auto\nstop_units: [nvidia-persistenced.service]\n")
    d = daemon_mod.Daemon(world.host, world.paths, world.machine)
    return d, world, world.snapshot()


def _handle(d, data: bytes) -> dict:
    """Feed ``data`` to the daemon's real connection handler; return its final answer."""
    client, conn = socket.socketpair()
    try:
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        with d._busy_cv:
            d._busy += 1      # as serve_forever counts it
        d._handle(conn)       # reads, dispatches, answers, closes conn
        lines = client.makefile("rb").read().splitlines()
    finally:
        client.close()
    answers = [json.loads(x) for x in lines]
    assert all("accepted" in a for a in answers[:-1])
    return answers[-1]


def _check_answer(served, answer: dict) -> None:
    d, world, before = served
    if answer["ok"]:
        if world.snapshot() != before:   # a prepare that worked: give the host back
            world.machine.release("win11", "test")
            assert world.snapshot() == before
        return
    assert answer["error"]["code"] != errors.INTERNAL, answer
    assert answer["error"]["code"] in errors.CODES
    assert world.snapshot() == before, answer


@_settings("request_bytes")
@given(data=st.binary(max_size=200) | st.builds(lambda b: b + b"\n", st.binary(max_size=200)))
def test_any_bytes_as_a_request_are_answered_never_internal(served, data):
    _check_answer(served, _handle(served[0], data))


@_settings("request_json")
@given(req=REQUESTS | JSON, deep=st.integers(0, 40))
def test_any_json_request_is_answered_never_internal(served, req, deep):
    for _ in range(deep if deep > 30 else 0):   # now and then: nested past the limit
        req = [req]
    _check_answer(served, _handle(served[0], json.dumps(req).encode() + b"\n"))


# ---- profiles ---------------------------------------------------------------------------------

def _tokens(tokens, max_size: int):
    """Text made of ``tokens`` (strings of any length)."""
    return st.lists(st.sampled_from(tokens), max_size=max_size).map("".join)


YAMLISH = _tokens(list("abdelmnorstuv0159:.-_ \n\t[]{},'\"#&*!|>@%~?") + list(KEYS)
                  + ["\n  - ", ": ", "0000:01:00.0", "&a ", "*a", "!!python/name:os", "<<: "],
                  60)


def _parse(text: str):
    try:
        return profile.parse_profile(text, "/p/vm.yaml", "vm")
    except HookdError as exc:
        assert exc.code == errors.PROFILE_INVALID, exc
        assert exc.message.startswith("/p/vm.yaml"), exc
        return exc


@_settings("profile_text")
@given(text=YAMLISH | st.text(max_size=80))
def test_any_text_as_a_profile_is_a_profile_or_profile_invalid(text):
    _parse(text)


PROFILE_DATA = st.dictionaries(
    st.sampled_from(KEYS + ("deadlines.x", "on_bsy")) | st.integers() | st.booleans()
    | st.text(max_size=8),
    JSON | st.lists(st.sampled_from(["0000:01:00.0", "0000:01:00.1", "gdm.service", "nvidia",
                                     "nvidia-drm", "a.service", "i915", "x y"]), max_size=70)
    | st.dictionaries(st.sampled_from(["unbind", "terminate", "bogus"]), SCALARS, max_size=3),
    max_size=6)


@_settings("profile_data")
@given(data=PROFILE_DATA, flow=st.booleans())
def test_any_structure_dumped_to_yaml_is_a_profile_or_profile_invalid(data, flow):
    try:
        text = yaml.safe_dump(data, default_flow_style=flow, allow_unicode=True)
    except yaml.YAMLError:
        return
    _parse(text)
    try:
        profile.profile_from_dict({"name": "vm", "path": "/p/vm.yaml", **data})
    except HookdError as exc:
        assert exc.code == errors.PROFILE_INVALID, exc


# ---- domain XML --------------------------------------------------------------------------------

ADDRESS = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[01][0-9a-f]\.[0-7]")


def _devices(xml: str):
    try:
        got = profile.devices_from_domain_xml(xml)
    except HookdError as exc:
        assert exc.code == errors.DOMAIN_XML_INVALID, exc
        return exc
    assert isinstance(got, tuple) and all(ADDRESS.fullmatch(a) for a in got), got
    assert len(set(got)) == len(got)
    return got


@_settings("xml_text")
@given(xml=_tokens(list("<>/='\"&;!?- domainhostdevsurcpi0x1")
                  + ["<!DOCTYPE", "<!ENTITY", "<?xml", "]>", "<domain>", "<hostdev "], 80)
       | st.text(max_size=80))
def test_any_text_as_domain_xml_is_addresses_or_domain_xml_invalid(xml):
    _devices(xml)


ATTR_VALUES = st.sampled_from(["0x0000", "0x01", "0", "07", "08", "0x1f", "0x20", "9", "-1",
                               "0x", "", "pci", "usb", "subsystem", "capabilities"]) \
    | st.text(max_size=6)
TAGS = st.sampled_from(["domain", "devices", "hostdev", "source", "address", "name"])


def _element(children):
    return st.builds(
        lambda tag, attrs, kids, text: (tag, attrs, kids, text), TAGS,
        st.dictionaries(st.sampled_from(["mode", "type", "domain", "bus", "slot", "function"]),
                        ATTR_VALUES, max_size=6),
        st.lists(children, max_size=4), st.text(max_size=5))


def _render(node) -> str:
    from xml.sax.saxutils import escape, quoteattr
    if isinstance(node, str):
        return escape(node)
    tag, attrs, kids, text = node
    attr = "".join(f" {k}={quoteattr(v)}" for k, v in attrs.items())
    return f"<{tag}{attr}>{escape(text)}{''.join(_render(k) for k in kids)}</{tag}>"


XML_TREES = st.recursive(st.text(max_size=4), _element, max_leaves=30)


@_settings("xml_tree")
@given(tree=XML_TREES, wrap=st.booleans())
def test_any_element_tree_as_domain_xml_is_addresses_or_domain_xml_invalid(tree, wrap):
    xml = _render(tree)
    _devices(f"<domain><devices>{xml}</devices></domain>" if wrap else xml)
