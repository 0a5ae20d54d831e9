"""Hostile and odd images through both doors: the page's intake (`chat.uploads`) and /v1 on a real server.

ROWS is the one table. Every input is built here in code (nothing is read from disk), and every row
states what each door must do with it:

- the page (its intake as `ui.send` runs it: `uploads.check_files` for all files, then
  `uploads.clean_files`, then the store; the file written under a misleading name where that is the
  point) stores exactly one clean image (8-bit RGB, PNG or JPEG, no EXIF/ICC, the expected size) or
  raises a `Notice` naming the problem;
- the API (the same bytes as a data URL, through the real `openai` client) answers 200 with text, or
  400/413 with the error code and a message carrying the same phrase as the page.

Both doors run with the same limits (LIMITS): the page's Settings and the server's flags are built from
it, so the numbers in the messages agree. A few rows exist for one door only (a data URL cannot be
attached on the page; a request body has no page counterpart); the table says why.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import random
import struct
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from PIL import ExifTags, Image

from chat import ui
from chat.config import Settings
from chat.images import plan
from chat.notices import Notice
from chat.store import Store
from chat.uploads import check_files, clean_files
from tests.servers import Server, data_dir

# The limits both doors share: small enough to keep the payloads small.
LIMITS = {
    "max_image_bytes": 2_000_000,
    "max_image_pixels": 20_000_000,
    "max_body_bytes": 8_000_000,
    "max_images_per_message": 8,
    "max_images_per_conversation": 32,
}

# The sanitizer's sentences, spelled out (not imported) so a changed message is noticed.
DAMAGED = "The image file is damaged or incomplete."
UNSUPPORTED = "Unsupported image format; use PNG, JPEG, WebP, GIF or BMP."
TOO_MANY_PIXELS = "Image has too many pixels; the limit is 20 megapixels."  # Pillow's bomb guard, promoted
RED, BLUE, WHITE, BLACK = (255, 0, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)
IMAGE_PARAM = "messages[0].content[0].image_url.url"


# -- expectations -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ok:
    """Accepted. Page: one stored image per file, `size` (width, height) and `mime`; API: 200 with text."""

    size: tuple[int, int]
    mime: str = "image/png"
    check: Callable[[Image.Image, bytes], None] | None = None  # more about the stored image (page)
    seconds: float | None = None  # the page's intake must take less than this


@dataclass(frozen=True)
class No:
    """Refused. Page: a Notice containing `phrase`; API: `status` with `code`, `param` and `phrase`."""

    phrase: str
    status: int = 400
    code: str | None = "invalid_image"
    param: str | None = IMAGE_PARAM
    seconds: float | None = None  # the page's refusal must take less than this


@dataclass(frozen=True)
class Row:
    """One input. `make` returns the bytes of one file, or a list for several attachments.

    `page` / `api` is the expectation at that door, or a string saying why the row does not apply there.
    `url` turns the bytes into the image_url the API client sends (default: a base64 data URL of `mime`).
    """

    id: str
    make: Callable[[], bytes | list[bytes]]
    page: Ok | No | str
    api: Ok | No | str
    name: str = "image.png"
    mime: str = "image/png"
    url: Callable[[bytes, str], str] | None = None
    xfail_page: str = ""
    xfail_api: str = ""


def both(expect: Ok | No) -> dict:
    return {"page": expect, "api": expect}


# -- builders -----------------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def two_tone(size=(48, 36), left=RED, right=BLUE) -> Image.Image:
    img = Image.new("RGB", size, right)
    img.paste(left, (0, 0, size[0] // 2, size[1]))
    return img


def noise(size=(200, 200)) -> Image.Image:
    data = random.Random(size[0] * 7919 + size[1]).randbytes(size[0] * size[1] * 3)
    return Image.frombytes("RGB", size, data)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height; its pixel data is a few junk bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", b"junk" * 8)
            + png_chunk(b"IEND", b""))


def jpeg_header_only(width: int, height: int) -> bytes:
    """SOI, a baseline SOF0 claiming width x height (3 components), SOS, a few junk bytes: no real scan."""
    sof = struct.pack(">BHHB", 8, height, width, 3) + bytes([1, 0x11, 0, 2, 0x11, 0, 3, 0x11, 0])
    sos = bytes([3, 1, 0, 2, 0x11, 3, 0x11, 0, 63, 0])
    return (b"\xff\xd8" + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof
            + b"\xff\xda" + struct.pack(">H", len(sos) + 2) + sos + b"junk" * 8 + b"\xff\xd9")


def real_png_of_size(width: int, height: int) -> bytes:
    """A real, complete PNG of width x height: 1-bit black compresses to almost nothing."""
    return encode(Image.new("1", (width, height), 0), "PNG")


def zip_named_png() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("cat.png", encode(two_tone(), "PNG"))
    return buf.getvalue()


def svg() -> bytes:
    return (b'<?xml version="1.0" encoding="UTF-8"?>\n'
            b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
            b'<rect width="64" height="64" fill="red"/><script>alert(1)</script></svg>\n')


def openable_by_pillow(data: bytes, fmt: str) -> bytes:
    """Assert Pillow itself (without our allowlist) would take these bytes for `fmt`: a realistic fixture."""
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == fmt, img.format
    return data


def tiff() -> bytes:
    return openable_by_pillow(encode(two_tone(), "TIFF"), "TIFF")


def psd() -> bytes:
    """A minimal, complete 32x32 RGB Photoshop file (raw channel data)."""
    width = height = 32
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    sections = struct.pack(">III", 0, 0, 0)  # colour mode data, image resources, layers: all empty
    pixels = struct.pack(">H", 0) + bytes([255]) * (width * height) + bytes(2 * width * height)
    return openable_by_pillow(header + sections + pixels, "PSD")


def eps() -> bytes:
    """An EPS header and a tiny PostScript body (rendering it would need Ghostscript; opening does not)."""
    body = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n%%EndComments\n"
            b"1 0 0 setrgbcolor 0 0 64 64 rectfill\nshowpage\n%%EOF\n")
    return openable_by_pillow(body, "EPS")


def pdf() -> bytes:
    data = encode(two_tone(), "PDF")
    assert data.startswith(b"%PDF-")
    return data


def heic() -> bytes:
    """The start of an ISO-BMFF HEIC file (an iPhone photo): an ftyp box, then zeros."""
    return struct.pack(">I", 24) + b"ftypheic" + b"\0\0\0\0" + b"mif1heic" + bytes(64)


def random_bytes() -> bytes:
    data = random.Random(1234).randbytes(4096)
    assert not data.startswith((b"\x89PNG", b"\xff\xd8", b"GIF8", b"BM", b"RIFF"))
    return data


def over_byte_cap() -> bytes:
    return b"\x89PNG\r\n\x1a\n" + random.Random(5).randbytes(2_500_000 - 8)


def png_bad_crc() -> bytes:
    data = bytearray(encode(two_tone(), "PNG"))
    assert data[12:16] == b"IHDR"
    data[29] ^= 0xFF  # first byte of IHDR's CRC (8 signature + 4 length + 4 type + 13 body)
    return bytes(data)


def png_truncated_idat() -> bytes:
    data = encode(noise(), "PNG")
    cut = data[: int(len(data) * 0.6)]
    assert b"IDAT" in cut and b"IEND" not in cut
    return cut


def truncated_jpeg() -> bytes:
    data = encode(noise(), "JPEG", quality=90)
    return data[: len(data) // 2]


def ztxt_bomb() -> bytes:
    """A valid small PNG with a zTXt chunk that inflates to 64 MB (about 64 kB on the wire)."""
    data = encode(two_tone(), "PNG")
    bomb = png_chunk(b"zTXt", b"Comment\0\0" + zlib.compress(bytes(64_000_000), 9))
    return data[:33] + bomb + data[33:]  # right after IHDR


def polyglot_png_zip() -> bytes:
    """A valid PNG with a ZIP archive appended: opens as both."""
    return encode(two_tone(), "PNG") + zip_named_png()


def exif_rotated_gps_jpeg() -> bytes:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # shown rotated 90 degrees clockwise
    exif[ExifTags.Base.Make] = "SpyCam"
    exif[ExifTags.IFD.GPSInfo] = {ExifTags.GPS.GPSLatitudeRef: "N", ExifTags.GPS.GPSLatitude: (52.0, 31.0, 12.5),
                                  ExifTags.GPS.GPSLongitudeRef: "E", ExifTags.GPS.GPSLongitude: (13.0, 24.0, 1.5)}
    data = encode(two_tone((80, 40)), "JPEG", exif=exif.tobytes())
    with Image.open(io.BytesIO(data)) as img:
        assert img.getexif().get_ifd(ExifTags.IFD.GPSInfo)  # the fixture really carries GPS
    return data


GIF_FRAMES, GIF_SIZE = 1000, (200, 150)


def gif_1000_frames() -> bytes:
    palette = [255, 0, 0] + [v for i in range(1, 256) for v in (0, i, 255 - i)]
    frames = []
    for i in range(GIF_FRAMES):
        frame = Image.new("P", GIF_SIZE, 0 if i == 0 else 1 + i % 255)
        frame.putpalette(palette)
        frames.append(frame)
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=20, loop=0)
    with Image.open(io.BytesIO(data)) as img:
        assert img.n_frames == GIF_FRAMES
    return data


def gif_image_offsets(data: bytes) -> list[int]:
    """Offsets of the image descriptors (frames) in a GIF, found by walking its blocks."""

    def skip_sub_blocks(pos: int) -> int:
        while data[pos]:
            pos += data[pos] + 1
        return pos + 1

    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    frames = []
    while data[pos] != 0x3B:  # trailer
        if data[pos] == 0x21:  # extension: label, then sub-blocks
            pos = skip_sub_blocks(pos + 2)
        else:
            assert data[pos] == 0x2C, hex(data[pos])
            frames.append(pos)
            local = data[pos + 9]
            pos += 10 + (3 << ((local & 7) + 1) if local & 0x80 else 0)
            pos = skip_sub_blocks(pos + 1)  # LZW minimum code size, then the data
    return frames


def gif_cut_in_second_frame() -> bytes:
    """A two-frame GIF cut off in the middle of its second frame's data: the first frame is whole."""
    first, second = Image.new("P", (64, 48), 0), Image.effect_noise((64, 48), 80).convert("P")
    first.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    data = encode(first, "GIF", save_all=True, append_images=[second], duration=100)
    offsets = gif_image_offsets(data)
    assert len(offsets) == 2
    cut = data[: offsets[1] + (len(data) - offsets[1]) // 2]
    with Image.open(io.BytesIO(cut)) as img, pytest.raises((OSError, IndexError, EOFError)):  # frame 2 is broken
        img.seek(1)
        img.load()
    return cut


def cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG")  # red in ink


def palette_with_transparency() -> bytes:
    img = Image.new("P", (40, 40), 1)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # 0 red (transparent), 1 blue
    img.putpixel((0, 0), 0)
    return encode(img, "PNG", transparency=0)


def la_png() -> bytes:
    img = Image.new("LA", (40, 40), (0, 255))
    img.putpixel((0, 0), (0, 0))
    return encode(img, "PNG")


def i16_png() -> bytes:
    img = Image.new("I;16", (64, 40))
    for x in range(64):
        for y in range(40):
            img.putpixel((x, y), x * 65)  # 0..4095, a 12-bit scan
    data = encode(img, "PNG")
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "I;16"
    return data


def mode_1_png() -> bytes:
    img = Image.new("1", (40, 40), 0)
    img.paste(1, (0, 0, 20, 40))  # left half white
    return encode(img, "PNG")


def animated_webp() -> bytes:
    frames = [Image.new("RGB", (40, 40), RED)] + [Image.new("RGB", (40, 40), (0, i * 10, 255)) for i in range(19)]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=40, loop=0, lossless=True)
    with Image.open(io.BytesIO(data)) as img:
        assert img.n_frames == 20
    return data


