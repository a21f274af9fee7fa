"""The fast CUDA engine (kernels.py, moe.py, engine.py). This file imports nothing heavy: evaluate reads FAST_BITS
to choose an engine without loading triton."""

FAST_BITS = (16, 8, 4, 2)  # 3-bit codes straddle bytes; the quantize stage can make them, the kernels cannot
