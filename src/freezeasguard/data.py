"""Image-caption datasets: loading, validation, augmentation and provenance.

Users bring their own folders of images, so every malformed input fails at construction with a DataError
naming the file, line or column to fix, instead of hours into a run. Augmentation is a pure function of a
per-sample seed (see `seeding`), so a resumed or multi-process run sees exactly the pixels an
uninterrupted single-process run would.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import json
import os
import posixpath
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from .errors import DataError
from .seeding import STREAM_AUGMENT, derive_seed
from .utils.files import file_sha256, swap_directory

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGE_FORMATS",
    "Augment",
    "ImageTransform",
    "ImageCaptionDataset",
    "ImageCaptionFolder",
    "ImageCaptionList",
    "collate_examples",
    "write_imagefolder",
]

# Same set as the Hugging Face `imagefolder` builder users already know, minus formats Pillow reads poorly.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"})
# The decoders those extensions name, and no other: a file is decoded by what its bytes are, among these only, so
# a TIFF or an EPS (which makes Pillow call Ghostscript) named .png is refused rather than decoded.
IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


def open_image(path: Path | str) -> Image.Image:
    """Image.open restricted to IMAGE_FORMATS (identified by content)."""
    return Image.open(path, formats=IMAGE_FORMATS)
_METADATA_NAMES = ("metadata.jsonl", "metadata.csv")
_PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_LIST_LIMIT = 5

Source = Union[Path, Image.Image]
_D = TypeVar("_D", bound="ImageCaptionDataset")


# --------------------------------------------------------------------------------------------- transform


@dataclass(frozen=True)
class Augment:
    """One sample's augmentation, drawn up front so it can be logged, compared and replayed."""

    flip: bool = False
    crop_y: float = 0.5
    crop_x: float = 0.5


@dataclass(frozen=True)
class ImageTransform:
    """PIL image -> float32 [3, R, R] tensor in [-1, 1], the range Stable Diffusion's VAE expects.

    Split into `prepare` (deterministic, cacheable: RGB + resize) and `apply` (seeded crop/flip) so that
    preloaded datasets can skip decoding without changing a single output value.
    """

    resolution: int
    center_crop: bool = True
    random_flip: bool = False
    background: tuple[int, int, int] = (255, 255, 255)

    def __post_init__(self) -> None:
        r = self.resolution
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise DataError(f"ImageTransform.resolution must be a positive int, got {r!r}")
        bg = self.background
        if (
            not isinstance(bg, tuple)
            or len(bg) != 3
            or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in bg)
        ):
            raise DataError(f"ImageTransform.background must be an (r, g, b) tuple of ints 0-255, got {bg!r}")

    def draw(self, seed: int | None) -> Augment:
        """Always consumes the same draws whatever the flags, so toggling one flag never shifts the other."""
        if seed is None:
            return Augment()
        gen = torch.Generator().manual_seed(derive_seed(seed, STREAM_AUGMENT))
        u_flip, u_y, u_x = torch.rand(3, generator=gen, dtype=torch.float64).tolist()
        flip = self.random_flip and u_flip < 0.5
        if self.center_crop:
            return Augment(flip=flip)
        return Augment(flip=flip, crop_y=u_y, crop_x=u_x)

    def prepare(self, image: Image.Image) -> np.ndarray:
        """RGB uint8 [H, W, 3] with the shorter side == resolution; the seed-independent part of the work."""
        rgb = _to_rgb(image, self.background)
        w, h = rgb.size
        scale = self.resolution / min(w, h)
        size = (max(self.resolution, round(w * scale)), max(self.resolution, round(h * scale)))
        if size != rgb.size:
            rgb = rgb.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        return np.asarray(rgb, dtype=np.uint8)

    def apply(self, prepared: np.ndarray, augment: Augment) -> torch.Tensor:
        """Crop + flip a `prepare` output; never writes to `prepared` (it may be a shared preload)."""
        r = self.resolution
        h, w = prepared.shape[:2]
        top = round(augment.crop_y * (h - r))
        left = round(augment.crop_x * (w - r))
        arr = prepared[top : top + r, left : left + r]
        if augment.flip:
            arr = arr[:, ::-1]
        chw = torch.from_numpy(arr.transpose(2, 0, 1).copy())
        return chw.to(torch.float32).div_(127.5).sub_(1.0)

    def __call__(self, image: Image.Image, seed: int | None = None) -> torch.Tensor:
        return self.apply(self.prepare(image), self.draw(seed))


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Composite transparency on `background`: emoji-style PNGs keep arbitrary colour under alpha 0."""
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        canvas = Image.new("RGBA", image.size, (*background, 255))
        canvas.alpha_composite(image.convert("RGBA"))
        return canvas.convert("RGB")
    if image.mode.startswith("I") or image.mode == "F":
        # Pillow's convert("RGB") clips 16-bit values, turning most of a 16-bit PNG white.
        arr = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16") or (image.mode == "I" and arr.max(initial=0) > 255):
            arr = arr / 257.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L").convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


# --------------------------------------------------------------------------------------------- datasets


def _check_header(path: Path) -> None:
    """Cheap (header only) so a misnamed or truncated-to-zero file fails before training starts."""
    try:
        with open_image(path) as im:
            w, h = im.size
    except Exception as e:  # Pillow raises many types for bad input (OSError, SyntaxError, ValueError...)
        raise DataError(f"{path} is not a readable image: {type(e).__name__}: {e}") from e
    if w <= 0 or h <= 0:
        raise DataError(f"{path} has an empty size {w}x{h}")


def _preview(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_LIST_LIMIT])
    return shown + (f", ... ({len(items)} in all)" if len(items) > _LIST_LIMIT else "")


def collate_examples(examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch dict examples field by field; generic so cached-latent examples reuse it."""
    if not examples:
        raise DataError("cannot collate an empty list of examples")
    keys = list(examples[0].keys())
    for n, ex in enumerate(examples):
        if set(ex.keys()) != set(keys):
            raise DataError(f"example {n} has fields {sorted(ex.keys())}, example 0 has {sorted(keys)}")
    batch: dict[str, Any] = {}
    for key in keys:
        values = [ex[key] for ex in examples]
        n_tensors = sum(isinstance(v, torch.Tensor) for v in values)
        if n_tensors == len(values):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) > 1:
                raise DataError(f"cannot stack field {key!r}: tensor shapes differ {sorted(shapes)}")
            batch[key] = torch.stack(values)
        elif n_tensors:
            raise DataError(f"field {key!r} mixes tensors and non-tensors across examples")
        elif all(isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in values):
            batch[key] = torch.tensor([int(v) for v in values], dtype=torch.long)
        else:
            batch[key] = values
    return batch


