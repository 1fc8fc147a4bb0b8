"""Checking an uploaded dataset archive before a job is queued.

An upload is a zip of an image-caption folder (the layout `ImageCaptionFolder` reads: images with
`metadata.jsonl` / `metadata.csv` or `.txt` sidecars). Everything that could hurt the service or fail hours
later is refused up front with a message naming the archive member: paths that escape the folder (`..`,
absolute, drive letters), symlinks, zip bombs (per-member and overall compression ratio, total size, member
count, and the bytes actually inflated), files that are neither images nor captions or cannot be written
under their names, images that are not PNG/JPEG/WEBP/BMP/GIF by their content (`data.open_image`; the name
does not matter) or do not decode, images over the pixel limit and uploads over the total pixel limit (read
from the headers before any pixel is decoded), and images without captions. Extraction goes to a fresh folder
that is removed on any failure.
"""

from __future__ import annotations

import posixpath
import shutil
import stat
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..data import IMAGE_EXTENSIONS
from ..errors import FreezeAsGuardError
from .config import ServiceConfig

CAPTION_FILES = ("metadata.jsonl", "metadata.csv")
# Archive tools add these; they are skipped rather than refused so a zip made by Finder uploads as is.
_JUNK_DIRS = ("__MACOSX/",)
_JUNK_NAMES = (".DS_Store", "Thumbs.db", "desktop.ini")
_RATIO_FLOOR = 64 << 10  # members smaller than this are not ratio-checked (a tiny text file compresses well)
_CHUNK = 1 << 20


