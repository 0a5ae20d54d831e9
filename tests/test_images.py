"""Image intake: every input is built here with Pillow; nothing is read from disk."""

from __future__ import annotations

import hashlib
import io
import struct
import zipfile
import zlib

import pytest
from PIL import ExifTags, Image, ImageCms, PngImagePlugin

from chat.images import (
    ALLOWED_FORMATS,
    CleanImage,
    ImageError,
    check_header,
    check_size,
    open_clean,
    sanitize,
    smart_resize,
    visual_tokens,
)

DAMAGED = "The image file is damaged or incomplete."
UNSUPPORTED = "Unsupported image format; use PNG, JPEG, WebP, GIF or BMP."
# Qwen3-VL's preprocessor_config.json: size={"shortest_edge": 65536, "longest_edge": 16777216}
QWEN3_MIN, QWEN3_MAX = 65_536, 16_777_216


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def decoded(clean: CleanImage) -> Image.Image:
    img = Image.open(io.BytesIO(clean.data))
    img.load()
    return img


def two_tone(size=(40, 20), left=(255, 0, 0), right=(0, 0, 255)) -> Image.Image:
    img = Image.new("RGB", size, right)
    img.paste(left, (0, 0, size[0] // 2, size[1]))
    return img


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, followed by pixel data that is junk."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", b"junk" * 8)
        + chunk(b"IEND", b"")
    )


# --- formats ----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ALLOWED_FORMATS)
def test_allowed_formats_accepted(fmt):
    src = encode(two_tone((48, 36)), fmt)
    clean = sanitize(src)
    assert clean.original_format == fmt
    assert (clean.width, clean.height) == (48, 36)
    assert (clean.original_width, clean.original_height) == (48, 36)
    expected_mime = "image/jpeg" if fmt == "JPEG" else "image/png"
    assert clean.mime == expected_mime
    out = decoded(clean)
    assert out.format == expected_mime.split("/")[1].upper()
    assert out.mode == "RGB" and out.size == (48, 36)
    r, _, b = out.getpixel((2, 2))
    assert r > 200 and b < 60  # left half is still red: content survived


def test_sha256_matches_data_and_is_stable():
    src = encode(two_tone(), "PNG")
    first, second = sanitize(src), sanitize(src)
    assert first.sha256 == hashlib.sha256(first.data).hexdigest()
    assert first.sha256 == second.sha256 and first.data == second.data
    other = sanitize(encode(two_tone(left=(0, 255, 0)), "PNG"))
    assert other.sha256 != first.sha256


def test_open_clean_round_trip():
    clean = sanitize(encode(two_tone((50, 40)), "JPEG"))
    img = open_clean(clean.data)
    assert img.mode == "RGB" and img.size == (50, 40)
    with pytest.raises(ImageError):
        open_clean(b"not an image")


# --- metadata and orientation -------------------------------------------------------


def test_exif_orientation_applied_and_exif_gps_removed():
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6  # display rotated 90 degrees clockwise
    exif[ExifTags.IFD.GPSInfo] = {
        ExifTags.GPS.GPSLatitudeRef: "N",
        ExifTags.GPS.GPSLatitude: (52.0, 31.0, 12.5),
    }
    # 80x40 rather than 40x20: a 20 px side would also be padded to 32.
    src = encode(two_tone((80, 40)), "JPEG", exif=exif.tobytes())
    source = Image.open(io.BytesIO(src))
    assert source.getexif().get_ifd(ExifTags.IFD.GPSInfo)  # the fixture really has GPS

    clean = sanitize(src)
    assert (clean.width, clean.height) == (40, 80)
    assert (clean.original_width, clean.original_height) == (80, 40)
    out = decoded(clean)
    assert out.size == (40, 80)
    assert "exif" not in out.info
    assert len(out.getexif()) == 0
    assert not out.getexif().get_ifd(ExifTags.IFD.GPSInfo)
    assert b"Exif" not in clean.data
    # Rotating clockwise brings the red left half to the top.
    top, bottom = out.getpixel((20, 10)), out.getpixel((20, 70))
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_png_text_and_icc_stripped():
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "secret-comment")
    info.add_itxt("Author", "secret-author", zip=True)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    src = encode(two_tone(), "PNG", pnginfo=info, icc_profile=icc)
    assert "Comment" in Image.open(io.BytesIO(src)).info  # fixture carries metadata

    clean = sanitize(src)
    out = decoded(clean)
    assert not {"Comment", "Author", "icc_profile", "exif"} & set(out.info)
    assert b"secret" not in clean.data
    for kind in (b"tEXt", b"iTXt", b"zTXt", b"iCCP", b"eXIf"):
        assert kind not in clean.data