class ImageCaptionDataset(Dataset):
    """Images (files or in-memory PIL images) with captions, behind one seeded `example(i, seed)` API.

    Subclasses only decide where sources and captions come from; loading, preloading, provenance and
    subsetting live here once.
    """

    collate = staticmethod(collate_examples)

    def __init__(
        self,
        sources: Sequence[Source],
        captions: Sequence[str],
        transform: ImageTransform,
        *,
        root: Path | None = None,
        preload: bool = False,
    ) -> None:
        if not isinstance(transform, ImageTransform):
            raise TypeError(f"transform must be an ImageTransform, got {type(transform).__name__}")
        if len(sources) != len(captions):
            raise DataError(f"got {len(sources)} images but {len(captions)} captions; they must pair up")
        self.transform = transform
        self.root = root
        self._sources: list[Source] = list(sources)
        self._captions: list[str] = list(captions)
        self._labels: list[str] = []
        for i, (src, cap) in enumerate(zip(self._sources, self._captions)):
            if isinstance(src, Path):
                _check_header(src)
                label = src.relative_to(root).as_posix() if root is not None else str(src)
            elif isinstance(src, Image.Image):
                label = f"<memory:{i}>"
            else:
                raise DataError(f"image {i} must be a path or a PIL image, got {type(src).__name__}")
            if not isinstance(cap, str):
                raise DataError(f"caption of {label} must be a string, got {type(cap).__name__}: {cap!r}")
            self._labels.append(label)
        self._prepared: list[np.ndarray] | None = None
        if preload:
            self._prepared = []
            for i in range(len(self)):
                arr = transform.prepare(self.load_image(i))
                arr.setflags(write=False)
                self._prepared.append(arr)

    def __len__(self) -> int:
        return len(self._sources)

    def _index(self, i: int) -> int:
        return range(len(self))[i]  # IndexError past the end keeps the sequence protocol working

    @property
    def preloaded(self) -> bool:
        return self._prepared is not None

    @property
    def captions(self) -> list[str]:
        return list(self._captions)

    def caption(self, i: int) -> str:
        return self._captions[self._index(i)]

    def source(self, i: int) -> str:
        """A label for messages and logs: the file's path, or `<memory:i>` for in-memory images."""
        i = self._index(i)
        src = self._sources[i]
        return str(src) if isinstance(src, Path) else self._labels[i]

    def load_image(self, i: int) -> Image.Image:
        """Fully decoded (so errors surface here, not mid-transform), upright per EXIF orientation."""
        i = self._index(i)
        src = self._sources[i]
        try:
            if isinstance(src, Path):
                with open_image(src) as im:
                    im.load()
                    return ImageOps.exif_transpose(im)
            return ImageOps.exif_transpose(src)
        except Exception as e:
            raise DataError(f"cannot decode image {self.source(i)}: {type(e).__name__}: {e}") from e

    def example(self, i: int, seed: int | None) -> dict[str, Any]:
        i = self._index(i)
        if self._prepared is not None:
            prepared = self._prepared[i]
        else:
            prepared = self.transform.prepare(self.load_image(i))
        pixels = self.transform.apply(prepared, self.transform.draw(seed))
        return {"pixel_values": pixels, "caption": self._captions[i], "index": i}

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.example(i, None)

    def manifest(self) -> list[dict[str, str]]:
        """Per-item content hashes, so a released guard can record exactly which data it was trained on."""
        entries = []
        for label, src, cap in zip(self._labels, self._sources, self._captions):
            if isinstance(src, Path):
                digest = file_sha256(src)
            else:
                digest = hashlib.sha256(src.convert("RGBA").tobytes()).hexdigest()
            entries.append({"file": label, "caption": cap, "sha256": digest})
        return entries

    def subset(self: _D, indices: Iterable[int]) -> _D:
        """A view of the same type over `indices` that shares the transform and any preloaded arrays."""
        idx = [self._index(int(i)) for i in indices]
        view = copy.copy(self)
        view._sources = [self._sources[i] for i in idx]
        view._captions = [self._captions[i] for i in idx]
        view._labels = [self._labels[i] for i in idx]
        view._prepared = None if self._prepared is None else [self._prepared[i] for i in idx]
        return view

    def recaptioned(self: _D, rewrite: Callable[[str], str]) -> _D:
        """A view of the same images with every caption passed through `rewrite` (an attacker's own words)."""
        view = copy.copy(self)
        view._captions = [rewrite(c) for c in self._captions]
        return view

    def __repr__(self) -> str:
        where = f"root={str(self.root)!r}, " if self.root is not None else ""
        return f"{type(self).__name__}({where}n={len(self)}, transform={self.transform})"


