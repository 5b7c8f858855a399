"""Forward benchmark: `python tests/benchmark_forward.py [--seqlens ...] [--dims ...]`.

This project's dense forward vs SDPA (flash, cuDNN) and FlexAttention, bf16, same inputs and
run; TFLOP/s and ratio to cuDNN; CSV and PNG under tests/bench_out/. Needs a CUDA GPU.
"""

from bench_utils import run_attention_benchmark

if __name__ == "__main__":
    run_attention_benchmark("fwd")
