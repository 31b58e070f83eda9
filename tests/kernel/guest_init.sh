#!/bin/sh
# PID 1 of the user-mode Linux guest that runs the kernel tests (see tests/kernel/run.py).
#
# run.py copies this script into the run folder build/uml/runs/<id>/ and boots with init=<that copy>, so the
# run folder is this script's own folder. The guest's root is the host's filesystem (hostfs): everything written
# outside the tmpfs mounts made below lands on the host, so this script writes only into the run folder.
# Output goes to files there, never to the (slow) console. It always ends with `poweroff -f`: PID 1 exiting
# would panic the guest kernel instead of shutting it down.

RUN_DIR=${0%/*}
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
date +%s.%N >"$RUN_DIR/init-started"
exec >"$RUN_DIR/init.log" 2>&1 </dev/null
# APROXY_REPO (the checkout), APROXY_BUILD (build/uml) and maybe APROXY_GUEST_SELECTED (the node ids to
# run), shell-quoted by run.py.
. "$RUN_DIR/guest.env"

log() {
    echo "$(date +%s.%N) $*"
}

finish() {
    dmesg >"$RUN_DIR/dmesg.log" 2>&1
    # hostfs writes go through the guest's page cache; `poweroff -f` does not sync.
    sync
    poweroff -f --no-wtmp  # -f: no init system to ask; --no-wtmp: the host's /var/log/wtmp is ours too
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
[ -c /dev/null ] || mount -t devtmpfs devtmpfs /dev
# Private scratch space, so the guest never litters the host's /tmp and /run (ip netns lives in /run/netns).
# A checkout under /tmp (CI may clone anywhere) must stay visible: then /tmp is left as it is and the scratch
# space is a directory in the guest's own /run instead.
mount -t tmpfs tmpfs /run
case "$RUN_DIR" in
    /tmp/*) SCRATCH=/run/aproxy/scratch ;;
    *) mount -t tmpfs tmpfs /tmp && SCRATCH=/tmp ;;
esac
mkdir -p /run/aproxy/bin "$SCRATCH"
: >/run/aproxy/guest  # marker the guest side of conftest.py checks before touching any kernel state

# Modules come from build/uml/modroot-<version> (run.py ran depmod there). A wrapper named modprobe, first on
# PATH and registered as the kernel's module loader, makes on-demand loads work too (ipvsadm, iptables, a
# scheduler requested by name, `ip link add type dummy`).
MODROOT="$APROXY_BUILD/modroot-$(uname -r)"
printf '#!/bin/sh\nexec /usr/sbin/modprobe -d %s "$@"\n' "$MODROOT" >/run/aproxy/bin/modprobe
chmod 755 /run/aproxy/bin/modprobe
echo /run/aproxy/bin/modprobe >/proc/sys/kernel/modprobe
# This kernel has no nftables for the ip family: the iptables commands must be the legacy variant.
for tool in iptables ip6tables; do
    for suffix in "" -save -restore; do
        ln -s "/usr/sbin/$tool-legacy$suffix" "/run/aproxy/bin/$tool$suffix"
    done
done
export PATH=/run/aproxy/bin:$PATH

MODULES="ipv6 ip_set ip_set_hash_ipportip xt_set ip_vs ip_vs_rr ip_vs_wrr ip_vs_lc ip_vs_wlc ip_vs_lblc ip_vs_lblcr ip_vs_dh ip_vs_sh ip_vs_sed
ip_vs_nq ip_vs_mh dummy veth nf_conntrack nf_conntrack_netlink ip_tables iptable_nat iptable_filter
iptable_mangle xt_ipvs xt_nat xt_MASQUERADE xt_mark xt_comment xt_conntrack xt_statistic xt_recent xt_tcpudp
xt_addrtype xt_multiport ipt_REJECT ip6_tables ip6table_nat ip6table_filter ip6table_mangle ip6t_REJECT
bridge ip_set_hash_ip ip_set_hash_ipport ip_set_hash_ipportnet ip_set_bitmap_port"
log "loading modules from $MODROOT"
# shellcheck disable=SC2086 # word splitting of the module list is intended
if ! modprobe -a $MODULES; then
    for module in $MODULES; do
        modprobe "$module" || echo "MODULE LOAD FAILED: $module"
    done
fi

log "modules loaded"
# The node's own network: IPVS refuses real servers it has no route to, so the guest gets an interface and
# default routes (a dummy: no packet ever leaves the guest). Addresses are private test ranges.
# No IPv6 duplicate address detection (it holds new addresses back for a second or more), also in the
# namespaces tests create: those inherit the node's conf/default settings instead of the kernel's defaults.
sysctl -q -w net.core.devconf_inherit_init_net=1 \
    net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
# One `ip` process for all of it: every process start costs ~0.1 s here.
ip -batch - <<EOF
link set lo up
link add eth0 type dummy
addr add 172.30.0.2/24 dev eth0
addr add fd00:172:30::2/64 dev eth0 nodad
link set eth0 up
route add 0.0.0.0/0 via 172.30.0.1 dev eth0
route add ::/0 via fd00:172:30::1 dev eth0
EOF

export APROXY_IN_GUEST=1
[ -n "${APROXY_GUEST_SELECTED:-}" ] && export APROXY_GUEST_SELECTED
export APROXY_GUEST_RUN_DIR="$RUN_DIR"
export HOME="$SCRATCH" TMPDIR="$SCRATCH"
# No __pycache__ written into the host's checkout from inside the guest.
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1

# What to run, one argument a line, from run.py: pytest's arguments (its own options, the junit XML path, the
# tests to run) in pytest.args, or a whole command line in program.args (`make run`'s demo).
set --
if [ -f "$RUN_DIR/program.args" ]; then
    ARGS="$RUN_DIR/program.args" OUTPUT="$RUN_DIR/program.log"
else
    ARGS="$RUN_DIR/pytest.args" OUTPUT="$RUN_DIR/pytest.log"
    set -- "$APROXY_REPO/.venv/bin/pytest"
fi
while IFS= read -r arg; do
    set -- "$@" "$arg"
done <"$ARGS"

cd "$APROXY_REPO" || finish
log "running $*"
"$@" >"$OUTPUT" 2>&1
code=$?
log "exited with $code"
echo "$code" >"$RUN_DIR/exit-code.tmp" && mv "$RUN_DIR/exit-code.tmp" "$RUN_DIR/exit-code"
finish