def mpo() -> bytes:
    """A two-picture MPO (what phone cameras write): opens as a JPEG variant."""
    data = encode(two_tone((64, 48)), "MPO", save_all=True, append_images=[two_tone((64, 48), BLUE, RED)])
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "MPO" and img.n_frames == 2
    return data


def small_png() -> bytes:
    return encode(two_tone(), "PNG")


def five_noisy_pngs() -> list[bytes]:
    """Five valid 730x730 PNGs of about 1.6 MB each: every one within the byte cap, together over the body cap."""
    one = encode(noise((730, 730)), "PNG", compress_level=1)
    assert 1_500_000 < len(one) < LIMITS["max_image_bytes"]
    return [one] * 5


# -- checks on the stored image (page door) -----------------------------------------------------


def pixel_is(xy: tuple[int, int], colour: tuple[int, int, int], tolerance: int = 40):
    def check(img: Image.Image, raw: bytes) -> None:
        got = img.getpixel(xy)
        assert all(abs(a - b) <= tolerance for a, b in zip(got, colour, strict=True)), (xy, got, colour)

    return check


def all_of(*checks):
    def check(img: Image.Image, raw: bytes) -> None:
        for c in checks:
            c(img, raw)

    return check


def no_trace_of(*needles: bytes):
    def check(img: Image.Image, raw: bytes) -> None:
        for needle in needles:
            assert needle not in raw, needle

    return check


