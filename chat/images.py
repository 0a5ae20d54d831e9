"""Image intake: untrusted bytes in, one clean 8-bit RGB image (and its sha256) out.

Design: every image a person or program sends passes through `sanitize` exactly once,
before it is stored or shown to the model. The rules (REFERENCE.md section 6) run
cheapest-first so hostile input costs as little as possible:

1. byte count, before Pillow sees anything;
2. `Image.open` with a format allowlist (PNG, JPEG, WebP, GIF, BMP), which only parses
   the header; the rarely used parsers (FITS, PSD, EPS, ...) never run;
3. pixel count and aspect ratio from that header, before `load()` decodes anything;
   Pillow's own decompression-bomb warning is promoted to an error as a second net;
4. decode the first frame only, strictly (a truncated file is refused, never padded
   with grey), apply the EXIF orientation, flatten every mode to 8-bit RGB on white;
5. copy the pixels into a fresh image, so no EXIF/GPS/ICC/text metadata can ride along,
   pad tiny images to 32 px, and re-encode (JPEG stays JPEG at q95, all else PNG).

The output bytes are content-addressed by sha256, so the same upload dedupes in the
store and hits the same vision-feature cache entry. Every failure is an `ImageError`
whose text is a sentence a user can act on; no Pillow exception leaks out.

The second half is the visual-token arithmetic of the Qwen2-VL/Qwen3-VL image
processor (`smart_resize`), reproduced here without importing transformers so the UI
and API can price an image (context budget, usage) without torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image, ImageOps

ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MIN_SIDE = 32  # one 32x32 merged patch; smaller images are padded up to it
MAX_ASPECT = 200  # transformers' smart_resize raises above this
JPEG_QUALITY = 95

# MPO is a JPEG with extra pictures appended (phone cameras); Pillow's JPEG opener
# returns it under its own name, so it counts as JPEG for the output encoding.
_JPEG_SOURCES = ("JPEG", "MPO")
# File signatures of the allowed formats: a file that starts like one of them but
# fails to open is damaged, not unsupported, and deserves the other message.
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")
_HIGH_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_ALPHA_MODES = ("RGBA", "LA", "PA")
# What Pillow's EXIF parser raises on a mangled block.
_EXIF_ERRORS = (OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError, struct.error)

# The refusals' sentences, as str.format templates: chat/i18n_catalog.py translates each one for the page
# (issue 13; tests/test_i18n.py checks that every one of MESSAGES is there).
UNSUPPORTED = "Unsupported image format; use PNG, JPEG, WebP, GIF or BMP."
DAMAGED = "The image file is damaged or incomplete."
EMPTY = "The image file is empty."
TOO_MANY_PIXELS = "Image has too many pixels; the limit is {limit} megapixels."
TOO_LARGE = "Image is {size} MB; the limit is {limit} MB."
NO_SIDE = "Image is {width}x{height} pixels; both sides must be at least 1 pixel."
TOO_THIN = "Image is {width}x{height} pixels; the aspect ratio must be at most {aspect}:1."
OVER_PIXELS = "Image is {width}x{height} pixels ({pixels} megapixels); the limit is {limit} megapixels."
UNKNOWN_DETAIL = "Unknown detail level '{detail}'; use low, auto or high."
MESSAGES = (UNSUPPORTED, DAMAGED, EMPTY, TOO_MANY_PIXELS, TOO_LARGE, NO_SIDE, TOO_THIN, OVER_PIXELS, UNKNOWN_DETAIL)


class ImageError(ValueError):
    """A refused image; str(err) is a plain, user-facing sentence naming the limit.

    Raised with one of MESSAGES and its values: `template` and `values` stay on the error.
    """

    def __init__(self, template: str, **values) -> None:
        super().__init__(template.format(**values) if values else template)
        self.template = template
        self.values = values


@dataclass(frozen=True)
class CleanImage:
    """A sanitized image: re-encoded bytes with no metadata, plus what it came from."""

    data: bytes
    mime: str
    sha256: str
    width: int
    height: int
    original_width: int
    original_height: int
    original_format: str


@contextlib.contextmanager
def _checked_open(data: bytes, max_bytes: int, max_pixels: int) -> Iterator[Image.Image]:
    """Open untrusted bytes after the cheap checks; every failure inside becomes an ImageError."""
    if not data:
        raise ImageError(EMPTY)
    check_size(len(data), max_bytes)
    try:
        # Pillow warns (and only at ~89 MP) instead of refusing; as an error it stops
        # open() itself, before any pixel is decoded.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as img:
                _check_geometry(img.width, img.height, max_pixels)
                yield img
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError(TOO_MANY_PIXELS, limit=_millions(max_pixels)) from err
    except Image.UnidentifiedImageError as err:
        raise ImageError(
            DAMAGED if data.startswith(_SIGNATURES) or _is_webp(data) else UNSUPPORTED
        ) from err
    except Exception as err:
        # Malformed files surface as OSError, SyntaxError, ValueError, but also as
        # struct.error, IndexError, EOFError... from deep inside the parsers. All of
        # them mean the same thing to the person who sent the file.
        raise ImageError(DAMAGED) from err


def check_size(n_bytes: int, max_bytes: int) -> None:
    """Refuse an image of `n_bytes` (known before any byte is decoded, e.g. from a base64 length)."""
    if n_bytes > max_bytes:
        raise ImageError(TOO_LARGE, size=_over(n_bytes, max_bytes), limit=_millions(max_bytes))


def check_header(
    data: bytes, *, max_bytes: int = 20_000_000, max_pixels: int = 40_000_000
) -> tuple[int, int]:
    """The checks `sanitize` runs before decoding (bytes, format, declared size), alone; returns (w, h).

    Pillow's open is lazy: it parses the header only, so checking every image of a request this way
    costs next to nothing, and a request whose last image is too big is refused before the first is decoded.
    """
    with _checked_open(data, max_bytes, max_pixels) as img:
        return img.size


def sanitize(
    data: bytes, *, max_bytes: int = 20_000_000, max_pixels: int = 40_000_000
) -> CleanImage:
    """Check, decode and re-encode untrusted image bytes, or raise ImageError."""
    with _checked_open(data, max_bytes, max_pixels) as img:
        original_format = img.format or "unknown"
        width, height = img.size
        # Right after open the file sits on frame 0, so load() decodes the
        # first frame of an animation and nothing else.
        img.load()
        rgb = _to_rgb(_upright(img))
    return _encode(rgb, original_format, width, height)


def open_clean(data: bytes) -> Image.Image:
    """Decode bytes produced by sanitize() into a loaded RGB image for the model."""
    try:
        with Image.open(io.BytesIO(data), formats=("PNG", "JPEG")) as img:
            img.load()
            # convert() always returns a new image that no longer needs the file.
            return img.convert("RGB")
    except Exception as err:
        raise ImageError(DAMAGED) from err


def smart_resize(
    height: int, width: int, *, factor: int = 32, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Return (height, width) as transformers' Qwen2-VL/Qwen3-VL image processor resizes it."""
    if height < 1 or width < 1:
        raise ImageError(NO_SIDE, width=width, height=height)
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ImageError(TOO_THIN, width=width, height=height, aspect=MAX_ASPECT)
    # Python's round() (half to even) is what transformers uses; keep it, the token
    # counts at 720p and 2160p depend on it.
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def visual_tokens(
    width: int,
    height: int,
    *,
    min_pixels: int,
    max_pixels: int,
    patch_size: int = 16,
    merge_size: int = 2,
) -> int:
    """LLM tokens an image costs (excluding the 2 vision start/end tokens)."""
    h_bar, w_bar = smart_resize(
        height, width, factor=patch_size * merge_size, min_pixels=min_pixels, max_pixels=max_pixels
    )
    return (h_bar // patch_size) * (w_bar // patch_size) // (merge_size * merge_size)


def _check_geometry(width: int, height: int, max_pixels: int) -> None:
    """Refuse from the header alone: empty, too many pixels, or too long and thin."""
    if width < 1 or height < 1:
        raise ImageError(DAMAGED)
    if width * height > max_pixels:
        raise ImageError(OVER_PIXELS, width=width, height=height, pixels=_over(width * height, max_pixels),
                         limit=_millions(max_pixels))
    # Checked before padding: padding a 1x500 strip to 32x500 would hide it.
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise ImageError(TOO_THIN, width=width, height=height, aspect=MAX_ASPECT)


def _upright(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a copy, so the source file can be closed."""
    try:
        return ImageOps.exif_transpose(img)
    except _EXIF_ERRORS:
        # A mangled EXIF block is common in the wild and says nothing about the
        # pixels, which already decoded fine; keep them unrotated rather than refuse.
        return img.copy()


def _to_rgb(img: Image.Image) -> Image.Image:
    """Flatten any Pillow mode to 8-bit RGB; transparency becomes white."""
    if img.mode in _HIGH_DEPTH_MODES:
        return _stretch_to_8bit(img).convert("RGB")
    if img.mode in _ALPHA_MODES or img.has_transparency_data:
        # convert("RGBA") also honours a palette/tRNS transparency entry.
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _stretch_to_8bit(img: Image.Image) -> Image.Image:
    """Map a 16/32-bit or float greyscale image onto 0..255 by its actual range."""
    # Pillow's plain convert("L") clips at 255, so a 12-bit scan (0..4095) would come
    # out almost all white; stretching keeps its contrast.
    f = img.convert("F")
    low, high = f.getextrema()
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ImageError(DAMAGED)
    if high == low:
        # A flat image has no range to stretch; keep its value where it fits 8 bits.
        return Image.new("L", f.size, int(min(255.0, max(0.0, low))))
    scale = 255.0 / (high - low)
    return f.point(lambda v: (v - low) * scale).convert("L")


def _encode(
    rgb: Image.Image, original_format: str, original_width: int, original_height: int
) -> CleanImage:
    """Pad, copy into a metadata-free image and encode; JPEG sources stay JPEG."""
    width, height = max(rgb.width, MIN_SIDE), max(rgb.height, MIN_SIDE)
    # A fresh image has an empty info dict: Pillow's PNG writer falls back to
    # img.info for the ICC profile and transparency, so a copy would carry them over.
    clean = Image.new("RGB", (width, height), (255, 255, 255))
    clean.paste(rgb, ((width - rgb.width) // 2, (height - rgb.height) // 2))
    buf = io.BytesIO()
    if original_format in _JPEG_SOURCES:
        # Re-encoding a photo as PNG would grow it several-fold for no gain.
        clean.save(buf, "JPEG", quality=JPEG_QUALITY, subsampling=0)
        mime = "image/jpeg"
    else:
        clean.save(buf, "PNG", optimize=False)
        mime = "image/png"
    out = buf.getvalue()
    return CleanImage(
        data=out,
        mime=mime,
        sha256=hashlib.sha256(out).hexdigest(),
        width=width,
        height=height,
        original_width=original_width,
        original_height=original_height,
        original_format=original_format,
    )


def _is_webp(data: bytes) -> bool:
    """True when the bytes carry the RIFF/WEBP signature."""
    return data[:4] == b"RIFF" and data[8:12] == b"WEBP"


def _millions(value: float) -> str:
    """Format a limit in millions: '20', '2.5', '0.065536'."""
    return f"{value / 1e6:.6f}".rstrip("0").rstrip(".")


def _over(value: float, limit: float) -> str:
    """Format an amount in millions with the fewest decimals (one or more) that read above limit."""
    # Plain rounding would print a file 1 byte over 20 MB as "20.0 MB; the limit is 20 MB".
    for digits in range(1, 7):
        text = f"{value / 1e6:.{digits}f}"
        if float(text) > limit / 1e6:
            return text
    return f"{value / 1e6:.6f}"


# -- resolution budget ------------------------------------------------------------------------

DETAILS = ("low", "auto", "high")
DEFAULT_DETAIL = "auto"
# Visual tokens an image may use at each level (one token per 32x32 pixels). Auto keeps a
# 1920x1080 screenshot at its native resolution (2,040 tokens); High is for dense documents.
DETAIL_TOKENS = {"low": 256, "auto": 2560, "high": 4096}
MIN_TOKENS = 64
PIXELS_PER_TOKEN = 32 * 32


def detail_pixels(detail: str) -> tuple[int, int]:
    """(min_pixels, max_pixels) of the processor for a detail level."""
    if detail not in DETAIL_TOKENS:
        raise ImageError(UNKNOWN_DETAIL, detail=detail)
    return MIN_TOKENS * PIXELS_PER_TOKEN, DETAIL_TOKENS[detail] * PIXELS_PER_TOKEN


def lower_detail(detail: str) -> str | None:
    """The next lower level, or None at the bottom."""
    i = DETAILS.index(detail)
    return DETAILS[i - 1] if i > 0 else None


@dataclass(frozen=True)
class Plan:
    """What the model will see of one image."""

    width: int
    height: int
    model_width: int
    model_height: int
    tokens: int  # visual tokens, plus the 2 vision start/end tokens

    @property
    def scaled_down(self) -> bool:
        """True when the model sees clearly fewer pixels than the image has (not mere rounding to 32 px)."""
        return self.model_width * self.model_height < 0.9 * self.width * self.height

    def describe(self) -> str:
        """One line for a person."""
        line = f"{self.width}×{self.height} → model sees {self.model_width}×{self.model_height}, {self.tokens:,} tokens"
        return line + (" (scaled down)" if self.scaled_down else "")


def plan(width: int, height: int, detail: str = DEFAULT_DETAIL) -> Plan:
    """How an image of this size is resized and what it costs at `detail`."""
    min_pixels, max_pixels = detail_pixels(detail)
    width, height = max(width, MIN_SIDE), max(height, MIN_SIDE)  # sanitize pads tiny images
    h, w = smart_resize(height, width, min_pixels=min_pixels, max_pixels=max_pixels)
    return Plan(width, height, w, h, (h // 32) * (w // 32) + 2)


def upright_size(data: bytes, *, max_bytes: int = 20_000_000, max_pixels: int = 40_000_000) -> tuple[int, int]:
    """Width and height as the image will be stored (EXIF rotation applied), from the header only.

    The same checks as `sanitize` before decoding, so a preview refuses what sending would refuse.
    """
    with _checked_open(data, max_bytes, max_pixels) as img:
        w, h = img.size
        try:
            orientation = img.getexif().get(0x0112, 1)
        except _EXIF_ERRORS:
            orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)
