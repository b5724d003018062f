"""The desktops of the simulated host variants (``.sim/desktop.json``, :mod:`.desktop`), each on
the NVIDIA host (GPU ``0000:01:00.0``: ``/dev/dri/card0``, ``/dev/nvidia0``; HDMI audio
``0000:01:00.1``: ``/dev/snd/controlC1``, ``/dev/snd/pcmC1D3p``), as in FIELD-NOTES §8:

- ``desktop-x11``: LightDM (``lightdm.service`` = ``display-manager.service``, its Xorg is the
  DM unit's process holding card0), autologin of ``alice`` into an X session (xterm);
- ``desktop-wayland``: greetd whose ``initial_session`` (once per boot) runs weston as alice,
  opening card0 through logind (so logind holds it too); a restart shows agreety as ``_greetd``
  (a text greeter, ``Type=tty``);
- ``desktop-greeter``: LightDM showing its greeter (user ``lightdm``), nobody logged in;
- ``desktop-vt``: no display manager; alice logged in on tty1 by ``getty@tty1.service``
  (autologin) running weston (through logind).

In every variant alice's instance runs PipeWire + WirePlumber on the HDMI audio nodes (she is in
``audio``: they keep them, §7), pipewire-pulse, their sockets, and a lingering unit that does
not touch the GPU (``syncthing.service``); she also has a session off seat0 (SSH). Greeter users
have their own instance with audio.
"""

from __future__ import annotations

AUDIO = ["/dev/snd/controlC1", "/dev/snd/pcmC1D3p"]
NVIDIA_CARD = ["/dev/dri/card0", "/dev/nvidia0", "/dev/nvidiactl", "/dev/nvidia-modeset"]


def _audio_units(extra: dict | None = None) -> dict:
    units = {
        "pipewire.socket": {},
        "pipewire.service": {"holds": AUDIO, "triggered_by": ["pipewire.socket"]},
        "wireplumber.service": {"holds": ["/dev/snd/controlC1"]},
        "pipewire-pulse.socket": {},
        "pipewire-pulse.service": {"holds": [], "triggered_by": ["pipewire-pulse.socket"]},
    }
    units.update(extra or {})
    return units


def _users(greeter: str | None = None, greeter_uid: int = 107) -> dict:
    users = {"alice": {"uid": 1000, "units": _audio_units(
        {"syncthing.service": {"holds": []}})}}
    if greeter:
        users[greeter] = {"uid": greeter_uid, "units": _audio_units()}
    return users


_REMOTE = [{"user": "alice", "type": "tty", "comm": "sshd-session", "service": "sshd"}]
_LIGHTDM_GREETER = {"user": "lightdm", "type": "x11", "comm": "lightdm-gtk-gre",
                    "service": "lightdm-greeter"}
# type "tty": greetd 0.9 and login(1) on a VT register the session before the compositor runs,
# and weston never changes it (seen in the real-systemd guest; only LightDM's X session is x11)
_WESTON = {"user": "alice", "type": "tty", "comm": "weston", "holds": NVIDIA_CARD,
           "via_logind": ["/dev/dri/card0"]}

DESKTOPS = {
    "desktop-x11": {
        "dm": "lightdm.service", "policy": "autologin",
        "autologin": {"user": "alice", "type": "x11", "comm": "xterm",
                      "service": "lightdm-autologin"},
        "greeter": _LIGHTDM_GREETER, "users": _users("lightdm"), "remote": _REMOTE},
    "desktop-wayland": {
        "dm": "greetd.service", "policy": "initial_once",
        "autologin": dict(_WESTON, service="greetd", tty="tty1"),
        "greeter": {"user": "_greetd", "type": "tty", "comm": "agreety", "service": "greetd",
                    "tty": "tty1"},
        "users": _users("_greetd", 995), "remote": _REMOTE},
    "desktop-greeter": {
        "dm": "lightdm.service", "policy": "greeter", "greeter": _LIGHTDM_GREETER,
        "users": {**_users("lightdm"), "alice": dict(_users()["alice"], linger=True)},
        "remote": _REMOTE},
    "desktop-vt": {
        "vt": dict(_WESTON, tty="tty1", getty="getty@tty1.service", service="login"),
        "users": _users(), "remote": _REMOTE},
}

# no nvidia-persistenced here: a profile naming only the devices is enough on these hosts
_BASE_UNITS = {"sshd.service": {"active": True, "holds": []}}

#: Units of each desktop variant (``units.json``).
UNITS = {
    "desktop-x11": {"lightdm.service": {"aliases": ["display-manager.service"], "active": True,
                                        "holds": NVIDIA_CARD}, **_BASE_UNITS},
    "desktop-wayland": {"greetd.service": {"aliases": ["display-manager.service"],
                                           "active": True, "holds": []}, **_BASE_UNITS},
    "desktop-greeter": {"lightdm.service": {"aliases": ["display-manager.service"],
                                            "active": True, "holds": NVIDIA_CARD}, **_BASE_UNITS},
    "desktop-vt": {"getty@tty1.service": {"aliases": ["autovt@tty1.service"], "active": True,
                                          "holds": []}, **_BASE_UNITS},
}


def wait_up(root: str, timeout_s: float = 20.0) -> None:
    """Wait until the desktop of simulated host ``root`` is up: a WirePlumber holds the HDMI
    audio's nodes (the last thing a desktop starts, FIELD-NOTES §8); woken by inotify
    ``IN_OPEN`` on the nodes.

    :raises TimeoutError: not up within ``timeout_s`` s.
    """
    import time

    from vfio_hookd import procs
    from vfio_hookd.inotify import IN_OPEN, Inotify

    from .kernel import SimHost
    host = SimHost(root)
    deadline = time.monotonic() + timeout_s
    with Inotify() as ino:
        for n in AUDIO:
            ino.add(host.path(n), IN_OPEN)
        while not any(h.command == "wireplumber" for h in procs.find_holders(host, AUDIO)):
            if not ino.wait(deadline):
                raise TimeoutError(f"the desktop of {root} is not up after {timeout_s:g} s")
