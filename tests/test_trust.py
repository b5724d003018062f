"""Only root's files steer the daemon (vfio_hookd.trust): a profile or a record is read only if
it, its symlinks' targets and every directory up to / are root's and writable by root alone.

The tests run as root: an untrusted case is a file chowned to another uid (65534) or made
writable by group/others, under ``tmp_path`` (``/tmp`` is 1777 root, pytest's directories
0700 root).
"""

from __future__ import annotations

import json
import os

import pytest

from conftest import write_profile
from vfio_hookd import errors, profile, trust
from vfio_hookd.errors import HookdError
from vfio_hookd.paths import Paths
from vfio_hookd.status import status_from_records

pytestmark = pytest.mark.unit

NOBODY = 65534


@pytest.fixture(autouse=True)
def _root():
    if os.geteuid() != 0:
        pytest.skip("needs root to chown files to another uid")


def load(paths, vm="win11"):
    return profile.load_profile(paths, vm)


def refused(call) -> HookdError:
    with pytest.raises(HookdError) as exc:
        call()
    assert exc.value.code == errors.UNTRUSTED_FILE and exc.value.exit_status == 27
    return exc.value


def test_a_root_profile_in_root_directories_is_read(dirs, paths):
    write_profile(dirs, "win11", "on_busy: terminate\n")
    assert load(paths).on_busy == "terminate"


def test_a_file_owned_by_another_user_is_refused_naming_path_owner_mode_and_fix(dirs, paths):
    path = write_profile(dirs, "win11", "on_busy: terminate\n")
    os.chown(path, NOBODY, 0)
    err = refused(lambda: load(paths))
    assert err.message.startswith(f"{path}: the file is owned by uid {NOBODY}")
    assert "mode 0644" in err.message
    assert f"chown root:root {path}" in err.message and "chmod" not in err.message
    assert err.details == {"file": path, "path": path, "uid": NOBODY, "mode": "0644"}
    assert str(err).startswith("UNTRUSTED_FILE: ")


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_a_group_or_world_writable_file_is_refused(dirs, paths, mode):
    path = write_profile(dirs, "win11", "")
    os.chmod(path, mode)
    err = refused(lambda: load(paths))
    assert f"mode {mode:04o}" in err.message and "uid 0" in err.message
    assert f"chmod go-w {path}" in err.message and "chown" not in err.message


def test_both_faults_name_both_fixes(dirs, paths):
    path = write_profile(dirs, "win11", "")
    os.chown(path, NOBODY, NOBODY)
    os.chmod(path, 0o666)
    err = refused(lambda: load(paths))
    assert f"chown root:root {path} and chmod go-w {path}" in err.message


@pytest.mark.parametrize("which", ["vms", "config", "tmp_path"])
@pytest.mark.parametrize("fault", ["group-writable", "world-writable", "owner"])
def test_a_directory_above_the_file_that_others_may_write_is_refused(dirs, paths, tmp_path,
                                                                     which, fault):
    path = write_profile(dirs, "win11", "")
    d = {"vms": dirs["config"] / "vms", "config": dirs["config"], "tmp_path": tmp_path}[which]
    if fault == "owner":
        os.chown(d, NOBODY, 0)
    else:
        os.chmod(d, 0o775 if fault == "group-writable" else 0o757)
    try:
        err = refused(lambda: load(paths))
        assert err.message.startswith(f"{path}: the directory {d} it is read through is owned")
        assert err.details["path"] == str(d)
        fix = f"chown root:root {d}" if fault == "owner" else f"chmod go-w {d}"
        assert fix in err.message
        # the config directory itself: refused even before the profile is looked for
        os.unlink(path)
        refused(lambda: load(paths))
    finally:
        os.chown(d, 0, 0)
        os.chmod(d, 0o700 if which == "tmp_path" else 0o755)