class ImageCaptionList(ImageCaptionDataset):
    """Explicit lists of images (PIL images or paths) and captions."""

    def __init__(
        self,
        images: Sequence[Image.Image | str | Path],
        captions: Sequence[str],
        transform: ImageTransform,
        preload: bool = False,
    ) -> None:
        sources = [Path(im) if isinstance(im, (str, os.PathLike)) else im for im in images]
        super().__init__(sources, captions, transform, preload=preload)


class ImageCaptionFolder(ImageCaptionDataset):
    """A folder in the Hugging Face `imagefolder` layout, or kohya-style `<stem>.txt` caption sidecars.

    Captions come from `metadata.jsonl` or `metadata.csv` at the root (`file_name` relative to the root);
    without either, every image needs a `.txt` beside it. Images are ordered by relative path so that the
    index of an image, and therefore its seeds, does not depend on the filesystem's listing order.
    """

    def __init__(
        self,
        root: str | Path,
        transform: ImageTransform,
        caption_column: str = "text",
        image_column: str = "file_name",
        preload: bool = False,
    ) -> None:
        root = Path(root)
        if not root.exists():
            raise DataError(f"dataset folder {root} does not exist")
        if not root.is_dir():
            raise DataError(f"dataset path {root} is not a directory; expected a folder of images")
        images = _find_images(root)
        present = [root / name for name in _METADATA_NAMES if (root / name).is_file()]
        if len(present) > 1:
            raise DataError(
                f"both {present[0]} and {present[1]} exist, so the captions are ambiguous; keep only one"
            )
        self.caption_column = caption_column
        self.image_column = image_column
        self.metadata_file: Path | None = present[0] if present else None
        if self.metadata_file is None:
            caption_map = _sidecar_captions(root, images)
        else:
            caption_map = _metadata_captions(self.metadata_file, images, caption_column, image_column)
        rels = sorted(images)
        super().__init__(
            [images[r] for r in rels], [caption_map[r] for r in rels], transform, root=root, preload=preload
        )


