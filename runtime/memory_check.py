"""Before bind allocates the KV store: does it fit in this machine's free GPU and host memory?

The sizes are the store's own (runtime/kv_store.py) for the plan's residency segments: a resident
layer holds K and V for the segment's length, an offloaded one a budget buffer on the device and
its whole history in (pinned) host memory; the retrieval head's K cache and the slot table are on
the device. Offloading is one way and caches only grow, so the device need is the largest over the
segments and the host need is the last segment's. Every term is per request slot, so the largest
batch that fits is the free memory divided by one slot's bytes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from specontext_compiler.errors import RuntimeResourceError

GIB = 1024 ** 3
# Prefill activations, the sampled logits and allocator slack live outside the KV store. The GPU
# reserve is small on purpose: free memory is read after the weights and the CUDA context are in,
# and the plan's own memory model already kept its reserve; this check is for batches far too
# large (a store of 100 GB on a 16 GB machine), the memory manager reports a near miss later.
DEVICE_RESERVE_BYTES = 512 * 1024 ** 2
HOST_RESERVE_FRACTION = 0.10


@dataclass(frozen=True)
class SlotBytes:
    """KV bytes one request slot needs, at the plan's worst point."""

    device: int
    host: int


def slot_bytes(plan, spec, width: int, groups: int, head, dtype: torch.dtype) -> SlotBytes:
    """Bytes per slot on the device (max over segments) and in host memory (the last segment)."""
    elem = torch.empty((), dtype=dtype).element_size()
    max_len = plan.workload.max_len
    v_dim = getattr(spec, "v_head_dim", 0) or spec.head_dim
    per_token = spec.num_kv_heads * (spec.head_dim + v_dim) * elem     # one layer, K + V
    fixed = groups * width * 4                                          # slot table (int32)
    if head is not None:
        fixed += head.num_kv_heads * max_len * head.head_dim * elem
    device = 0
    for segment in plan.segments:
        length = min(segment.to_len, max_len)
        resident = spec.num_layers - len(segment.offloaded_layers)
        grow_copy = spec.num_kv_heads * spec.head_dim * length * elem   # one K held twice while it grows
        device = max(device, resident * length * per_token + len(segment.offloaded_layers) * width * per_token
                     + grow_copy)
    host = len(plan.segments[-1].offloaded_layers) * max_len * per_token
    return SlotBytes(device + fixed, host)


def check_fits(slots: int, need: SlotBytes, device: torch.device) -> None:
    """Raise RuntimeResourceError, naming the largest batch that fits, if `slots` do not."""
    host_free = _host_available_bytes() * (1 - HOST_RESERVE_FRACTION)
    if device.type == "cuda":
        device_free = max(0, torch.cuda.mem_get_info(device)[0] - DEVICE_RESERVE_BYTES)
        per_host, per_device = need.host, need.device
    else:                           # the CPU reference path keeps "device" tensors in host memory too
        device_free, per_host, per_device = float("inf"), need.host + need.device, 0
    fits = min(int(device_free // per_device) if per_device else slots,
               int(host_free // per_host) if per_host else slots)
    if fits >= slots:
        return
    where = (f"{slots * per_device / GIB:.1f} GiB of GPU memory ({device_free / GIB:.1f} free) and "
             if per_device else "")
    advice = (f"bind with batch={fits} or compile with --batch {fits}" if fits > 0 else
              "not even one request fits: compile for a smaller --max-len")
    raise RuntimeResourceError(
        f"batch {slots} needs {where}{slots * per_host / GIB:.1f} GiB of host memory "
        f"({host_free / GIB:.1f} available) for its KV cache; the largest batch that fits is {fits}: {advice}")


def _host_available_bytes() -> float:
    """MemAvailable from /proc/meminfo (Linux), else free physical pages."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return float("inf")
