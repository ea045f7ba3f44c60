"""PRoPE (projective positional encoding) multi-view attention: the reference and the fused
kernels. Imports go one way, top to bottom:

    fused.py       prope_attention, its autograd Function, resolve (the default kernel policy)
    sdpa_core.py   transform passes around PyTorch SDPA (cuDNN), the other attention core
    backward.py    the two-kernel and the one-kernel (atomic-dq) backwards
    forward.py     the pre-pass forward          forward_ws.py  the warp-specialised forward
    core.py        camera matrices, per-token transforms, precisions, the fallback launcher
    configs.py     PRoPEKernels (the kernel choice) and the launch configs with their defaults
    reference.py   prope_attention_ref in plain PyTorch (the math, the accuracy baseline)
    bench.py       shapes, inputs, FLOP counts, timing and accuracy checks (benchmarks, GPU tests)
    sweeps.py      launch-config sweeps of each kernel (benchmarks)

This file imports nothing, so `import kernels` does not need triton (`kernels.attention` loads
fused.py when a CUDA call first needs it).
"""