def _find_images(root: Path) -> dict[str, Path]:
    """Relative posix path -> file; hidden files/folders are skipped (macOS `._x.png`, checkpoints dirs)."""
    images: dict[str, Path] = {}
    stray_metadata: list[str] = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            images[rel.as_posix()] = path
        elif path.name in _METADATA_NAMES and len(rel.parts) > 1:
            stray_metadata.append(rel.as_posix())
    if stray_metadata:
        raise DataError(
            f"metadata file(s) {_preview(sorted(stray_metadata))} under {root} are not at the dataset root; "
            f"only {root}/metadata.jsonl or {root}/metadata.csv is read (file_name relative to {root})"
        )
    if not images:
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        raise DataError(f"no images ({exts}) found under {root}")
    return images


def _sidecar_captions(root: Path, images: Mapping[str, Path]) -> dict[str, str]:
    captions: dict[str, str] = {}
    missing: list[str] = []
    for rel, path in images.items():
        txt = path.with_suffix(".txt")
        if txt.is_file():
            captions[rel] = _read_text(txt).strip()
        else:
            missing.append(f"{rel} (expected {txt.relative_to(root).as_posix()})")
    if missing:
        raise DataError(
            f"no caption for image(s) under {root}: {_preview(sorted(missing))}; put a <image stem>.txt beside "
            f"each image, or write {root}/metadata.jsonl with 'file_name' and 'text' columns"
        )
    return captions


# A caption file or a metadata table of a dataset: far below this (a metadata table of 100,000 captions is ~20 MB).
MAX_TEXT_BYTES = 64 << 20


def _read_text(path: Path) -> str:
    from .utils.files import read_bounded

    try:
        return read_bounded(path, "caption or metadata file", DataError, limit=MAX_TEXT_BYTES).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not valid UTF-8 text: {e}") from e


def _metadata_rows(meta: Path) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    """(line number, row) pairs and the columns seen, from either metadata format."""
    text = _read_text(meta)
    rows: list[tuple[int, dict[str, Any]]] = []
    if meta.suffix == ".jsonl":
        # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends unescaped.
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{meta} line {lineno} is not valid JSON ({e.msg} at column {e.colno}); "
                    'each line must be one JSON object like {"file_name": "a.png", "text": "a caption"}'
                ) from e
            if not isinstance(row, dict):
                raise DataError(f"{meta} line {lineno} is a JSON {type(row).__name__}; expected an object")
            rows.append((lineno, row))
        columns = list(dict.fromkeys(k for _, row in rows for k in row))
        return rows, columns
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None:
        raise DataError(f"{meta} is empty; expected a header row such as: file_name,text")
    rows = [(reader.line_num, row) for row in reader]
    return rows, [c for c in reader.fieldnames if c]


def _missing_column_error(meta: Path, column: str, columns: Sequence[str], option: str) -> DataError:
    have = ", ".join(repr(c) for c in columns) if columns else "none (no rows)"
    hint = f"{option}=<column>" + f" (--{option.replace('_', '-')} on the command line)"
    return DataError(f"{meta} has no column {column!r}; its columns are {have}; pick one with {hint}")