def padded_1x1(img: Image.Image, raw: bytes) -> None:
    assert {c: n for n, c in img.getcolors()} == {BLACK: 1, WHITE: 32 * 32 - 1}


def stretched_gradient(img: Image.Image, raw: bytes) -> None:
    grey = img.convert("L")
    low, high = grey.getextrema()
    assert low <= 5 and high >= 250  # 0..4095 mapped onto 0..255, not clipped to white
    row = [grey.getpixel((x, 0)) for x in range(64)]
    assert row == sorted(row) and len(set(row)) > 50


# -- the table ----------------------------------------------------------------------------------

ROWS = [
    # Decompression bombs: a header claiming a huge size over a few bytes of data. Refused from the header
    # (the data is junk: had it been decoded, the answer would be "damaged", not a size).
    Row("png_bomb_81mp_below_pillow_guard", lambda: png_header_only(9000, 9000), **both(
        No("Image is 9000x9000 pixels (81.0 megapixels); the limit is 20 megapixels."))),
    Row("png_bomb_100mp_pillow_warning", lambda: png_header_only(10_000, 10_000), **both(No(TOO_MANY_PIXELS))),
    Row("png_bomb_400mp_pillow_error", lambda: png_header_only(20_000, 20_000), **both(No(TOO_MANY_PIXELS))),
    Row("jpeg_bomb_4gp_pillow_error", lambda: jpeg_header_only(65_000, 65_000), name="photo.jpg",
        mime="image/jpeg", **both(No(TOO_MANY_PIXELS))),
    Row("png_header_only_just_over_cap", lambda: png_header_only(5001, 4000), **both(
        No("Image is 5001x4000 pixels (20.004 megapixels); the limit is 20 megapixels."))),
    Row("png_real_exactly_at_pixel_cap", lambda: real_png_of_size(5000, 4000), **both(
        Ok((5000, 4000), check=pixel_is((2500, 2000), BLACK, 0)))),
    Row("png_8000x6000", lambda: real_png_of_size(8000, 6000), **both(
        No("Image is 8000x6000 pixels (48.0 megapixels); the limit is 20 megapixels.", seconds=1.0))),
    Row("png_20000x40_aspect", lambda: encode(Image.new("L", (20_000, 40), 128), "PNG"), **both(
        No("Image is 20000x40 pixels; the aspect ratio must be at most 200:1."))),
    Row("png_zero_width", lambda: png_header_only(0, 64), **both(No(DAMAGED))),
    Row("png_1x1_padded", lambda: encode(Image.new("RGB", (1, 1), BLACK), "PNG"), **both(
        Ok((32, 32), check=padded_1x1))),
    # Damaged files of allowed formats.
    Row("jpeg_truncated", truncated_jpeg, name="photo.jpg", mime="image/jpeg", **both(No(DAMAGED))),
    Row("png_bad_ihdr_crc", png_bad_crc, **both(No(DAMAGED))),
    Row("png_truncated_idat", png_truncated_idat, **both(No(DAMAGED))),
    Row("png_ztxt_bomb_64mb", ztxt_bomb, **both(No(DAMAGED, seconds=1.0))),
    # Not an image, or not an allowed one, whatever the name says.
    Row("empty", lambda: b"", **both(No("The image file is empty."))),
    Row("random_bytes", random_bytes, name="photo.jpg", mime="image/jpeg", **both(No(UNSUPPORTED))),
    Row("over_byte_cap_2_5mb", over_byte_cap, **both(No("is 2.5 MB; the limit is 2 MB."))),
    Row("zip_named_cat_png", zip_named_png, name="cat.png", **both(No(UNSUPPORTED))),
    Row("svg_named_png", svg, name="logo.png", mime="image/svg+xml", **both(No(UNSUPPORTED))),
    Row("tiff_named_png", tiff, name="scan.png", **both(No(UNSUPPORTED))),
    Row("psd_named_png", psd, name="layers.png", **both(No(UNSUPPORTED))),
    Row("eps_named_png", eps, name="figure.png", **both(No(UNSUPPORTED))),
    Row("pdf_named_png", pdf, name="page.png", **both(No(UNSUPPORTED))),
    Row("heic_named_jpg", heic, name="IMG_0001.jpg", mime="image/heic", **both(No(UNSUPPORTED))),
    # Accepted, and cleaned on the way in.
    Row("png_with_zip_appended", polyglot_png_zip, **both(
        Ok((48, 36), check=all_of(pixel_is((5, 5), RED), no_trace_of(b"PK\x03\x04", b"cat.png"))))),
    Row("jpeg_exif_rotated_with_gps", exif_rotated_gps_jpeg, name="IMG_2024.jpg", mime="image/jpeg", **both(
        Ok((40, 80), "image/jpeg", check=all_of(pixel_is((20, 10), RED), pixel_is((20, 70), BLUE),
                                                no_trace_of(b"Exif", b"SpyCam"))))),
    Row("gif_1000_frames", gif_1000_frames, name="loop.gif", mime="image/gif", **both(
        Ok(GIF_SIZE, check=pixel_is((100, 75), RED, 0), seconds=0.5))),
    Row("gif_cut_in_second_frame", gif_cut_in_second_frame, name="anim.gif", mime="image/gif", **both(
        Ok((64, 48), check=pixel_is((10, 10), RED, 0)))),
    Row("jpeg_cmyk", cmyk_jpeg, name="print.png", **both(Ok((40, 40), "image/jpeg", check=pixel_is((20, 20), RED)))),
    Row("png_palette_transparency", palette_with_transparency, **both(
        Ok((40, 40), check=all_of(pixel_is((0, 0), WHITE, 0), pixel_is((10, 10), BLUE, 0))))),
    Row("png_la", la_png, **both(Ok((40, 40), check=all_of(pixel_is((0, 0), WHITE, 0), pixel_is((9, 9), BLACK, 0))))),
    Row("png_i16", i16_png, **both(Ok((64, 40), check=stretched_gradient))),
    Row("png_mode_1", mode_1_png, **both(
        Ok((40, 40), check=all_of(pixel_is((5, 5), WHITE, 0), pixel_is((30, 5), BLACK, 0))))),
    Row("webp", lambda: encode(two_tone(), "WEBP", lossless=True), name="image.webp", mime="image/webp",
        **both(Ok((48, 36), check=pixel_is((5, 5), RED, 0)))),
    Row("bmp", lambda: encode(two_tone(), "BMP"), name="image.bmp", mime="image/bmp",
        **both(Ok((48, 36), check=pixel_is((40, 5), BLUE, 0)))),
    Row("webp_animated", animated_webp, name="anim.webp", mime="image/webp", **both(
        Ok((40, 40), check=pixel_is((20, 20), RED, 0)))),
    Row("mpo_two_pictures", mpo, name="DSC_0001.jpg", mime="image/jpeg", **both(
        Ok((64, 48), "image/jpeg", check=pixel_is((5, 5), RED)))),
    # Several attachments at once.
    Row("nine_images_one_message", lambda: [small_png()] * 9,
        page=No("9 images attached; a message may carry 8."),
        api=No("A message may carry 8 images.", code=None, param="messages[0].content[8]")),
    Row("body_over_cap_five_valid_images", five_noisy_pngs,
        page=Ok((730, 730)),  # the page has no request body: five valid images within the per-message limit
        api=No("The request body is over the limit of 8,000,000 bytes", 413, "request_too_large", None)),
    # Data URLs that are wrong before any image is looked at: the page has no data URLs.
    Row("data_url_bad_base64", small_png, url=lambda d, m: f"data:{m};base64,{base64.b64encode(d).decode()[:-6]}*!~",
        page="API only: the page receives files, not base64",
        api=No("The image's base64 data is not valid.", code="invalid_image_url")),
    Row("data_url_not_image", small_png, mime="application/octet-stream",
        page="API only: the page receives files, not data URLs",
        api=No("A data URL must look like data:image/<type>;base64,<data>.", code="invalid_image_url")),
    Row("data_url_without_base64", small_png, url=lambda d, m: f"data:{m},{d.hex()}",
        page="API only: the page receives files, not data URLs",
        api=No("A data URL must look like data:image/<type>;base64,<data>.", code="invalid_image_url")),
    Row("remote_url", small_png, url=lambda d, m: "https://example.com/cat.png",
        page="API only: the page receives files, not URLs",
        api=No("Remote image URLs are not fetched by this server", code="image_url_not_allowed")),
]


