"""`invoke health --deep`'s GPU probe: a program for the env's python (torch), never imported by
the controller, which sends this file's source as `python -c` (deepgpu.measure). Python 3.8.

Prints one JSON line. Without a usable CUDA device (no torch, a CPU build, no driver):

    {"cuda": false, "reason": "torch.cuda.is_available() is False", "torch": "2.5.1+cpu"}

With one, every visible GPU is measured, all of them at once (as training loads them, so a node
whose power or cooling cannot hold eight busy GPUs shows it):

    {"cuda": true, "torch": "2.5.1+cu121", "gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3",
      "gemm": {"tflops": 712.4, "dtype": "bf16", "n": 8192, "iters": 640, "error": ""},
      "memory": {"bytes": 68719476736, "mismatches": 0, "passes": 2, "seconds": 1.9,
                 "error": ""}}, ...],
     "allreduce": {"gpus": 8, "bytes": 1073741824, "busbw": 471.3, "iters": 30, "error": ""}}

- gemm: square N x N matmuls in bf16 (fp16 before Ampere); warm-up first (clocks ramp up, cuBLAS
  picks its kernel), then enough iterations to fill GEMM_S, timed per GPU with CUDA events on its
  own stream, so a slow GPU gets its own figure though all run together. 2 N^3 flops each.
- memory: a fill-and-verify pass over MEM_FRACTION of the free memory: every 8-byte word gets
  its index XOR a pattern, all of it is written before any is read back (the buffer dwarfs the
  L2 cache), then compared chunk by chunk; the second pass writes the complement, so every bit
  holds a 0 and a 1 once. Any mismatch fails the GPU. MEM_S bounds it: no pass starts after it.
- allreduce: NCCL between this node's GPUs from one process (torch.cuda.nccl, as nccl-tests'
  `-g N`), ALLREDUCE_BYTES of float32 per GPU; busbw = algbw * 2(n-1)/n.

A GPU that raises (a CUDA error, NaN in the product) gets its `error` and the others go on.
"""

import json
import sys
import time

try:
    import torch
except Exception as e:  # any failure to import means "not measured", said in the output
    torch = None
    NO_TORCH = "torch not importable: " + (str(e).splitlines() or [type(e).__name__])[0]

GEMM_N = 8192  # 2 * 8192^3 = 1.1 TFLOP: ~1.5 ms on an H100, big enough to keep it busy
GEMM_WARMUP_S = 0.5
GEMM_S = 1.5
MEM_FRACTION = 0.8  # of the free memory after the GEMM's buffers are given back
MEM_S = 20.0
MEM_CHUNK = 64 * 1024 * 1024  # words (512 MiB): the verify's scratch and compare buffers
PATTERN = 0x5A5A5A5A5A5A5A5A  # alternate bits; its complement is the second pass
ALLREDUCE_BYTES = 1024 * 1024 * 1024  # large messages: bandwidth, not latency (nccl-tests' peak)
ALLREDUCE_S = 1.0