class UploadError(FreezeAsGuardError, ValueError):
    """An uploaded archive is refused; `member` names the offending file (None: the archive itself)."""

    def __init__(self, message: str, member: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.member = member
        self.status = status


class UploadCancelled(Exception):
    """The job was cancelled while its upload was being checked."""


@dataclass
class CheckedUpload:
    folder: Path
    images: int
    files: int
    uncompressed_bytes: int


def _member_path(name: str) -> str:
    """The member's relative POSIX path, or UploadError for anything that could land outside the folder."""
    if "\\" in name:
        raise UploadError(f"{name}: backslash in an archive path (absolute or traversing Windows paths are refused)", name)
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UploadError(f"{name}: absolute path in the archive", name)
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise UploadError(f"{name}: path traversal ('..') in the archive", name)
    if "\x00" in name:
        raise UploadError(f"{name!r}: NUL byte in an archive path", name)
    return posixpath.join(*parts) if parts else ""


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return info.create_system == 3 and stat.S_ISLNK(info.external_attr >> 16)


def _strip_common_root(names: list[str]) -> str:
    """'folder/' when every member lives under one top folder (what `zip -r data.zip folder` makes)."""
    tops = {n.split("/", 1)[0] for n in names}
    if len(tops) == 1 and all("/" in n for n in names):
        return next(iter(tops)) + "/"
    return ""


def extract_upload(archive: Path | BinaryIO, dest: Path, cfg: ServiceConfig,
                   cancelled: Callable[[], bool] | None = None) -> CheckedUpload:
    """Check `archive` (a path or a seekable binary file) and extract it into `dest` (created; removed again on
    any failure). `cancelled` is asked between files; when it answers True, UploadCancelled is raised."""
    if dest.exists():
        raise FileExistsError(dest)
    dest.mkdir(parents=True)

    def check() -> None:
        if cancelled is not None and cancelled():
            raise UploadCancelled()

    try:
        return _extract(archive, dest, cfg, check)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


def _extract(archive: Path | BinaryIO, dest: Path, cfg: ServiceConfig, check: Callable[[], None]) -> CheckedUpload:
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UploadError(f"the upload is not a readable zip archive ({exc})") from exc
    with zf:
        members: list[tuple[zipfile.ZipInfo, str]] = []
        for info in zf.infolist():
            rel = _member_path(info.filename)
            if _is_symlink(info):
                raise UploadError(f"{info.filename}: symbolic link in the archive (only regular files are accepted)",
                                  info.filename)
            if info.is_dir() or not rel:
                continue
            # Hidden files are skipped, as ImageCaptionFolder skips them; archive tools' junk likewise.
            if rel.startswith(_JUNK_DIRS) or posixpath.basename(rel) in _JUNK_NAMES or \
                    any(part.startswith(".") for part in rel.split("/")):
                continue
            if info.flag_bits & 0x1:
                raise UploadError(f"{info.filename}: encrypted archive member", info.filename)
            members.append((info, rel))
        if not members:
            raise UploadError("the archive holds no files")
        if len(members) > cfg.max_files:
            raise UploadError(f"the archive holds {len(members)} files, more than the limit of {cfg.max_files}")
        declared = sum(i.file_size for i, _ in members)
        if declared > cfg.max_uncompressed_bytes:
            raise UploadError(f"the archive inflates to {declared:,} bytes, more than the limit of "
                              f"{cfg.max_uncompressed_bytes:,}", status=413)
        for info, _ in members:
            if info.file_size > _RATIO_FLOOR and info.file_size > cfg.max_compression_ratio * max(info.compress_size, 1):
                raise UploadError(f"{info.filename}: compression ratio {info.file_size / max(info.compress_size, 1):.0f}:1 "
                                  f"exceeds {cfg.max_compression_ratio:g}:1 (zip bomb?)", info.filename)
        packed = sum(i.compress_size for i, _ in members)
        if declared > _RATIO_FLOOR and declared > cfg.max_compression_ratio * max(packed, 1):
            raise UploadError(f"the archive's compression ratio {declared / max(packed, 1):.0f}:1 exceeds "
                              f"{cfg.max_compression_ratio:g}:1 (zip bomb?)")

        root = _strip_common_root([rel for _, rel in members])
        seen: set[str] = set()
        images: list[tuple[str, str]] = []
        written = 0
        for info, rel in members:
            name = rel[len(root):]
            ext = posixpath.splitext(name)[1].lower()
            base = posixpath.basename(name)
            if ext in IMAGE_EXTENSIONS:
                images.append((info.filename, name))
            elif not (base in CAPTION_FILES and "/" not in name) and ext != ".txt":
                raise UploadError(f"{info.filename}: not an image ({' '.join(sorted(IMAGE_EXTENSIONS))}) or a caption "
                                  f"file ({', '.join(CAPTION_FILES)} at the top, or .txt sidecars)", info.filename)
            if name.lower() in seen:
                raise UploadError(f"{info.filename}: listed twice in the archive", info.filename)
            seen.add(name.lower())
            check()
            target = dest / name
            # Count what actually inflates: the header sizes checked above are only the archive's claim.
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as out:
                    while chunk := src.read(_CHUNK):
                        written += len(chunk)
                        if written > cfg.max_uncompressed_bytes:
                            raise UploadError(f"{info.filename}: the archive inflates past the limit of "
                                              f"{cfg.max_uncompressed_bytes:,} bytes", info.filename, status=413)
                        out.write(chunk)
            except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
                # a CRC or size that does not match the header, a truncated stream, an unsupported method
                raise UploadError(f"{info.filename}: corrupt archive member ({exc})", info.filename) from exc
            except OSError as exc:
                # a name the filesystem refuses: too long, or a file where the archive also has a folder
                raise UploadError(f"{info.filename}: cannot be stored under this name "
                                  f"({exc.strerror or type(exc).__name__})", info.filename) from exc
        if not images:
            raise UploadError("the archive holds no images (" + " ".join(sorted(IMAGE_EXTENSIONS)) + ")")
        # Sizes first, from the headers: an upload over the pixel limits costs no decoding at all.
        total = 0
        for member, name in images:
            total += _image_pixels(dest / name, member, cfg.max_image_pixels)
            if total > cfg.max_total_pixels:
                raise UploadError(f"{member}: the images up to this one hold {total:,} pixels, more than the limit "
                                  f"of {cfg.max_total_pixels:,} for one upload", member, status=413)
        for member, name in images:
            check()
            _decode_image(dest / name, member)
        _check_captions(dest, len(images))
        return CheckedUpload(folder=dest, images=len(images), files=len(members), uncompressed_bytes=written)


def _image_pixels(path: Path, member: str, max_pixels: int) -> int:
    """Width x height from the header (no pixel decoded), through `open_image`: only the allowed formats, known
    by their content, are even parsed."""
    from ..data import open_image

    try:
        with open_image(path) as im:
            w, h = im.size
    except Exception as exc:  # Pillow raises many types for bad input (OSError, SyntaxError, ValueError, ...)
        raise UploadError(f"{member}: not a decodable image ({_pillow_error(exc, path, member)})", member) from exc
    if w * h > max_pixels:
        raise UploadError(f"{member}: {w}x{h} = {w * h:,} pixels, more than the limit of {max_pixels:,}", member)
    return w * h


def _decode_image(path: Path, member: str) -> None:
    from ..data import open_image

    try:
        with open_image(path) as im:
            im.load()
    except Exception as exc:  # noqa: BLE001 - as above
        raise UploadError(f"{member}: not a decodable image ({_pillow_error(exc, path, member)})", member) from exc


def _pillow_error(exc: Exception, path: Path, member: str) -> str:
    # Pillow's messages name the file it was given by the server's path, which users never see.
    return f"{type(exc).__name__}: {exc}".replace(str(path), member)


def _check_captions(folder: Path, n_images: int) -> None:
    """Build the dataset the worker will build: a missing caption (or a bad metadata row) fails here."""
    from ..data import ImageCaptionFolder, ImageTransform
    from ..errors import DataError

    try:
        ds = ImageCaptionFolder(folder, ImageTransform(8))
    except (DataError, OSError, ValueError) as exc:
        msg = str(exc).replace(str(folder) + "/", "").replace(str(folder), "<upload>")
        raise UploadError(msg if isinstance(exc, DataError) else f"the captions cannot be read: {msg}") from exc
    if len(ds) != n_images:
        raise UploadError(f"the captions cover {len(ds)} of the archive's {n_images} images")
