"""What the machine can do and what the process holds: matmul peak, copy bandwidth, resident memory."""

from __future__ import annotations

import time

import torch


def measure_matmul_peak(dtype: torch.dtype, device: str, seconds: float = 1.0) -> float:
    """Best GFLOP/s of a large square matmul: the machine's practical ceiling for this dtype and thread count."""
    n = 8192 if str(device).startswith("cuda") else 2048  # big enough to fill the device
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == 0.0:
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def measure_copy_bandwidth(device: str) -> float:
    """Best GB/s of a large device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = 0.0
    for _ in range(20):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = max(best, 2 * src.numel() / (time.perf_counter() - t) / 1e9)
    return best


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def rss_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
