"""The page's attachments: every cheap check on every file before any is decoded, then cleaning,
then removal of the uploaded originals from Gradio's upload cache.

Order for one message: count -> each file's size on disk (stat) -> each file's declared pixels
from its header -> only then decode and re-encode (`chat.images.sanitize`). So forty 36 MP
images cost forty header reads, not forty decodes. Originals (EXIF, GPS and all) are deleted
as soon as their clean copies are stored; only files inside Gradio's upload folder are ever
deleted, never a path outside it.
"""

from __future__ import annotations

import functools
import uuid
from pathlib import Path

from gradio.utils import get_upload_folder

from chat.config import Settings
from chat.images import CleanImage, ImageError, sanitize, upright_size
from chat.notices import Notice
from chat.store import IMAGE_EXTENSIONS


def path_of(f) -> Path:
    """The server path of one attached file (Gradio gives a str or a FileData dict)."""
    return Path(f if isinstance(f, str) else (f or {}).get("path", ""))


def name_of(f) -> str:
    """The name the person gave the file."""
    if isinstance(f, dict) and f.get("orig_name"):
        return str(f["orig_name"])
    return path_of(f).name


def _mb(n: float) -> str:
    return f"{n / 1e6:.6f}".rstrip("0").rstrip(".")


def _mb_over(n: float, limit: float) -> str:
    """n in MB with the fewest decimals that still read above the limit."""
    for digits in range(1, 7):
        if float(text := f"{n / 1e6:.{digits}f}") > limit / 1e6:
            return text
    return _mb(n)


def _stat_size(path: Path, name: str) -> int:
    try:
        if not path.is_file():
            raise OSError
        return path.stat().st_size
    except OSError:
        raise Notice(f"{name} could not be read; attach it again.") from None


@functools.lru_cache(maxsize=256)
def header_size(path: str, max_bytes: int, max_pixels: int) -> tuple[int, int]:
    """Upright (width, height) from the file's header only (cached: upload paths are unique)."""
    return upright_size(Path(path).read_bytes(), max_bytes=max_bytes, max_pixels=max_pixels)


def check_files(files: list, settings: Settings) -> list[tuple[int, int]]:
    """Count, bytes and declared pixels of every file, decoding none; their sizes, or a Notice."""
    if len(files) > settings.max_images_per_message:
        raise Notice(f"{len(files)} images attached; a message may carry {settings.max_images_per_message}.")
    paths = [(path_of(f), name_of(f)) for f in files]
    for path, name in paths:
        size = _stat_size(path, name)
        if size > settings.max_image_bytes:
            raise Notice(f"{name}: the file is {_mb_over(size, settings.max_image_bytes)} MB; the limit is "
                         f"{_mb(settings.max_image_bytes)} MB.")
    sizes = []
    for path, name in paths:
        try:
            sizes.append(header_size(str(path), settings.max_image_bytes, settings.max_image_pixels))
        except ImageError as exc:
            raise Notice(f"{name}: {exc}") from None
        except OSError:
            raise Notice(f"{name} could not be read; attach it again.") from None
    return sizes


def clean_files(files: list, settings: Settings) -> list[CleanImage]:
    """Decode and re-encode each file (after `check_files`): clean 8-bit RGB without metadata."""
    out = []
    for f in files:
        name = name_of(f)
        try:
            data = path_of(f).read_bytes()
        except OSError:
            raise Notice(f"{name} could not be read; attach it again.") from None
        try:
            out.append(sanitize(data, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels))
        except ImageError as exc:
            raise Notice(f"{name}: {exc}") from None
    return out


def upload_root() -> Path:
    """Gradio's upload cache folder (GRADIO_TEMP_DIR), resolved."""
    return Path(get_upload_folder()).resolve()


def discard_originals(files: list) -> int:
    """Delete uploaded originals that lie inside Gradio's upload folder (nothing else); how many."""
    root = upload_root()
    removed = 0
    for f in files:
        raw = path_of(f)
        try:
            if raw.is_symlink():
                continue
            path = raw.resolve()
        except OSError:
            continue
        if path == root or not path.is_relative_to(root) or not path.is_file():
            continue
        try:
            path.unlink()
            removed += 1
            if path.parent != root:
                path.parent.rmdir()  # Gradio's per-upload folder, when nothing else is in it
        except OSError:
            pass
    return removed


def give_back(images: list[CleanImage], names: list[str]) -> list[str]:
    """Clean copies written into the upload folder, for a refused question's input box (originals are gone)."""
    folder = upload_root() / f"vlchat-{uuid.uuid4().hex}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, (image, name) in enumerate(zip(images, names, strict=True)):
        stem = Path(name).stem[:100].strip(". ") or f"image-{n + 1}"
        path = folder / f"{stem}.{IMAGE_EXTENSIONS.get(image.mime, 'png')}"
        path.write_bytes(image.data)
        paths.append(str(path))
    return paths
