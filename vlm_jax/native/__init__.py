"""C++ kernels for XLA's CPU backend, as XLA FFI custom calls (build.py compiles and registers them).

- logistic_probe.cc: the data term of a logistic probe in one pass (vlm_jax/probe/cpu_kernel.py).
- blocked_attention.cc: the blocked attention's forward and backward, a few query rows at a time
  (vlm_jax/nn/cpu_attention.py).
- decode_matmul.cc: the products of a decode step (a few rows times every weight matrix) at memory
  speed, on stacked weights read in place or on weights packed in column panels
  (vlm_jax/nn/decode_matmul.py).
- thread_blocks.h: work shared among the threads of XLA's intra-op pool.
- vector_math.h: eight-lane float vectors, their loads and stores, a vector exp.
"""
