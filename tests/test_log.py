"""Logging: journal fields through python-systemd's JournalHandler, stderr without a journal."""

from __future__ import annotations

import pytest

import logging

from vfio_hookd import log as logmod

pytestmark = pytest.mark.unit


def test_journal_gets_vm_step_phase_duration_fields():
    sent = []
    logmod.setup(sender=lambda MESSAGE, **fields: sent.append((MESSAGE, fields)))
    logging.getLogger("vfio_hookd").info("units done", extra={
        "VM": "win11", "STEP": "units", "PHASE": "preparing", "DURATION_MS": 812.4})
    msg, fields = sent[-1]
    assert msg == "units done"
    assert fields["VM"] == "win11" and fields["STEP"] == "units"
    assert fields["PHASE"] == "preparing" and fields["DURATION_MS"] == 812.4
    assert fields["PRIORITY"] == "6"


def test_stderr_format_carries_the_fields(capsys):
    logmod.setup(journal=False)
    logging.getLogger("vfio_hookd").error("bind_vfio failed", extra={"VM": "win11", "STEP": "bind_vfio"})
    err = capsys.readouterr().err
    assert "vfio-hookd[VM=win11 STEP=bind_vfio] ERROR: bind_vfio failed" in err


def test_notify_without_socket_does_nothing(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    logmod.notify("READY=1")  # must not raise nor import systemd.daemon needlessly


@pytest.mark.parametrize("state", ["READY=1", "STOPPING=1"])
def test_notify_to_a_socket_nobody_listens_on_is_logged_not_raised(tmp_path, monkeypatch,
                                                                  capsys, state):
    import socket
    path = str(tmp_path / "notify")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.close()                   # the file stays, nobody reads it: ECONNREFUSED
    logmod.setup(journal=False)
    for where in (path, str(tmp_path / "absent")):
        monkeypatch.setenv("NOTIFY_SOCKET", where)
        assert logmod.notify(state) is False
        err = capsys.readouterr().err
        assert f"WARNING: cannot send {state} to systemd at {where}" in err
