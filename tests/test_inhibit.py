"""The inhibit step (a logind ``block`` inhibitor lock while the VM holds the GPU), fast tier:
the in-process fake logind (:mod:`testbed.fake_logind`, locks of :mod:`testbed.sim.inhibitors`:
a real pipe per lock, listed while the descriptor is open) on the simulated desktops; the
profile key; the daemon-start retake from the records; status and plan. Over D-Bus and with
the daemon as a process: tests/test_inhibit_bus.py."""

from __future__ import annotations

import os

import pytest

from conftest import SimWorld, diff
from test_desktop import audio_up
from testbed.sim import faults
from vfio_hookd import errors, plan_view
from vfio_hookd.errors import HookdError
from vfio_hookd.steps import BY_NAME, STEP_NAMES, Context
from vfio_hookd.steps.inhibit import WHO, retake_all

pytestmark = pytest.mark.unit
STEP = BY_NAME["inhibit"]


@pytest.fixture
def desk(dirs):
    """The LightDM desktop host (logind runs), its audio servers up."""
    w = SimWorld(dirs, "desktop-x11")
    audio_up(w, timeout_s=30)   # the machine may be loaded
    yield w
    w.close()


def locks(world) -> list[tuple]:
    """``(what, who, mode, pid)`` of every lock logind lists now."""
    return [(i.what, i.who, i.mode, i.pid) for i in world.logind.inhibitors()]


def state(world) -> dict:
    """The host as a test compares it: the tree, the units and logind's locks."""
    return dict(world.snapshot(), locks=locks(world))


def same(before: dict, after: dict) -> None:
    """Assert two :func:`state` s are equal, naming the tree's paths that differ."""
    assert diff(before["tree"], after["tree"]) == {}
    assert after == before


def _ctx(world, vm="win11") -> Context:
    plan = world.machine.plan_prepare(vm, None)
    return Context(vm=vm, host=world.host, profile=plan.profile, deadlines=plan.deadlines,
                   devices=plan.devices, drivers=plan.drivers, systemd=lambda: world.systemd,
                   logind=lambda: world.logind, inhibitors=world.machine.inhibitors)


def test_the_step_is_first_in_prepare_order():
    assert STEP_NAMES[0] == "inhibit"


@pytest.mark.parametrize("text,what", [("sleep", "sleep"), ("[sleep, idle]", "sleep:idle"),
                                       ("[idle, sleep]", "sleep:idle"), ("idle", "idle")])
def test_observe_apply_undo_leaves_the_host_identical(desk, text, what):
    desk.profile(extra=f"inhibit: {text}\n")
    ctx = _ctx(desk)
    before = state(desk)
    assert before["locks"] == []
    facts = STEP.observe(ctx)
    assert facts["plan"] == [{"what": what, "who": WHO, "mode": "block",
                              "why": facts["plan"][0]["why"]}]
    assert "VM win11 holds the GPU (0000:01:00.0, 0000:01:00.1)" in facts["plan"][0]["why"]
    same(before, state(desk))                      # observe changes nothing
    STEP.apply(ctx, facts)
    assert locks(desk) == [(what, WHO, "block", os.getpid())]
    fd = desk.machine.inhibitors.get("win11").fd
    assert not os.get_inheritable(fd)             # no child process keeps the lock alive
    assert facts["pid"] == os.getpid() and facts["since"].endswith("Z")
    assert STEP.undo(ctx, facts) == []
    same(before, state(desk))                      # ListInhibitors empty again
    with pytest.raises(OSError):                   # the descriptor is closed, not leaked
        os.fstat(fd)


def test_off_by_default_records_nothing(desk):
    desk.profile()
    rec = desk.machine.prepare("win11")
    entry = rec.step("inhibit")
    assert entry.status == "done"
    assert entry.facts == {"plan": [], "done": [], "skipped": ["inhibit: none in the profile"]}
    assert locks(desk) == []
    st = desk.machine.status("win11")["vms"]["win11"]
    assert st["inhibitor"] is None
    assert desk.machine.release("win11").step("inhibit").notes == []
    assert plan_view.document(desk.machine, desk.machine.plan_prepare("win11"))["steps"][0] \
        == {"name": "inhibit", "facts": {"plan": [], "skipped": ["inhibit: none in the profile"]}}


