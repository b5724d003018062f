#!/bin/sh
# /init of the kernel tests' initramfs (busybox). Mounts the host's root (9p, read-only) under a
# tmpfs overlay so that the guest can write anywhere without touching the host, mounts the
# guest's own /proc /sys /dev in it, binds the test kernel's modules at /lib/modules/KV, and
# runs tests/kernel/guest_runner.py in that chroot. The verdict goes to QEMU through
# isa-debug-exit (port 0xf4): 0 = every scenario passed (QEMU exits 1), 1 = some failed (QEMU
# exits 3). A crash of this script panics the kernel, and QEMU (-no-reboot) exits 0.
export PATH=/bin:/sbin
mkdir -p /proc /sys /dev /host /out /rw /newroot
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "vfio-hookd guest init: loading 9p/overlay modules"
for m in $(cat /modules.order); do insmod "/modules/$m" || echo "insmod $m failed"; done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose hostroot /host || echo "mount hostroot failed"
mount -t 9p -o trans=virtio,version=9p2000.L,cache=none out /out || echo "mount out failed"
. /out/boot.env
mount -t tmpfs -o size=512m tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
    || echo "overlay mount failed"
R=/newroot
if [ "${DESKTOP:-0}" = 1 ]; then
    # desktop boot: real systemd as PID 1 (FIELD-NOTES §8); the runner is its service
    # (tests/kernel/desktop_runner.py) and reports the verdict through isa-debug-exit itself
    mkdir -p "$R/lib/modules/$KV" "$R/vfio-out"
    mount --bind "/host$KMODS" "$R/lib/modules/$KV"
    mount --bind /out "$R/vfio-out"
    . "/host$REPO/tests/kernel/desktop_root.sh"
    echo /sbin/modprobe > /proc/sys/kernel/modprobe
    mount --move /dev "$R/dev"
    mount --move /sys "$R/sys"
    mount --move /proc "$R/proc"
    echo "vfio-hookd guest init: switch_root to systemd"
    exec switch_root /newroot /lib/systemd/systemd
fi
mount -t proc proc "$R/proc"
mount -t sysfs sysfs "$R/sys"
mount -t devtmpfs devtmpfs "$R/dev"
# The repo may live under a directory that gets the guest's own tmpfs below (a clone in /tmp,
# as CI may make): keep the overlay's view of it and put it back on top afterwards.
mkdir -p /rw/repo
mount --bind "$R$REPO" /rw/repo
mkdir -p "$R/dev/pts" "$R/dev/shm"
mount -t devpts devpts "$R/dev/pts"
mount -t tmpfs tmpfs "$R/dev/shm"
mount -t tmpfs tmpfs "$R/run"
mount -t tmpfs tmpfs "$R/tmp"
mkdir -p "$R$REPO"
mount --move /rw/repo "$R$REPO"
mkdir -p "$R/lib/modules/$KV" "$R/vfio-out"
mount --bind "/host$KMODS" "$R/lib/modules/$KV"
mount --bind /out "$R/vfio-out"
mount -t cgroup2 cgroup2 "$R/sys/fs/cgroup" 2>/dev/null
# The kernel's own module requests (request_module(): HDA codec drivers, char-major-* aliases)
# run /proc/sys/kernel/modprobe in PID 1's root, this initramfs, whose busybox modprobe knows
# no modules: hand them to the real kmod in the chroot, as a booted system's modprobe does.
printf '#!/bin/sh\nexec /bin/chroot %s /sbin/modprobe "$@"\n' "$R" > /sbin/modprobe-chroot
chmod 755 /sbin/modprobe-chroot
echo /sbin/modprobe-chroot > /proc/sys/kernel/modprobe
echo "vfio-hookd guest init: running the scenarios ($SCENARIOS)"
chroot "$R" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
    "$REPO/.venv/bin/python" "$REPO/tests/kernel/guest_runner.py" /vfio-out
rc=$?
echo "vfio-hookd guest init: runner exit status $rc"
sync
if [ "$rc" -eq 0 ]; then v='\000'; else v='\001'; fi
printf "$v" | dd of=/dev/port bs=1 seek=244 count=1 conv=notrunc 2>/dev/null
echo "vfio-hookd guest init: isa-debug-exit did not stop QEMU" >&2
poweroff -f