# --- modes --------------------------------------------------------------------------


def test_rgba_composited_on_white():
    img = Image.new("RGBA", (40, 40), (200, 0, 0, 255))
    img.putpixel((0, 0), (10, 20, 30, 0))
    img.putpixel((1, 0), (0, 0, 0, 128))
    out = decoded(sanitize(encode(img, "PNG")))
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((5, 5)) == (200, 0, 0)
    assert all(120 <= c <= 135 for c in out.getpixel((1, 0)))  # half black on white


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency(fmt):
    img = Image.new("P", (40, 40), 1)
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, index 1 blue
    img.putpixel((0, 0), 0)
    src = encode(img, fmt, transparency=0)
    out = decoded(sanitize(src))
    assert out.getpixel((0, 0)) == (255, 255, 255)  # transparent red is gone
    assert out.getpixel((10, 10)) == (0, 0, 255)


def test_la_composited_on_white():
    img = Image.new("LA", (40, 40), (0, 255))
    img.putpixel((0, 0), (0, 0))
    out = decoded(sanitize(encode(img, "PNG")))
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((10, 10)) == (0, 0, 0)


def test_16bit_greyscale_stretched_not_saturated():
    img = Image.new("I;16", (64, 40))
    for x in range(64):
        for y in range(40):
            img.putpixel((x, y), x * 65)  # 0 .. 4095, a 12-bit scan
    src = encode(img, "PNG")
    assert Image.open(io.BytesIO(src)).mode == "I;16"
    out = decoded(sanitize(src)).convert("L")
    low, high = out.getextrema()
    assert low <= 5 and high >= 250
    row = [out.getpixel((x, 0)) for x in range(64)]
    assert row == sorted(row) and len(set(row)) > 50  # a gradient, not a clipped plateau


def test_mode_1():
    img = Image.new("1", (40, 40), 0)
    img.paste(1, (0, 0, 20, 40))
    out = decoded(sanitize(encode(img, "PNG")))
    assert out.mode == "RGB"
    assert out.getpixel((5, 5)) == (255, 255, 255)
    assert out.getpixel((30, 5)) == (0, 0, 0)


def test_cmyk_jpeg():
    img = Image.new("CMYK", (40, 40), (0, 255, 255, 0))  # red in ink
    src = encode(img, "JPEG")
    assert Image.open(io.BytesIO(src)).mode == "CMYK"
    clean = sanitize(src)
    out = decoded(clean)
    assert clean.mime == "image/jpeg" and out.mode == "RGB"
    r, g, b = out.getpixel((20, 20))
    assert r > 200 and g < 60 and b < 60


# --- geometry -----------------------------------------------------------------------


def test_tiny_image_padded_with_white():
    clean = sanitize(encode(Image.new("RGB", (1, 1), (0, 0, 0)), "PNG"))
    assert (clean.width, clean.height) == (32, 32)
    assert (clean.original_width, clean.original_height) == (1, 1)
    out = decoded(clean)
    colours = {c: n for n, c in out.getcolors()}
    assert colours == {(0, 0, 0): 1, (255, 255, 255): 32 * 32 - 1}


