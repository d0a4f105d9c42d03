"""What a number is in dsv4, owned by neither the model nor the cache: the FP8/FP4/e8m0 formats and the
official kernels' roundings (``formats``), the numerics modes (``modes``), and the GEMMs that run on
checkpoint-format weights (``gemm``)."""
