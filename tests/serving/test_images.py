"""Preprocessing: every accepted image form gives the network input prepare would give; the rest is refused."""
import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from serving.errors import BatchSizeError, BatchTooLargeError, DecodeError, ImageShapeError
from serving.images import decode, to_model_input
from tests.serving.conftest import npy_claiming

GREY = (1, 4, 5)
RGB = (3, 4, 5)
NORM_GREY = {"mean": [0.3], "std": [0.4], "pixel_scale": 255.0}
NORM_RGB = {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.6, 0.7], "pixel_scale": 255.0}


def raw(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def encode(pixels: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, format=fmt)
    return buffer.getvalue()


def prepare_arithmetic(nchw: np.ndarray, norm: dict) -> np.ndarray:
    """slc.data.datasets.PreparedSplit.normalise, restated."""
    mean = np.asarray(norm["mean"], np.float32)[:, None, None]
    std = np.asarray(norm["std"], np.float32)[:, None, None]
    return (nchw.astype(np.float32) / norm["pixel_scale"] - mean) / std


def test_uint8_pixels_are_normalised_like_prepare():
    nchw = raw((3, *GREY))
    got = to_model_input(nchw, GREY, NORM_GREY)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, prepare_arithmetic(nchw, NORM_GREY))


def test_every_grey_layout_gives_the_same_batch():
    nchw = raw((3, *GREY))
    expected = to_model_input(nchw, GREY, NORM_GREY)
    nhw = nchw[:, 0]
    for layout in (nhw, nhw[..., None], nchw):
        np.testing.assert_array_equal(to_model_input(layout, GREY, NORM_GREY), expected)
    for single in (nhw[0], nhw[0, :, :, None]):
        np.testing.assert_array_equal(to_model_input(single, GREY, NORM_GREY), expected[:1])


def test_rgb_layouts_keep_channel_order():
    nhwc = raw((2, 4, 5, 3))
    expected = prepare_arithmetic(nhwc.transpose(0, 3, 1, 2), NORM_RGB)
    np.testing.assert_array_equal(to_model_input(nhwc, RGB, NORM_RGB), expected)
    np.testing.assert_array_equal(to_model_input(nhwc.transpose(0, 3, 1, 2), RGB, NORM_RGB), expected)
    np.testing.assert_array_equal(to_model_input(nhwc[0], RGB, NORM_RGB), expected[:1])


def test_rgb_for_a_grey_model_is_converted_exactly_as_pillow_does():
    rgb = raw((4, 5, 3), seed=2)
    pillow_grey = np.asarray(Image.fromarray(rgb).convert("L"))
    np.testing.assert_array_equal(to_model_input(rgb, GREY, NORM_GREY), to_model_input(pillow_grey, GREY, NORM_GREY))


def test_grey_for_an_rgb_model_is_repeated_to_three_channels():
    grey = raw((4, 5))
    got = to_model_input(grey, RGB, NORM_RGB)
    np.testing.assert_array_equal(got, prepare_arithmetic(np.repeat(grey[None, None], 3, axis=1), NORM_RGB))


def test_float_input_is_taken_as_normalised_and_passed_unchanged():
    x = np.random.default_rng(0).normal(size=(2, *GREY)).astype(np.float32)
    np.testing.assert_array_equal(to_model_input(x, GREY, NORM_GREY), x)
    np.testing.assert_array_equal(to_model_input(x[0].astype(np.float64), GREY, NORM_GREY), x[:1])


@pytest.mark.parametrize("images, message", [
    (raw((5, 4)), r"5x4 pixels .*the model takes 4x5.*does not resize"),
    (raw((2, 6, 6)), r"6x6 pixels"),
    (raw((4, 5, 4)), r"4 channels.*drop the alpha"),
    (raw((2, 4, 5)).astype(np.int64), r"dtype int64"),
    (np.zeros((2, 3, 4, 5), np.float32), r"float array .* must be \(1, 4, 5\)"),
    (np.full((1, *GREY), np.nan, np.float32), r"NaN"),
    (raw((1, 1, 2, 4, 5)), r"5-D"),
    ([raw((4, 5)), raw((4, 6))], r"one size"),
])
def test_wrong_images_are_refused_with_what_was_expected(images, message):
    with pytest.raises(ImageShapeError, match=message):
        to_model_input(images, GREY, NORM_GREY)


def test_an_empty_batch_is_refused():
    with pytest.raises(BatchSizeError, match="empty"):
        to_model_input(raw((0, 4, 5)), GREY, NORM_GREY)


