"""SPT benchmarks: sparse attention and the routed FFN against their dense baselines, in the same run.

    .venv/bin/python -m pytest benchmarks/bench_spt.py --benchmark-enable -s    # GPU part only where CUDA is

On a shared CPU machine add --benchmark-timer=time.process_time: the CPU timings run on one thread, so process
CPU time is what they cost, whatever else the machine is doing (not for the GPU part: it would miss GPU time).

Every number is a ratio to a dense baseline measured by the same process on the same inputs; nothing asserts a
wall-clock time. The session ends with a table of ratios (also written to $OUT/bench_spt.json when OUT is set).

- Attention, shaped like SmolLM2-135M (9 query heads, 3 key/value heads, head dim 64, batch 1): "spt" is the whole
  path a patched layer runs (PQ-encode queries and keys, select ceil(L/8) candidates, sparse attention), "eager"
  is transformers' eager attention (materialised L x L scores), "sdpa" is torch's fused attention.
- CPU peak memory at L = 2048 and 4096: each variant runs forward + backward in a fresh subprocess (after a
  warm-up call), and the number is the peak resident set during the call (VmHWM, reset just before it) minus the
  resident set just before it. That is what the operating system had to provide (glibc told to return large
  blocks at once, so it tracks live tensors); tracemalloc would miss torch's allocations entirely.
- GPU (skipped without CUDA): fwd+bwd time and torch.cuda.max_memory_allocated for L = 1k..8k, head dim 64/128,
  bfloat16; and the routed FFN (2 of 4 blocks, and 48 of 64) against the dense SwiGLU FFN.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spt_kernels import (  # noqa: E402
    ProductQuantizer,
    SPTConfig,
    candidate_budget,
    route_tokens,
    routed_ffn,
    select_candidates,
    sparse_attention,
)

CUDA = torch.cuda.is_available()
SPARSITY = 8
RESULTS: dict[str, dict[str, float]] = {}  # "group" -> {variant: value}; ratios are taken within a group


def attention_inputs(seq_len, head_dim, dtype, device, heads=9, kv_heads=3):
    q = torch.randn(1, heads, seq_len, head_dim, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(1, kv_heads, seq_len, head_dim, dtype=dtype, device=device, requires_grad=True)
    v = torch.randn(1, kv_heads, seq_len, head_dim, dtype=dtype, device=device, requires_grad=True)
    return q, k, v


def spt_attention(q, k, v, pq):
    """What a patched attention layer runs (minus the training-mode codebook update)."""
    budget = candidate_budget(k.shape[2], SPARSITY)
    defaults = SPTConfig()
    idx = select_candidates(pq.encode(q), pq.encode(k), budget, sink_keys=defaults.sink_keys, keep_self=defaults.keep_self)
    return sparse_attention(q, k, v, idx)


def eager_attention(q, k, v):
    """transformers' eager attention: repeat kv heads, full scores, additive causal mask, fp32 softmax."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    seq_len = q.shape[2]
    causal = torch.full((seq_len, seq_len), torch.finfo(q.dtype).min, dtype=q.dtype, device=q.device).triu(1)
    probs = torch.softmax(scores + causal, dim=-1, dtype=torch.float32).to(q.dtype)
    return probs @ v


def sdpa_attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def attention_variant(name, q, k):
    if name == "spt":
        pq = ProductQuantizer(q.shape[-1]).to(q.device)
        pq.encode(torch.cat([q.detach().reshape(-1, q.shape[-1]), k.detach().reshape(-1, k.shape[-1])]))
        return lambda q, k, v: spt_attention(q, k, v, pq)
    return {"eager": eager_attention, "sdpa": sdpa_attention}[name]


def forward_backward(fn, inputs, grad_out):
    for t in inputs:
        t.grad = None
    fn(*inputs).backward(grad_out)
    if CUDA and inputs[0].is_cuda:
        torch.cuda.synchronize()


def record(group, variant, value):
    RESULTS.setdefault(group, {})[variant] = value


