#!/usr/bin/env bash
# hami GPU kit (built by `cargo xtask gpu-kit DIR`): measures, on a node with an NVIDIA GPU, CUDA and
# PyTorch, what the real driver and libcuda do and what the hami agent attributes, per phase, against
# NVML. Everything goes under $OUT (default: ./out next to this script). Needs root. No network.
# Exit codes: 0 ran (read summary.txt), 2 not root, 3 no GPU here.
set -u
KIT="$(cd "$(dirname "$0")" && pwd)"
OUT="${OUT:-$KIT/out}"
mkdir -p "$OUT/phases"
exec > >(tee -a "$OUT/kit.log") 2>&1
START=$(date +%s)
step() { echo "== $* (+$(( $(date +%s) - START )) s)"; }

if [ ! -e /dev/nvidiactl ] || ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "no NVIDIA GPU here (/dev/nvidiactl or a working nvidia-smi is missing): nothing to measure"
    exit 3
fi
if [ "$(id -u)" != 0 ]; then
    echo "run as root: the agent loads eBPF programs, and the kit makes cgroups and device nodes"
    exit 2
fi
PY="${PYTHON:-python3}"

step "facts"
{
    echo "date: $(date -u +%FT%TZ)"
    echo "driver: $(cat /sys/module/nvidia/version 2>/dev/null)"
    echo "kernel: $(uname -r)"
    echo "cgroup fs: $(stat -fc %T /sys/fs/cgroup)"
    echo "btf: $(ls -l /sys/kernel/btf/vmlinux 2>&1)"
    echo "lsm: $(cat /sys/kernel/security/lsm 2>&1)"
    nvidia-smi -L
    nvidia-smi --query-gpu=index,uuid,pci.bus_id,persistence_mode,memory.total,name,driver_version --format=csv
    echo "--- /dev/nvidia*"; ls -l /dev/nvidia* 2>&1
    echo "--- /proc/devices"; grep -i nvidia /proc/devices
    echo "--- libraries"; ldconfig -p | grep -E 'libcuda\.so|libnvidia-ml\.so'
    echo "--- torch"; timeout 60 "$PY" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.device_count())' 2>&1
} > "$OUT/facts.txt" 2>&1
cat "$OUT/facts.txt"

step "agent"
# Every libcuda the linker knows, resolved (containers may carry others; this node's own are probed).
LIBS=$(ldconfig -p | awk '/libcuda\.so(\.1)? /{print $NF}' | xargs -r -n1 readlink -f | sort -u)
LIBS_JSON=$(printf '%s\n' $LIBS | "$PY" -c 'import json,sys; print(json.dumps([l.strip() for l in sys.stdin if l.strip()]))')
PORT=19394
cat > "$OUT/agent.json" <<JSON
{ "node_name": "gpu-kit", "listen": "127.0.0.1:$PORT", "interval_ms": 200, "retain_terminated_secs": 600,
  "libcuda": $LIBS_JSON,
  "paths": { "bpffs": "/sys/fs/bpf/hami-gpu-kit", "state_dir": "$OUT/agent-state", "regions_dir": "$OUT/regions" } }
JSON
"$KIT/hami-agent" detach --config "$OUT/agent.json" >/dev/null 2>&1
RUST_LOG=info "$KIT/hami-agent" run --config "$OUT/agent.json" > "$OUT/agent.log" 2>&1 &
AGENT=$!
trap 'kill $AGENT 2>/dev/null; wait $AGENT 2>/dev/null; "$KIT/hami-agent" detach --config "$OUT/agent.json" >/dev/null 2>&1' EXIT
for _ in $(seq 1 100); do
    curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1 && break
    kill -0 $AGENT 2>/dev/null || break
    sleep 0.2
done
if ! curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null 2>&1; then
    echo "the agent did not start; its log:"; tail -50 "$OUT/agent.log"
