"""The VLM image processor against an independent implementation of the documented steps (numpy for the white
compositing, OpenCV's own bicubic resize), on image files of many sizes, modes and formats; token counts; errors."""

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from nemotron_diffusion.image_processing_nemotron_diffusion_vlm import NemotronDiffusionVLMImageProcessor


cv2 = pytest.importorskip("cv2")

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def reference(path, cap=1400, cell=28):
    """The documented steps, written independently: PIL only decodes (no EXIF transpose); alpha compositing onto
    white in integer numpy arithmetic (round half up of (c*a + 255*(255-a)) / 255, which is what pasting onto a
    white canvas through the alpha channel computes); the cap with round-half-even; OpenCV INTER_CUBIC on float32."""
    with Image.open(path) as image:
        image.load()
        if image.mode == "RGB":
            rgb = np.asarray(image).astype(np.float32)
        else:
            rgba = np.asarray(image.convert("RGBA")).astype(np.int64)
            c, a = rgba[..., :3], rgba[..., 3:]
            rgb = ((c * a + 255 * (255 - a) + 127) // 255).astype(np.float32)
    height, width = rgb.shape[:2]
    ratio = max(width / cap, height / cap)
    if ratio > 1:
        width, height = round(width / ratio), round(height / ratio)
    cols, rows = math.ceil(width / cell), math.ceil(height / cell)
    if (rows * cell, cols * cell) != rgb.shape[:2]:
        rgb = cv2.resize(rgb, (cols * cell, rows * cell), interpolation=cv2.INTER_CUBIC)
    x = (rgb / np.float32(255.0) - MEAN) / STD
    return x.transpose(2, 0, 1), (rows, cols)


def photo_like(width, height, seed=0):
    """A synthetic but image-like RGB picture: smooth gradients, shapes with hard edges, and noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack(
        [
            127 + 100 * np.sin(x / max(width, 1) * 6.0 + seed),
            127 + 100 * np.cos(y / max(height, 1) * 5.0),
            (x + y) * 255.0 / max(width + height - 2, 1),
        ],
        axis=-1,
    )
    base += rng.normal(0, 12, base.shape)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for i in range(6):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(1, width + 1)), y0 + int(rng.integers(1, height + 1))
        draw.rectangle([x0, y0, x1, y1], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        ex, ey = sorted((y0 % width, x1)), sorted((x0 % height, y1))
        draw.ellipse([ex[0], ey[0], ex[1], ey[1]], outline=(255 - 40 * i, 30 * i, 90), width=2)
    return image


def _with_alpha(image, seed=0):
    rng = np.random.default_rng(seed)
    alpha = np.zeros((image.height, image.width), dtype=np.uint8)
    alpha[:, : image.width // 2] = 255
    alpha[image.height // 2 :, :] = rng.integers(0, 256, (image.height - image.height // 2, image.width))
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.fromarray(alpha, "L"))
    return rgba


def make_file(tmp_path, width, height, mode, fmt, seed=0):
    image = photo_like(width, height, seed)
    if mode == "RGBA":
        image = _with_alpha(image, seed)
    elif mode == "LA":
        image = _with_alpha(image, seed).convert("LA")
    elif mode == "L":
        image = image.convert("L")
    elif mode == "1":
        image = image.convert("1")
    elif mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    elif mode == "P-transparent":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        image.info["transparency"] = 3
    elif mode == "CMYK":
        image = image.convert("CMYK")
    path = tmp_path / f"img-{width}x{height}-{mode}.{fmt.lower()}"
    kwargs = {"transparency": 3} if mode == "P-transparent" else {}
    image.save(path, format=fmt, **kwargs)
    return path


CASES = [
    # (width, height, mode, format)
    (1, 1, "RGB", "PNG"),
    (3, 2, "RGB", "PNG"),
    (27, 29, "RGB", "PNG"),
    (28, 28, "RGB", "PNG"),
    (56, 84, "RGB", "PNG"),
    (300, 200, "RGB", "JPEG"),
    (640, 480, "RGBA", "PNG"),
    (333, 777, "LA", "PNG"),
    (1023, 767, "L", "PNG"),
    (500, 90, "P", "GIF"),
    (211, 307, "P-transparent", "PNG"),
    (123, 45, "1", "PNG"),
    (250, 170, "CMYK", "JPEG"),
    (1401, 3, "RGB", "PNG"),  # cap: height rounds to 3, width to 1400; a source under 4 px: OpenCV's own code
    (2, 500, "RGB", "PNG"),
    (900, 3, "RGBA", "PNG"),
    (1400, 1400, "RGB", "PNG"),
    (1920, 1080, "RGB", "JPEG"),
    (2100, 1403, "RGB", "PNG"),  # 1400 x 935.3 -> 935
    (3000, 2000, "RGBA", "PNG"),  # huge, transparent
]


def _needs_ipp(width, height):
    # OpenCV's pip wheels resize sources of at least 4 x 4 pixels with Intel IPP (exact bicubic) and smaller ones
    # with OpenCV's own code (float32 positions); the processor reproduces both, the reference is cv2 itself.
    if min(width, height) >= 4 and not cv2.ipp.useIPP():
        pytest.skip("this OpenCV build has no IPP: its resize of larger images is not the one NVIDIA's code ran")


@pytest.mark.parametrize("width, height, mode, fmt", CASES)
def test_matches_an_independent_implementation(tmp_path, width, height, mode, fmt):
    _needs_ipp(width, height)
    path = make_file(tmp_path, width, height, mode, fmt, seed=width % 7)
    processor = NemotronDiffusionVLMImageProcessor()
    out = processor(str(path))
    expected, (rows, cols) = reference(path)
    assert out["pixel_values"].dtype == torch.float32
    assert tuple(out["pixel_values"].shape) == (1, 3, rows * 28, cols * 28)
    assert out["image_sizes"].tolist() == [[rows * 28, cols * 28]]
    np.testing.assert_allclose(out["pixel_values"][0].numpy(), expected, rtol=0, atol=1e-5)
    with Image.open(path) as image:
        assert processor.image_grid(image.width, image.height) == (rows, cols)
        assert processor.num_image_tokens(image.width, image.height) == 1 + rows * (cols + 1)


def test_the_same_for_a_pil_image_bytes_and_a_numpy_array(tmp_path):
    path = make_file(tmp_path, 91, 60, "RGB", "PNG")
    processor = NemotronDiffusionVLMImageProcessor()
    from_path = processor(path)["pixel_values"]
    with Image.open(path) as image:
        image.load()
        before = np.asarray(image).copy()
        from_pil = processor(image)["pixel_values"]
        assert np.array_equal(np.asarray(image), before)  # the caller's image is not modified
        from_array = processor(np.asarray(image))["pixel_values"]
    from_bytes = processor(path.read_bytes())["pixel_values"]
    for other in (from_pil, from_array, from_bytes):
        assert torch.equal(other, from_path)


def test_rgba_input_image_is_not_modified(tmp_path):
    image = _with_alpha(photo_like(40, 30))
    before = np.asarray(image).copy()
    NemotronDiffusionVLMImageProcessor()(image)
    assert image.mode == "RGBA" and np.array_equal(np.asarray(image), before)


def test_exif_orientation_is_not_applied(tmp_path):
    image = photo_like(120, 60)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes())
    out = NemotronDiffusionVLMImageProcessor()(path)
    assert out["image_sizes"].tolist() == [[28 * 3, 28 * 5]]  # 60 high, 120 wide: as stored, not as displayed


@pytest.mark.parametrize(
    "width, height, grid, tokens",
    [(300, 200, (8, 11), 97), (640, 480, (18, 23), 433), (1024, 768, (28, 37), 1065),
     (1920, 1080, (29, 50), 1480), (1400, 1400, (50, 50), 2551), (5000, 5000, (50, 50), 2551)],
)
def test_token_counts_of_documented_examples(width, height, grid, tokens):
    processor = NemotronDiffusionVLMImageProcessor()
    assert processor.image_grid(width, height) == grid
    assert processor.num_image_tokens(width, height) == tokens


def test_round_half_to_even_in_the_cap():
    processor = NemotronDiffusionVLMImageProcessor(max_image_size=28)
    # 56 x 7 -> ratio 2 -> 28 x 3.5 -> round(3.5) = 4 (even) -> 1 x 1 cell; 56 x 5 -> 2.5 -> 2
    assert processor.image_grid(56, 7) == (1, 1) and processor.image_grid(56, 5) == (1, 1)
    big = NemotronDiffusionVLMImageProcessor(max_image_size=56)
    # 112 x 58 -> 56 x 29 -> 2 x 2 cells (29 px need 2 rows); 112 x 54 -> 56 x 27 -> 1 row
    assert big.image_grid(112, 58) == (2, 2) and big.image_grid(112, 54) == (1, 2)
    # 112 x 57 -> 56 x 28.5 -> round half to even: 28 -> 1 row (round half up would give 29 -> 2 rows)
    assert big.image_grid(112, 57) == (1, 2)


def test_several_images_are_zero_padded_bottom_right(tmp_path):
    processor = NemotronDiffusionVLMImageProcessor()
    paths = [make_file(tmp_path, 60, 30, "RGB", "PNG", 1), make_file(tmp_path, 20, 90, "RGBA", "PNG", 2)]
    out = processor([paths[0], [paths[1]]])  # nested lists (one list per prompt) are flattened in order
    assert out["image_sizes"].tolist() == [[56, 84], [112, 28]]  # 60 x 30 -> 3 x 2 cells, 20 x 90 -> 1 x 4
    assert tuple(out["pixel_values"].shape) == (2, 3, 112, 84)
    for i, path in enumerate(paths):
        alone = processor(path)["pixel_values"][0]
        h, w = out["image_sizes"][i].tolist()
        assert torch.equal(out["pixel_values"][i, :, :h, :w], alone)
        assert not out["pixel_values"][i, :, h:, :].any() and not out["pixel_values"][i, :, :, w:].any()


def test_save_and_load(tmp_path):
    from transformers import AutoImageProcessor

    import nemotron_diffusion  # noqa: F401  (registers the classes)

    processor = NemotronDiffusionVLMImageProcessor(max_image_size=700)
    processor.save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is NemotronDiffusionVLMImageProcessor
    assert (loaded.max_image_size, loaded.patch_size, loaded.merge_size) == (700, 14, 2)
    assert loaded.image_mean == processor.image_mean and loaded.image_std == processor.image_std


def test_unreadable_image_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "not-an-image.png"
    bad.write_text("hello")
    processor = NemotronDiffusionVLMImageProcessor()
    with pytest.raises(ValueError, match=r"`images\[1\]`: cannot read an image from .*not-an-image.png"):
        processor([make_file(tmp_path, 30, 30, "RGB", "PNG"), bad])
    with pytest.raises(ValueError, match=r"`images\[0\]`: cannot read an image from .*missing.png"):
        processor(tmp_path / "missing.png")


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda p: p(3.5), TypeError, r"`images\[0\]`: expected a PIL image, a path, bytes or a uint8 numpy array"),
        (lambda p: p(np.zeros((4, 4, 2), np.uint8)), ValueError, r"a numpy image must be uint8 of shape"),
        (lambda p: p(np.zeros((4, 4, 3), np.float32)), ValueError, r"a numpy image must be uint8"),
        (lambda p: p([]), ValueError, r"`images` is empty"),
        (lambda p: p(np.zeros((4, 4), np.uint8), return_tensors="np"), ValueError, r"`return_tensors`='np'"),
        (lambda p: p(np.zeros((4, 4), np.uint8), max_image_size=10), ValueError, r"`max_image_size`=10"),
        (lambda p: p.image_grid(0, 5), ValueError, r"`width`=0 is invalid"),
    ],
)
def test_bad_input_is_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call(NemotronDiffusionVLMImageProcessor())


@pytest.mark.parametrize(
    "kwargs, field",
    [({"max_image_size": 27}, "max_image_size"), ({"patch_size": 0}, "patch_size"),
     ({"image_std": [1, 0, 1]}, "image_std")],
)
def test_bad_settings_are_clear_errors(kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        NemotronDiffusionVLMImageProcessor(**kwargs)


@pytest.mark.parametrize(
    "shape, size",
    [((3, 1, 1), (28, 28)), ((3, 2, 7), (28, 56)), ((3, 3, 1401), (28, 1400)), ((1, 1500, 2), (1400, 28)),
     ((3, 4, 4), (28, 28)), ((3, 200, 300), (196, 308)), ((3, 1000, 1500), (924, 1400)), ((3, 2000, 100), (1400, 84)),
     ((3, 29, 57), (28, 56))],
)
def test_cubic_resize_equals_opencv(shape, size):
    from nemotron_diffusion.image_processing_nemotron_diffusion_vlm import opencv_cubic_resize

    _needs_ipp(shape[2], shape[1])
    rng = np.random.default_rng(sum(shape))
    image = rng.integers(0, 256, shape).astype(np.float32)
    ours = opencv_cubic_resize(torch.from_numpy(image), *size).numpy()
    theirs = cv2.resize(image.transpose(1, 2, 0), (size[1], size[0]), interpolation=cv2.INTER_CUBIC)
    theirs = theirs.reshape(size[0], size[1], -1).transpose(2, 0, 1)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-3)  # of 255: 1.5e-5 after normalisation