def record_time(benchmark, variant):
    """Mean seconds of a finished benchmark; absent under --benchmark-disable (the repo's default addopts)."""
    if benchmark.stats is not None:
        record(benchmark.group + " time", variant, benchmark.stats.stats.mean)


@pytest.fixture(scope="module", autouse=True)
def ratio_table():
    """After all benchmarks: print every variant's ratio to its group's dense baseline, and save them."""
    yield
    lines = []
    for group, values in sorted(RESULTS.items()):
        base_name = next(b for b in ("eager", "dense") if b in values) if {"eager", "dense"} & set(values) else None
        for variant, value in sorted(values.items()):
            ratio = f"{value / values[base_name]:.3f}x {base_name}" if base_name else ""
            lines.append(f"{group:<40} {variant:<6} {value:14.6g}  {ratio}")
    print("\nSPT benchmark ratios (time in s, memory in MiB)\n" + "\n".join(lines))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_spt.json").write_text(json.dumps(RESULTS, indent=2))


# ---------------------------------------------------------------- CPU


@pytest.fixture
def one_thread():
    """CPU timings on one thread: steadier on a small shared machine, and the same for every variant."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("variant", ["eager", "sdpa", "spt"])
@pytest.mark.parametrize("seq_len", [256, 512])
def test_cpu_attention_fwd_bwd_time(benchmark, one_thread, seq_len, variant):
    q, k, v = attention_inputs(seq_len, 64, torch.float32, "cpu")
    fn = attention_variant(variant, q, k)
    grad_out = torch.randn_like(q)
    benchmark.group = f"cpu attention fwd+bwd L={seq_len}"
    benchmark.pedantic(forward_backward, args=(fn, (q, k, v), grad_out), rounds=5, warmup_rounds=1)
    record_time(benchmark, variant)


def peak_rss_mib(variant: str, seq_len: int) -> float:
    """Peak resident memory (MiB) of one fwd+bwd of `variant`, in a fresh process, above its pre-call level."""
    script = Path(__file__).resolve()
    # A fixed mmap threshold makes glibc hand every large tensor straight back to the OS when freed, so the
    # resident set tracks live tensors instead of whatever the heap happened to keep.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, str(script), "peak-rss", variant, str(seq_len)],
        capture_output=True, text=True, check=True, timeout=600, env=env,
    )
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("variant", ["eager", "sdpa", "spt"])
@pytest.mark.parametrize("seq_len", [2048, 4096])
def test_cpu_attention_peak_memory(benchmark, seq_len, variant):
    benchmark.group = f"cpu attention peak memory L={seq_len}"
    mib = benchmark.pedantic(peak_rss_mib, args=(variant, seq_len), rounds=1, iterations=1)
    benchmark.extra_info["peak_rss_mib"] = mib
    record(benchmark.group, variant, mib)


def ffn_inputs(tokens, hidden, inner, dtype, device):
    x = torch.randn(tokens, hidden, dtype=dtype, device=device, requires_grad=True)
    weights = [
        (torch.randn(shape, dtype=dtype, device=device) * hidden**-0.5).requires_grad_()
        for shape in ((inner, hidden), (inner, hidden), (hidden, inner))
    ]
    return x, weights


# variant -> (active, blocks): SPTConfig()'s speed setting, and the fine blocks that keep quality (results/spt.md)
FFN_ROUTING = {"routed": (2, 4), "routed-48of64": (48, 64)}
FFN_VARIANTS = ["dense", *FFN_ROUTING]


def ffn_variant(name, x):
    if name == "dense":
        return lambda x, wg, wu, wd: (F.silu(x @ wg.T) * (x @ wu.T)) @ wd.T
    active, n_blocks = FFN_ROUTING[name]
    blocks, gate = route_tokens(torch.randn(len(x), n_blocks, device=x.device), active)
    return lambda x, wg, wu, wd: routed_ffn(x, wg, wu, wd, blocks, gate, n_blocks)


@pytest.mark.parametrize("variant", FFN_VARIANTS)
def test_cpu_ffn_fwd_bwd_time(benchmark, one_thread, variant):
    x, weights = ffn_inputs(1024, 576, 1536, torch.float32, "cpu")  # SmolLM2-135M FFN, 1k tokens
    benchmark.group = "cpu ffn fwd+bwd T=1024"
    args = (ffn_variant(variant, x), (x, *weights), torch.randn_like(x))
    benchmark.pedantic(forward_backward, args=args, rounds=5, warmup_rounds=1)
    record_time(benchmark, variant)


# ---------------------------------------------------------------- GPU

gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def cuda_peak_mib(fn, inputs, grad_out):
    """Peak allocated CUDA memory (MiB) of one fwd+bwd above what was allocated before it."""
    forward_backward(fn, inputs, grad_out)  # warm-up: triton compilation, cuBLAS workspaces
    for t in inputs:
        t.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    forward_backward(fn, inputs, grad_out)
    return (torch.cuda.max_memory_allocated() - before) / 2**20


@gpu
@pytest.mark.parametrize("variant", ["eager", "sdpa", "spt"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("seq_len", [1024, 2048, 4096, 8192])
def test_gpu_attention(benchmark, seq_len, head_dim, variant):
    q, k, v = attention_inputs(seq_len, head_dim, torch.bfloat16, "cuda", heads=16, kv_heads=4)
    fn = attention_variant(variant, q, k)
    grad_out = torch.randn_like(q)
    group = f"gpu attention L={seq_len} D={head_dim} bf16"
    mib = cuda_peak_mib(fn, (q, k, v), grad_out)
    benchmark.group = group
    benchmark.extra_info["peak_mib"] = mib
    benchmark.pedantic(forward_backward, args=(fn, (q, k, v), grad_out), rounds=10, warmup_rounds=2)
    record_time(benchmark, variant)
    record(group + " peak", variant, mib)


@gpu
@pytest.mark.parametrize("variant", FFN_VARIANTS)
@pytest.mark.parametrize("tokens", [4096, 16384])
def test_gpu_ffn(benchmark, tokens, variant):
    x, weights = ffn_inputs(tokens, 2048, 8192, torch.bfloat16, "cuda")
    fn = ffn_variant(variant, x)
    grad_out = torch.randn_like(x)
    group = f"gpu ffn T={tokens} 2048->8192 bf16"
    mib = cuda_peak_mib(fn, (x, *weights), grad_out)
    benchmark.group = group
    benchmark.extra_info["peak_mib"] = mib
    benchmark.pedantic(forward_backward, args=(fn, (x, *weights), grad_out), rounds=10, warmup_rounds=2)
    record_time(benchmark, variant)
    record(group + " peak", variant, mib)


def _proc_status_kib(field: str) -> int:
    """A memory field of /proc/self/status in KiB: VmRSS (resident now) or VmHWM (peak resident)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_rss_main(variant: str, seq_len: int) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)  # as the timings; per-thread scratch buffers would otherwise blur the comparison
    q, k, v = attention_inputs(seq_len, 64, torch.float32, "cpu")
    fn = attention_variant(variant, q, k)
    grad_out = torch.randn_like(q)
    forward_backward(fn, (q, k, v), grad_out)  # warm-up: lazy initialisation inside torch
    q.grad = k.grad = v.grad = None
    before = _proc_status_kib("VmRSS")
    # Reset the peak to the current resident set. (getrusage's ru_maxrss cannot be reset and, on Linux, even
    # carries over the parent's peak through fork + exec, so a large pytest parent would inflate it.)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    forward_backward(fn, (q, k, v), grad_out)
    print((_proc_status_kib("VmHWM") - before) / 1024)


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "peak-rss":
        sys.exit(f"usage: {sys.argv[0]} peak-rss (eager|sdpa|spt) SEQ_LEN")
    _peak_rss_main(sys.argv[2], int(sys.argv[3]))
