"""What ``pip install .`` installs: the product only, and it runs.

The wheel is built from a copy of the repository (so the build's ``build/`` and ``*.egg-info``
stay out of the work tree) with ``pip wheel --no-deps --no-build-isolation``, as
``scripts/setup`` and the README's install do. It must hold ``vfio_hookd`` with its package
data and nothing of the test bed (``testbed/``: the simulated host, the demo, the test
helpers). Then it is installed into a throwaway venv (``--system-site-packages
--without-pip``, the README's layout; pip runs from the outside with ``--python``) and the
installed ``python -m vfio_hookd`` and ``vfio-hookd`` console script really run.
"""

from __future__ import annotations

import pytest

import os
import shutil
import subprocess
import sys
import zipfile

from conftest import REPO

pytestmark = pytest.mark.unit

_SKIP = {".venv", ".cache", ".git", "artefacts", "build", "__pycache__", ".pytest_cache"}


def _copy_repo(dst: str) -> None:
    def ignore(_dir, names):
        return [n for n in names if n in _SKIP or n.endswith(".egg-info")]
    shutil.copytree(REPO, dst, symlinks=True, ignore=ignore)


def _run(argv, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300, **kw)
    assert r.returncode == 0, f"{argv}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r


def test_the_wheel_holds_the_product_only_and_runs(tmp_path):
    src, out, venv = str(tmp_path / "src"), str(tmp_path / "wheels"), str(tmp_path / "venv")
    _copy_repo(src)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "-w", out, "."], cwd=src)
    wheels = [f for f in os.listdir(out) if f.endswith(".whl")]
    assert len(wheels) == 1, wheels
    wheel = os.path.join(out, wheels[0])
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    code = [n for n in names if ".dist-info/" not in n]
    assert all(n.startswith("vfio_hookd/") for n in code), code
    for bad in ("testbed/", "sim", "demo", "fake_systemd", "conftest"):
        assert not [n for n in names if bad in n], (bad, names)
    for need in ("vfio_hookd/__main__.py", "vfio_hookd/cli.py", "vfio_hookd/qemu_hook.py",
                 "vfio_hookd/data/vfio-hookd.service", "vfio_hookd/data/vfio-hookd.socket"):
        assert need in names, (need, names)

    # install it where nothing of the repository is importable, and run it
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv])
    py = os.path.join(venv, "bin", "python")
    # without the repository on the path (conftest puts it on PYTHONPATH): the editable
    # install's vfio_hookd.egg-info there would read as "already installed" to pip
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index",
          wheel], cwd=str(tmp_path), env=env)
    where = _run([py, "-c", "import vfio_hookd; print(vfio_hookd.__file__)"], env=env,
                 cwd=str(tmp_path)).stdout.strip()
    assert where.startswith(os.path.join(venv, "lib")), where
    r = subprocess.run([py, "-c", "import testbed"], capture_output=True, text=True, env=env,
                       cwd=str(tmp_path))
    assert r.returncode != 0 and "No module named 'testbed'" in r.stderr, r.stderr
    for argv in ([py, "-m", "vfio_hookd", "--help"],
                 [os.path.join(venv, "bin", "vfio-hookd"), "--help"]):
        r = _run(argv, env=env, cwd=str(tmp_path))
        assert "usage: vfio-hookd" in r.stdout and "daemon" in r.stdout, r.stdout
    r = _run([py, "-m", "vfio_hookd", "daemon", "--help"], env=env, cwd=str(tmp_path))
    assert "--host-root" not in r.stdout
    # the package data is installed and used: hook and units into a root
    root = tmp_path / "root"
    r = _run([os.path.join(venv, "bin", "vfio-hookd"), "install", "--root", str(root),
              "--no-reload"], env=dict(env, VFIO_HOOKD_CONFIG="/etc/vfio-hookd"),
             cwd=str(tmp_path))
    hook = root / "etc/libvirt/hooks/qemu.d/vfio-hookd"
    assert hook.read_text().startswith("#!/usr/bin/python3")
    unit = (root / "etc/systemd/system/vfio-hookd.service").read_text()
    assert os.path.join(venv, "bin", "vfio-hookd") in unit
