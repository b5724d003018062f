"""The kernel tests' session fixture, shared by ``test_kernel.py`` and ``test_desktop.py``."""

from __future__ import annotations

import pytest

from kernel_plan import Boots


@pytest.fixture(scope="session")
def kernel_boots():
    """The session's boots (:class:`kernel_plan.Boots`): all start, two at a time, when the
    first kernel test asks for its boot, so a run without kernel tests costs nothing."""
    b = Boots()
    yield b
    b.close()
