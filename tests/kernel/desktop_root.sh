#!/bin/sh
# Sourced by the guest's /init (tests/kernel/guest_init.sh, busybox sh) on a desktop boot
# (boot.env DESKTOP=1), with the overlay root at $R, before it switch_roots into
# /lib/systemd/systemd (FIELD-NOTES §8). Writes the guest-only configuration into the overlay's
# tmpfs upper (nothing reaches this machine): the user alice, the masks, graphical.target, the
# test runner's service. The variants' own configuration (which display manager, autologin,
# the getty) is written by tests/kernel/desktop_runner.py while the guest runs.
set -u
E=$R/etc
# tmpfs on /tmp before systemd starts: Debian's tmp.conf (D /tmp) otherwise makes
# systemd-tmpfiles write overlay whiteouts for the whole /tmp of this machine over 9p (2 min).
# A clone under /tmp (as CI may make) is kept visible: moved aside, put back on top of the tmpfs,
# and also bound at /opt/vh-repo, which vfio-hookd's wrapper below uses: the daemon's unit has
# PrivateTmp=yes, so a service sees an empty /tmp of its own.
mkdir -p /rw/repo-aside "$R/opt/vh-repo"
mount --bind "$R$REPO" /rw/repo-aside
mount -t tmpfs -o mode=1777 tmpfs "$R/tmp"
mkdir -p "$R$REPO"
mount --bind /rw/repo-aside "$R$REPO"
mount --bind /rw/repo-aside "$R/opt/vh-repo"
: >"$E/.updated"
# This machine's policy-rc.d (if any: CI images ship one that refuses every start) would stop
# the package's maintainer scripts from starting its units in the guest, as they do on a
# user's machine: the guest's root has none (a whiteout in the overlay only).
rm -f "$R/usr/sbin/policy-rc.d"
# man-db's dpkg trigger rebuilds the whole manual page index when this flag exists (minutes
# under TCG, during the package variant's dpkg -i): off in the guest, as in Debian's images
rm -f "$R/var/lib/man-db/auto-update"
: >"$R/var/.updated"
printf '# vfio-hookd guest: nothing to mount\n' >"$E/fstab"
echo vh-guest >"$E/hostname"
# alice (uid 1000, group audio as Debian's installer does for the first user), with her own
# entries: this machine's uid/gid 1000 (if any) is replaced in the guest's copies.
grep -v '^[^:]*:[^:]*:1000:' "/host/etc/passwd" | grep -v '^alice:' >"$E/passwd"
echo 'alice:x:1000:1000:Alice:/home/alice:/bin/bash' >>"$E/passwd"
grep -v '^[^:]*:[^:]*:1000:' "/host/etc/group" | grep -v '^alice:' \
    | sed -e 's/^\(audio:[^:]*:[^:]*:\)\(.*\)$/\1\2,alice/' -e 's/^\(audio:[^:]*:[^:]*:\),alice$/\1alice/' \
    >"$E/group"
echo 'alice:x:1000:' >>"$E/group"
cut -d: -f1 "$E/passwd" | while read -r u; do
    grep "^$u:" /host/etc/shadow 2>/dev/null || echo "$u:*:19000:0:99999:7:::"
done | grep -v '^alice:' >"$E/shadow"
# '*': no password, not locked ('!'), so sshd accepts her key
echo 'alice:*:19000:0:99999:7:::' >>"$E/shadow"
cut -d: -f1 "$E/group" | while read -r g; do echo "$g:*::"; done >"$E/gshadow"
chmod 640 "$E/shadow" "$E/gshadow"
mkdir -p "$R/home/alice"
chown 1000:1000 "$R/home/alice"
chmod 755 "$R/home/alice"
# journald in memory only
mkdir -p "$E/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\nRuntimeMaxUse=64M\n' >"$E/systemd/journald.conf.d/vh.conf"
# no display manager at boot: the runner picks one per variant
rm -f "$E/systemd/system/display-manager.service"
rm -f "$E/systemd/system/getty.target.wants/getty@tty1.service"
ln -sf /lib/systemd/system/graphical.target "$E/systemd/system/default.target"
# mask what this machine's image enables but the guest does not need
for u in postgresql.service libvirtd.service libvirt-guests.service libvirtd.socket \
    libvirtd-ro.socket libvirtd-admin.socket virtlogd.socket virtlogd-admin.socket \
    virtlockd.socket virtlockd-admin.socket virtlogd.service virtlockd.service \
    e2scrub_reap.service e2scrub_all.timer systemd-timesyncd.service systemd-pstore.service \
    apt-daily.timer apt-daily-upgrade.timer logrotate.timer man-db.timer fstrim.timer \
    dpkg-db-backup.timer serial-getty@ttyS0.service console-getty.service \
    systemd-networkd-wait-online.service systemd-update-utmp-runlevel.service \
    cron.service exim4.service rsyslog.service; do
    ln -sf /dev/null "$E/systemd/system/$u"
done
# the test runner: a service of the guest's systemd, started once the system is up
cat >"$E/systemd/system/vh-desktop-runner.service" <<UNIT
[Unit]
Description=vfio-hookd desktop test runner (tests/kernel/desktop_runner.py)
After=multi-user.target dbus.service systemd-logind.service ssh.service
Wants=dbus.service systemd-logind.service

[Service]
Type=exec
Environment=PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 HOME=/root
ExecStart=$REPO/.venv/bin/python $REPO/tests/kernel/desktop_runner.py /vfio-out
StandardOutput=journal+console
StandardError=journal+console
UNIT
mkdir -p "$E/systemd/system/graphical.target.wants"
ln -sf ../vh-desktop-runner.service "$E/systemd/system/graphical.target.wants/vh-desktop-runner.service"
# vfio-hookd as a user has it on PATH (a pip install puts it in /usr/local/bin): this
# repository's code, whichever checkout the venv was made in
cat >"$R/usr/local/bin/vfio-hookd" <<SH
#!/bin/sh
PYTHONPATH=/opt/vh-repo exec /opt/vh-repo/.venv/bin/python -m vfio_hookd "\$@"
SH
chmod 755 "$R/usr/local/bin/vfio-hookd"