def test_thin_image_padded_on_short_side_only():
    clean = sanitize(encode(Image.new("RGB", (100, 10), (0, 0, 0)), "PNG"))
    assert (clean.width, clean.height) == (100, 32)


@pytest.mark.parametrize("size", [(1000, 2), (2, 1000)])
def test_extreme_aspect_refused(size):
    with pytest.raises(ImageError, match="200:1"):
        sanitize(encode(Image.new("L", size), "PNG"))


def test_aspect_just_inside_limit_accepted():
    clean = sanitize(encode(Image.new("L", (400, 2)), "PNG"))
    assert clean.original_width == 400


# --- refusals -----------------------------------------------------------------------


def test_empty_refused():
    with pytest.raises(ImageError, match="empty"):
        sanitize(b"")


def test_too_many_bytes_refused_naming_limit():
    with pytest.raises(ImageError) as err:
        sanitize(b"\0" * 52_300_000)
    assert str(err.value) == "Image is 52.3 MB; the limit is 20 MB."
    with pytest.raises(ImageError) as err:
        sanitize(b"\0" * 20_000_001)
    assert str(err.value) == "Image is 20.000001 MB; the limit is 20 MB."
    src = encode(two_tone(), "PNG")
    assert len(src) > 50
    with pytest.raises(ImageError, match=r"the limit is 0\.00005 MB\.$"):
        sanitize(src, max_bytes=50)
    assert sanitize(src, max_bytes=len(src)).width == 40


def test_too_many_pixels_refused_from_small_file():
    src = encode(Image.new("1", (8000, 8000), 1), "PNG")
    assert len(src) < 100_000  # 64 MP of white compresses to almost nothing
    with pytest.raises(ImageError) as err:
        sanitize(src)
    assert "8000x8000" in str(err.value) and "the limit is 40 megapixels" in str(err.value)


@pytest.mark.parametrize(
    ("size", "max_pixels"),
    [
        ((7000, 7000), 40_000_000),  # our own limit
        ((10_000, 10_000), 10**9),  # Pillow's DecompressionBombWarning, promoted
        ((20_000, 20_000), 10**9),  # Pillow's DecompressionBombError
    ],
)
def test_too_many_pixels_refused_before_decoding(size, max_pixels):
    # The pixel data is junk: decoding would report a damaged file, so a size
    # message proves the refusal came from the header alone.
    with pytest.raises(ImageError) as err:
        sanitize(png_header_only(*size), max_pixels=max_pixels)
    assert "pixels" in str(err.value) and str(err.value) != DAMAGED


def test_check_header_reads_the_header_only():
    # Junk pixel data: check_header accepts it (nothing is decoded), sanitize would not.
    assert check_header(png_header_only(6000, 6000)) == (6000, 6000)
    with pytest.raises(ImageError, match="7000x7000 pixels"):
        check_header(png_header_only(7000, 7000))
    with pytest.raises(ImageError, match="aspect ratio"):
        check_header(png_header_only(10_000, 20))
    with pytest.raises(ImageError, match="Unsupported"):
        check_header(b"GIF89" + b"x" * 100)
    with pytest.raises(ImageError, match="the limit is 0.00002 MB"):
        check_header(png_header_only(64, 64), max_bytes=20)


def test_check_size_refuses_by_count_alone():
    check_size(20_000_000, 20_000_000)
    with pytest.raises(ImageError) as err:
        check_size(20_000_001, 20_000_000)
    assert str(err.value) == "Image is 20.000001 MB; the limit is 20 MB."


