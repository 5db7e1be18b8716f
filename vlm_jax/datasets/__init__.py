"""Synthetic data (deterministic from seeds) and readers for the studies' real datasets.

  shapes      study A's shape world: six named shapes, squiggles, colours, boxes, masks
  questions   captions and questions (name, colour, position, count), correspondence items
  hierarchy   study D's superordinate / coarse / fine classes with attribute text
  depth       study B's relative depth: two marked points, occlusion, depth maps
  readers     SPair-71k, CUB-200-2011 and BLINK-style jsonl from a local path
"""