fi
curl -sf "http://127.0.0.1:$PORT/metrics" > "$OUT/metrics-start.txt" 2>&1

# Runs `phases.py <run>` in a cgroup of its own with the ioctl logger preloaded; at each `PHASE name`
# line it records NVML's per-process memory and the agent's snapshot, then lets the script go on.
run_phases() {
    local run="$1"; shift
    local cg=/sys/fs/cgroup/hami-gpu-kit-$run
    mkdir -p "$cg" 2>/dev/null
    local cgid; cgid=$(stat -c %i "$cg" 2>/dev/null || echo 0)
    echo "$cgid" > "$OUT/phases/$run.cgroup-id"
    local n=0
    coproc PHASES { exec env "$@" LD_PRELOAD="$KIT/libhami_ioctl_log.so" HAMI_IOCTL_LOG="$OUT/ioctls-$run.jsonl" \
        sh -c 'echo $$ > '"$cg"'/cgroup.procs 2>/dev/null; exec timeout 150 '"$PY"' '"$KIT"'/phases.py '"$run" 2>"$OUT/phases/$run.stderr"; }
    local pid=$PHASES_PID
    while IFS= read -r -t 120 line <&"${PHASES[0]}"; do
        echo "[$run] $line"
        case "$line" in
            PID\ *)
                echo "${line#PID }" > "$OUT/phases/$run.pid"
                ;;
            PHASE\ *)
                n=$((n + 1))
                local name="${line#PHASE }"; name="${name// /_}"
                local base="$OUT/phases/$run-$(printf %02d $n)-$name"
                sleep 0.5  # the agent drains events every few ms; NVML updates as the driver does
                nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits > "$base.nvml.csv" 2>&1
                curl -sf "http://127.0.0.1:$PORT/snapshot" > "$base.snapshot.json" 2>&1
                echo go >&"${PHASES[1]}"
                ;;
        esac
    done
    wait "$pid" 2>/dev/null; echo "[$run] exit $?"
    sleep 1
    curl -sf "http://127.0.0.1:$PORT/snapshot" > "$OUT/phases/$run-99-after-exit.snapshot.json" 2>&1
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits > "$OUT/phases/$run-99-after-exit.nvml.csv" 2>&1
}

step "phases: main (caching allocator)"
run_phases main
step "phases: cudaMallocAsync backend"
run_phases async PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync

step "phases: own /dev made with mknod in a private mount namespace (as runc does with CDI)"
UVM_MAJOR=$(awk '$2=="nvidia-uvm"{print $1}' /proc/devices)
NGPU=$(nvidia-smi -L | wc -l)
cat > "$OUT/mknod-dev.sh" <<SH
set -e
mount -t tmpfs -o mode=0755 tmpfs /dev
mknod -m 666 /dev/null c 1 3; mknod -m 666 /dev/zero c 1 5; mknod -m 666 /dev/random c 1 8
mknod -m 666 /dev/urandom c 1 9; mknod -m 666 /dev/tty c 5 0
mkdir -p /dev/shm /dev/pts; mount -t tmpfs tmpfs /dev/shm
mknod -m 666 /dev/nvidiactl c 195 255
for m in \$(seq 0 $((NGPU - 1))); do mknod -m 666 /dev/nvidia\$m c 195 \$m; done
[ -n "$UVM_MAJOR" ] && mknod -m 666 /dev/nvidia-uvm c $UVM_MAJOR 0 && mknod -m 666 /dev/nvidia-uvm-tools c $UVM_MAJOR 1
ls -li /dev > "$OUT/mknod-dev-listing.txt"
exec env "\$@"
SH
run_phases mknod unshare -m --propagation private bash "$OUT/mknod-dev.sh"

step "summary"
curl -sf "http://127.0.0.1:$PORT/metrics" > "$OUT/metrics-end.txt" 2>&1
"$PY" "$KIT/summary.py" "$OUT" | tee "$OUT/summary.txt"
step "done"