def test_header_only_png_within_limits_is_damaged():
    with pytest.raises(ImageError) as err:
        sanitize(png_header_only(64, 64))
    assert str(err.value) == DAMAGED


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_refused(fmt):
    src = encode(Image.effect_noise((200, 200), 64).convert("RGB"), fmt)
    with pytest.raises(ImageError) as err:
        sanitize(src[: len(src) // 2])
    assert str(err.value) == DAMAGED


def test_zip_named_png_refused():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("picture.png", encode(two_tone(), "PNG"))
    with pytest.raises(ImageError) as err:
        sanitize(buf.getvalue())
    assert str(err.value) == UNSUPPORTED


def test_tiff_refused():
    src = encode(two_tone(), "TIFF")
    assert Image.open(io.BytesIO(src)).format == "TIFF"  # Pillow itself would open it
    with pytest.raises(ImageError) as err:
        sanitize(src)
    assert str(err.value) == UNSUPPORTED


def test_garbage_after_png_signature_is_damaged():
    with pytest.raises(ImageError) as err:
        sanitize(b"\x89PNG\r\n\x1a\n" + b"\xff" * 64)
    assert str(err.value) == DAMAGED


def test_errors_are_value_errors():
    assert issubclass(ImageError, ValueError)


# --- animation ----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animation_gives_first_frame(fmt):
    frames = [Image.new("RGB", (40, 40), (255, 0, 0))]
    frames += [Image.new("RGB", (40, 40), (0, (i * 5) % 256, 255)) for i in range(49)]
    src = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=40, loop=0)
    assert getattr(Image.open(io.BytesIO(src)), "n_frames", 1) == 50
    out = decoded(sanitize(src))
    assert getattr(out, "n_frames", 1) == 1
    r, g, b = out.getpixel((20, 20))
    assert r > 200 and g < 60 and b < 60


# --- visual token math --------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "tokens"),
    [
        (512, 512, 256),
        (1280, 720, 880),
        (1920, 1080, 2040),
        (2560, 1440, 3600),
        (3840, 2160, 8160),
        (4032, 3024, 11_844),  # a 12 MP phone photo
    ],
)
def test_visual_tokens_at_default_budget(width, height, tokens):
    assert visual_tokens(width, height, min_pixels=QWEN3_MIN, max_pixels=QWEN3_MAX) == tokens


def test_visual_tokens_respects_budget():
    small = 256 * 32 * 32, 1280 * 32 * 32  # Qwen's suggested 256..1280 tokens
    assert visual_tokens(3840, 2160, min_pixels=small[0], max_pixels=small[1]) <= 1280
    assert visual_tokens(64, 64, min_pixels=small[0], max_pixels=small[1]) >= 256


def test_smart_resize_refuses_extreme_aspect():
    with pytest.raises(ImageError, match="200:1"):
        smart_resize(1, 300, min_pixels=QWEN3_MIN, max_pixels=QWEN3_MAX)


SIDES = sorted(
    {1, 2, 15, 16, 31, 32, 33, 48, 100, 720, 1080, 1440, 2160, 3024, 4032, 9000}
    | set(range(5, 5000, 211))
)
BUDGETS = [(QWEN3_MIN, QWEN3_MAX), (256 * 32 * 32, 1280 * 32 * 32), (56 * 56, 28 * 28 * 1280)]


@pytest.mark.parametrize(("min_pixels", "max_pixels"), BUDGETS)
def test_smart_resize_matches_transformers(min_pixels, max_pixels):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import (
        smart_resize as reference,
    )

    processor = Qwen2VLImageProcessorPil(
        patch_size=16, merge_size=2, size={"shortest_edge": min_pixels, "longest_edge": max_pixels}
    )
    compared = 0
    for h in SIDES:
        for w in SIDES:
            try:
                expected = reference(h, w, factor=32, min_pixels=min_pixels, max_pixels=max_pixels)
            except ValueError:
                with pytest.raises(ImageError):
                    smart_resize(h, w, min_pixels=min_pixels, max_pixels=max_pixels)
                continue
            assert smart_resize(h, w, min_pixels=min_pixels, max_pixels=max_pixels) == expected, (
                h,
                w,
            )
            patches = processor.get_number_of_image_patches(h, w)
            assert visual_tokens(w, h, min_pixels=min_pixels, max_pixels=max_pixels) == patches // 4
            compared += 1
    assert compared > 500