def test_prepare_holds_the_lock_until_release(desk):
    desk.profile(extra="inhibit: sleep\n")
    before = state(desk)
    rec = desk.machine.prepare("win11")
    assert locks(desk) == [("sleep", WHO, "block", os.getpid())]
    assert rec.step("inhibit").facts["done"][0]["what"] == "sleep"
    st = desk.machine.status("win11")["vms"]["win11"]["inhibitor"]
    assert st["what"] == "sleep" and st["mode"] == "block" and st["held"] is True
    assert st["error"] is None and st["since"] == rec.step("inhibit").facts["since"]
    rec = desk.machine.release("win11")
    assert rec.step("inhibit").status == "undone" and rec.step("inhibit").notes == []
    assert locks(desk) == []
    assert desk.machine.status("win11")["vms"]["win11"]["inhibitor"] is None
    after = state(desk)
    assert after["units"] == before["units"] and after["locks"] == before["locks"]


@pytest.mark.parametrize("op,target,step", [("stop", "lightdm.service", "units"),
                                            ("rmmod", "nvidia", "modules")])
def test_a_later_step_that_fails_rolls_the_lock_back(desk, op, target, step):
    desk.profile(extra="inhibit: [sleep, idle]\n")
    faults.inject(desk.root, op, target, "fail", errno=5, count=1)
    with pytest.raises(HookdError) as exc:
        desk.machine.prepare("win11")
    assert f"step {step}" in exc.value.message
    rec = desk.machine.records.load("win11")
    assert rec.step("inhibit").status == "undone"
    assert locks(desk) == []
    assert desk.machine.inhibitors.get("win11") is None


def test_logind_refusing_the_lock_fails_the_prepare_and_changes_nothing(desk):
    desk.profile(extra="inhibit: sleep\n")
    before = state(desk)
    faults.inject(desk.root, "inhibit", "sleep", "fail", count=1)
    with pytest.raises(HookdError) as exc:
        desk.machine.prepare("win11")
    assert exc.value.code == errors.INHIBIT_FAILED
    assert exc.value.exit_status == 35
    assert exc.value.message.startswith("step inhibit: systemd-logind did not give the sleep "
                                        "inhibitor lock (mode block): Access denied")
    rec = desk.machine.records.load("win11")
    assert rec.phase == "failed" and rec.step("inhibit").status == "failed"
    assert rec.step("inhibit").notes == []     # never taken: nothing to say about closing it
    assert all(s.status == "pending" for s in rec.steps[1:])
    same(before, state(desk))


def test_no_logind_fails_the_prepare_with_inhibit_failed(world):
    """The NVIDIA host without a desktop has no logind at all."""
    world.profile(extra="inhibit: sleep\n")
    before = world.snapshot()
    with pytest.raises(HookdError) as exc:
        world.machine.prepare("win11")
    assert exc.value.code == errors.INHIBIT_FAILED
    assert "systemd-logind is not running" in exc.value.message
    assert "set inhibit: none" in exc.value.message
    assert world.snapshot() == before


def test_a_new_daemon_takes_the_lock_again_and_releases_it(desk):
    """A daemon restart: the old process's descriptors close with it (logind drops the
    lock); the new one takes it again from the record, and its release closes it."""
    from vfio_hookd.machine import Machine
    desk.profile(extra="inhibit: sleep\n")
    rec = desk.machine.prepare("win11")
    desk.machine.inhibitors.close_all()           # the old daemon ends
    assert locks(desk) == []
    st = desk.machine.status("win11")["vms"]["win11"]["inhibitor"]
    assert st["held"] is False and st["error"] is None
    new = Machine(desk.host, desk.paths, lambda: desk.fake, logind_factory=lambda: desk.logind)
    import logging
    assert retake_all(new, logging.getLogger("test")) == {"win11": None}
    assert locks(desk) == [("sleep", WHO, "block", os.getpid())]
    st = new.status("win11")["vms"]["win11"]["inhibitor"]
    assert st["held"] is True and st["why"] == rec.step("inhibit").facts["done"][0]["why"]
    assert new.release("win11").step("inhibit").notes == []
    assert locks(desk) == []


def test_a_failed_retake_is_shown_not_fatal(desk):
    import logging
    from vfio_hookd.machine import Machine
    desk.profile(extra="inhibit: sleep\n")
    desk.machine.prepare("win11")
    desk.machine.inhibitors.close_all()
    new = Machine(desk.host, desk.paths, lambda: desk.fake, logind_factory=lambda: desk.logind)
    faults.inject(desk.root, "inhibit", "sleep", "fail", count=1)
    got = retake_all(new, logging.getLogger("test"))
    assert got["win11"].startswith("INHIBIT_FAILED: systemd-logind did not give the sleep")
    st = new.status("win11")["vms"]["win11"]["inhibitor"]
    assert st["held"] is False and st["error"] == got["win11"]
    # release from the record alone: the lock this process never held is a no-op with a note
    rec = new.release("win11")
    assert rec.phase == "idle"
    note, = rec.step("inhibit").notes
    assert "not held by this process" in note and "nothing to close" in note


