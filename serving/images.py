"""Every way an image reaches the model, turned into the network's float32 (N, C, H, W) input here.

Two kinds of arrays are accepted, told apart by dtype:
- uint8 = raw pixels, as decoded from a PNG/JPEG or stored by `prepare`: one image (H, W) or
  (H, W, C), or a batch (N, H, W), (N, H, W, C) or (N, C, H, W). A channel axis is recognised by
  a size of 1, 3 or 4. Pixels are scaled and normalised with the manifest's `pixel_scale`, `mean`
  and `std`, exactly as `prepare` did for training.
- float = the network's own input, already normalised: (C, H, W) or (N, C, H, W), passed as is.
Channels of raw pixels are converted only where there is one obvious answer: grey -> RGB by
repeating it, RGB -> grey by ITU-R 601-2 luma with Pillow's integer rounding (what a user who
uploads a PNG saved as RGB to a grey-scale model expects, and identical to `Image.convert("L")`).
An alpha channel is refused in arrays and dropped when decoding a file. Images are never resized:
resizing changes the answer, so a wrong size is an error that says the size expected.
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, UnidentifiedImageError

from serving.errors import BatchSizeError, BatchTooLargeError, DecodeError, ImageShapeError

CHANNEL_SIZES = (1, 3, 4)
NPY_MAGIC = b"\x93NUMPY"
NPY_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
NPY_HEADER_BYTES = 10_000   # numpy's own default bound on a header it parses
NPY_KINDS = "buif"          # bool, unsigned, signed, float: what to_model_input can say something about
NPY_MAX_DIMS = 4
IMAGE_FORMATS = ["PNG", "JPEG"]
# Pillow modes decoded to grey ("L") or RGB without losing information.
GREY_MODES = {"1", "L", "LA"}
COLOUR_MODES = {"RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}


def decode(data: bytes, name: str = "upload", size: tuple[int, int] | None = None) -> np.ndarray:
    """A PNG/JPEG file -> uint8 (H, W) or (H, W, 3); an .npy file -> its array. `name` is for messages.

    With `size` (H, W), an image of another size is refused from its header, before its pixels
    are decoded, so a huge upload costs nothing.
    """
    if data.startswith(NPY_MAGIC):
        return read_npy(data, name)
    # Pillow's decoders raise what they meet in a corrupt file (struct.error, IndexError, zlib errors as
    # well as OSError): any of them is bytes that are not a readable image, the client's to fix, never a 500
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Exception as error:
        raise _decode_error(name, data, error) from None
    with image:
        if size is not None and (image.height, image.width) != tuple(size):
            raise _size_error(name, (image.height, image.width), size)
        try:
            image.load()
            return np.asarray(_to_grey_or_rgb(image, name))
        except DecodeError:
            raise
        except Exception as error:
            raise _decode_error(name, data, error) from None


def read_npy(data: bytes, name: str = "upload") -> np.ndarray:
    """An .npy file's array as a read-only view of `data`, allocating nothing: the header's shape and
    dtype must describe exactly the bytes that follow it, so a header that claims 10^12 values
    from a 144-byte upload is refused before anything is reserved (np.load would try to)."""
    hint = "save it with numpy.save (no pickled objects)"
    stream = io.BytesIO(data)
    try:  # numpy's own header reader, on at most NPY_HEADER_BYTES; its errors for a bad header vary by field
        version = np.lib.format.read_magic(stream)
        if version not in NPY_HEADER_READERS:
            raise ValueError(f".npy format version {version[0]}.{version[1]}, this server reads 1.0 and 2.0")
        shape, fortran_order, dtype = NPY_HEADER_READERS[version](stream, max_header_size=NPY_HEADER_BYTES)
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DecodeError(f"{name} looks like an .npy file but its header cannot be read ({reason[:200]}); "
                          f"{hint}") from None
    if dtype.kind not in NPY_KINDS or dtype.fields is not None or dtype.shape != ():
        raise DecodeError(f"{name} holds an array of dtype {str(dtype)[:80]}, not numbers: send uint8 pixels or float32 "
                          f"normalised input; {hint}")
    if len(shape) > NPY_MAX_DIMS:
        raise DecodeError(f"{name} holds a {len(shape)}-D array; images are at most 4-D (N, H, W, C)")
    claimed, body = math.prod(shape) * dtype.itemsize, len(data) - stream.tell()
    if claimed != body:
        raise DecodeError(f"{name}: its .npy header claims shape {_short(shape)} of {dtype} ({claimed:,} bytes) but "
                          f"{body:,} bytes follow it; the file is truncated or its header was altered, {hint}")
    array = np.frombuffer(data, dtype, count=math.prod(shape), offset=stream.tell())
    return array.reshape(shape, order="F" if fortran_order else "C")


def _short(shape: tuple) -> str:
    text = str(shape)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(shape)} axes)"


def _decode_error(name: str, data: bytes, error: Exception) -> DecodeError:
    if isinstance(error, UnidentifiedImageError):
        reason = "not a PNG, JPEG or .npy file"
    else:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return DecodeError(f"{name} cannot be read ({len(data)} bytes: {reason}); send a PNG/JPEG image or a "
                       f"numpy.save'd array")


def _to_grey_or_rgb(image: Image.Image, name: str) -> Image.Image:
    if image.mode in GREY_MODES:
        return image.convert("L")
    if image.mode in COLOUR_MODES:
        return image.convert("RGB")
    raise DecodeError(f"{name} has pixel mode {image.mode!r} (16-bit or float); save it as an 8-bit "
                      f"grey-scale or RGB PNG/JPEG")


def to_model_input(images, input_shape, normalisation: dict, max_batch: int | None = None) -> np.ndarray:
    """Any accepted image or batch (see the module docstring) -> float32 (N, C, H, W) network input."""
    array = _as_array(images)
    c, h, w = input_shape
    if array.dtype == np.uint8:
        batch = _uint8_batch(array, (h, w))
        check_batch_size(len(batch), max_batch)
        batch = _convert_channels(batch, c)
        return _normalise(batch, normalisation)
    if np.issubdtype(array.dtype, np.floating):
        batch = array[None] if array.ndim == 3 else array
        if batch.ndim != 4 or batch.shape[1:] != (c, h, w):
            raise ImageShapeError(f"a float array is taken as normalised network input and must be ({c}, {h}, {w}) "
                                  f"or (N, {c}, {h}, {w}), got shape {array.shape}; send raw uint8 pixels "
                                  f"to have them normalised")
        check_batch_size(len(batch), max_batch)
        # checked as float32, the form the network gets: a float64 of 1e300 is finite, its float32 is inf
        with np.errstate(over="ignore"):
            batch = np.ascontiguousarray(batch, dtype=np.float32)
        if not np.isfinite(batch).all():
            raise ImageShapeError("the float input holds NaN or infinite values as float32 (the network's input type, "
                                  "finite up to ±3.4e38); send finite normalised pixels")
        return batch
    raise ImageShapeError(f"images of dtype {array.dtype} are not accepted: send uint8 pixels (0-255) or "
                          f"float32 normalised network input")


def _as_array(images) -> np.ndarray:
    try:
        array = np.asarray(images)
    except ValueError as error:
        raise ImageShapeError(f"the images do not form one array ({error}); send images of one size") from None
    if array.dtype == object:
        raise ImageShapeError("the images do not form one array (different sizes?); send images of one size")
    return array


def _uint8_batch(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 pixels in any accepted layout -> (N, H, W, C)."""
    if array.ndim == 2:
        batch = array[None, :, :, None]
    elif array.ndim == 3:
        batch = array[None] if array.shape[-1] in CHANNEL_SIZES else array[..., None]
    elif array.ndim == 4:
        if array.shape[-1] in CHANNEL_SIZES:
            batch = array
        elif array.shape[1] in CHANNEL_SIZES:
            batch = array.transpose(0, 2, 3, 1)
        else:
            raise ImageShapeError(f"uint8 batch of shape {array.shape} has no channel axis of size 1, 3 or 4; "
                                  f"send (N, H, W, C) or (N, C, H, W)")
    else:
        raise ImageShapeError(f"uint8 pixels of shape {array.shape} ({array.ndim}-D): expected one image "
                              f"(H, W) or (H, W, C), or a batch (N, H, W), (N, H, W, C) or (N, C, H, W)")
    if batch.shape[1:3] != size:
        raise _size_error("images", batch.shape[1:3], size)
    return batch


