# Copyright 2026 The nemotron-diffusion authors. Licensed under the Apache License, Version 2.0.
"""Image preprocessing of Nemotron-Labs-Diffusion-VLM (NVIDIA's port of Mistral's image encoder).

Per image (the steps are spelled out in docs/vlm.md):

1. Read with PIL (a path, bytes or an image); EXIF orientation is *not* applied. Anything that is not RGB becomes
   RGBA and is pasted onto a white canvas through its alpha channel, so transparency turns white.
2. With `m = max_image_size` (1400): `r = max(W / m, H / m)`; if `r > 1` the size becomes `round(W / r)` x
   `round(H / r)` (Python's round: halves go to the even neighbour).
3. Cells of `cell_size = patch_size * merge_size` = 28 pixels: `w = ceil(W / 28)`, `h = ceil(H / 28)`; the image is
   resized to exactly `28w x 28h` (small images grow, odd sizes stretch to whole cells).
4. The resize is bicubic with a = -0.75 and half-pixel centres, borders replicated, no antialiasing (OpenCV's
   `INTER_CUBIC`, reproduced by `opencv_cubic_resize`), on float32 RGB values in [0, 255], without rounding back
   to integers.
5. `x / 255`, normalised with the CLIP mean and std, channels first. `image_sizes` = (28h, 28w).
6. A batch is zero-padded bottom-right to its largest height and width; the model crops each image back to its size.

The image then takes `1 + h * (w + 1)` tokens: `<|image_start|>`, per row w `<|image_pad|>` and a `<|image_break|>`,
the last row ending in `<|image_end|>` instead (`image_token_layout`).

Only the standard library, numpy, PIL and torch are used (no OpenCV).
"""

import io
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _fit_size(width: int, height: int, max_image_size: int) -> tuple[int, int]:
    """Step 2: the size after the cap, rounded half to even."""
    ratio = max(width / max_image_size, height / max_image_size)
    if ratio > 1:
        width, height = round(width / ratio), round(height / ratio)
    return max(width, 1), max(height, 1)