def test_only_prepared_records_are_taken_again(desk):
    import logging
    desk.profile(extra="inhibit: sleep\n")
    desk.machine.prepare("win11")
    desk.machine.release("win11")
    assert retake_all(desk.machine, logging.getLogger("test")) == {}
    assert locks(desk) == []


def test_plan_says_the_lock_will_be_taken(desk):
    desk.profile(extra="inhibit: [sleep, idle]\n")
    plan = desk.machine.plan_prepare("win11")
    doc = plan_view.document(desk.machine, plan)
    assert doc["steps"][0]["name"] == "inhibit"
    lines = plan_view.render(doc)
    i = lines.index("  step inhibit")
    assert lines[i + 1].startswith("    plan: what=sleep:idle, who=vfio-hookd, why=VM win11 "
                                   "holds the GPU")
    assert lines[i + 1].endswith("mode=block")
    assert lines[i + 2] == "    why: sleep:idle (block): inhibit in the profile"
    assert locks(desk) == []                       # plan takes nothing
    # the deadline counts the one Inhibit call (10 s) only when the profile asks for it
    desk.profile(extra="inhibit: none\n")
    assert plan.deadline_s - desk.machine.plan_prepare("win11").deadline_s == 10.0


def test_cli_status_shows_the_lock(desk, capsys):
    from vfio_hookd import cli
    desk.profile(extra="inhibit: sleep\n")
    desk.machine.prepare("win11")
    cli.cmd_status(type("A", (), {"vm": "win11", "json": False})(), cli.Env(desk.paths,
                                                                          desk.host))
    out = capsys.readouterr().out
    assert "  inhibitor sleep (block) since " in out
    assert "the daemon that took it is not running (it takes it again when it starts)" in out
    desk.machine.release("win11")


def test_the_record_alone_releases_it(desk):
    """Release reads the record, not today's profile: a profile turned to none meanwhile
    still has the lock closed."""
    desk.profile(extra="inhibit: sleep\n")
    desk.machine.prepare("win11")
    desk.profile(extra="inhibit: none\n")
    desk.machine.release("win11")
    assert locks(desk) == []


@pytest.mark.parametrize("text,want", [
    ("inhibit: none", ()), ("inhibit: sleep", ("sleep",)), ("inhibit: idle", ("idle",)),
    ("inhibit: [sleep]", ("sleep",)), ("inhibit: [idle, sleep]", ("sleep", "idle")),
    ("inhibit:\n  - sleep\n  - idle", ("sleep", "idle")), ("", ()),
])
def test_the_profile_key(text, want):
    from vfio_hookd import profile
    p = profile.parse_profile(f"devices: ['0000:01:00.0']\n{text}\n", "/p.yaml", "vm")
    assert p.inhibit == want
    assert profile.profile_from_dict(p.to_dict()) == p          # the record's copy reads back
    assert p.to_dict()["inhibit"] == (list(want) if want else "none")


@pytest.mark.parametrize("text,message", [
    ("inhibit: true", "/p.yaml:2: inhibit: must be 'none', 'sleep', 'idle' or a list of them, "
                      "got bool: write 'sleep'"),
    ("inhibit: sleep:idle", "/p.yaml:2: inhibit: write the lock types as a list: "
                            "inhibit: [sleep, idle]"),
    ("inhibit: slep", "/p.yaml:2: inhibit: must be 'none', 'sleep', 'idle' or a list of them, "
                      "got 'slep' (did you mean 'sleep'?)"),
    ("inhibit: []", "/p.yaml:2: inhibit: empty list: write 'none' to take no inhibitor lock, "
                    "or [sleep]"),
    ("inhibit: 3", "/p.yaml:2: inhibit: must be 'none', 'sleep', 'idle' or a list of them, "
                   "got int"),
    ("inhibit:\n  - sleep\n  - shutdown", "/p.yaml:4: inhibit[1]: 'shutdown' is not taken: a "
                                          "shutdown stops the VM (libvirt-guests) and its "
                                          "release gives the GPU back; the lock types are "
                                          "'sleep' and 'idle'"),
    ("inhibit: [sleep, sleep]", "/p.yaml:2: inhibit[1]: duplicate lock type 'sleep' (also "
                                "inhibit[0])"),
    ("inhibit: [5]", "/p.yaml:2: inhibit[0]: must be 'sleep' or 'idle', got int"),
])
def test_a_bad_profile_key_names_file_line_and_key(text, message):
    from vfio_hookd import profile
    with pytest.raises(HookdError) as exc:
        profile.parse_profile(f"devices: ['0000:01:00.0']\n{text}\n", "/p.yaml", "vm")
    assert exc.value.code == errors.PROFILE_INVALID
    assert exc.value.message == message
