import atexit
import os
import shutil
import tempfile

# Tests run on CPU, deterministic and quiet.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# One persistent compilation cache for the whole session, shared with the subprocesses the
# tests start (they inherit the environment): many tests compile the same tiny models again
# in a new process (kill-and-resume, determinism, 1 vs 2 devices), and a cached executable
# loads in a fraction of the compile time (a run_fit.py subprocess: 25 s -> 9 s). The cache
# lives in a fresh temporary folder, so no executable outlives the session or crosses machines.
# Under pytest-xdist (`make test`) the controller loads this file first, so its workers inherit
# the same folder and share what either compiles; the controller removes it at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="sphere_jax_test_jit_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
