"""Host memory: how much RAM is free, the one rule for holding more of it, and the blocks the weights
live in.

- ``mem_available`` and ``room_for``: the kernel's ``MemAvailable``, and whether a run may hold
  ``nbytes`` more while leaving the system ``HOST_HEADROOM`` (every fit decision of the project asks this).
- ``peak_rss_bytes``: the most host RAM this process has held so far (its peak resident set).
- ``HostSlab``: one anonymous, page-aligned mapping, page-locked for the GPU with ``cudaHostRegister``
  when asked (exactly its bytes, none of torch's pinned allocator's power-of-two rounding): the
  expert store.
- ``HostArena``: a bump allocator over one anonymous mapping that starts on a 2 MiB boundary and is
  advised ``MADV_HUGEPAGE`` (Linux; the kernel's ``transparent_hugepage`` setting decides): the weights
  a CPU run computes from, read straight from the files into it. Decode streams every weight it uses,
  and reads them measurably faster from anonymous huge pages than from the memory-mapped files'
  4 KiB pages (docs/benchmarks.md, "CPU weights in one huge-page arena").
"""

from __future__ import annotations

import mmap
import resource
import sys
import weakref
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import UserError
from ..kernels.formats import QuantizedTensor, aligned, tensor_bytes
from ..sizes import format_gb

GiB = 2**30
PAGE = mmap.PAGESIZE
HUGE_PAGE = 2 << 20
HOST_HEADROOM = 2 * GiB  # host RAM left to the OS and the rest of the process


def mem_available(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """The kernel's estimate of host RAM available without swapping (`MemAvailable`), in bytes;
    None where it cannot be read (not Linux)."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def room_for(nbytes: int, available: int | None) -> bool:
    """Whether ``nbytes`` more can be held while ``HOST_HEADROOM`` of the RAM ``available`` is left to the
    system (True where that cannot be read). Page-locked memory cannot be swapped out, and running
    short ends in the OOM killer, so every placement in host RAM asks this one rule."""
    return available is None or nbytes + HOST_HEADROOM <= available


def peak_rss_bytes() -> int:
    """This process's peak resident set in bytes (``getrusage`` counts KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


class CudaHostRegister:
    """Page-locks host memory for the GPU with `cudaHostRegister` (exactly the given range), and
    unlocks it with `cudaHostUnregister`."""

    PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context

    def register(self, ptr: int, nbytes: int) -> None:
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(ptr, nbytes, self.PORTABLE)
        if err != cudart.cudaError.success:
            raise UserError(f"could not pin {format_gb(nbytes)} of host RAM for the expert store "
                            f"({cudart.cudaGetErrorString(err)})", hint="free some RAM or use --bits 4")

    def unregister(self, ptr: int) -> None:
        torch.cuda.synchronize()  # no copy from these pages may still be in flight
        torch.cuda.cudart().cudaHostUnregister(ptr)


def anonymous_mapping(size: int, huge_pages: bool = False) -> mmap.mmap:
    """A private anonymous mapping of `size` bytes (page-aligned, zero-filled on first touch); with
    `huge_pages`, advised `MADV_HUGEPAGE` where the platform has it (Linux)."""
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    mapping = mmap.mmap(-1, size, flags=flags) if flags else mmap.mmap(-1, size)
    if huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    return mapping


class HostSlab:
    """One anonymous, page-aligned host mapping of `nbytes` (rounded up to whole pages), as a uint8
    tensor; pinned through `pinner` when given, unpinned and unmapped by `close()` (or when the
    slab is garbage-collected)."""

    def __init__(self, nbytes: int, pinner: CudaHostRegister | None = None) -> None:
        self.nbytes = nbytes
        self.size = max(PAGE, -(-nbytes // PAGE) * PAGE)
        mapping = anonymous_mapping(self.size)
        self.tensor = torch.frombuffer(mapping, dtype=torch.uint8)  # [size], shares the mapping
        ptr = self.tensor.data_ptr()
        if pinner is not None:
            pinner.register(ptr, self.size)
        self.pinned_bytes = self.size if pinner is not None else 0
        self._finalizer = weakref.finalize(self, HostSlab._release, mapping, ptr, pinner)

    @staticmethod
    def _release(mapping: mmap.mmap, ptr: int, pinner: CudaHostRegister | None) -> None:
        if pinner is not None:
            try:
                pinner.unregister(ptr)
            except Exception:  # at interpreter exit CUDA may already be gone
                pass
        try:
            mapping.close()
        except BufferError:  # tensors still view it: it is unmapped when the last one goes
            pass

    def close(self) -> None:
        self.pinned_bytes = 0
        self.tensor = None  # this view too, so that the mapping can go as soon as no other view holds it
        self._finalizer()


class HostArena:
    """A bump allocator over one block of host memory whose start is 2 MiB-aligned, advised for huge
    pages (see the module docstring), holding tensors back to back at `ALIGN`. Tensors it hands out
    are views of the block and keep it alive; it is never freed piecemeal."""

    def __init__(self, nbytes: int) -> None:
        self.size, self.used = nbytes, 0
        self.huge_pages = hasattr(mmap, "MADV_HUGEPAGE")
        # No explicit unmapping: `torch.frombuffer` holds the mapping, which goes with the last view.
        block = torch.frombuffer(anonymous_mapping(nbytes + HUGE_PAGE, huge_pages=True), dtype=torch.uint8)
        start = (-block.data_ptr()) % HUGE_PAGE
        self._block = block[start:start + nbytes]

    def alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor in the arena."""
        n = tensor_bytes(shape, dtype)
        at = aligned(self.used)
        if at + n > self.size:
            raise RuntimeError(f"host arena of {self.size} bytes cannot hold {n} more at {at}")
        self.used = at + n
        return self._block[at:at + n].view(dtype).view(shape)

    def copy(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``t`` (converted to ``dtype``) copied into the arena."""
        out = self.alloc(tuple(t.shape), dtype or t.dtype)
        out.copy_(t)
        return out

    def copy_weight(self, w: torch.Tensor | QuantizedTensor, dtype: torch.dtype | None = None
                    ) -> torch.Tensor | QuantizedTensor:
        """A stored weight copied into the arena: dense in ``dtype``, quantized parts as they are."""
        if isinstance(w, QuantizedTensor):
            return QuantizedTensor(w.spec, w.shape, {k: self.copy(v) for k, v in w.parts.items()})
        return self.copy(w, dtype)


AvailableRam = Callable[[], int | None]  # `mem_available`, or a stand-in in the tests
