"""Error codes: each has its own stable exit status, documented in the README."""

from __future__ import annotations

import os
import re

import pytest

from conftest import REPO
from vfio_hookd import errors
from vfio_hookd.errors import HookdError

pytestmark = pytest.mark.unit


def test_every_code_has_its_own_exit_status():
    statuses = list(errors.EXIT_STATUS.values())
    assert len(set(statuses)) == len(statuses)
    assert min(statuses) == 2   # 0 success, 1 an unexpected bug
    assert errors.CODES == tuple(errors.EXIT_STATUS)
    for code, status in errors.EXIT_STATUS.items():
        assert HookdError(code, "x").exit_status == status


def test_exit_statuses_never_move():
    """Scripts test these numbers: the ones released with 0.1 stay where they were."""
    released = ["PROFILE_INVALID", "VM_NAME_INVALID", "NOT_MANAGED", "DOMAIN_XML_INVALID",
                "DEVICE_NOT_FOUND", "IOMMU_GROUP_INCOMPLETE", "DEVICE_CLAIMED", "DEVICE_BUSY",
                "UNIT_FAILED", "MODULE_FAILED", "BIND_FAILED", "VTCONSOLE_FAILED",
                "FRAMEBUFFER_FAILED", "TIMEOUT", "HOST_IO", "STATE_DRIFT", "RELEASE_INCOMPLETE",
                "DAEMON_UNREACHABLE", "BAD_REQUEST", "PERMISSION_DENIED", "SYSTEMD_UNAVAILABLE",
                "INSTALL_FAILED", "VM_RUNNING", "INTERNAL"]
    assert {c: errors.EXIT_STATUS[c] for c in released} == {c: i + 2 for i, c in enumerate(released)}
    assert errors.EXIT_STATUS["RECORD_INVALID"] == 26
    assert errors.EXIT_STATUS["UNTRUSTED_FILE"] == 27
    # reserved for issue 11's steps (33 CPU tuning, 34 hugepages, 36/37 the ROM dump)
    assert errors.EXIT_STATUS["INHIBIT_FAILED"] == 35


def test_the_readme_documents_every_exit_status():
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    documented = {code: int(n) for n, code in re.findall(r"\| (\d+) \| `([A-Z_]+)`", text)}
    assert documented == errors.EXIT_STATUS


def test_an_unknown_code_from_the_socket_becomes_internal():
    err = HookdError.from_dict({"code": "NO_SUCH", "message": "m"})
    assert err.code == errors.INTERNAL and "NO_SUCH" in err.message
    with pytest.raises(ValueError):
        HookdError("NO_SUCH", "m")


def test_the_codes_of_this_round_keep_their_reserved_numbers():
    assert errors.EXIT_STATUS["HUGEPAGES_SHORT"] == 34