def _size_error(what: str, got: tuple[int, int], size: tuple[int, int]) -> ImageShapeError:
    return ImageShapeError(f"{what}: {got[0]}x{got[1]} pixels (H x W), the model takes {size[0]}x{size[1]}; "
                           f"resize or crop to {size[0]}x{size[1]} first (the server does not resize, as "
                           f"that would change the answer)")


def _convert_channels(batch: np.ndarray, channels: int) -> np.ndarray:
    """(N, H, W, C_in) -> (N, H, W, channels) where the conversion is unambiguous."""
    have = batch.shape[-1]
    if have == channels:
        return batch
    if have == 1 and channels == 3:
        return np.repeat(batch, 3, axis=-1)
    if have == 3 and channels == 1:
        return _luma(batch)
    hint = "; drop the alpha channel" if have == 4 else ""
    raise ImageShapeError(f"images have {have} channels, the model takes {channels} "
                          f"({'grey-scale' if channels == 1 else 'RGB'}){hint}")


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601-2 luma with Pillow's fixed-point rounding, so arrays and decoded files agree exactly."""
    weights = np.array([19595, 38470, 7471], dtype=np.uint32)
    grey = (rgb.astype(np.uint32) @ weights + 0x8000) >> 16
    return grey.astype(np.uint8)[..., None]


def _normalise(batch: np.ndarray, normalisation: dict) -> np.ndarray:
    """(N, H, W, C) uint8 -> (N, C, H, W) float32, the arithmetic of `prepare` (pixels / scale - mean) / std."""
    mean = np.asarray(normalisation["mean"], np.float32)[:, None, None]
    std = np.asarray(normalisation["std"], np.float32)[:, None, None]
    pixels = batch.transpose(0, 3, 1, 2).astype(np.float32)
    return np.ascontiguousarray((pixels / normalisation["pixel_scale"] - mean) / std, dtype=np.float32)


def check_batch_size(n: int, max_batch: int | None) -> None:
    """Refuse an empty batch, and one over `max_batch` (the memory a request may take)."""
    if n == 0:
        raise BatchSizeError("the batch is empty: send at least one image")
    if max_batch is not None and n > max_batch:
        raise BatchTooLargeError(f"the batch has {n} images, at most {max_batch} are taken per request "
                                 f"(serving.max_batch); split it into smaller batches")
