"""Phases of the hami GPU kit (run by run.sh, one process per run: main, async, mknod).

At each phase the script prints `PHASE <name>` and waits for a line on stdin, while run.sh records
NVML's per-process memory and the hami agent's snapshot. Nothing here asserts: the numbers are
compared offline (summary.py) and in the issue note.
"""
import ctypes
import os
import sys

MIB = 1 << 20


def mark(name):
    print(f"PHASE {name}", flush=True)
    sys.stdin.readline()


def main(run):
    print(f"PID {os.getpid()}", flush=True)
    import torch

    cuda = torch.device("cuda")
    torch.zeros(1, device=cuda)
    torch.cuda.synchronize()
    mark("init")
    if run == "mknod":
        a = torch.empty(256 * MIB, dtype=torch.uint8, device=cuda)
        torch.cuda.synchronize()
        mark("alloc-256MiB")
        del a
        return
    if run == "async":
        a = torch.empty(256 * MIB, dtype=torch.uint8, device=cuda)
        torch.cuda.synchronize()
        mark("async-256MiB")
        del a
        torch.cuda.synchronize()
        mark("async-freed")
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        mark("async-empty_cache")
        return
    held = []
    for size, name in [(MIB, "1MiB"), (64 * MIB, "64MiB"), (1024 * MIB, "1GiB")]:
        held.append(torch.empty(size, dtype=torch.uint8, device=cuda))
        torch.cuda.synchronize()
        mark(f"alloc-{name}")
    held.clear()
    torch.cuda.synchronize()
    mark("freed-kept-by-caching-allocator")
    torch.cuda.empty_cache()
    mark("empty_cache")
    y = torch.ones(1024, device=cuda)
    torch.cuda.synchronize()
    mark("before-1000-launches")
    for _ in range(1000):
        y.add_(1)
    torch.cuda.synchronize()
    mark("after-1000-launches")
    lib = ctypes.CDLL("libcuda.so.1")
    ptr = ctypes.c_uint64()
    rc = lib.cuMemAllocManaged(ctypes.byref(ptr), ctypes.c_size_t(256 * MIB), ctypes.c_uint(1))
    mark(f"managed-256MiB-rc{rc}")
    torch.empty(512 * MIB, dtype=torch.uint8, device=cuda)
    torch.cuda.synchronize()
    mark("alloc-512MiB-exit-without-free")
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "main")
