"""The hugepages step on the simulated host's pools (testbed.sim.hugepages): allocate what the
VM misses, give back a short allocation, free exactly what this VM added, from the record."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import diff, write_profile
from test_machine import assert_rolled_back, kernel_only
from testbed.sim import faults, hugepages as simhp
from vfio_hookd import errors
from vfio_hookd.errors import HookdError
from vfio_hookd.machine import Machine
from vfio_hookd.profile import parse_profile
from vfio_hookd.steps import STEP_NAMES, STEPS, Context
from vfio_hookd.steps.hugepages import HugepagesStep

pytestmark = pytest.mark.unit

M2, G1 = 2048, 1024 * 1024
NR2 = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"
STEP = HugepagesStep()


def pool(world, size=M2) -> dict:
    return simhp.pool_counts(world.root, size)


def ctx_for(world, vm: str, hp: str, xml: str | None = None) -> Context:
    """The context a prepare of ``vm`` builds, with ``hugepages: HP`` in its profile."""
    world.profile(vm, extra=f"hugepages: {hp}\n")
    plan = world.machine.plan_prepare(vm, xml)
    return Context(vm=vm, host=world.host, profile=plan.profile, deadlines=plan.deadlines,
                   devices=plan.devices, drivers=plan.drivers, systemd=lambda: world.systemd)


def domain(memory: str = "<memory unit='KiB'>1048576</memory>", backing: str = "") -> str:
    return (f"<domain type='kvm'><name>win11</name>{memory}{backing}<devices>"
            "<hostdev mode='subsystem' type='pci' managed='yes'><source>"
            "<address domain='0x0000' bus='0x01' slot='0x00' function='0x0'/></source></hostdev>"
            "<hostdev mode='subsystem' type='pci' managed='yes'><source>"
            "<address domain='0x0000' bus='0x01' slot='0x00' function='0x1'/></source></hostdev>"
            "</devices></domain>")


# ---- the step alone -------------------------------------------------------------------------
def test_apply_then_undo_leaves_the_host_identical(world):
    ctx = ctx_for(world, "win11", "{pages: 64, size: 2M}")
    before = world.snapshot()
    facts = STEP.observe(ctx)
    assert facts["plan"] == [{"size_kb": M2, "pages": 64, "available": 0, "nr_before": 0,
                              "add": 64}]
    STEP.apply(ctx, facts)
    assert pool(world) == {"nr": 64, "free": 64, "resv": 0, "surplus": 0, "overcommit": 0}
    assert facts["done"] == [{"size_kb": M2, "before": 0, "add": 64, "added": 64, "promoted": 0,
                              "freed": 0}]
    assert world.host.read("/proc/meminfo").count("HugePages_Total:    64")
    notes = STEP.undo(ctx, facts)
    assert notes == ["freed the 64 2M pages this VM added (nr_hugepages 64 -> 0)"]
    assert diff(before["tree"], world.snapshot()["tree"]) == {}
    assert STEP.undo(ctx, facts) == []          # a second undo frees nothing more


def test_memory_is_compacted_first_and_only_when_pages_are_added(world):
    # the 2 GiB asked for fit only once the fragmented memory is compacted
    simhp.configure(world.root, contiguous_kb=1024 * 1024, fragmented_kb=2 * 1024 * 1024)
    ctx = ctx_for(world, "win11", "{pages: 1024, size: 2M}")
    facts = STEP.observe(ctx)
    STEP.apply(ctx, facts)
    assert pool(world)["nr"] == 1024
    assert simhp.state(world.root)["compactions"] == 1
    STEP.undo(ctx, facts)
    simhp.configure(world.root, boot_pages={M2: 1024})   # enough free: nothing to add
    facts = STEP.observe(ctx)
    assert facts["plan"] == [] and "adds none" in facts["why"]["hugepages"]
    STEP.apply(ctx, facts)
    assert facts["done"] == [] and simhp.state(world.root)["compactions"] == 1


def test_short_allocation_gives_the_part_back_and_fails(world):
    simhp.configure(world.root, contiguous_kb=100 * M2, fragmented_kb=20 * M2)
    ctx = ctx_for(world, "win11", "{pages: 512, size: 2M}")
    before = world.snapshot()
    facts = STEP.observe(ctx)
    with pytest.raises(HookdError) as exc:
        STEP.apply(ctx, facts)
    err = exc.value
    assert err.code == errors.HUGEPAGES_SHORT and err.exit_status == 34
    assert "allocated 120 of the 512 2M hugepages" in err.message
    assert "hugepagesz=2M hugepages=512" in err.message and "1G" in err.message
    assert pool(world)["nr"] == 0 and facts["done"][0]["added"] == 0
    assert STEP.undo(ctx, facts) == []
    assert diff(before["tree"], world.snapshot()["tree"]) == {}


def test_boot_pages_count_and_are_never_freed(world):
    simhp.configure(world.root, boot_pages={M2: 100})
    ctx = ctx_for(world, "win11", "{pages: 150, size: 2M}")
    facts = STEP.observe(ctx)
    assert facts["plan"][0]["add"] == 50
    STEP.apply(ctx, facts)
    assert pool(world)["nr"] == 150
    STEP.undo(ctx, facts)
    assert pool(world) == {"nr": 100, "free": 100, "resv": 0, "surplus": 0, "overcommit": 0}
    # boot pages some program uses (or reserved by a mapping) are not free for the VM
    simhp.use_pages(world.root, M2, 60)
    simhp.use_pages(world.root, M2, 20, reserve=True)
    facts = STEP.observe(ctx)
    assert facts["plan"][0]["available"] == 20 and facts["plan"][0]["add"] == 130
    STEP.apply(ctx, facts)
    STEP.undo(ctx, facts)
    assert pool(world) == {"nr": 100, "free": 40, "resv": 20, "surplus": 0, "overcommit": 0}


@pytest.mark.parametrize("order", ["first-added-first-freed", "last-added-first-freed"])
def test_two_vms_pages_are_independent(world, order):
    simhp.configure(world.root, boot_pages={M2: 10})
    a = ctx_for(world, "a", "{pages: 110, size: 2M}")
    fa = STEP.observe(a)
    STEP.apply(a, fa)
    simhp.use_pages(world.root, M2, 110)           # VM a's QEMU runs on them
    b = ctx_for(world, "b", "{pages: 50, size: 2M}")
    fb = STEP.observe(b)
    STEP.apply(b, fb)
    assert (fa["done"][0]["added"], fb["done"][0]["added"], pool(world)["nr"]) == (100, 50, 160)
    first, second = [(a, fa, 110), (b, fb, 50)][::1 if order.startswith("first") else -1]
    simhp.release_pages(world.root, M2, first[2]) if first[0] is a else None
    STEP.undo(first[0], first[1])
    left = pool(world)
    assert left["nr"] == 160 - (100 if first[0] is a else 50)
    assert left["free"] - left["resv"] >= (50 if first[0] is a else 0)
    if second[0] is a:
        simhp.release_pages(world.root, M2, 110)
    STEP.undo(second[0], second[1])
    assert pool(world) == {"nr": 10, "free": 10, "resv": 0, "surplus": 0, "overcommit": 0}


def test_pages_still_in_use_become_surplus_and_are_freed_when_let_go(world):
    ctx = ctx_for(world, "win11", "{pages: 64, size: 2M}")
    before = world.snapshot()
    facts = STEP.observe(ctx)
    STEP.apply(ctx, facts)
    simhp.use_pages(world.root, M2, 40)            # QEMU still maps 40 of them
    notes = STEP.undo(ctx, facts)
    assert len(notes) == 1 and notes[0].startswith("40 of the 64 2M pages this VM added are "
                                                   "still in use")
    assert "surplus_hugepages 40" in notes[0]
    assert pool(world) == {"nr": 0, "free": 0, "resv": 0, "surplus": 40, "overcommit": 0}
    # nr_hugepages reads persistent + surplus pages (as Linux 6.1 does in the kernel tests)
    assert world.host.read(NR2) == "40"
    assert world.host.read("/proc/sys/vm/nr_hugepages") == "0"
    simhp.release_pages(world.root, M2, 40)        # QEMU exits
    assert diff(before["tree"], world.snapshot()["tree"]) == {}


def test_surplus_pages_of_another_user_stay_surplus(world):
    """Surplus pages (another program's, in use after someone shrank the pool below them) are
    promoted by the growing write; undo makes them surplus again, not persistent."""
    simhp.configure(world.root, boot_pages={M2: 10})
    simhp.use_pages(world.root, M2, 10)
    world.host.write(NR2, "0", 5)
    start = pool(world)
    assert start == {"nr": 0, "free": 0, "resv": 0, "surplus": 10, "overcommit": 0}
    ctx = ctx_for(world, "win11", "{pages: 20, size: 2M}")
    facts = STEP.observe(ctx)
    STEP.apply(ctx, facts)
    assert pool(world)["nr"] == 30 and pool(world)["free"] == 20
    assert facts["done"][0]["promoted"] == 10 and facts["done"][0]["added"] == 20
    STEP.undo(ctx, facts)
    assert pool(world) == start


def test_a_pool_shrunk_by_someone_else_is_left_alone(world):
    simhp.configure(world.root, boot_pages={M2: 10})
    ctx = ctx_for(world, "win11", "{pages: 74, size: 2M}")
    facts = STEP.observe(ctx)
    STEP.apply(ctx, facts)
    world.host.write(NR2, "30", 5)                 # the admin shrank it meanwhile
    notes = STEP.undo(ctx, facts)
    assert "fewer than the 64 pages this VM added" in notes[0]
    assert pool(world)["nr"] == 30


def test_undo_after_a_crash_mid_apply_frees_what_the_pool_gained(world):
    simhp.configure(world.root, boot_pages={M2: 5})
    ctx = ctx_for(world, "win11", "{pages: 69, size: 2M}")
    facts = STEP.observe(ctx)                      # the record on disk: plan, no done
    world.host.write(NR2, "69", 5)                 # the write happened, then the daemon died
    STEP.undo(ctx, {"plan": facts["plan"]})
    assert pool(world)["nr"] == 5
    assert STEP.undo(ctx, {"plan": facts["plan"]}) == []   # nothing gained: nothing freed


# ---- auto from the domain XML ------------------------------------------------------------------
@pytest.mark.parametrize("memory,backing,size,pages", [
    ("<memory unit='KiB'>1048576</memory>", "<memoryBacking><hugepages/></memoryBacking>", M2,
     512),
    ("<memory>1048577</memory>", "<memoryBacking><hugepages/></memoryBacking>", M2, 513),
    ("<memory unit='GiB'>4</memory>",
     "<memoryBacking><hugepages><page size='1' unit='G'/></hugepages></memoryBacking>", G1, 4),
    ("<memory unit='MiB'>3000</memory>",
     "<memoryBacking><hugepages><page size='2048'/></hugepages></memoryBacking>", M2, 1500),
    ("<memory unit='G'>2</memory>",
     "<memoryBacking><hugepages><page size='2' unit='MiB' nodeset='0'/></hugepages>"
     "</memoryBacking>", M2, 1024),
])
def test_auto_takes_the_domains_memory_in_its_page_size(world, memory, backing, size, pages):
    ctx = ctx_for(world, "win11", "auto", domain(memory, backing))
    facts = STEP.observe(ctx)
    assert facts["plan"][0]["size_kb"] == size and facts["plan"][0]["pages"] == pages
    assert "auto: <memory>" in facts["why"]["hugepages"]


def test_auto_without_hugepages_in_the_domain_does_nothing(world):
    world.profile(extra="hugepages: auto\n")
    before = world.snapshot()
    plan = world.machine.plan_prepare("win11", domain())
    assert plan.profile.hugepages.pages == 0 and plan.shape.hugepages == 0
    rec = world.machine.prepare("win11", domain())
    entry = rec.step("hugepages")
    assert entry.facts["plan"] == [] and entry.facts["done"] == []
    assert "no <memoryBacking><hugepages/>" in entry.facts["why"]["hugepages"]
    assert pool(world)["nr"] == 0
    world.machine.release("win11")
    kernel_only(before["tree"], world.snapshot()["tree"])


@pytest.mark.parametrize("hp,xml,code,words", [
    ("auto", None, errors.DOMAIN_XML_INVALID, "auto needs the domain XML"),
    ("auto", domain("<memory unit='KiB'>lots</memory>",
                    "<memoryBacking><hugepages/></memoryBacking>"),
     errors.DOMAIN_XML_INVALID, "<memory> is 'lots'"),
    ("auto", domain("", "<memoryBacking><hugepages/></memoryBacking>"),
     errors.DOMAIN_XML_INVALID, "no <memory>"),
    ("auto", domain(backing="<memoryBacking><hugepages><page size='2' unit='M' nodeset='0'/>"
                            "<page size='1' unit='G' nodeset='1'/></hugepages></memoryBacking>"),
     errors.DOMAIN_XML_INVALID, "pages of 2 sizes"),
    ("auto", domain(backing="<memoryBacking><hugepages><page size='16' unit='M'/></hugepages>"
                            "</memoryBacking>"),
     errors.PROFILE_INVALID, "no pool of 16M pages (/sys/kernel/mm/hugepages/ has 2M, 1G)"),
    ("{pages: 4, size: 64K}", None, errors.PROFILE_INVALID, "no pool of 64K pages"),
])
def test_requests_the_host_cannot_serve_are_refused_before_anything(world, hp, xml, code, words):
    world.profile(extra=f"hugepages: {hp}\n")
    before = world.snapshot()
    with pytest.raises(HookdError) as exc:
        world.machine.prepare("win11", xml)
    assert exc.value.code == code and words in exc.value.message, exc.value
    assert world.snapshot() == before


@pytest.mark.parametrize("text,where", [
    ("hugepages: yes\n", "w.yaml:1: hugepages: write 'auto' or {pages: N, size: S}"),
    ("hugepages: some\n", "w.yaml:1: hugepages: must be 'none', 'auto' or a mapping"),
    ("hugepages:\n  pages: -1\n", "w.yaml:2: hugepages.pages: must be a whole number"),
    ("hugepages:\n  size: 2M\n", "w.yaml:1: hugepages: pages: missing"),
    ("hugepages:\n  pages: 8\n  size: 3M\n", "w.yaml:3: hugepages.size: must be a page size"),
    ("hugepages:\n  pages: 8\n  sise: 2M\n", "w.yaml:3: hugepages: unknown key 'sise' "
                                            "(did you mean 'size'?)"),
    ("hugepages: {pages: 99999999999, size: 1G}\n", "more than 16 TiB"),
])
def test_a_bad_hugepages_key_names_its_line_and_field(text, where):
    with pytest.raises(HookdError) as exc:
        parse_profile(text, "w.yaml", "win11")
    assert exc.value.code == errors.PROFILE_INVALID and where in str(exc.value), exc.value


# ---- through the state machine -----------------------------------------------------------------
def test_prepare_and_release_with_hugepages(world):
    world.profile(extra="hugepages: {pages: 256, size: 2M}\n")
    before = world.snapshot()
    plan = world.machine.plan_prepare("win11")
    assert plan.shape.hugepages == 1
    from vfio_hookd.plan_view import document, render
    lines = render(document(world.machine, plan))
    assert "    plan: size_kb=2048, pages=256, available=0, nr_before=0, add=256" in lines
    rec = world.machine.prepare("win11")
    assert STEP_NAMES.index("hugepages") == STEP_NAMES.index("bind_vfio") + 1 and rec.step("hugepages").status == "done"
    assert rec.step("hugepages").facts["done"][0]["added"] == 256
    assert rec.profile["hugepages"] == {"pages": 256, "size": "2M"}
    st = world.machine.status("win11")["vms"]["win11"]
    hp = next(s for s in st["steps"] if s["name"] == "hugepages")
    assert hp["why"]["hugepages"].startswith("added 256 pages of 2M (nr_hugepages 0 -> 256)")
    assert pool(world)["nr"] == 256
    world.machine.release("win11")
    kernel_only(before["tree"], world.snapshot()["tree"])


def test_release_after_a_daemon_restart_works_from_the_record_alone(world):
    path = world.profile(extra="hugepages: {pages: 32, size: 1G}\n")
    simhp.configure(world.root, contiguous_kb=40 * G1)
    before = world.snapshot()
    world.machine.prepare("win11")
    assert pool(world, G1)["nr"] == 32
    os.unlink(path)                                 # today's profile is gone
    fresh = Machine(world.host, world.paths, lambda: world.fake, holders_grace_s=0.3,
                    logind_factory=lambda: world.logind)
    rec = fresh.release("win11", "daemon restart")
    assert rec.step("hugepages").status == "undone"
    assert pool(world, G1)["nr"] == 0
    kernel_only(before["tree"], world.snapshot()["tree"])


def test_a_short_allocation_rolls_the_whole_prepare_back(world):
    world.profile(extra="hugepages: {pages: 4096, size: 2M}\n")   # 8 GiB; 4 + 2 GiB there
    simhp.configure(world.root, contiguous_kb=4 * G1, fragmented_kb=2 * G1)
    before = world.snapshot()
    with pytest.raises(HookdError) as exc:
        world.machine.prepare("win11")
    assert exc.value.code == errors.HUGEPAGES_SHORT
    assert exc.value.message.startswith("step hugepages: the kernel allocated 3072 of the 4096")
    rec = world.machine.records.load("win11")
    assert rec.step("hugepages").status == "failed" and not rec.holds_host
    k = STEP_NAMES.index("hugepages")
    assert all(s.status == "undone" for s in rec.steps[:k])       # the steps before it
    assert all(s.status == "pending" for s in rec.steps[k + 1:])  # cpu_isolation, cpu_governor
    assert pool(world)["nr"] == 0
    kernel_only(before["tree"], world.snapshot()["tree"])


# a fault at each write of the step (compact_memory, the nr_hugepages write, the give-back),
# and a failure of every other step, before or after it
_WRITE_FAULTS = [("/proc/sys/vm/compact_memory", 1), (NR2, 1), (NR2, 2)]


@pytest.mark.parametrize("target,nth", _WRITE_FAULTS, ids=["compact", "grow", "give-back"])
def test_a_failed_write_rolls_back_to_the_pool_before(world, target, nth):
    world.profile(extra="hugepages: {pages: 128, size: 2M}\n")
    simhp.configure(world.root, boot_pages={M2: 8}, contiguous_kb=64 * M2, fragmented_kb=0)
    before = world.snapshot()
    if nth == 2:   # the growing write succeeds short, the give-back write fails once
        orig = world.host._write_now
        writes = []

        def flaky(p, data):
            if p == target:
                writes.append(data)
                if len(writes) == 2:
                    raise OSError(5, "Input/output error")
            return orig(p, data)
        world.host._write_now = flaky
    else:
        faults.inject(world.root, "write", target, "fail", errno=5, count=1)
    with pytest.raises(HookdError) as exc:
        world.machine.prepare("win11")
    assert "step hugepages" in exc.value.message
    faults.clear(world.root)
    rec = world.machine.records.load("win11")
    assert not rec.holds_host, rec.release_errors
    assert pool(world) == {"nr": 8, "free": 8, "resv": 0, "surplus": 0, "overcommit": 0}
    kernel_only(before["tree"], world.snapshot()["tree"])


@pytest.mark.parametrize("k", range(len(STEPS)), ids=STEP_NAMES)
def test_a_failure_at_any_step_leaves_the_pool_as_it_was(world, monkeypatch, k):
    world.profile(extra="hugepages: {pages: 64, size: 2M}\n")
    simhp.configure(world.root, boot_pages={M2: 4})
    before = world.snapshot()
    step = STEPS[k]
    real_apply = step.apply

    def failing(ctx, facts):
        real_apply(ctx, facts)         # the step's change is on the host: the rollback undoes it
        raise HookdError(errors.HOST_IO, f"injected after {step.name}")
    monkeypatch.setattr(step, "apply", failing)
    with pytest.raises(HookdError) as exc:
        world.machine.prepare("win11")
    assert f"injected after {step.name}" in exc.value.message
    assert pool(world) == {"nr": 4, "free": 4, "resv": 0, "surplus": 0, "overcommit": 0}
    assert_rolled_back(before, world.snapshot(), k)


def test_a_record_that_cannot_be_saved_after_the_last_step_frees_the_pages(world, monkeypatch):
    world.profile(extra="hugepages: {pages: 64, size: 2M}\n")
    saves = []
    real = world.machine.records.save

    def save(rec):
        if rec.phase == "prepared":
            saves.append(rec.phase)
            raise OSError(28, "No space left on device")
        real(rec)
    monkeypatch.setattr(world.machine.records, "save", save)
    with pytest.raises(HookdError):
        world.machine.prepare("win11")
    assert saves and pool(world)["nr"] == 0


# ---- any pool, any request -------------------------------------------------------------------
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(boot=st.integers(0, 40), used=st.integers(0, 40), resv=st.integers(0, 10),
       memory=st.integers(0, 120), fragmented=st.integers(0, 60), pages=st.integers(1, 150))
def test_any_pool_and_request_ends_as_it_began(world, boot, used, resv, memory, fragmented,
                                               pages):
    """Whatever the pool holds (boot pages, some in use or reserved by others) and however
    much memory there is: apply adds what is missing or fails short with the pool as before,
    and undo gives back exactly what was added."""
    used, resv = min(used, boot), min(resv, boot - min(used, boot))
    state = simhp.state(world.root)
    for p in state["pools"].values():
        assert p["nr"] == p["free"] == p["surplus"] == p["resv"] == 0
    simhp.configure(world.root, contiguous_kb=memory * M2, fragmented_kb=fragmented * M2,
                    boot_pages={M2: boot})
    simhp.use_pages(world.root, M2, used)
    simhp.use_pages(world.root, M2, resv, reserve=True)
    ctx = ctx_for(world, "win11", f"{{pages: {pages}, size: 2M}}")
    start = pool(world)
    facts = STEP.observe(ctx)
    missing = max(0, pages - (boot - used - resv))
    try:
        STEP.apply(ctx, facts)
    except HookdError as exc:
        assert exc.code == errors.HUGEPAGES_SHORT and missing > memory + fragmented
        assert pool(world) == start
    else:
        assert missing <= memory + fragmented
        assert pool(world)["nr"] == start["nr"] + missing
        assert pool(world)["free"] - pool(world)["resv"] >= pages
    STEP.undo(ctx, facts)
    assert pool(world) == start
    # back to an empty pool for the next example
    simhp.release_pages(world.root, M2, used)
    simhp.release_pages(world.root, M2, resv, reserved=True)
    world.host.write(NR2, "0", 5)
