"""C++ kernels for XLA's CPU backend, as XLA FFI custom calls (build.py compiles and registers them).

- logistic_probe.cc: the data term of a logistic probe in one pass (vlm_jax/probe/cpu_kernel.py).
- panel_matmul.cc: products of a few rows with weights packed in column panels, at memory speed
  (vlm_jax/nn/panel_matmul.py; the decode steps of generation).
- thread_blocks.h: work shared among the threads of XLA's intra-op pool.
"""