def _params(door: str) -> list:
    out = []
    for row in ROWS:
        if isinstance(getattr(row, door), str):
            continue
        reason = getattr(row, f"xfail_{door}")
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(row, id=row.id, marks=marks))
    return out


@functools.cache
def payload(row_id: str) -> bytes | list[bytes]:
    """A row's bytes, built once per run (both doors get the same bytes)."""
    return next(r for r in ROWS if r.id == row_id).make()


def files_of(row: Row) -> list[bytes]:
    data = payload(row.id)
    return data if isinstance(data, list) else [data]


def test_the_table():
    assert len(ROWS) >= 25
    assert len({r.id for r in ROWS}) == len(ROWS)
    for row in ROWS:
        assert isinstance(row.page, (Ok, No)) or (isinstance(row.page, str) and row.page), row.id
        assert isinstance(row.api, (Ok, No)) or (isinstance(row.api, str) and row.api), row.id
    assert sum(isinstance(r.page, (Ok, No)) for r in ROWS) >= 25
    assert sum(isinstance(r.api, (Ok, No)) for r in ROWS) >= 25


# -- door 1: the page ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def page_ctx(tmp_path_factory):
    """A Ctx with a real Store and the shared limits. The intake never touches the engine: None says so."""
    data = tmp_path_factory.mktemp("page-data")
    store = Store(data)
    yield ui.Ctx(store=store, engine=None, settings=Settings(data_dir=data, **LIMITS), random_weights=True)
    store.close()


