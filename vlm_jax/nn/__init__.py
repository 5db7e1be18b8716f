"""Layers as pure functions over parameter dicts.

Axis alphabet used in names, docstrings and einsum strings throughout vlm_jax:
  B batch, T tokens (queries), S tokens attended to (keys/values), N images, P vision tokens
  per image, L layers, H heads, K kv-heads, G query heads per kv-head (H = K * G),
  E head width, D model width, F MLP width, V vocabulary, C image channels.
"""
