"""Process memory: how much this process holds, and handing back weights a method replaced.

:func:`status_bytes`, :func:`reset_peak_resident` and :func:`in_use_bytes` are the one place that
reads the process's memory (the plan's runtime term, the run summary's peaks, the benchmarks,
LoRA-GA sizing its layer groups).

The rest concerns weights that a method replaces after transformers memory-mapped them.

On a CPU, transformers 5 maps the safetensors checkpoint (copy-on-write) and hands out tensors over
the mapping. A weight that a method *replaces* (PiSSA's residual, a 4-bit quantization) leaves its
old pages behind: the mapping lives as long as any tensor of the file does, and every page the
replacement read stays resident in it, so the process counts the old weight beside the new one
(measured: PiSSA's CPU peak 1.28x LoRA's on SmolLM2, 1.60x on a 378M model). The kernel could
reclaim those clean file pages under pressure, but until then they are resident memory, which is
what schedulers and OOM killers count. :func:`release_replaced` hands them back at once.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

#: Linux's "reclaim these pages now" advice (5.4+): file pages are dropped (re-read if touched),
#: anonymous pages go to swap or stay; never loses data, unlike MADV_DONTNEED.
_MADV_PAGEOUT = 21


def status_bytes(field: str) -> int:
    """A size field of ``/proc/self/status`` (``VmRSS``: resident now, ``VmHWM``: its peak) in bytes;
    0 where there is no ``/proc`` (not Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak_resident() -> bool:
    """Reset ``VmHWM`` to the current resident set, so the next peak measures what follows only;
    False where the kernel refuses (no ``/proc``, or ``clear_refs`` not writable)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def in_use_bytes(device: torch.device, tensors: Iterable[torch.Tensor] = ()) -> int:
    """The memory this process holds where ``device`` computes, counting ``tensors`` as wholly held.

    On a GPU: CUDA memory allocated by torch. On a CPU: the resident set (libraries, weights,
    touched checkpoint pages; 0 without ``/proc``) plus the pages of ``tensors`` not in it yet.
    transformers memory-maps a checkpoint on a CPU, so right after loading most of the weights are
    not resident; they will be once a forward pass reads them (SmolLM2 just loaded: 499 MiB
    resident, about 475 of them libraries, for 513 MiB of weights).
    """
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    rss = status_bytes("VmRSS")
    return rss + _not_resident_bytes(tensors) if rss else 0


def _not_resident_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the CPU storages of ``tensors`` that lie in file mappings and are not in this process's
    resident set yet, from each mapping's ``Size`` and ``Rss`` in ``/proc/self/smaps`` (the page
    cache may hold them, but they count once the process touches them). Anonymous memory counts as
    resident. 0 where there is no ``/proc``."""
    storages = {}
    for tensor in tensors:
        if tensor.device.type == "cpu" and not tensor.is_meta:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    if not storages:
        return 0
    try:
        smaps = Path("/proc/self/smaps").read_text()
    except OSError:
        return 0
    missing = 0
    for start, end, file_backed, size, rss in _mappings(smaps):
        if not file_backed or rss >= size:
            continue
        inside = sum(min(end, a + n) - max(start, a) for a, n in storages.items() if a < end and a + n > start)
        missing += min(inside, size - rss)
    return missing


def _mappings(smaps: str) -> Iterator[tuple[int, int, bool, int, int]]:
    """``(start, end, file-backed, Size bytes, Rss bytes)`` of each mapping in the text of ``/proc/self/smaps``."""
    header: tuple[int, int, bool] | None = None
    size = 0
    for line in smaps.splitlines():
        first = line.split(maxsplit=1)[0] if line else ""
        if "-" in first and not first.endswith(":"):
            fields = line.split()
            low, high = (int(x, 16) for x in fields[0].split("-"))
            header = (low, high, len(fields) >= 6 and fields[5].startswith("/"))
        elif header is not None and first == "Size:":
            size = int(line.split()[1]) * 1024
        elif header is not None and first == "Rss:":
            yield (*header, size, int(line.split()[1]) * 1024)
            header = None


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library with ``madvise`` typed; loaded once (PiSSA calls :func:`release_replaced` per layer)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def trim_heap() -> bool:
    """Hand the free memory that glibc's heaps keep back to the system; ``False`` where there is no
    ``malloc_trim`` (not Linux, or another C library).

    glibc keeps freed blocks for reuse, so a process that built large temporaries stays that much
    larger in resident set, what schedulers and OOM killers count, until something reuses them:
    attaching DoRA to SmolLM2-135M (PEFT builds each layer's dense ``W + s B A`` to take its norms)
    leaves 380 MiB of them. Free pages in the middle of a heap are returned too. Tens of milliseconds.
    """
    if not sys.platform.startswith("linux"):
        return False
    libc = _libc()
    if not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim(0)
    return True


def weight_locations(modules: Iterable[nn.Module]) -> dict[nn.Module, tuple[int, int]]:
    """Where each module's CPU weight lies now: ``(address, bytes)``, to pass to :func:`release_replaced`."""
    found = {}
    for module in modules:
        weight = getattr(module, "weight", None)
        if weight is not None and weight.device.type == "cpu" and not weight.is_meta:
            found[module] = (weight.data_ptr(), weight.numel() * weight.element_size())
    return found


def release_replaced(locations: dict[nn.Module, tuple[int, int]], trim: bool = True) -> int:
    """Advise the kernel to reclaim the old pages of every weight in ``locations`` that has since been
    replaced (its module's weight lies elsewhere now); returns the bytes advised.

    Only whole pages inside a weight's old range are advised, so no page shared with a neighbouring
    tensor is touched, and the advice never loses data (see :data:`_MADV_PAGEOUT`): memory that is
    still in use, or reused by the allocator, is simply kept. ``trim`` also calls :func:`trim_heap`
    (worth its cost after large temporaries, such as an SVD's workspaces).
    Linux only; elsewhere a no-op.
    """
    if not sys.platform.startswith("linux"):
        return 0
    libc = _libc()
    page, advised = mmap.PAGESIZE, 0
    for module, (address, size) in locations.items():
        weight = getattr(module, "weight", None)
        if weight is None or weight.data_ptr() == address:
            continue
        start, end = -(-address // page) * page, (address + size) // page * page
        if end > start and libc.madvise(start, end - start, _MADV_PAGEOUT) == 0:
            advised += end - start
    if advised and trim:
        trim_heap()  # the freed temporaries of the replacement (SVD workspaces)
    return advised