def page_intake(ctx: ui.Ctx, paths: list[str]) -> list[str]:
    """The page's intake as `ui.send` runs it: every file checked (nothing decoded), then cleaned, then stored."""
    check_files(paths, ctx.settings)
    images = clean_files(paths, ctx.settings)
    return [ctx.store.put_image(i.data, mime=i.mime, width=i.width, height=i.height) for i in images]


def stored_count(ctx: ui.Ctx) -> int:
    return ctx.store.db.table("images").count


def png_bit_depth(raw: bytes) -> tuple[int, int]:
    """(bit depth, colour type) from a PNG's IHDR."""
    assert raw[12:16] == b"IHDR"
    return raw[24], raw[25]


@pytest.mark.parametrize("row", _params("page"))
def test_page(row: Row, page_ctx: ui.Ctx, tmp_path: Path):
    expect = row.page
    files = files_of(row)
    stem, dot, ext = row.name.rpartition(".")
    names = [row.name] if len(files) == 1 else [f"{stem}-{i}{dot}{ext}" for i in range(len(files))]
    paths = []
    for name, data in zip(names, files, strict=True):
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    before = stored_count(page_ctx)

    started = time.perf_counter()
    if isinstance(expect, No):
        with pytest.raises(Notice) as info:
            page_intake(page_ctx, paths)
        took = time.perf_counter() - started
        message = info.value.message
        assert expect.phrase in message, message
        if len(files) == 1:  # a refused file is named, so the person knows which one
            assert message.startswith(f"{row.name}: "), message
        assert stored_count(page_ctx) == before  # nothing of a refused upload is kept
    else:
        ids = page_intake(page_ctx, paths)
        took = time.perf_counter() - started
        assert len(ids) == len(files)
        for sha in ids:
            raw = page_ctx.store.image_bytes(sha)
            assert hashlib.sha256(raw).hexdigest() == sha
            meta = page_ctx.store.image_row(sha)
            assert (meta["mime"], meta["width"], meta["height"]) == (expect.mime, *expect.size)
            img = Image.open(io.BytesIO(raw))
            img.load()
            assert img.format == {"image/png": "PNG", "image/jpeg": "JPEG"}[expect.mime]
            assert img.mode == "RGB" and img.size == expect.size
            if img.format == "PNG":
                assert png_bit_depth(raw) == (8, 2)  # 8 bits per sample, truecolour: no 16-bit, no alpha
            else:
                assert img.bits == 8 and img.layers == 3
            assert len(img.getexif()) == 0
            assert not {"exif", "icc_profile", "xmp", "comment", "transparency"} & set(img.info), img.info
            assert getattr(img, "n_frames", 1) == 1
            if expect.check:
                expect.check(img, raw)
    if expect.seconds is not None:
        assert took < expect.seconds, f"{took:.2f} s"


