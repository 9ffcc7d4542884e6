"""Host (CPU) memory: glibc's malloc told to keep what it frees, and to
give back what compiling left free."""

import ctypes
from typing import Any, Optional

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


def _libc(name: str) -> Optional[Any]:
  """The C library's function `name`, or None where there is none."""
  try:
    return getattr(ctypes.CDLL(None), name)
  except (OSError, AttributeError):
    return None


def keep_freed() -> bool:
  """Makes glibc's malloc keep freed memory for reuse; False if it cannot.

  XLA:CPU allocates a step's temporaries afresh every step, and glibc maps
  each block over its mmap threshold (at most 32 MB) anew and unmaps it on
  free, so every step page-faults its temporaries in again. Serving large
  blocks from the heap and never trimming it keeps those pages mapped, at
  the cost of never giving the peak back to the OS while the process
  lives. On the SaG paper variant at batch 8 (docs/training.md) it cut the
  minor page faults from 15.3 M to 9.3 M, the evaluation batch from 2.41-
  2.48 s to 2.05-2.06 s and the train step by 1-2 %, for 0.2 GB more peak
  RSS. Process-wide, so only for programs that own their process
  (`refseg_jax.main`, the train-step benchmark), and only where the C
  library is glibc (elsewhere nothing changes).
  """
  mallopt = _libc('mallopt')
  if mallopt is None:
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  # -1 is SIZE_MAX to glibc's trim threshold (it takes the int as size_t).
  settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1),
              (_M_TOP_PAD, 1 << 30))
  return all(mallopt(param, value) == 1 for param, value in settings)


def release_freed() -> bool:
  """Gives the memory malloc holds free back to the OS (glibc's
  `malloc_trim(0)`); False if it cannot or there was none to give.

  Compiling a large step frees its gigabyte or so of compiler memory in
  blocks the step's buffers do not fit, and under `keep_freed` the heap
  never shrinks, so that memory would stay resident beside the step's: on
  the SaG paper variant at batch 8 (docs/training.md) releasing it after
  compiling took the peak RSS from 9.34 to 8.45 GB. Cheap (a walk of
  malloc's free lists), so it is done after every compilation of a train
  step; pages released and later reused are faulted in once.
  """
  trim = _libc('malloc_trim')
  if trim is None:
    return False
  trim.argtypes = (ctypes.c_size_t,)
  return trim(0) == 1
