"""Host memory: freed blocks stay mapped, so reusing them faults no pages;
releasing gives them back."""

import subprocess
import sys

import pytest

# Allocates and frees a 64 MB block ten times (as XLA:CPU does with a
# step's temporaries) and prints the page faults that took.
_FAULTS = '''
import resource, sys
import numpy as np
from refseg_jax import host_memory
if sys.argv[1] == 'keep':
  assert host_memory.keep_freed()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
  block = np.ones(64 << 20, np.uint8)
  del block
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
'''


def _faults(mode: str) -> int:
  return int(subprocess.run([sys.executable, '-c', _FAULTS, mode],
                            capture_output=True, text=True,
                            check=True).stdout)


@pytest.mark.skipif(not sys.platform.startswith('linux'),
                    reason='mallopt is glibc (Linux) only')
def test_freed_memory_is_reused_without_page_faults():
  # Default: each block is mapped anew (16,384 4-KB pages, fewer where
  # huge pages back it); kept: the first block's pages serve all ten.
  assert 5 * _faults('keep') < _faults('default')


# Under `keep_freed`, allocates and frees 200 MB in 2 KB blocks (as a
# compiler does) and prints the resident MB after freeing, then after
# `release_freed`.
_RESIDENT = '''
import os
from refseg_jax import host_memory
resident_mb = lambda: int(open('/proc/self/statm').read().split()[1]) * (
    os.sysconf('SC_PAGE_SIZE') / 2**20)
assert host_memory.keep_freed()
blocks = [bytearray(2048) for _ in range(100_000)]
del blocks
kept = resident_mb()
print(kept, resident_mb() if host_memory.release_freed() else kept)
'''


@pytest.mark.skipif(not sys.platform.startswith('linux'),
                    reason='malloc_trim is glibc (Linux) only')
def test_release_freed_gives_kept_memory_back():
  kept, released = map(float, subprocess.run(
      [sys.executable, '-c', _RESIDENT], capture_output=True, text=True,
      check=True).stdout.split())
  # The 200 MB stay resident until released; then nearly all go.
  assert kept - released > 150, (kept, released)
