"""dsv4's compiled CPU kernels: one library built from ``csrc/`` on first use and cached.

The GEMMs on checkpoint-format weights (``gemm.py``) and the lightning indexer's scores (``index_scores.py``)
live in it. Both compute each output element by one fixed sequence of IEEE operations, AVX-512 where the CPU
has it and a portable path with the same arithmetic otherwise; where the library cannot be built (no
compiler) they fall back, with one warning, to torch ops.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import threading
import warnings
from pathlib import Path

import torch

_SOURCES = [Path(__file__).parent / "csrc" / name for name in ("lowbit_gemm.cpp", "index_scores.cpp")]
ISA = {"portable": 1, "avx512": 2}
_build_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_build_failed = False


def _build_directory() -> str | None:
    """Where the compiled library is cached: torch's own directory when TORCH_EXTENSIONS_DIR says so, else
    dsv4's cache, one directory per torch version (the library links against torch)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return None
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dsv4" / "kernels"
    path = root / f"torch-{torch.__version__}"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _build() -> ctypes.CDLL:
    """Compile (or reuse) the library. -fopenmp only enables at::parallel_for's inline OpenMP region: the
    library binds to the libgomp torch has already loaded, so torch.set_num_threads governs it."""
    from torch.utils.cpp_extension import load

    if shutil.which("ninja") is None:
        # torch's builder runs `ninja` from PATH; the ninja wheel (a dependency) may sit outside it.
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    path = load(
        name="dsv4_kernels",
        sources=[str(s) for s in _SOURCES],
        extra_cflags=["-O3", "-fopenmp", "-ffp-contract=off"],
        extra_ldflags=["-fopenmp"],
        build_directory=_build_directory(),
        is_python_module=False,
    )
    lib = ctypes.CDLL(path)
    lib.dsv4_gemm_best_isa.restype = ctypes.c_int
    lib.dsv4_gemm.restype = None
    lib.dsv4_gemm.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3
    lib.dsv4_index_scores.restype = ctypes.c_int
    lib.dsv4_index_scores.argtypes = (
        [ctypes.c_int] * 3 + [ctypes.c_void_p] * 10 + [ctypes.c_int64] * 6 + [ctypes.c_void_p]
    )
    return lib


def kernel_library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None (after one warning) where they cannot be built."""
    global _library, _build_failed
    if _library is None and not _build_failed:
        with _build_lock:
            if _library is None and not _build_failed:
                try:
                    _library = _build()
                except Exception as e:  # no compiler, no ninja, a failed build: all mean the torch path
                    _build_failed = True
                    lines = str(e).strip().splitlines()
                    why = lines[-1] if lines else type(e).__name__
                    warnings.warn(
                        f"dsv4: the CPU kernels could not be built ({why}); CPU GEMMs and indexer scores fall "
                        "back to torch ops, slower and not batch-invariant",
                        RuntimeWarning,
                        stacklevel=3,
                    )
    return _library


def kernel_isa() -> str:
    """What the CPU kernels run on here: 'avx512', 'portable' (compiled, without AVX-512) or 'torch'."""
    lib = kernel_library()
    if lib is None:
        return "torch"
    return "avx512" if lib.dsv4_gemm_best_isa() == ISA["avx512"] else "portable"
