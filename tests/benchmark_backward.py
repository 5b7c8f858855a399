"""Backward benchmark: `python tests/benchmark_backward.py [--seqlens ...] [--dims ...]`.

Times the backward only (autograd.grad on a retained graph): this project vs SDPA (flash,
cuDNN) and FlexAttention, bf16; TFLOP/s counted as 2.5x the forward FLOPs; CSV and PNG under
tests/bench_out/. Needs a CUDA GPU.
"""

from bench_utils import run_attention_benchmark

if __name__ == "__main__":
    run_attention_benchmark("bwd")
