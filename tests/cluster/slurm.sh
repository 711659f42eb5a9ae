#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for the cluster tests.
#   tests/cluster/slurm.sh up      install (Debian's slurm-wlm + munge), configure, start; prints the state dir
#   tests/cluster/slurm.sh down    stop the daemons by their PID files
# Needs root and a reachable Debian mirror; nothing here touches systemd. Known to work: slurm-wlm 22.05.
set -euo pipefail
STATE=${MOELANG_SLURM_STATE:-/tmp/moelang-slurm}
CONF_DIR=/etc/slurm

up() {
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
  fi
  mkdir -p "$STATE"/{spool,ctld,log} "$CONF_DIR" /run/munge /var/lib/munge /var/log/munge /etc/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
  chmod 0400 /etc/munge/munge.key
  if ! pgrep -x munged >/dev/null; then
    if id munge >/dev/null 2>&1; then runuser -u munge -- /usr/sbin/munged; else /usr/sbin/munged --force; fi
  fi
  # The node line comes from the hardware (RealMemory above the real memory drains the node).
  local node
  node=$(slurmd -C | head -n 1 | sed 's/ UpTime=.*//')
  local name
  name=$(echo "$node" | sed -n 's/^NodeName=\([^ ]*\).*/\1/p')
  cat > "$CONF_DIR/slurm.conf" <<CONF
ClusterName=moelang
SlurmctldHost=${name}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.txt
JobAcctGatherType=jobacct_gather/none
MinJobAge=600
ReturnToService=2
SchedulerType=sched/backfill
MpiDefault=none
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=main Nodes=$name Default=YES MaxTime=INFINITE State=UP
CONF
  cp "$CONF_DIR/slurm.conf" "$STATE/slurm.conf"
  pkill -x slurmctld 2>/dev/null || true
  pkill -x slurmd 2>/dev/null || true
  sleep 1
  /usr/sbin/slurmctld -c -f "$CONF_DIR/slurm.conf"
  /usr/sbin/slurmd -f "$CONF_DIR/slurm.conf"
  for _ in $(seq 60); do
    if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed)'; then
      echo "$STATE"
      return 0
    fi
    sleep 1
  done
  echo "slurm did not come up; see $STATE/log" >&2
  sinfo >&2 || true
  return 1
}

down() {
  for pid in "$STATE/slurmd.pid" "$STATE/slurmctld.pid"; do
    if [ -s "$pid" ]; then kill "$(cat "$pid")" 2>/dev/null || true; fi
  done
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
