"""A fused threshold + gather kernel for the per-token sparse down-projection on CPU, compiled on first use.

Why: torch's per-token path (:class:`~deft.sparse.modules.SparseDown`) needs three passes over the W2
input before it reads a single weight: ``hardshrink``, ``nonzero`` (the costliest: ~3.3 ms for MiniLM's
1,408 x 1,536 input on one core) and the index arithmetic that turns flat positions into bags for
``F.embedding_bag``. This kernel reads each token's row of ``h`` once, keeps the units with
``|h| > t`` in a small index buffer, and adds ``h_j * W2^T[j]`` for those units straight into the
token's output row. Same result as ``F.linear(hardshrink(h, t), W2, b)`` up to float reassociation.

It is plain C++ with no torch headers (a second to build), compiled with the system's C++ compiler
(``$CXX``, else ``c++`` / ``g++`` / ``clang++``) into the user cache (``$DEFT_KERNEL_CACHE``, else
``$XDG_CACHE_HOME/deft/kernels`` or ``~/.cache/deft/kernels``), keyed by the source, the compiler and the
CPU's feature flags (it is built for the CPU it runs on), and loaded with ctypes. Without a compiler, or
with ``DEFT_NATIVE=0``, :func:`library` returns None and the torch path runs; nothing else changes.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from functools import lru_cache
from pathlib import Path

import torch

# x: (n, din) row-major; wt: W2^T, (din, dout) row-major; out: (n, dout). A unit j of token i counts as
# active unless |x[i, j]| <= t, so NaN stays active and propagates as it does through the dense layer.
# Returns the number of active (token, unit) pairs, or -1 once more than max_nnz were found (the caller
# then runs the dense kernel: past ~35 % density the gather costs more than a GEMM).
_SOURCE = r"""
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

namespace {

template <typename T>
void token_rows(const T* __restrict x, int64_t i0, int64_t i1, int64_t din, const T* __restrict wt,
                int64_t dout, T t, const T* __restrict bias, T* __restrict out, int64_t max_nnz,
                std::atomic<int64_t>* total) {
  std::vector<int64_t> idx(din + 1);
  for (int64_t i = i0; i < i1; ++i) {
    const T* xi = x + i * din;
    int64_t c = 0;
    for (int64_t j = 0; j < din; ++j) {  // branch-free compaction of the active units
      idx[c] = j;
      c += !(std::fabs(xi[j]) <= t);
    }
    if (total->fetch_add(c, std::memory_order_relaxed) + c > max_nnz) return;
    T* __restrict o = out + i * dout;
    if (bias) std::copy(bias, bias + dout, o); else std::fill(o, o + dout, T(0));
    int64_t k = 0;
    for (; k + 4 <= c; k += 4) {  // four rows per pass: a quarter of the loads and stores of o
      const T v0 = xi[idx[k]], v1 = xi[idx[k + 1]], v2 = xi[idx[k + 2]], v3 = xi[idx[k + 3]];
      const T* w0 = wt + idx[k] * dout;
      const T* w1 = wt + idx[k + 1] * dout;
      const T* w2 = wt + idx[k + 2] * dout;
      const T* w3 = wt + idx[k + 3] * dout;
      for (int64_t q = 0; q < dout; ++q) o[q] += v0 * w0[q] + v1 * w1[q] + v2 * w2[q] + v3 * w3[q];
    }
    for (; k < c; ++k) {
      const T v = xi[idx[k]];
      const T* w = wt + idx[k] * dout;
      for (int64_t q = 0; q < dout; ++q) o[q] += v * w[q];
    }
  }
}

template <typename T>
int64_t gather(const T* x, int64_t n, int64_t din, const T* wt, int64_t dout, T t, const T* bias, T* out,
               int64_t max_nnz, int64_t threads) {
  std::atomic<int64_t> total(0);
  // a thread costs ~20-50 us to start: only worth it for a batch of tokens
  int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, n / 64));
  if (parts == 1) {
    token_rows<T>(x, 0, n, din, wt, dout, t, bias, out, max_nnz, &total);
  } else {
    std::vector<std::thread> pool;
    int64_t step = (n + parts - 1) / parts;
    for (int64_t p = 1; p < parts; ++p) {
      int64_t i0 = p * step, i1 = std::min(n, i0 + step);
      if (i0 < i1) pool.emplace_back(token_rows<T>, x, i0, i1, din, wt, dout, t, bias, out, max_nnz, &total);
    }
    token_rows<T>(x, 0, std::min(n, step), din, wt, dout, t, bias, out, max_nnz, &total);
    for (auto& th : pool) th.join();
  }
  int64_t nnz = total.load();
  return nnz > max_nnz ? -1 : nnz;
}

}  // namespace

