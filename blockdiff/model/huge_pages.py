"""One buffer on 2 MB pages for the weights a forward streams through.

A one-token forward of a quantized model reads every weight once, tens of megabytes in a few
milliseconds, as a hundred or so short products. On 4 KB pages each page of weights costs a
TLB miss and a page walk, and the hardware prefetchers stop at every page boundary; on 2 MB
pages (Linux's transparent huge pages, which most distributions grant on request with
madvise) the products ran about a quarter faster on a 2-core Xeon (benchmarks/RESULTS.md).
Where the request is refused the buffer is an ordinary one: the same tensors, the same results.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

import torch

HUGE_PAGE = 2 << 20
ALIGNMENT = 64  # each tensor starts on a cache line
MADV_HUGEPAGE = 14
log = logging.getLogger(__name__)


@functools.cache
def _madvise():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        madvise = libc.madvise
    except (OSError, AttributeError, TypeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def gather(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of `tensors` (CPU, any dtypes and shapes), contiguous and in this order in one
    buffer whose pages are requested as huge pages before they are first written."""
    sizes = [t.numel() * t.element_size() for t in tensors]
    offsets, end = [], 0
    for size in sizes:
        offsets.append(end)
        end += -(-size // ALIGNMENT) * ALIGNMENT
    buffer = torch.empty(end + HUGE_PAGE, dtype=torch.uint8)  # untouched: no page is mapped yet
    start = -buffer.data_ptr() % HUGE_PAGE  # the first huge-page boundary in the buffer
    madvise = _madvise()
    if madvise is None or madvise(buffer.data_ptr() + start, end, MADV_HUGEPAGE) != 0:
        log.debug("huge pages were not granted for %d bytes of weights", end)
    copies = []
    for tensor, offset, size in zip(tensors, offsets, sizes):
        copy = buffer[start + offset:start + offset + size].view(tensor.dtype).view(tensor.shape)
        copies.append(copy.copy_(tensor))
    return copies
