#!/bin/busybox sh
# PID 1 of the test VM (test/vm/vm.ts). Sets up the system, loads the modules listed in
# /etc/udm-vm/modules, then serves the host on the virtio-serial port named udm.ctl:
#   host → guest: one line per command, the base64 of a shell script;
#   guest → host: "READY <kernel version>" once, then per command "<exit status> <base64 of its
#   stdout and stderr>".
# Lines carry base64 only, so the channel is byte-exact whatever the commands print. When the
# host closes the port (EOF) or sends "poweroff -f", the VM powers off and qemu exits
# (-no-reboot, panic=-1).

/bin/busybox mkdir -p /proc /sys /dev /tmp /run /mnt
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run

while read -r m; do
  # crc32c-intel needs SSE4.2 (absent on some qemu CPU models); crc32c_generic stands in.
  insmod "/lib/modules/$(uname -r)/$m" || echo "udm-vm: insmod $m failed"
done </etc/udm-vm/modules

# `vport NAME`: the /dev node of the virtio-serial port qemu named NAME.
cat >/bin/vport <<'EOF'
#!/bin/sh
for p in /sys/class/virtio-ports/*; do
  [ "$(cat "$p/name" 2>/dev/null)" = "$1" ] && echo "/dev/${p##*/}" && exit 0
done
echo "vport: no port named $1" >&2
exit 1
EOF
chmod 755 /bin/vport

# The ports and their names arrive from the host after the driver has loaded; wait for as many
# named ports as the kernel command line announces (udmvm.ports=N), at most 30 s.
want=$(sed -n 's/.*udmvm\.ports=\([0-9]*\).*/\1/p' /proc/cmdline)
tries=0
while :; do
  have=0
  for p in /sys/class/virtio-ports/*; do
    [ -n "$(cat "$p/name" 2>/dev/null)" ] && [ -e "/dev/${p##*/}" ] && have=$((have + 1))
  done
  [ "$have" -ge "${want:-1}" ] && break
  tries=$((tries + 1))
  if [ "$tries" -gt 600 ]; then
    echo "udm-vm: only $have of ${want:-1} virtio-serial ports appeared"
    poweroff -f
  fi
  usleep 50000
done

ctl=$(vport udm.ctl) || poweroff -f
exec 3<>"$ctl"
echo "READY $(uname -r)" >&3
while IFS= read -r line <&3; do
  echo "$line" | base64 -d >/tmp/.udm-vm-cmd
  (cd / && sh /tmp/.udm-vm-cmd) </dev/null >/tmp/.udm-vm-out 2>&1
  echo "$? $(base64 -w 0 </tmp/.udm-vm-out)" >&3
done
poweroff -f
