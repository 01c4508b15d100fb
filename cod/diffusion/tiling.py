"""Tiled sampling: the denoiser on overlapping windows of a large image, its velocities blended at every step.

A whole-image pass attends over every token of the image, so its cost grows with the square of the area (47,000
tokens for a 12-megapixel photo). `TiledDenoiser` wraps a denoiser with the sampler's calling convention,
`net(x, t, cond=...) -> (velocity, cond)`, and computes each call on windows of a fixed size that overlap their
neighbours; each cell's velocity is the weighted mean of the windows that cover it, with weights that rise smoothly
(sin^2) across an overlap and are 1 elsewhere, so a step costs a fixed amount per window and the number of windows
grows linearly with the area. The sampler, its Adams history and guidance are unchanged: they see one velocity
for the whole image at every step, and the windows agree with each other at every step through the shared state x.

The condition map is computed once for the whole image and cropped per window, not computed per window with a
margin: the condition decoder attends over its whole grid (global attention, then convolutions), so its receptive
field is the whole image and no finite margin would reproduce the map a whole-image decode uses. Once per image,
at the token grid's resolution (1/256 of the pixels), it is a small share of a decode.

Windows start on the token grid, so every window's tokens are whole tokens of the image and its condition tokens
are the image's. When one window covers the image the wrapped denoiser is called exactly as without tiling (the
same call, the same result).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tiling:
    """Window side and overlap of neighbouring windows, in model-space cells (multiples of the token size)."""

    tile: int
    overlap: int

    def __post_init__(self):
        if self.tile <= 0 or not 0 <= self.overlap < self.tile:
            raise ValueError(f"tiles need a positive size and an overlap smaller than it, got tile {self.tile}, "
                             f"overlap {self.overlap}")

    def starts(self, n: int, multiple: int) -> list[int]:
        """First cells of the windows along an axis of n cells: every `tile - overlap` cells (rounded down to the
        token grid), the last window flush with the end; one window when the tile covers the axis."""
        if self.tile >= n:
            return [0]
        stride = max(multiple, (self.tile - self.overlap) // multiple * multiple)
        last = (n - self.tile) // multiple * multiple
        return sorted(set(range(0, last, stride)) | {last})

    def windows(self, height: int, width: int, multiple: int) -> list[tuple[int, int, int, int]]:
        """(top, left, height, width) of every window of a height x width grid, row-major."""
        th, tw = min(self.tile, height), min(self.tile, width)
        return [(y, x, th, tw) for y in self.starts(height, multiple) for x in self.starts(width, multiple)]


def axis_weights(start: int, size: int, n: int, overlap: int) -> torch.Tensor:
    """Blending weights of a window [start, start + size) of an axis of n cells: sin^2 from ~0 to 1 over its first
    `overlap` cells unless it starts at 0, cos^2 down over its last `overlap` cells unless it ends at n, 1 elsewhere.
    Two windows that overlap by exactly `overlap` cells sum to 1 there (sin^2 + cos^2); where they overlap by more
    (the last window is flush with the end) the caller's normalisation by the summed weights takes over. Every
    weight is positive, so every cell has weight."""
    w = torch.ones(size, dtype=torch.float64)
    ramp_len = min(overlap, size // 2)
    if ramp_len:
        ramp = torch.sin(0.5 * math.pi * (torch.arange(ramp_len, dtype=torch.float64) + 0.5) / ramp_len) ** 2
        if start > 0:
            w[:ramp_len] = ramp
        if start + size < n:
            w[size - ramp_len:] = torch.minimum(w[size - ramp_len:], ramp.flip(0))
    return w


class TiledDenoiser:
    """net, called on overlapping windows (see the module docstring). cells_per_token: model-space cells per
    condition token (the denoiser's patch size); windows and their starts are multiples of it."""

    def __init__(self, net, tiling: Tiling, cells_per_token: int):
        if tiling.tile % cells_per_token or tiling.overlap % cells_per_token:
            raise ValueError(f"tile {tiling.tile} and overlap {tiling.overlap} must be multiples of the token size "
                             f"{cells_per_token}")
        self.net, self.tiling, self.cells = net, tiling, cells_per_token

    def windows(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        return self.tiling.windows(height, width, self.cells)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                 cond: torch.Tensor | None = None):
        if cond is None:
            raise ValueError("tiled sampling needs the condition map computed up front (cond=...)")
        H, W = x.shape[-2:]
        windows = self.windows(H, W)
        if len(windows) == 1:
            return self.net(x, t, cond=cond)
        s, o = self.cells, self.tiling.overlap
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        total_y = torch.zeros(H, dtype=torch.float64)
        total_x = torch.zeros(W, dtype=torch.float64)
        for top, left, h, w in windows:
            wy, wx = axis_weights(top, h, H, o), axis_weights(left, w, W, o)
            v, _ = self.net(x[..., top:top + h, left:left + w], t,
                            cond=cond[..., top // s:(top + h) // s, left // s:(left + w) // s])
            weight = (wy[:, None] * wx[None, :]).to(torch.float32).to(x.device)
            out[..., top:top + h, left:left + w].addcmul_(v.float(), weight)
        # The weights are a product of one weight per axis on a grid of windows, so their sum at each cell is the
        # product of the per-axis sums (each window position along an axis counted once).
        for top in sorted({w[0] for w in windows}):
            total_y[top:top + windows[0][2]] += axis_weights(top, windows[0][2], H, o)
        for left in sorted({w[1] for w in windows}):
            total_x[left:left + windows[0][3]] += axis_weights(left, windows[0][3], W, o)
        out /= (total_y[:, None] * total_x[None, :]).to(torch.float32).to(x.device)
        return out.to(x.dtype), cond


# --------------------------------------------------------------------------------------------------------------
# When to tile, in pixels (the user's unit)
# --------------------------------------------------------------------------------------------------------------
TILE_CHOICES = ("auto", "off")
# "auto" tiles images of more than AUTO_ABOVE_PIXELS pixels (4 MP: a 2048x2048 image is the largest decoded
# whole), in windows of AUTO_TILE pixels overlapping by AUTO_OVERLAP. docs/precision.md has the measurements.
AUTO_ABOVE_PIXELS = 2048 * 2048
AUTO_TILE = 512
AUTO_OVERLAP = 128


def parse_tile(value) -> str | int:
    """"auto", "off" or a window side in pixels (a positive integer, or its digits as text) -> "auto" | "off" | int."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in TILE_CHOICES:
            return text
        if text.isdigit() and int(text) > 0:
            return int(text)
    elif isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise ValueError(f"tile must be 'auto', 'off' or a window side in pixels (a positive integer), got {value!r}")


def tiling_for(tile, height: int, width: int, pixels_per_cell: int, cells_per_token: int,
               overlap: int | None = None) -> Tiling | None:
    """The tiling of a height x width image (pixels) for a tile option ("auto", "off" or pixels), in model-space
    cells; None for a whole-image decode. A tile in pixels is rounded down to whole tokens (at least one) and the
    overlap (pixels; default a quarter of the tile, rounded to tokens) is kept below it."""
    tile = parse_tile(tile)
    if tile == "off":
        return None
    if tile == "auto":
        if height * width <= AUTO_ABOVE_PIXELS:
            return None
        tile, overlap = AUTO_TILE, AUTO_OVERLAP if overlap is None else overlap
    token = pixels_per_cell * cells_per_token
    tile_tokens = max(1, tile // token)
    overlap_px = tile_tokens * token // 4 if overlap is None else overlap
    overlap_tokens = min(max(0, overlap_px // token), tile_tokens - 1)
    if tile_tokens * token >= max(height, width):
        return None
    return Tiling(tile_tokens * cells_per_token, overlap_tokens * cells_per_token)
