"""Hand the OpenMP worker threads of the current thread back, so that the engine thread's workers keep spinning.

GNU OpenMP (libgomp: PyTorch's Linux wheels and numba's parallel loops use it) gives every thread that starts a
parallel region its own pool of workers, which lives as long as that thread. Between regions the workers spin,
ready for the next one, but only while the process holds no more libgomp threads than CPUs; past that they go to
sleep after ~100 spins, and every parallel region pays a futex wake-up. The thread that loads the model (it runs
parallel ops there) keeps its pool after it hands the model to the engine's thread, which starts a second one:
on a 2-CPU machine that alone made each decode-attention matmul take 2.2 ms instead of 0.12 ms, and a whole INT4
decode step on the engine thread 1.3x slower than on the loading thread (benchmarks/README.md). Pausing the
loader's runtime (OpenMP 5.0 omp_pause_resource_all) ends its workers; a later parallel region on that thread
simply starts a new pool.
"""
import ctypes
import logging
import os

log = logging.getLogger("chatglm.openmp")
_OMP_PAUSE_SOFT = 1


def loaded_runtimes() -> list:
    """Paths of the libgomp copies loaded in this process (Linux; elsewhere none are found)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/" in line}
    except OSError:
        return []
    return sorted(p for p in paths if os.path.basename(p).startswith("libgomp"))


def release_workers() -> int:
    """End the OpenMP worker pools the calling thread started, in every libgomp loaded; returns how many runtimes
    paused. Call it on the thread that loaded the model, before another thread takes over the model's work."""
    paused = 0
    for path in loaded_runtimes():
        try:
            pause = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):  # an old libgomp without OpenMP 5.0
            continue
        pause.restype, pause.argtypes = ctypes.c_int, [ctypes.c_int]
        if pause(_OMP_PAUSE_SOFT) == 0:
            paused += 1
        else:
            log.debug("omp_pause_resource_all failed in %s", path)
    return paused