def _metadata_captions(
    meta: Path, images: Mapping[str, Path], caption_column: str, image_column: str
) -> dict[str, str]:
    rows, columns = _metadata_rows(meta)
    for column, option in ((image_column, "image_column"), (caption_column, "caption_column")):
        if column not in columns:
            raise _missing_column_error(meta, column, columns, option)
    root = meta.parent
    folded = {rel.casefold(): rel for rel in images}
    captions: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for lineno, row in rows:
        where = f"{meta} line {lineno}"
        name = row.get(image_column)
        if not isinstance(name, str) or not name:
            raise DataError(f"{where}: {image_column!r} must be a file name string, got {name!r}")
        rel = posixpath.normpath(name.replace("\\", "/"))
        if rel.startswith("/") or rel == ".." or rel.startswith("../"):
            raise DataError(f"{where}: {name!r} must be a path relative to {root} and inside it")
        if rel not in images:
            if (root / rel).is_file():
                why = "is not a dataset image (supported: " + " ".join(sorted(IMAGE_EXTENSIONS))
                why += "; hidden files and folders are skipped)"
            else:
                why = "does not exist"
                if rel.casefold() in folded:
                    why += f" (did you mean {folded[rel.casefold()]!r}? names are case-sensitive)"
            raise DataError(f"{where}: {image_column} {name!r} ({root / rel}) {why}")
        if rel in first_line:
            raise DataError(f"{where}: second row for {rel!r} (first at line {first_line[rel]}); keep one row")
        first_line[rel] = lineno
        caption = row.get(caption_column)
        if caption is None:
            raise DataError(f"{where}: caption {caption_column!r} of image {rel!r} is missing or null")
        if not isinstance(caption, str):
            raise DataError(
                f"{where}: caption {caption_column!r} of image {rel!r} must be a string, got {caption!r}"
            )
        captions[rel] = caption
    unlisted = sorted(set(images) - set(captions))
    if unlisted:
        raise DataError(
            f"image(s) under {root} have no row in {meta}: {_preview(unlisted)}; add a row for each "
            "image or move it out of the folder"
        )
    return captions


# --------------------------------------------------------------------------------------------- writing


def write_imagefolder(
    dest: str | Path,
    images: Sequence[Image.Image],
    captions: Sequence[str],
    names: Sequence[str] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write PNGs + metadata.jsonl readable by ImageCaptionFolder, all-or-nothing.

    Built in a hidden sibling folder then renamed into place, so a crash or a concurrent reader never sees
    a half-written cache. With `overwrite`, the old folder is swapped out only once the new one is
    complete, and only if it looks like one of ours (has metadata.jsonl), so a mistyped path cannot wipe
    an unrelated directory.
    """
    dest = Path(dest)
    if len(images) != len(captions):
        raise DataError(f"got {len(images)} images but {len(captions)} captions; they must pair up")
    if not images:
        raise DataError(f"refusing to write an empty dataset to {dest}: it could not be loaded back")
    if names is None:
        width = max(5, len(str(len(images) - 1)))
        files = [f"{i:0{width}d}.png" for i in range(len(images))]
    else:
        if len(names) != len(images):
            raise DataError(f"got {len(names)} names for {len(images)} images")
        files = [_png_name(n) for n in names]
        seen: dict[str, str] = {}
        for f in files:
            if f.casefold() in seen:
                raise DataError(f"names {seen[f.casefold()]!r} and {f!r} collide (case-insensitively)")
            seen[f.casefold()] = f
    for i, (im, cap) in enumerate(zip(images, captions)):
        if not isinstance(im, Image.Image):
            raise DataError(f"image {i} ({files[i]}) must be a PIL image, got {type(im).__name__}")
        if not isinstance(cap, str):
            raise DataError(f"caption {i} ({files[i]}) must be a string, got {type(cap).__name__}")
    if dest.exists():
        if not overwrite:
            raise DataError(f"{dest} already exists; pass overwrite=True to replace it")
        if not dest.is_dir() or not (dest / "metadata.jsonl").is_file():
            raise DataError(f"refusing to overwrite {dest}: it is not a folder written by write_imagefolder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.partial-"))
    try:
        for im, name in zip(images, files):
            if im.mode not in _PNG_MODES:
                im = im.convert("RGBA" if im.mode in _ALPHA_MODES else "RGB")
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            im.save(tmp / name, format="PNG")
        with open(tmp / "metadata.jsonl", "w", encoding="utf-8") as f:
            for name, cap in zip(files, captions):
                f.write(json.dumps({"file_name": name, "text": cap}, ensure_ascii=False) + "\n")
        swap_directory(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _png_name(name: str) -> str:
    rel = posixpath.normpath(str(name).replace("\\", "/"))
    if not name or rel.startswith("/") or rel in (".", "..") or rel.startswith("../"):
        raise DataError(f"image name {name!r} must be a relative path inside the dataset folder")
    if any(part.startswith(".") for part in rel.split("/")):
        raise DataError(f"image name {name!r} must not be hidden (start with '.'): loaders skip hidden files")
    suffix = posixpath.splitext(rel)[1].lower()
    if suffix == ".png":
        return rel
    if suffix in IMAGE_EXTENSIONS:
        raise DataError(f"image name {name!r} has extension {suffix!r}, but images are written as PNG")
    return rel + ".png"
