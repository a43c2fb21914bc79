"""Giving memory back to the system while a loop over 10**8-10**9 weights runs.

`release_pages` lets the kernel take back the resident pages of a tensor or array that views
a memory-mapped file once a caller is done with it for a while (the pages are read from the
file again if used; the values never change). `trim_heap` returns memory the C allocator
keeps after large temporaries were freed. Both are advice: no-ops where unsupported.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from typing import Any

import numpy as np
import torch

#: ``madvise`` advice that reclaims pages without ever losing data (Linux 5.4+): clean file
#: pages leave the process, anonymous ones are swapped out or left alone. Never
#: ``MADV_DONTNEED``, which would zero the private pages of a copy-on-write mapping.
_MADV_PAGEOUT = 21
_PAGE = mmap.PAGESIZE


def _libc(name: str, argtypes: tuple[Any, ...]) -> Any:
    """The C library's function ``name`` (Linux), or ``None``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _libc("madvise", (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int))
_MALLOC_TRIM = _libc("malloc_trim", (ctypes.c_size_t,))


def release_pages(data: torch.Tensor | np.ndarray) -> None:
    """Advise the kernel to take back the whole pages inside ``data``'s bytes (a contiguous
    CPU tensor or array, typically a view of a memory-mapped file)."""
    if _MADVISE is None:
        return
    if isinstance(data, torch.Tensor):
        if data.device.type != "cpu" or not data.is_contiguous():
            return
        start, size = data.data_ptr(), data.numel() * data.element_size()
    else:
        if not data.flags.c_contiguous:
            return
        start, size = data.ctypes.data, data.nbytes
    first = -(-start // _PAGE) * _PAGE
    last = (start + size) // _PAGE * _PAGE
    if last - first >= _PAGE:
        _MADVISE(first, last - first, _MADV_PAGEOUT)  # advice: a failure changes nothing


def trim_heap() -> None:
    """Hand memory the C allocator keeps after large temporaries were freed back to the
    system (glibc ``malloc_trim``): a loop over 10**8-weight layers otherwise keeps the freed
    arrays of its largest layer resident."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
