"""Weights in transparent huge pages (2 MiB), so that streaming them misses the TLB 512x less often.

A decode step reads each weight once, row after row; with 4 KiB pages the kernels cross a page every
1-2 rows of a 512-wide fp32 matrix (our guess at the cause: software prefetches that miss the TLB are
dropped). Copied into memory advised MADV_HUGEPAGE (Linux, THP "madvise" or "always") on the bench
machine, one thread, CPU time, alternated, load ~5: the LM head 32000x512 at 16 rows 21-28% less, at
1 row the same; 8 q/k/v weights 4-28% less; an expert (expert_ffn) 8-18% less at 1-16 rows. End to
end (bench/decode_throughput.py, 1s1e-shm-c2 vs 1s1e-shm-c2-sdpa-small-pages, load 1.7): with the
decode attention kernel, batch 16 55.6 vs 61.6 ms/token, batch 1 28.4 vs 31.3. The bytes are copied
unchanged: every result is bit-identical.

`to_huge_pages` lays the tensors out one after another in one anonymous region, 2 MiB-aligned, and
advises its whole 2 MiB pages only: the tail (< 2 MiB) stays in small pages, so no memory is wasted
(under 2 MiB in all there is nothing to gain: the tensors are returned as they were). The region is
a private mapping of its own (mmap), never malloc's: once a process has freed a block malloc had
mapped (torch frees such tensors all the time), glibc raises its mapping threshold up to 32 MiB, and
a smaller block then comes from heap memory already touched, in small pages, which madvise does not
turn into huge ones. Off (SHARDMESH_HUGE_PAGES=0), off Linux, for tensors not on the CPU, or when
madvise fails, it returns the tensors as they were (a log line says why when switched off or when
madvise fails).
"""

import ctypes
import ctypes.util
import functools
import logging
import mmap
import os
import sys

import torch

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # linux/mman.h
ALIGNMENT = 64      # bytes between consecutive tensors of the region: a cache line


@functools.lru_cache(maxsize=None)
def _madvise():
    """libc's madvise, or None (not Linux, or switched off)."""
    if os.environ.get("SHARDMESH_HUGE_PAGES", "1") == "0":
        log.info("huge pages off (SHARDMESH_HUGE_PAGES=0): weights stay where they were loaded")
        return None
    if not sys.platform.startswith("linux"):
        return None
    function = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).madvise
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def to_huge_pages(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Contiguous copies of these CPU tensors, each 64-byte aligned, in one region advised MADV_HUGEPAGE;
    or the tensors themselves when that is not possible. The copies keep the region alive."""
    madvise = _madvise()
    if madvise is None or not tensors or any(t.device.type != "cpu" for t in tensors):
        return tensors
    offsets, total = [], 0
    for tensor in tensors:
        offsets.append(total)
        total += -(-tensor.numel() * tensor.element_size() // ALIGNMENT) * ALIGNMENT
    length = total // HUGE_PAGE * HUGE_PAGE  # the whole huge pages
    if length == 0:
        return tensors
    # [bytes], fresh and private (a shared one is not anonymous memory THP backs): no page touched
    # yet. The tensors made over it keep the mapping alive.
    region = torch.frombuffer(mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS),
                              dtype=torch.uint8)
    start = -region.data_ptr() % HUGE_PAGE
    if madvise(region.data_ptr() + start, length, MADV_HUGEPAGE) != 0:
        log.info("madvise(MADV_HUGEPAGE) failed (errno %d): weights stay in small pages", ctypes.get_errno())
        return tensors
    copies = []
    for tensor, offset in zip(tensors, offsets):
        size = tensor.numel() * tensor.element_size()
        copy = region[start + offset:start + offset + size].view(tensor.dtype).view(tensor.shape)
        copies.append(copy.copy_(tensor))  # the first touch: the kernel backs the region with huge pages
    return copies