def test_a_symlink_to_an_untrusted_target_is_refused_naming_the_target(dirs, paths, tmp_path):
    other = tmp_path / "elsewhere"
    other.mkdir(mode=0o755)
    target = other / "win11.yaml"
    target.write_text("on_busy: terminate\n")
    link = dirs["config"] / "vms" / "win11.yaml"
    os.symlink(target, link)
    assert load(paths).on_busy == "terminate"   # all root's: followed
    os.chown(target, NOBODY, 0)
    err = refused(lambda: load(paths))
    assert err.message.startswith(f"{link}: the file {target} it is read through")
    assert f"chown root:root {target}" in err.message
    # the target's directory is checked too
    os.chown(target, 0, 0)
    os.chmod(other, 0o777)
    err = refused(lambda: load(paths))
    assert err.details["path"] == str(other) and f"chmod go-w {other}" in err.message


def test_a_relative_symlink_through_dotdot_is_followed_and_checked(dirs, paths, tmp_path):
    (tmp_path / "shared").mkdir(mode=0o755)
    (tmp_path / "shared" / "p.yaml").write_text("on_busy: terminate\n")
    os.symlink("../../shared/p.yaml", dirs["config"] / "vms" / "win11.yaml")
    assert load(paths).on_busy == "terminate"
    os.chmod(tmp_path / "shared" / "p.yaml", 0o666)
    assert refused(lambda: load(paths)).details["path"] == str(tmp_path / "shared" / "p.yaml")


def test_a_symlink_in_an_untrusted_directory_to_a_trusted_target_is_refused(dirs, tmp_path):
    """Whoever may write the link's directory chooses which file is read."""
    trusted = tmp_path / "trusted.yaml"
    trusted.write_text("on_busy: terminate\n")
    untrusted = tmp_path / "theirs"
    untrusted.mkdir()
    os.chown(untrusted, NOBODY, NOBODY)
    (untrusted / "vms").mkdir(mode=0o755)
    os.symlink(trusted, untrusted / "vms" / "win11.yaml")
    err = refused(lambda: load(Paths(config_dir=str(untrusted), run_dir=str(dirs["run"]))))
    assert err.details["path"] == str(untrusted)
    # and a directory symlink in a root directory that leads into one
    os.rmdir(dirs["config"] / "vms")
    os.symlink(untrusted / "vms", dirs["config"] / "vms")
    paths = Paths(config_dir=str(dirs["config"]), run_dir=str(dirs["run"]))
    assert refused(lambda: load(paths)).details["path"] == str(untrusted)


def test_a_symlink_owned_by_another_user_is_refused(dirs, paths, tmp_path):
    target = tmp_path / "p.yaml"
    target.write_text("")
    link = dirs["config"] / "vms" / "win11.yaml"
    os.symlink(target, link)
    os.chown(link, NOBODY, NOBODY, follow_symlinks=False)
    err = refused(lambda: load(paths))
    assert err.message.startswith(f"{link}: the symbolic link is owned by uid {NOBODY}")
    assert f"chown -h root:root {link}" in err.message


def test_a_sticky_directory_is_safe_for_root_entries_in_it(dirs, tmp_path):
    """/tmp's shape: mode 1777, root's. Others may add entries, not move or replace root's."""
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    config = sticky / "etc"
    (config / "vms").mkdir(parents=True, mode=0o755)
    os.chmod(config, 0o755)
    (config / "vms" / "win11.yaml").write_text("on_busy: terminate\n")
    paths = Paths(config_dir=str(config), run_dir=str(dirs["run"]))
    assert load(paths).on_busy == "terminate"
    # an entry in it that is not root's is not
    os.chown(config, NOBODY, 0)
    assert refused(lambda: load(paths)).details["path"] == str(config)
    os.chown(config, 0, 0)
    # nor is a sticky directory that is not root's, or a writable one without the sticky bit
    os.chown(sticky, NOBODY, 0)
    assert refused(lambda: load(paths)).details["path"] == str(sticky)
    os.chown(sticky, 0, 0)
    os.chmod(sticky, 0o777)
    assert refused(lambda: load(paths)).details["path"] == str(sticky)


