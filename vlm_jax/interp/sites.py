"""The site vocabulary: names of the activations `capture` can return.

Per-layer sites come stacked with a leading layer axis L (TransformerLens-like names);
`*.hidden_states` follow transformers' hidden_states exactly (L + 1 entries: the input of
layer 0, then the output of every layer; index 0 of the text stack is the merged input
embedding, i.e. the projector output at image positions; the text stack's last entry is
after the final norm, as in transformers). For a logit lens over un-normed residuals use
text.embed + text.resid_post.

  site                         shape
  vision.resid_pre|resid_mid|resid_post|attn_out|mlp_out
                               [L, N, P, Dv]
  vision.q|k|v|z               [L, N, P, Hv, Ev]   (z: per-head attention output, before out_proj)
  vision.attn_pattern          [L, N, Hv, P, P]
  vision.hidden_states         [L + 1, N, P, Dv]
  vision.features              [N, P', Dv * n_feature_layers]   (what the projector reads)
  projector.out                [N, P', D]
  text.embed                   [B, T, D]                       (image features merged in)
  text.resid_pre|resid_mid|resid_post|attn_out|mlp_out
                               [L, B, T, D]
  text.q|z                     [L, B, T, H, E]   (q after RoPE; z: per-head output before o_proj)
  text.k|v                     [L, B, T, K, E]   (k after RoPE)
  text.attn_pattern            [L, B, H, T, S]
  text.hidden_states           [L + 1, B, T, D]
  text.final                   [B, T, D]                       (after the final norm)
  logits                       [B, T, V]
"""

from __future__ import annotations

from vlm_jax.models import text_decoder, vision_tower

VISION_LAYER_SITES = tuple(f"vision.{s}" for s in vision_tower.LAYER_SITES)
TEXT_LAYER_SITES = tuple(f"text.{s}" for s in text_decoder.LAYER_SITES)
OTHER_SITES = (
    "vision.hidden_states",
    "vision.features",
    "projector.out",
    "text.embed",
    "text.hidden_states",
    "text.final",
    "logits",
)
ALL_SITES = VISION_LAYER_SITES + TEXT_LAYER_SITES + OTHER_SITES


def validate_capture(capture) -> tuple[str, ...]:
    """Returns capture as a sorted tuple of unique names; unknown names raise KeyError."""
    if isinstance(capture, str):
        capture = (capture,)
    names = tuple(sorted(set(capture)))
    unknown = [n for n in names if n not in ALL_SITES]
    if unknown:
        raise KeyError(
            f"unknown capture site(s) {unknown}. Valid sites: {', '.join(ALL_SITES)}"
        )
    return names


def layer_sites(capture: tuple[str, ...], tower: str) -> frozenset:
    """Per-layer site names (without the tower prefix) asked for one tower."""
    prefix = tower + "."
    names = {c[len(prefix):] for c in capture if c.startswith(prefix)}
    if f"{tower}.hidden_states" in capture:
        names.add("resid_pre")
    return frozenset(n for n in names if n in vision_tower.LAYER_SITES)