def test_a_batch_over_max_batch_is_refused_and_at_max_batch_accepted():
    assert len(to_model_input(raw((3, 4, 5)), GREY, NORM_GREY, max_batch=3)) == 3
    with pytest.raises(BatchTooLargeError, match="4 images, at most 3"):
        to_model_input(raw((4, 4, 5)), GREY, NORM_GREY, max_batch=3)


@pytest.mark.parametrize("pixels, mode, expected_shape", [
    (raw((4, 5)), None, (4, 5)),
    (raw((4, 5, 3)), None, (4, 5, 3)),
    (raw((4, 5, 4)), "RGBA", (4, 5, 3)),
    (raw((4, 5, 2)), "LA", (4, 5)),
])
def test_png_decodes_to_grey_or_rgb_pixels(pixels, mode, expected_shape):
    decoded = decode(encode(pixels, mode=mode))
    assert decoded.dtype == np.uint8 and decoded.shape == expected_shape
    np.testing.assert_array_equal(decoded, pixels[..., :3] if mode == "RGBA" else pixels[..., 0] if mode == "LA" else pixels)


def test_jpeg_decodes():
    assert decode(encode(raw((4, 5)), "JPEG")).shape == (4, 5)


def test_npy_decodes_to_its_array():
    batch = raw((3, 4, 5))
    buffer = io.BytesIO()
    np.save(buffer, batch)
    np.testing.assert_array_equal(decode(buffer.getvalue()), batch)


def test_an_image_of_the_wrong_size_is_refused_from_its_header():
    with pytest.raises(ImageShapeError, match=r"big.png: 40x50 pixels .*takes 4x5"):
        decode(encode(raw((40, 50))), "big.png", size=(4, 5))


def test_a_16_bit_png_is_refused():
    data = encode(np.arange(20, dtype=np.uint16).reshape(4, 5) * 3000)
    with pytest.raises(DecodeError, match="16-bit"):
        decode(data, "deep.png")


@pytest.mark.parametrize("data, message", [
    (b"hello, not an image", r"notes.txt cannot be read .*not a PNG, JPEG or .npy"),
    (encode(raw((4, 5)))[:60], r"notes.txt cannot be read"),
    (encode(raw((4, 5)), "BMP"), r"not a PNG, JPEG or .npy"),
    (b"\x93NUMPY garbage", r"looks like an .npy file"),
    (b"", r"0 bytes"),
])
def test_corrupt_or_other_files_are_refused(data, message):
    with pytest.raises(DecodeError, match=message):
        decode(data, "notes.txt")


def test_a_pickled_npy_is_refused_without_unpickling():
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DecodeError, match="no pickled objects"):
        decode(buffer.getvalue())


def test_an_npy_header_claiming_a_huge_shape_is_refused_before_anything_is_allocated():
    """144 bytes whose header claims 10^6 x 10^6 uint8: np.load reserves 1 TB (MemoryError, a 500)."""
    data = npy_claiming((10**6, 10**6))
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError, match=r"header claims shape \(1000000, 1000000\) of uint8 "
                                              r"\(1,000,000,000,000 bytes\) but 16 bytes follow it"):
            decode(data, "huge.npy")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(data) < 200 and peak < 1 << 20


@pytest.mark.parametrize("shape, descr, body, message", [
    ((2, 1, 4, 5), "<f4", b"\0" * 8, r"claims shape \(2, 1, 4, 5\) of float32"),
    ((1, 4, 5), "|u1", b"\0" * 21, r"\(20 bytes\) but 21 bytes follow"),
    ((1,), [("a", "<f4")], b"\0" * 4, r"dtype .*a.*, not numbers"),
    ((1,), "<c8", b"\0" * 8, r"dtype complex64, not numbers"),
    ((1,) * 5, "|u1", b"\0", r"5-D array; images are at most 4-D"),
])
def test_an_npy_whose_header_does_not_describe_its_bytes_is_refused(shape, descr, body, message):
    with pytest.raises(DecodeError, match=message):
        decode(npy_claiming(shape, descr, body), "odd.npy")


def test_a_fortran_ordered_npy_decodes_to_its_array():
    batch = np.asfortranarray(raw((3, 4, 5)))
    buffer = io.BytesIO()
    np.save(buffer, batch)
    np.testing.assert_array_equal(decode(buffer.getvalue()), batch)


def test_a_float64_finite_only_before_the_cast_to_float32_is_refused():
    """1e300 is a finite float64 and inf as float32, the type the network takes."""
    with pytest.raises(ImageShapeError, match="NaN or infinite values as float32"):
        to_model_input(np.full((1, *GREY), 1e300), GREY, NORM_GREY)
