#!/usr/bin/env bash
# Two "hosts" on this machine: network namespaces with their own addresses, each running an
# sshd, joined by a bridge. `lmx launch --hostfile` reaches them over ssh as it would two
# machines (same filesystem, so the same lmx binary and model path). Prints what
# `lmx launch` printed on stdout; exits 77 when this machine cannot make namespaces.
# Usage: tests/multihost/run.sh LMX MODEL LMX_ARGS...
set -euo pipefail
lmx=$1 model=$2
shift 2
id=$$
work=$(mktemp -d /tmp/lmx-multihost.XXXXXX)
bridge=lmxbr$id
hosts=(10.231.0.2 10.231.0.3)
cleanup() {
    for i in 0 1; do
        [ -f "$work/sshd$i.pid" ] && kill "$(cat "$work/sshd$i.pid")" 2>/dev/null || true
        ip netns del "lmxh$i-$id" 2>/dev/null || true
    done
    ip link del "$bridge" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
command -v /usr/sbin/sshd ssh ssh-keygen >/dev/null || { echo "needs sshd, ssh and ssh-keygen (apt install openssh-server; scripts/test.sh does)" >&2; exit 1; }
if ! ip link add "$bridge" type bridge 2>/dev/null; then
    echo "cannot create network interfaces here (needs root / CAP_NET_ADMIN)" >&2
    exit 77
fi
ip addr add 10.231.0.1/24 dev "$bridge"
ip link set "$bridge" up
ssh-keygen -q -t ed25519 -N "" -f "$work/id"
ssh-keygen -q -t ed25519 -N "" -f "$work/hostkey"
cp "$work/id.pub" "$work/authorized_keys"
chmod 600 "$work/authorized_keys"
mkdir -p /run/sshd
for i in 0 1; do
    ns=lmxh$i-$id
    ip netns add "$ns"
    ip link add "lv$i-$id" type veth peer name eth0 netns "$ns"
    ip link set "lv$i-$id" master "$bridge" up
    ip netns exec "$ns" ip addr add "${hosts[$i]}/24" dev eth0
    ip netns exec "$ns" ip link set eth0 up
    ip netns exec "$ns" ip link set lo up
    cat > "$work/sshd$i.conf" <<CONF
ListenAddress ${hosts[$i]}
HostKey $work/hostkey
AuthorizedKeysFile $work/authorized_keys
PidFile $work/sshd$i.pid
PermitRootLogin prohibit-password
PasswordAuthentication no
StrictModes no
UsePAM no
CONF
    ip netns exec "$ns" /usr/sbin/sshd -f "$work/sshd$i.conf"
done
printf '[{"ssh": "%s", "ips": ["%s"]}, {"ssh": "%s", "ips": ["%s"]}]\n' "${hosts[0]}" "${hosts[0]}" "${hosts[1]}" "${hosts[1]}" > "$work/hosts.json"
ssh_args="-i $work/id -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o BatchMode=yes"
# Wait for both sshds.
for h in "${hosts[@]}"; do
    for _ in $(seq 50); do ssh $ssh_args "$h" true 2>/dev/null && break; sleep 0.1; done
done
launch=("$lmx" launch --hostfile "$work/hosts.json")
for a in $ssh_args; do launch+=("--ssh-arg=$a"); done
# First the hosts check (ssh, the same lmx, Open MPI, the model readable), then the run.
"${launch[@]}" --check -- "$@" --model "$model"
# The two hosts share this machine's cores: one thread per rank.
"${launch[@]}" --env RAYON_NUM_THREADS=1 \
    --mpi-arg --mca --mpi-arg oob_tcp_if_include --mpi-arg 10.231.0.0/24 \
    --mpi-arg --mca --mpi-arg btl_tcp_if_include --mpi-arg 10.231.0.0/24 \
    --mpi-arg --mca --mpi-arg btl --mpi-arg self,tcp \
    -- "$@" --model "$model"