extern "C" {
int64_t deft_gather_f32(const float* x, int64_t n, int64_t din, const float* wt, int64_t dout, float t,
                        const float* bias, float* out, int64_t max_nnz, int64_t threads) {
  return gather<float>(x, n, din, wt, dout, t, bias, out, max_nnz, threads);
}
int64_t deft_gather_f64(const double* x, int64_t n, int64_t din, const double* wt, int64_t dout, double t,
                        const double* bias, double* out, int64_t max_nnz, int64_t threads) {
  return gather<double>(x, n, din, wt, dout, t, bias, out, max_nnz, threads);
}
}
"""

# -O3 vectorises the inner loops; -march=native targets the CPU the kernel runs on (the cache key holds
# the CPU's flags). The second set is the fallback for compilers that reject -march=native.
_FLAG_SETS = (
    ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread"],
    ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread"],
)
# torch dtype -> (exported symbol, ctypes scalar of the threshold)
_KERNELS = {torch.float32: ("deft_gather_f32", ctypes.c_float), torch.float64: ("deft_gather_f64", ctypes.c_double)}
_build_lock = threading.Lock()


def enabled() -> bool:
    """False when ``DEFT_NATIVE`` is 0 / false / no: the torch path runs everywhere."""
    return os.environ.get("DEFT_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    if os.environ.get("DEFT_KERNEL_CACHE"):
        return Path(os.environ["DEFT_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deft" / "kernels"


def _compiler() -> str | None:
    found = (shutil.which(name) for name in (os.environ.get("CXX"), "c++", "g++", "clang++") if name)
    return next((path for path in found if path), None)


def _cpu_id() -> str:
    # the feature flags decide what -march=native may use; a cache shared by different CPUs gets one
    # build per CPU type instead of one that crashes with an illegal instruction on the other
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.machine() + platform.processor()


def _build(cxx: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "deft_sparse.cpp"
        src.write_text(_SOURCE)
        out = Path(tmp) / target.name
        errors = []
        for flags in _FLAG_SETS:
            proc = subprocess.run([cxx, *flags, str(src), "-o", str(out)], capture_output=True, text=True)
            if proc.returncode == 0:
                os.replace(out, target)  # atomic: a concurrent process sees no file or the whole file
                return
            errors.append(proc.stderr.strip().splitlines()[-1:] or [""])
        raise OSError(f"{cxx} could not build the kernel: {errors}")


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernel (built on the first call, then loaded from the cache), or None if unavailable."""
    if not enabled():
        return None
    cxx = _compiler()
    if cxx is None:
        return None
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
        key = hashlib.sha256("\0".join([_SOURCE, repr(_FLAG_SETS), cxx, version, _cpu_id()]).encode()).hexdigest()
        target = cache_dir() / f"deft_sparse_{key[:16]}.so"
        with _build_lock:
            if not target.exists():
                _build(cxx, target)
        lib = ctypes.CDLL(str(target))
    except OSError:
        return None  # no usable compiler or cache folder: the torch path is always there
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for symbol, c_type in _KERNELS.values():
        fn = getattr(lib, symbol)
        fn.argtypes = [ptr, i64, i64, ptr, i64, c_type, ptr, ptr, i64, i64]
        fn.restype = i64
    return lib


def supports(x: torch.Tensor, wt: torch.Tensor) -> bool:
    """Whether :func:`gather` can take these tensors (CPU, fp32/fp64, no autograd), building the kernel once."""
    if x.device.type != "cpu" or wt.device.type != "cpu" or x.dtype not in _KERNELS or wt.dtype != x.dtype:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or wt.requires_grad):
        return False  # no backward: training goes through the differentiable torch path
    return library() is not None


def gather(
    x: torch.Tensor, wt: torch.Tensor, threshold: float, bias: torch.Tensor | None, max_nnz: int
) -> tuple[torch.Tensor, int] | None:
    """``hardshrink(x, t) @ wt + bias`` for ``x`` (n, din) and ``wt`` = W2^T (din, dout), skipping inactive units.

    Returns (output, active pairs), or None when more than ``max_nnz`` units were active (run the dense
    kernel then). Call :func:`supports` first.
    """
    lib = library()
    assert lib is not None
    x = x.contiguous()
    wt = wt.contiguous()
    n, din = x.shape
    dout = wt.shape[1]
    if wt.shape[0] != din:
        raise ValueError(f"x has {din} units but W2^T has {wt.shape[0]} rows")
    b = None if bias is None else bias.detach().to(x.dtype).contiguous()
    out = torch.empty(n, dout, dtype=x.dtype)
    fn = getattr(lib, _KERNELS[x.dtype][0])
    nnz = fn(
        x.data_ptr(),
        n,
        din,
        wt.data_ptr(),
        dout,
        float(threshold),
        None if b is None else b.data_ptr(),
        out.data_ptr(),
        int(max_nnz),
        torch.get_num_threads(),
    )
    return None if nnz < 0 else (out, int(nnz))
