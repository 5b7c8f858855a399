{
  description = "flash-sparse-attn: dense, sparse and gated attention in Triton (torch-noarch kernel)";

  inputs = {
    kernel-builder.url = "github:huggingface/kernels";
  };

  # `nix run .#build-and-copy` writes build/torch-{cuda,rocm,xpu,cpu}/ from build.toml.
  # Without Nix, `python scripts/build.py` writes the same variants.
  outputs =
    { self, kernel-builder }:
    kernel-builder.lib.genKernelFlakeOutputs {
      inherit self;
      path = ./.;
    };
}