def _err(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _sync(devices):
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


class _Clock:
    """Per-device time: CUDA events on the device's current stream; wall time on a CPU (tests)."""

    def __init__(self, device):
        self.device = device
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.marks = [torch.cuda.Event(enable_timing=True) for _ in range(2)]

    def mark(self, i):
        if self.cuda:
            self.marks[i].record(torch.cuda.current_stream(self.device))
        elif i == 0:
            self.t0 = time.perf_counter()
        else:
            self.t1 = time.perf_counter()

    def seconds(self):  # after _sync
        if self.cuda:
            return self.marks[0].elapsed_time(self.marks[1]) / 1e3
        return self.t1 - self.t0


def gemm(devices, n=GEMM_N, warmup_s=GEMM_WARMUP_S, seconds=GEMM_S):
    """{device index: {"tflops", "dtype", "n", "iters", "error"}}: every device at once."""
    out, mats = {}, {}
    for d in devices:
        out[d] = {"tflops": None, "dtype": "bf16", "n": n, "iters": 0, "error": ""}
        try:
            old = d.type == "cuda" and torch.cuda.get_device_capability(d)[0] < 8
            dtype = torch.float16 if old else torch.bfloat16  # bf16 is emulated before Ampere
            out[d]["dtype"] = "fp16" if old else "bf16"
            g = torch.Generator(device=d).manual_seed(1234)
            a = torch.randn(n, n, device=d, dtype=dtype, generator=g)
            b = torch.randn(n, n, device=d, dtype=dtype, generator=g)
            mats[d] = (a, b, torch.empty(n, n, device=d, dtype=dtype))
        except Exception as e:
            out[d]["error"] = _err(e)

    def rounds(k):  # k matmuls on every live device, interleaved: all of them stay busy
        for _ in range(k):
            for d in list(mats):
                try:
                    torch.mm(mats[d][0], mats[d][1], out=mats[d][2])
                except Exception as e:
                    out[d]["error"] = _err(e)
                    del mats[d]

    def settle():  # a device's asynchronous error surfaces at its synchronize
        for d in list(mats):
            try:
                _sync([d])
            except Exception as e:
                out[d]["error"] = _err(e)
                del mats[d]

    batch, began, took = 4, time.perf_counter(), 0.0
    while mats and time.perf_counter() - began < warmup_s:
        t = time.perf_counter()
        rounds(batch)
        settle()
        took = (time.perf_counter() - t) / batch
    iters = max(10, min(20000, int(seconds / took))) if took > 0 else 10
    clocks = {d: _Clock(d) for d in mats}
    for d in mats:
        clocks[d].mark(0)
    rounds(iters)
    for d in mats:
        clocks[d].mark(1)
    settle()
    for d in list(mats):
        flops = 2.0 * n**3 * iters
        out[d].update(tflops=flops / clocks[d].seconds() / 1e12, iters=iters)
        if not bool(torch.isfinite(mats[d][2]).all()):
            out[d]["error"] = "the product holds NaN or Inf: the GPU computes wrong results"
    mats.clear()
    return out


def fill(buf, start, stop, invert, into=None):
    """Words start..stop of the pattern (index XOR PATTERN, or its complement) into buf[start:
    stop], or into `into` (the verify's expected values)."""
    view = into if into is not None else buf[start:stop]
    torch.arange(start, stop, out=view)
    view.bitwise_xor_(PATTERN)
    if invert:
        view.bitwise_not_()
    return view


def memory(device, words=None, seconds=MEM_S, chunk=MEM_CHUNK, between=None):
    """{"bytes", "mismatches", "passes", "seconds", "error"} of the fill-and-verify pass on one
    device: `words` 8-byte words (default: MEM_FRACTION of its free memory). `between(buf)` runs
    after each fill, before its verify (tests flip words there as a bad cell would)."""
    out = {"bytes": 0, "mismatches": 0, "passes": 0, "seconds": 0.0, "error": ""}
    began = time.perf_counter()
    try:
        if words is None:
            torch.cuda.empty_cache()
            free = torch.cuda.mem_get_info(device)[0]
            words = int(free * MEM_FRACTION) // 8 - 2 * chunk  # room for scratch and compare
        buf = None
        while buf is None and words >= chunk // 8:
            try:
                buf = torch.empty(words, dtype=torch.int64, device=device)
            except RuntimeError:  # out of memory: another process took some; ask for half
                words //= 2
        if buf is None:
            out["error"] = "no memory free to test"
            return out
        out["bytes"] = words * 8
        scratch = torch.empty(min(chunk, words), dtype=torch.int64, device=device)
        bad = torch.zeros((), dtype=torch.int64, device=device)
        for invert in (False, True):
            if out["passes"] and time.perf_counter() - began > seconds:
                break
            for s in range(0, words, chunk):
                fill(buf, s, min(s + chunk, words), invert)
            if between is not None:
                between(buf)
            for s in range(0, words, chunk):
                e = min(s + chunk, words)
                want = fill(buf, s, e, invert, into=scratch[: e - s])
                bad += (buf[s:e] != want).sum()
            _sync([device])
            out["passes"] += 1
        out["mismatches"] = int(bad)
        del buf, scratch
    except Exception as e:
        out["error"] = _err(e)
    out["seconds"] = round(time.perf_counter() - began, 3)
    return out


def allreduce(devices, size=ALLREDUCE_BYTES, seconds=ALLREDUCE_S):
    """NCCL all_reduce among `devices` from this one process: {"gpus", "bytes", "busbw" (GB/s),
    "iters", "error"}. The first call builds the communicators (seconds); it is not timed."""
    from torch.cuda import nccl

    n = len(devices)
    out = {"gpus": n, "bytes": size, "busbw": None, "iters": 0, "error": ""}
    try:
        torch.cuda.empty_cache()
        free = min(torch.cuda.mem_get_info(d)[0] for d in devices)
        size = out["bytes"] = min(size, free // 4 // 4 * 4)  # a quarter of the least free
        tensors = [torch.zeros(size // 4, dtype=torch.float32, device=d) for d in devices]
        if not nccl.is_available(tensors):
            out["error"] = "NCCL is not available to torch here"
            return out
        for _ in range(3):
            nccl.all_reduce(tensors)
        _sync(devices)
        t = time.perf_counter()
        nccl.all_reduce(tensors)
        _sync(devices)
        iters = max(5, min(100, int(seconds / max(time.perf_counter() - t, 1e-6))))
        t = time.perf_counter()
        for _ in range(iters):
            nccl.all_reduce(tensors)
        _sync(devices)
        took = (time.perf_counter() - t) / iters
        out.update(busbw=size / took / 1e9 * 2 * (n - 1) / n, iters=iters)
    except Exception as e:
        out["error"] = _err(e)
    return out


def probe():
    if torch is None:
        return {"cuda": False, "reason": NO_TORCH, "torch": None}
    if not torch.cuda.is_available():
        return {"cuda": False, "reason": "torch.cuda.is_available() is False",
                "torch": torch.__version__}  # fmt: skip
    devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    result = {"cuda": True, "torch": torch.__version__, "gpus": []}
    flops = gemm(devices)
    torch.cuda.empty_cache()
    for d in devices:
        result["gpus"].append(
            {
                "index": d.index,
                "name": torch.cuda.get_device_name(d),
                "gemm": flops[d],
                "memory": memory(d),
            }
        )
    if len(devices) > 1:
        result["allreduce"] = allreduce(devices)
    return result


if __name__ == "__main__":
    sys.stdout.write(json.dumps(probe()) + "\n")
