"""Original-image pixels <-> patch grid, through the processor's pad, resize and crop.

Annotations (boxes, keypoints, segmentation masks) live in the original image's pixels; the
model sees a padded / resized / centre-cropped version cut into patches. `ImageGeometry`
replays the geometry of transformers' image processors (LLaVA's pad-to-square, resize by
shortest edge or to a fixed size, centre crop) for one image, and maps annotations to
fractional grid coordinates and to patch (token) sets.

Coordinates: pixels are (x, y) with (0, 0) the top-left corner of the top-left pixel; grid
coordinates are (row, col) with integers at patch centres, so (0, 0) is the centre of the
top-left patch and bilinear sampling on the grid is direct.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _get(size, key):
    if size is None:
        return None
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


@dataclass(frozen=True)
class ImageGeometry:
    original: tuple[int, int]  # (width, height) of the image as given
    pad: tuple[int, int, int, int]  # (left, top, padded width, padded height)
    resized: tuple[int, int]  # (width, height) after resizing
    crop: tuple[int, int, int, int]  # (left, top, width, height) of the crop, in resized pixels
    patch_size: int

    @classmethod
    def from_processor(cls, image_processor, image_or_size, patch_size: int) -> "ImageGeometry":
        """The geometry an HF image processor applies to an image (PIL image or (width, height))."""
        width, height = image_or_size if isinstance(image_or_size, tuple) else image_or_size.size
        left = top = 0
        pw, ph = width, height
        if getattr(image_processor, "do_pad", False):  # LLaVA: pad to a centred square
            side = max(width, height)
            left, top, pw, ph = (side - width) // 2, (side - height) // 2, side, side
        rw, rh = pw, ph
        if getattr(image_processor, "do_resize", True):
            size = image_processor.size
            shortest, h, w = _get(size, "shortest_edge"), _get(size, "height"), _get(size, "width")
            if shortest:  # transformers' get_resize_output_image_size(default_to_square=False)
                short, long = (pw, ph) if pw <= ph else (ph, pw)
                new_short, new_long = shortest, int(shortest * long / short)
                rw, rh = (new_short, new_long) if pw <= ph else (new_long, new_short)
            elif h and w:
                rw, rh = w, h
            else:
                raise ValueError(f"unsupported resize size {size}; expected shortest_edge or height/width")
        cl, ct, cw, ch = 0, 0, rw, rh
        if getattr(image_processor, "do_center_crop", False):
            crop = image_processor.crop_size
            ch, cw = _get(crop, "height"), _get(crop, "width")
            ct, cl = (rh - ch) // 2, (rw - cw) // 2
        return cls((width, height), (left, top, pw, ph), (rw, rh), (cl, ct, cw, ch), patch_size)

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of the patch grid."""
        return self.crop[3] // self.patch_size, self.crop[2] // self.patch_size

    def to_processed(self, xy) -> np.ndarray:
        """Original pixel coordinates [..., 2] (x, y) -> model-input pixel coordinates."""
        xy = np.asarray(xy, np.float64)
        left, top, pw, ph = self.pad
        sx, sy = self.resized[0] / pw, self.resized[1] / ph
        x = (xy[..., 0] + left) * sx - self.crop[0]
        y = (xy[..., 1] + top) * sy - self.crop[1]
        return np.stack([x, y], axis=-1)

    def to_original(self, xy) -> np.ndarray:
        """Model-input pixel coordinates [..., 2] -> original pixel coordinates."""
        xy = np.asarray(xy, np.float64)
        left, top, pw, ph = self.pad
        sx, sy = self.resized[0] / pw, self.resized[1] / ph
        x = (xy[..., 0] + self.crop[0]) / sx - left
        y = (xy[..., 1] + self.crop[1]) / sy - top
        return np.stack([x, y], axis=-1)

    def to_grid(self, xy) -> np.ndarray:
        """Original pixel coordinates [..., 2] (x, y) -> fractional grid coordinates [..., 2]
        (row, col), integers at patch centres (for bilinear sampling of patch features)."""
        p = self.to_processed(xy) / self.patch_size - 0.5
        return np.stack([p[..., 1], p[..., 0]], axis=-1)

    def patch_of(self, xy) -> np.ndarray:
        """Original pixel coordinates [..., 2] -> (row, col) [..., 2] of the patch holding the
        point, -1 where the point was cropped away."""
        p = np.floor(self.to_processed(xy) / self.patch_size).astype(int)
        rows, cols = self.grid
        inside = (p[..., 0] >= 0) & (p[..., 0] < cols) & (p[..., 1] >= 0) & (p[..., 1] < rows)
        return np.where(inside[..., None], np.stack([p[..., 1], p[..., 0]], axis=-1), -1)

    def patch_average(self, values: np.ndarray, samples: int = 4) -> np.ndarray:
        """Mean [rows, cols] of a per-pixel map [H, W] (original pixels) over each patch
        (samples x samples points per patch, mapped back to the original image; points the
        processor padded in count as 0)."""
        values = np.asarray(values)
        if values.shape != (self.original[1], self.original[0]):
            raise ValueError(f"the map is {values.shape} (rows, cols) but the image is "
                             f"{self.original[1]}x{self.original[0]} (height x width)")
        rows, cols = self.grid
        offsets = (np.arange(samples) + 0.5) / samples * self.patch_size
        ys = (np.arange(rows)[:, None] * self.patch_size + offsets[None, :]).reshape(-1)
        xs = (np.arange(cols)[:, None] * self.patch_size + offsets[None, :]).reshape(-1)
        grid_xy = np.stack(np.meshgrid(xs, ys), axis=-1)  # [rows*s, cols*s, 2]
        orig = np.floor(self.to_original(grid_xy)).astype(int)
        x, y = orig[..., 0], orig[..., 1]
        inside = (x >= 0) & (x < values.shape[1]) & (y >= 0) & (y < values.shape[0])
        sampled = np.zeros(x.shape, np.float64)
        sampled[inside] = values[y[inside], x[inside]]
        return sampled.reshape(rows, samples, cols, samples).mean(axis=(1, 3))

    def mask_coverage(self, mask: np.ndarray, samples: int = 4) -> np.ndarray:
        """Fraction [rows, cols] of each patch covered by a boolean mask [H, W] in original pixels."""
        return self.patch_average(np.asarray(mask, bool).astype(np.float64), samples)

    def box_coverage(self, box) -> np.ndarray:
        """Fraction [rows, cols] of each patch inside box (x0, y0, x1, y1) in original pixels."""
        (x0, y0), (x1, y1) = self.to_processed(np.asarray(box, np.float64).reshape(2, 2))
        rows, cols = self.grid
        p = self.patch_size
        edges_x, edges_y = np.arange(cols + 1) * p, np.arange(rows + 1) * p
        over_x = np.clip(np.minimum(edges_x[1:], x1) - np.maximum(edges_x[:-1], x0), 0, p) / p
        over_y = np.clip(np.minimum(edges_y[1:], y1) - np.maximum(edges_y[:-1], y0), 0, p) / p
        return over_y[:, None] * over_x[None, :]

    def box_patches(self, box, min_coverage: float = 1e-9) -> np.ndarray:
        """bool [rows, cols]: patches with at least `min_coverage` of their area in the box
        (default: any overlap; 0.5 = mostly inside)."""
        return self.box_coverage(box) >= min_coverage

    def mask_patches(self, mask: np.ndarray, min_coverage: float = 0.5) -> np.ndarray:
        """bool [rows, cols]: patches covered by the segmentation mask at least `min_coverage`."""
        return self.mask_coverage(mask) >= min_coverage


def patch_positions(grid_positions: np.ndarray, patches: np.ndarray) -> np.ndarray:
    """Token positions of the selected patches.

    grid_positions [rows, cols] (from ImageTokenMap.grid_positions); patches bool [rows, cols].
    """
    return np.asarray(grid_positions)[np.asarray(patches, bool)]