def test_a_swap_between_the_checks_and_the_open_is_caught_by_fstat(dirs, paths, monkeypatch):
    """The path is walked and checked, then another file is put in its place just before it is
    opened: what decides is ``fstat`` of the descriptor that is read."""
    path = write_profile(dirs, "win11", "on_busy: terminate\n")
    evil = dirs["config"] / "vms" / ".evil"
    evil.write_text("on_busy: fail\n")
    os.chown(evil, NOBODY, 0)
    real_open, real_stat, seen = os.open, os.stat, []

    def stat(name, *a, **kw):   # the walk's lstat of the profile: it is root's here
        st = real_stat(name, *a, **kw)
        if name == "win11.yaml":
            seen.append(st.st_uid)
        return st

    def swapping_open(name, flags, *a, **kw):
        if name == "win11.yaml" and not flags & os.O_PATH:
            os.replace(evil, path)
        return real_open(name, flags, *a, **kw)
    monkeypatch.setattr(trust.os, "stat", stat)
    monkeypatch.setattr(trust.os, "open", swapping_open)
    err = refused(lambda: load(paths))
    assert seen == [0]   # the check before the open saw root's file
    assert err.details == {"file": path, "path": path, "uid": NOBODY, "mode": "0644"}


def test_a_fifo_or_a_directory_is_not_read(dirs, paths):
    path = dirs["config"] / "vms" / "win11.yaml"
    os.mkfifo(path, 0o600)   # opening it blocks no one: O_NONBLOCK, then refused
    with pytest.raises(HookdError) as exc:
        load(paths)
    assert exc.value.code == errors.PROFILE_INVALID and "not a regular file" in exc.value.message


def test_open_trusted_wants_an_absolute_path():
    with pytest.raises(ValueError):
        trust.open_trusted("etc/passwd")


def test_the_trusted_uid_is_set_through_paths_never_the_environment(dirs, paths, monkeypatch):
    path = write_profile(dirs, "win11", "")
    os.chown(path, NOBODY, 0)
    refused(lambda: load(paths))
    assert load(Paths(config_dir=paths.config_dir, run_dir=paths.run_dir,
                      trusted_uid=NOBODY)).name == "win11"
    monkeypatch.setenv("VFIO_HOOKD_TRUSTED_UID", str(NOBODY))
    assert Paths.from_env().trusted_uid == 0


# ---- records ------------------------------------------------------------------------------

@pytest.mark.parametrize("fault", ["owner", "mode", "records-dir"])
def test_an_untrusted_record_is_refused_on_release_and_the_host_is_untouched(world, fault):
    world.profile()
    world.machine.prepare("win11")
    path = world.paths.record_path("win11")
    victim = {"owner": path, "mode": path, "records-dir": world.paths.records_dir}[fault]
    if fault == "owner":
        os.chown(victim, NOBODY, NOBODY)
    else:
        os.chmod(victim, 0o666 if fault == "mode" else 0o777)
    on_disk = open(path).read()
    before = world.snapshot()
    for call in (lambda: world.machine.release("win11"),
                 lambda: world.machine.plan_release("win11"),
                 lambda: world.machine.prepare("win11")):
        err = refused(call)
        assert err.message.startswith(path) and err.details["path"] == victim
    assert world.snapshot() == before
    assert world.host.link_name("/sys/bus/pci/devices/0000:01:00.0/driver") == "vfio-pci"
    assert open(path).read() == on_disk and json.loads(on_disk)["phase"] == "prepared"
    st = status_from_records(world.host, world.paths)["vms"]["win11"]
    assert st["phase"] == "unknown" and st["error"]["code"] == errors.UNTRUSTED_FILE
    # made root's again, it is released
    os.chown(victim, 0, 0)
    os.chmod(victim, 0o644 if fault != "records-dir" else 0o700)
    assert world.machine.release("win11").phase == "idle"


