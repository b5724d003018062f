"""The hook reads the domain XML from stdin within bounds (issue 9): at most the daemon's
limit plus one byte, and within its deadline; beyond either, one ``CODE: message`` line
(``DOMAIN_XML_INVALID``), exit 1, nothing sent to the daemon."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from vfio_hookd import qemu_hook
from vfio_hookd.profile.domain_xml import MAX_DOMAIN_XML_BYTES
from vfio_hookd.qemu_hook import HookFailure, read_xml

pytestmark = pytest.mark.unit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOOK = os.path.join(REPO, "hooks", "vfio-hookd")


@pytest.fixture
def managed(tmp_path, monkeypatch):
    """A config with a profile for ``win11`` and a run dir without a daemon: a request that
    got as far as the socket would fail DAEMON_UNREACHABLE, not DOMAIN_XML_INVALID."""
    (tmp_path / "etc" / "vms").mkdir(parents=True)
    (tmp_path / "etc" / "vms" / "win11.yaml").write_text("devices: auto\n")
    (tmp_path / "run").mkdir()
    env = dict(os.environ, VFIO_HOOKD_CONFIG=str(tmp_path / "etc"),
               VFIO_HOOKD_RUN=str(tmp_path / "run"))
    for k in ("VFIO_HOOKD_CONFIG", "VFIO_HOOKD_RUN"):
        monkeypatch.setenv(k, env[k])
    return env


def feed(data: bytes):
    """A pipe whose write end a thread fills with ``data``, then closes; returns
    ``(read fd, writer thread)``."""
    r, w = os.pipe()

    def writer():
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(w, view):]
        except BrokenPipeError:
            pass
        finally:
            os.close(w)
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    return r, t


def test_the_hook_limit_is_the_daemons():
    assert qemu_hook.MAX_XML_BYTES == MAX_DOMAIN_XML_BYTES


def test_an_xml_of_exactly_the_limit_is_read_whole():
    xml = b"<domain>" + b" " * (1000 - 17) + b"</domain>"
    r, t = feed(xml)
    try:
        assert read_xml(r, limit=1000) == xml.decode()
    finally:
        os.close(r)
    t.join()


def test_more_than_the_limit_is_refused_after_reading_one_byte_more():
    """Only limit + 1 bytes are read: the rest stays in the pipe, unread."""
    limit, extra = 100_000, 300_000
    r, t = feed(b"x" * (limit + extra))
    try:
        with pytest.raises(HookFailure) as exc:
            read_xml(r, limit=limit)
        assert exc.value.code == "DOMAIN_XML_INVALID"
        assert f"larger than {limit} bytes" in exc.value.message
        left = 0
        while chunk := os.read(r, 1 << 20):   # the writer closes its end when all is in
            left += len(chunk)
        assert left == extra - 1
    finally:
        os.close(r)
    t.join()


def test_a_stdin_that_never_ends_is_refused_at_the_deadline(managed, monkeypatch, capsys):
    """A writer that keeps the pipe open (and writes part of an XML) cannot hold the hook,
    nor libvirt waiting for it: main() answers DOMAIN_XML_INVALID at its deadline."""
    r, w = os.pipe()
    os.write(w, b"<domain><name>win11</name>")
    monkeypatch.setattr(qemu_hook, "STDIN_TIMEOUT_S", 0.3)
    sent = []
    monkeypatch.setattr(qemu_hook, "request", lambda *a, **k: sent.append(a))
    stdin = os.fdopen(r, "r")
    monkeypatch.setattr(sys, "stdin", stdin)
    try:
        assert qemu_hook.main(["vfio-hookd", "win11", "prepare", "begin", "-"]) == 1
    finally:
        stdin.close()
        os.close(w)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("DOMAIN_XML_INVALID: ")
    assert "did not end within 0.3 s" in err
    assert sent == []


def test_an_oversized_stdin_fails_the_hook_with_one_line(managed):
    """The installed hook, as libvirt runs it: 1 MiB + 1 byte on stdin."""
    r = subprocess.run([HOOK, "win11", "prepare", "begin", "-"],
                       input=b"<" + b"x" * MAX_DOMAIN_XML_BYTES, capture_output=True,
                       env=managed, timeout=60)
    assert r.returncode == 1
    err = r.stderr.decode()
    assert err.count("\n") == 1 and err.startswith("DOMAIN_XML_INVALID: ")
    assert f"larger than {MAX_DOMAIN_XML_BYTES} bytes" in err and "DAEMON" not in err


def test_a_stdin_that_is_not_utf8_is_refused(managed):
    r = subprocess.run([HOOK, "win11", "prepare", "begin", "-"], input=b"<domain>\xff</domain>",
                       capture_output=True, env=managed, timeout=60)
    assert r.returncode == 1 and r.stderr.decode().startswith("DOMAIN_XML_INVALID: ")
    assert "not UTF-8" in r.stderr.decode()


def test_an_unmanaged_vm_never_reads_stdin(tmp_path, managed):
    """A VM without a profile exits 0 at once, even with a stdin that never ends."""
    r, w = os.pipe()
    try:
        p = subprocess.run([HOOK, "other", "prepare", "begin", "-"], stdin=r,
                           capture_output=True, env=managed, timeout=60)
    finally:
        os.close(r)
        os.close(w)
    assert p.returncode == 0 and p.stderr == b""
