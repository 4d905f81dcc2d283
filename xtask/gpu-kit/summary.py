"""Summary of a GPU kit run: per run and phase, NVML's memory for the process against what the hami
agent attributed to its cgroup, the agent's call counts, and what the ioctl log saw. Reads OUT (the
first argument); prints a plain-text report."""
import glob
import json
import os
import sys
from collections import Counter

MIB = 1 << 20


def read(path, default=""):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return default


def nvml_mib(path, pid):
    total = 0
    for line in read(path).splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid) and parts[1].isdigit():
            total += int(parts[1])
    return total


def agent_view(path, cgid):
    try:
        snap = json.loads(read(path, "{}"))
    except ValueError:
        return None
    mem, calls = 0, Counter()
    for c in snap.get("containers", []):
        if str(c.get("cgroup_id")) == str(cgid):
            for g in c.get("gpus", []):
                mem += g.get("memory_bytes", 0)
            calls.update(c.get("cuda_calls", {}))
    return mem, calls, snap.get("agent", {})


def main(out):
    print(read(os.path.join(out, "facts.txt")).split("--- /dev")[0].strip())
    for run in ["main", "async", "mknod"]:
        pid = read(os.path.join(out, "phases", f"{run}.pid")).strip()
        cgid = read(os.path.join(out, "phases", f"{run}.cgroup-id")).strip()
        print(f"\n## run {run}: pid {pid or '?'} cgroup id {cgid or '?'}")
        print(f"{'phase':44} {'NVML MiB':>9} {'agent MiB':>10}  launches")
        view = None
        for snap in sorted(glob.glob(os.path.join(out, "phases", f"{run}-*.snapshot.json"))):
            base = snap[: -len(".snapshot.json")]
            name = os.path.basename(base)[len(run) + 1 :]
            view = agent_view(snap, cgid)
            nv = nvml_mib(base + ".nvml.csv", pid)
            if view is None:
                print(f"{name:44} {nv:>9} {'(no snapshot)':>10}")
                continue
            mem, calls, agent = view
            launches = {k: v for k, v in calls.items() if "Launch" in k}
            print(f"{name:44} {nv:>9} {mem / MIB:>10.1f}  {launches}")
        if view is not None:
            print(f"agent: {agent}")
        log = os.path.join(out, f"ioctls-{run}.jsonl")
        kinds = Counter()
        for line in read(log).splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            nr, size = r.get("nr"), r.get("size")
            if nr == 0xD3 and isinstance(r.get("xfer"), dict):
                nr, size = f"xfer:{r['xfer'].get('cmd')}", r["xfer"].get("size")
            kinds[(str(nr), size, r.get("ret"))] += 1
        print("ioctls (escape, size, ret): count")
        for k, v in sorted(kinds.items()):
            print(f"  {k}: {v}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "out")