# -- door 2: the API on a real server -----------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    """One `app.py --model tiny-random` on loopback, with LIMITS as its flags."""
    flags = [arg for name, value in LIMITS.items() for arg in ("--" + name.replace("_", "-"), str(value))]
    srv = Server(data_dir(tmp_path_factory, model_dir, "api-data"), *flags).start()
    yield srv
    srv.stop()


def client(srv: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.base}/v1", api_key="unused", max_retries=0, timeout=60)


def message(row: Row) -> dict:
    to_url = row.url or (lambda data, mime: f"data:{mime};base64,{base64.b64encode(data).decode()}")
    parts = [{"type": "image_url", "image_url": {"url": to_url(data, row.mime)}} for data in files_of(row)]
    return {"role": "user", "content": [*parts, {"type": "text", "text": "What is this?"}]}


@pytest.mark.parametrize("row", _params("api"))
def test_api(row: Row, server: Server):
    expect = row.api
    sdk = client(server)
    ask = {"model": "vlchat", "max_tokens": 2, "messages": [message(row)]}
    if isinstance(expect, No):
        with pytest.raises(openai.APIStatusError) as info:
            sdk.chat.completions.create(**ask)
        exc = info.value
        assert exc.status_code == expect.status, (exc.status_code, exc.body)
        err = exc.body
        assert set(err) == {"message", "type", "param", "code"}, err
        assert err["type"] == "invalid_request_error", err
        assert err["code"] == expect.code, err
        assert err["param"] == expect.param, err
        assert expect.phrase in err["message"], err
    else:
        r = sdk.chat.completions.create(**ask)
        text = r.choices[0].message.content
        assert isinstance(text, str) and text
        assert r.usage.completion_tokens == 2
        # Every image reached the model at (at least) the cost of its cleaned size.
        assert r.usage.prompt_tokens > len(files_of(row)) * plan(*expect.size).tokens


# -- after the matrix ---------------------------------------------------------------------------


def test_server_still_serves_after_the_matrix(server: Server):
    r = client(server).chat.completions.create(model="vlchat", max_tokens=4, messages=[
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(
                encode(two_tone((64, 48)), "PNG")).decode()}},
            {"type": "text", "text": "Describe the picture."}]}])
    assert r.choices[0].message.content and r.usage.completion_tokens == 4
    health = httpx.get(server.base + "/health", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert server.proc.poll() is None
    assert "Traceback" not in server.log.read_text(errors="replace")  # no request ended in an unhandled error