# ---- writing records ----------------------------------------------------------------------

@pytest.mark.parametrize("fault", ["run-owner", "run-mode", "records-mode", "records-sticky",
                                   "parent-mode", "records-link"])
def test_a_record_is_not_written_where_others_could_swap_it(world, tmp_path, fault):
    """RecordStore.save checks the records directory and every directory above it before it
    writes: release acts on what the record says. Nothing is written, nothing on the host
    changes, and the refusal names the directory, its owner, mode and the fix."""
    from vfio_hookd.record import Record, RecordStore
    run = world.paths.run_dir
    records = world.paths.records_dir
    os.makedirs(records, mode=0o700, exist_ok=True)
    victim = {"run-owner": run, "run-mode": run, "records-mode": records,
              "records-sticky": records, "parent-mode": str(tmp_path),
              "records-link": str(tmp_path / "elsewhere")}[fault]
    if fault == "run-owner":
        os.chown(run, NOBODY, NOBODY)
    elif fault == "records-sticky":
        os.chmod(records, 0o1777)
    elif fault == "records-link":   # the records directory is a link to a directory of nobody's
        os.mkdir(victim, 0o755)
        os.chown(victim, NOBODY, NOBODY)
        os.rmdir(records)
        os.symlink(victim, records)
    else:
        os.chmod(victim, 0o777 if fault != "parent-mode" else 0o707)
    before = world.snapshot()
    rec = Record.new("win11", ["0000:01:00.0"], {"0000:01:00.0": "nvidia"}, {}, ["units"], {}, {})
    err = refused(lambda: RecordStore(world.paths).save(rec))
    assert err.details["path"] == victim and err.details["file"] == records
    assert err.message.startswith(records + ": the directory")
    assert "writes its records only in directories that root owns" in err.message
    assert ("chown root:root " + victim) in err.message or ("chmod go-w " + victim) in err.message
    assert os.listdir(victim if fault == "records-link" else records) == []
    # a prepare is refused the same way before anything on the host changes
    world.profile()
    refused(lambda: world.machine.prepare("win11"))
    assert world.snapshot() == before
    assert os.listdir(victim if fault == "records-link" else records) == []


def test_the_records_directory_is_made_0700_and_checked_when_missing(world):
    from vfio_hookd.record import RecordStore
    world.profile()
    assert not os.path.exists(world.paths.records_dir)
    rec = world.machine.prepare("win11")
    st = os.stat(world.paths.records_dir)
    assert st.st_uid == 0 and st.st_mode & 0o777 == 0o700
    assert RecordStore(world.paths).load("win11").phase == rec.phase == "prepared"
    assert sorted(os.listdir(world.paths.records_dir)) == ["win11.json"]


def test_a_missing_records_directory_is_not_made_under_an_untrusted_run_directory(world):
    from vfio_hookd.record import Record, RecordStore
    os.chmod(world.paths.run_dir, 0o777)
    rec = Record.new("win11", ["0000:01:00.0"], {}, {}, ["units"], {}, {})
    err = refused(lambda: RecordStore(world.paths).save(rec))
    assert err.details["path"] == world.paths.run_dir
    assert not os.path.exists(world.paths.records_dir)


def test_a_planted_temporary_file_is_not_written_through(world, tmp_path):
    """A link (or file) at the temporary name is replaced, never followed."""
    from vfio_hookd.record import Record, RecordStore
    os.makedirs(world.paths.records_dir, mode=0o700)
    target = tmp_path / "target"
    target.write_text("untouched")
    os.symlink(target, os.path.join(world.paths.records_dir, f"win11.json.{os.getpid()}.tmp"))
    rec = Record.new("win11", ["0000:01:00.0"], {}, {}, ["units"], {}, {})
    RecordStore(world.paths).save(rec)
    assert target.read_text() == "untouched"
    assert sorted(os.listdir(world.paths.records_dir)) == ["win11.json"]
    assert RecordStore(world.paths).load("win11").vm == "win11"