class NemotronDiffusionVLMImageProcessor(BaseImageProcessor):
    r"""
    Constructs the image processor of Nemotron-Labs-Diffusion-VLM.

    Args:
        max_image_size (`int`, defaults to 1400):
            Longest side cap in pixels (a multiple of `patch_size * merge_size`).
        patch_size (`int`, defaults to 14), merge_size (`int`, defaults to 2):
            The vision tower's patch and the projector's merge: one image token per `patch_size * merge_size`
            pixels square.
        image_mean, image_std (`list[float]`, default CLIP's):
            Normalisation after scaling to [0, 1].
    """

    model_input_names = ["pixel_values", "image_sizes"]

    def __init__(
        self,
        max_image_size: int = 1400,
        patch_size: int = 14,
        merge_size: int = 2,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        **kwargs,
    ):
        super().__init__(**kwargs)
        for name, value in (("patch_size", patch_size), ("merge_size", merge_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{type(self).__name__}: `{name}`={value!r} is invalid; allowed: an integer >= 1.")
        cell = patch_size * merge_size
        if not isinstance(max_image_size, int) or isinstance(max_image_size, bool) or max_image_size < cell:
            raise ValueError(
                f"{type(self).__name__}: `max_image_size`={max_image_size!r} is invalid; allowed: an integer >= "
                f"patch_size * merge_size = {cell}."
            )
        for name, value in (("image_mean", image_mean), ("image_std", image_std)):
            if len(value) != 3 or (name == "image_std" and not all(v > 0 for v in value)):
                raise ValueError(
                    f"{type(self).__name__}: `{name}`={value!r} is invalid; allowed: three numbers"
                    + (" > 0." if name == "image_std" else ".")
                )
        self.max_image_size = max_image_size
        self.patch_size = patch_size
        self.merge_size = merge_size
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]

    @property
    def cell_size(self) -> int:
        return self.patch_size * self.merge_size

    # ---- sizes and token counts -----------------------------------------------------------------------------
    def image_grid(self, width: int, height: int, max_image_size: int | None = None) -> tuple[int, int]:
        """(rows h, columns w) of cells for an image of `width` x `height` pixels (steps 2 and 3)."""
        for name, value in (("width", width), ("height", height)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}`={value!r} is invalid; allowed: an integer >= 1 (pixels).")
        cap = self.max_image_size if max_image_size is None else max_image_size
        width, height = _fit_size(int(width), int(height), cap)
        return math.ceil(height / self.cell_size), math.ceil(width / self.cell_size)

    def num_image_tokens(self, width: int, height: int, max_image_size: int | None = None) -> int:
        """Tokens an image of `width` x `height` pixels takes in the prompt: `1 + h * (w + 1)`."""
        rows, cols = self.image_grid(width, height, max_image_size)
        return 1 + rows * (cols + 1)

    # ---- loading --------------------------------------------------------------------------------------------
    @staticmethod
    def load_image(image, name: str = "images"):
        """A PIL image from a PIL image, a path, bytes or an HxW / HxWxC uint8 array (no EXIF transpose)."""
        from PIL import Image, UnidentifiedImageError

        if isinstance(image, Image.Image):
            return image
        if isinstance(image, (str, os.PathLike)):
            path = Path(image)
            try:
                with Image.open(path) as opened:
                    opened.load()
                    return opened.copy()
            except (OSError, UnidentifiedImageError) as err:
                raise ValueError(f"`{name}`: cannot read an image from {str(path)!r}: {err}") from None
        if isinstance(image, (bytes, bytearray)):
            try:
                with Image.open(io.BytesIO(image)) as opened:
                    opened.load()
                    return opened.copy()
            except (OSError, UnidentifiedImageError) as err:
                raise ValueError(f"`{name}`: cannot read an image from {len(image)} bytes: {err}") from None
        if isinstance(image, np.ndarray):
            bad_channels = image.ndim == 3 and image.shape[2] not in (1, 3, 4)
            if image.dtype != np.uint8 or image.ndim not in (2, 3) or bad_channels:
                raise ValueError(
                    f"`{name}`: a numpy image must be uint8 of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got "
                    f"dtype {image.dtype} and shape {image.shape}."
                )
            array = image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image
            return Image.fromarray(np.ascontiguousarray(array))
        raise TypeError(
            f"`{name}`: expected a PIL image, a path, bytes or a uint8 numpy array, got {type(image).__name__}."
        )

    @staticmethod
    def to_rgb(image):
        """Step 1: RGB; any other mode goes through RGBA and is pasted onto white with its alpha as the mask."""
        from PIL import Image

        if image.mode == "RGB":
            return image
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        canvas.paste(rgba, (0, 0), rgba)
        return canvas.convert("RGB")

    # ---- one image ------------------------------------------------------------------------------------------
    def process_one(self, image, max_image_size: int | None = None, name: str = "images") -> torch.Tensor:
        """Steps 1-5 for one image: a float32 tensor [3, 28h, 28w]."""
        rgb = self.to_rgb(self.load_image(image, name))
        rows, cols = self.image_grid(rgb.width, rgb.height, max_image_size)
        pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32).copy()).permute(2, 0, 1)[None]
        out_h, out_w = rows * self.cell_size, cols * self.cell_size
        if (out_h, out_w) != tuple(pixels.shape[-2:]):
            pixels = opencv_cubic_resize(pixels[0], out_h, out_w)[None]
        pixels = pixels[0] / 255.0
        mean = torch.tensor(self.image_mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.image_std, dtype=torch.float32)[:, None, None]
        return (pixels - mean) / std

    # ---- the batch ------------------------------------------------------------------------------------------
    def preprocess(self, images, max_image_size: int | None = None, return_tensors="pt", **kwargs) -> BatchFeature:
        """`images`: one image or a (possibly nested, per prompt) list of them. Returns `pixel_values` [N, 3, H, W]
        (zero-padded bottom-right to the largest image) and `image_sizes` [N, 2] = (height, width) in pixels."""
        if return_tensors not in ("pt", None):
            raise ValueError(f"`return_tensors`={return_tensors!r} is invalid; allowed: 'pt' (or None).")
        unknown = sorted(k for k, v in kwargs.items() if v is not None)
        if unknown:
            raise TypeError(f"{type(self).__name__}.preprocess got unexpected arguments: {unknown}.")
        cap = self.max_image_size if max_image_size is None else max_image_size
        if not isinstance(cap, int) or isinstance(cap, bool) or cap < self.cell_size:
            raise ValueError(f"`max_image_size`={cap!r} is invalid; allowed: an integer >= {self.cell_size}.")
        flat = list(_flatten(images))
        if not flat:
            raise ValueError("`images` is empty: pass at least one image.")
        tensors = [self.process_one(image, cap, name=f"images[{i}]") for i, image in enumerate(flat)]
        height = max(t.shape[1] for t in tensors)
        width = max(t.shape[2] for t in tensors)
        pixel_values = torch.zeros(len(tensors), 3, height, width, dtype=torch.float32)
        for i, t in enumerate(tensors):
            pixel_values[i, :, : t.shape[1], : t.shape[2]] = t
        image_sizes = torch.tensor([list(t.shape[1:]) for t in tensors], dtype=torch.long)
        return BatchFeature(data={"pixel_values": pixel_values, "image_sizes": image_sizes})


def _cubic_taps(in_size: int, out_size: int):
    """OpenCV's generic INTER_CUBIC taps along one axis, in float32 as OpenCV computes them: the source position of
    output pixel d is (d + 0.5) * scale - 0.5 rounded to float32, with scale = 1 / (out / in); the four taps around
    it are clamped to the image (replicated border); weights are Keys' cubic with a = -0.75."""
    scale = 1.0 / (out_size / in_size)
    position = ((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    first = np.floor(position)
    t = (position - first).astype(np.float32)
    a, one = np.float32(-0.75), np.float32(1.0)
    u = one - t
    w0 = ((a * (t + one) - np.float32(5.0) * a) * (t + one) + np.float32(8.0) * a) * (t + one) - np.float32(4.0) * a
    w1 = ((a + np.float32(2.0)) * t - (a + np.float32(3.0))) * t * t + one
    w2 = ((a + np.float32(2.0)) * u - (a + np.float32(3.0))) * u * u + one
    w3 = one - w0 - w1 - w2
    taps = np.clip(first.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :], 0, in_size - 1)
    return torch.from_numpy(taps), torch.from_numpy(np.stack([w0, w1, w2, w3], axis=1).astype(np.float32))


def opencv_cubic_resize(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`cv2.resize(..., interpolation=cv2.INTER_CUBIC)` of a float32 image [C, H, W], as OpenCV's pip wheels compute
    it. They hand images of at least 4 x 4 pixels to Intel IPP, whose result is the exact bicubic (a = -0.75,
    half-pixel centres, replicated border, no antialiasing): computed here in float64 with torch's bicubic kernel and
    rounded to float32 (torch's own float32 kernel drifts up to 0.04 of 255 on large images). Smaller sources take
    OpenCV's generic code, whose float32 source positions shift the result by up to ~0.02 of 255: reproduced
    with its float32 taps (horizontal pass, then vertical, each summed left to right)."""
    if min(pixels.shape[-2:]) >= 4:
        out = F.interpolate(
            pixels[None].double(), size=(height, width), mode="bicubic", align_corners=False, antialias=False
        )
        return out[0].float()
    x = pixels.float()
    taps, weights = _cubic_taps(x.shape[-1], width)
    g = x[:, :, taps]  # [C, H, width, 4]
    x = ((g[..., 0] * weights[:, 0] + g[..., 1] * weights[:, 1]) + g[..., 2] * weights[:, 2]) + (
        g[..., 3] * weights[:, 3]
    )
    taps, weights = _cubic_taps(x.shape[-2], height)
    g = x[:, taps, :]  # [C, height, 4, width]
    weights = weights[:, :, None]
    return ((g[:, :, 0] * weights[:, 0] + g[:, :, 1] * weights[:, 1]) + g[:, :, 2] * weights[:, 2]) + (
        g[:, :, 3] * weights[:, 3]
    )


def _flatten(images):
    if isinstance(images, (list, tuple)):
        for item in images:
            yield from _flatten(item)
    else:
        yield images


def image_token_layout(rows: int, cols: int, start: str, pad: str, row_break: str, end: str) -> str:
    """The marker text of one image of rows x cols cells: 1 + rows * (cols + 1) tokens."""
    if rows < 1 or cols < 1:
        raise ValueError(f"an image has at least one cell, got rows={rows}, cols={cols}")
    body = [pad * cols + (end if r == rows - 1 else row_break) for r in range(rows)]
    return start + "".join(body)


# `save_pretrained` copies this file (and its single-dot relative imports) as remote code, with an `auto_map`.
NemotronDiffusionVLMImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["NemotronDiffusionVLMImageProcessor", "image_token_layout", "opencv_cubic_resize", "CLIP_MEAN", "CLIP_STD"]
