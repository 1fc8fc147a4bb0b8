from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from freezeasguard.data import (
    Augment,
    ImageCaptionDataset,
    ImageCaptionFolder,
    ImageCaptionList,
    ImageTransform,
    collate_examples,
    write_imagefolder,
)
from freezeasguard.errors import DataError

TF = ImageTransform(4)


def noise(w: int = 10, h: int = 8, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Asymmetric content, so crops and flips are distinguishable."""
    channels = len(mode)
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr if channels > 1 else arr[..., 0], mode)


def save(path: Path, image: Image.Image | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (image or noise(seed=len(str(path)))).save(path)
    return path


def write_jsonl(root: Path, rows: list[dict], name: str = "metadata.jsonl") -> None:
    (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


# ------------------------------------------------------------------------------------------- layouts


def test_jsonl_layout_sorted_with_nested_folders(tmp_path: Path) -> None:
    for rel in ["b.png", "a.jpg", "sub/deeper/c.PNG", "sub/a.webp"]:
        save(tmp_path / rel)
    write_jsonl(
        tmp_path,
        [
            {"file_name": "sub/deeper/c.PNG", "text": "cee"},
            {"file_name": "b.png", "text": "bee"},
            {"file_name": "./a.jpg", "text": "ay"},
            {"file_name": "sub/a.webp", "text": ""},  # empty captions are allowed
        ],
    )
    ds = ImageCaptionFolder(tmp_path, TF)
    assert len(ds) == 4
    assert ds.captions == ["ay", "bee", "", "cee"]
    assert [e["file"] for e in ds.manifest()] == ["a.jpg", "b.png", "sub/a.webp", "sub/deeper/c.PNG"]
    assert ds.caption(-1) == "cee"
    assert ds.source(1) == str(tmp_path / "b.png")
    ex = ds[3]
    assert ex["caption"] == "cee" and ex["index"] == 3 and ex["pixel_values"].shape == (3, 4, 4)


def test_csv_layout_custom_columns(tmp_path: Path) -> None:
    save(tmp_path / "x.png")
    save(tmp_path / "y" / "z.bmp")
    (tmp_path / "metadata.csv").write_text(
        'image,caption,extra\ny/z.bmp,"zed, with comma",1\nx.png,ex,2\n', encoding="utf-8"
    )
    ds = ImageCaptionFolder(tmp_path, TF, caption_column="caption", image_column="image")
    assert ds.captions == ["ex", "zed, with comma"]


def test_txt_sidecar_layout(tmp_path: Path) -> None:
    save(tmp_path / "b.png")
    save(tmp_path / "nested" / "a.jpeg")
    (tmp_path / "b.txt").write_text("bee caption\n", encoding="utf-8")
    (tmp_path / "nested" / "a.txt").write_text("  ay caption ", encoding="utf-8")
    save(tmp_path / ".hidden" / "skip.png", noise())  # hidden folders are ignored
    (tmp_path / "._b.png").write_bytes(b"\0\0macos resource fork")
    ds = ImageCaptionFolder(tmp_path, TF)
    assert ds.captions == ["bee caption", "ay caption"]
    assert [e["file"] for e in ds.manifest()] == ["b.png", "nested/a.jpeg"]


# ------------------------------------------------------------------------------------------- errors


def _two_images(root: Path) -> None:
    save(root / "a.png")
    save(root / "b.png")


def _setup_missing_root(root: Path) -> Path:
    return root / "nope"


def _setup_file_root(root: Path) -> Path:
    return save(root / "single.png")


def _setup_no_images(root: Path) -> Path:
    (root / "notes.txt").write_text("x")
    return root


def _setup_both_metadata(root: Path) -> Path:
    _two_images(root)
    write_jsonl(root, [{"file_name": "a.png", "text": "a"}, {"file_name": "b.png", "text": "b"}])
    (root / "metadata.csv").write_text("file_name,text\na.png,a\nb.png,b\n")
    return root


def _setup_bad_json(root: Path) -> Path:
    _two_images(root)
    (root / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a"}\n{"file_name": "b.png", text}\n')
    return root


def _setup_no_caption_column(root: Path) -> Path:
    _two_images(root)
    write_jsonl(root, [{"file_name": "a.png", "prompt": "a"}, {"file_name": "b.png", "prompt": "b"}])
    return root


def _setup_no_image_column(root: Path) -> Path:
    _two_images(root)
    write_jsonl(root, [{"path": "a.png", "text": "a"}, {"path": "b.png", "text": "b"}])
    return root


def _setup_ghost_file(root: Path) -> Path:
    _two_images(root)
    write_jsonl(root, [{"file_name": "a.png", "text": "a"}, {"file_name": "ghost.png", "text": "g"}])
    return root


def _setup_ghost_file_csv(root: Path) -> Path:
    _two_images(root)
    (root / "metadata.csv").write_text("file_name,text\na.png,a\nb.png,b\nghost.png,g\n")
    return root


def _setup_unlisted_image(root: Path) -> Path:
    _two_images(root)
    write_jsonl(root, [{"file_name": "a.png", "text": "a"}])
    return root


def _setup_null_caption(root: Path) -> Path:
    _two_images(root)
    write_jsonl(root, [{"file_name": "a.png", "text": "a"}, {"file_name": "b.png", "text": None}])
    return root


def _setup_absent_caption(root: Path) -> Path:
    _two_images(root)
    write_jsonl(root, [{"file_name": "a.png", "text": "a"}, {"file_name": "b.png"}])
    return root


def _setup_missing_sidecar(root: Path) -> Path:
    _two_images(root)
    (root / "a.txt").write_text("a")
    return root


def _setup_duplicate_rows(root: Path) -> Path:
    _two_images(root)
    write_jsonl(
        root,
        [{"file_name": "a.png", "text": "a"}, {"file_name": "b.png", "text": "b"}, {"file_name": "a.png", "text": "c"}],
    )
    return root


def _setup_fake_image(root: Path) -> Path:
    save(root / "a.png")
    (root / "fake.png").write_bytes(b"this is not a png")
    (root / "a.txt").write_text("a")
    (root / "fake.txt").write_text("f")
    return root


def _setup_stray_metadata(root: Path) -> Path:
    save(root / "sub" / "a.png")
    write_jsonl(root / "sub", [{"file_name": "a.png", "text": "a"}])
    return root


def _setup_escape_root(root: Path) -> Path:
    save(root / "a.png")
    write_jsonl(root, [{"file_name": "../a.png", "text": "a"}])
    return root


ERROR_CASES: list[tuple[Callable[[Path], Path], dict, list[str]]] = [
    (_setup_missing_root, {}, ["nope", "does not exist"]),
    (_setup_file_root, {}, ["single.png", "not a directory"]),
    (_setup_no_images, {}, ["no images", ".png"]),
    (_setup_both_metadata, {}, ["metadata.jsonl", "metadata.csv", "ambiguous"]),
    (_setup_bad_json, {}, ["metadata.jsonl line 2", "not valid JSON"]),
    (_setup_no_caption_column, {}, ["'text'", "'prompt'", "caption_column=", "--caption-column"]),
    (_setup_no_caption_column, {"caption_column": "caption"}, ["'caption'", "'prompt'", "--caption-column"]),
    (_setup_no_image_column, {}, ["'file_name'", "'path'", "image_column=", "--image-column"]),
    (_setup_ghost_file, {}, ["metadata.jsonl line 2", "ghost.png", "does not exist"]),
    (_setup_ghost_file_csv, {}, ["metadata.csv line 4", "ghost.png", "does not exist"]),
    (_setup_unlisted_image, {}, ["b.png", "no row"]),
    (_setup_null_caption, {}, ["line 2", "'b.png'", "missing or null"]),
    (_setup_absent_caption, {}, ["line 2", "'b.png'", "missing or null"]),
    (_setup_missing_sidecar, {}, ["b.png", "expected b.txt", "metadata.jsonl"]),
    (_setup_duplicate_rows, {}, ["line 3", "'a.png'", "first at line 1"]),
    (_setup_fake_image, {}, ["fake.png", "not a readable image"]),
    (_setup_stray_metadata, {}, ["sub/metadata.jsonl", "dataset root"]),
    (_setup_escape_root, {}, ["../a.png", "relative"]),
]


@pytest.mark.parametrize(("setup", "kwargs", "needles"), ERROR_CASES, ids=[c[0].__name__[7:] for c in ERROR_CASES])
def test_folder_errors_name_the_problem(tmp_path: Path, setup, kwargs: dict, needles: list[str]) -> None:
    root = setup(tmp_path)
    with pytest.raises(DataError) as info:
        ImageCaptionFolder(root, TF, **kwargs)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


def test_undecodable_image_names_file_and_pillow_error(tmp_path: Path) -> None:
    path = save(tmp_path / "trunc.png", noise(64, 64))
    path.write_bytes(path.read_bytes()[:200])  # header survives, pixel data does not
    ds = ImageCaptionList([path], ["t"], TF)  # header check passes
    with pytest.raises(DataError, match=r"trunc\.png.*(truncated|OSError)"):
        ds[0]
    with pytest.raises(DataError, match=r"trunc\.png"):
        ImageCaptionList([path], ["t"], TF, preload=True)


def test_list_and_transform_validation(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="2 images but 1 captions"):
        ImageCaptionList([noise(), noise()], ["one"], TF)
    for bad in (0, -3, 2.5, True, "64"):
        with pytest.raises(DataError, match="resolution"):
            ImageTransform(bad)  # type: ignore[arg-type]
    ds = ImageCaptionList([noise(), str(save(tmp_path / "p.png"))], ["mem", "path"], TF)
    assert ds.source(0) == "<memory:0>" and ds.source(1).endswith("p.png")
    with pytest.raises(IndexError):
        ds[2]


# ------------------------------------------------------------------------------------------- transform


def test_output_shape_dtype_range_and_resize() -> None:
    tf = ImageTransform(5)
    assert tf.prepare(noise(20, 10)).shape == (5, 10, 3)
    assert tf.prepare(noise(7, 30)).shape == (21, 5, 3)
    out = tf(noise(20, 10))
    assert out.shape == (3, 5, 5) and out.dtype == torch.float32 and out.is_contiguous()
    assert out.min() >= -1.0 and out.max() <= 1.0
    red = tf(Image.new("RGB", (9, 6), (255, 0, 0)))
    assert torch.equal(red, torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1).expand(3, 5, 5))


def test_transparency_composited_on_background() -> None:
    clear_red = Image.new("RGBA", (6, 6), (255, 0, 0, 0))
    assert torch.allclose(TF(clear_red), torch.ones(3, 4, 4), atol=1e-6)
    assert torch.allclose(ImageTransform(4, background=(0, 0, 0))(clear_red), -torch.ones(3, 4, 4))
    la = Image.new("LA", (6, 6), (0, 0))
    assert torch.allclose(TF(la), torch.ones(3, 4, 4))
    pal = Image.new("P", (6, 6), 3)
    pal.putpalette([0, 255, 0] * 256)
    pal.info["transparency"] = 3
    assert torch.allclose(TF(pal), torch.ones(3, 4, 4))
    half = TF(Image.new("RGBA", (6, 6), (0, 0, 0, 128)))  # half-transparent black on white -> mid grey
    assert abs(float(half.mean())) < 0.02


def test_sixteen_bit_and_exif_orientation(tmp_path: Path) -> None:
    white16 = Image.fromarray(np.full((6, 6), 65535, dtype=np.uint16))
    assert torch.allclose(TF(white16), torch.ones(3, 4, 4))
    img = noise(8, 4)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    img.save(tmp_path / "rot.png", exif=exif)
    assert ImageCaptionList([tmp_path / "rot.png"], ["r"], TF).load_image(0).size == (4, 8)


def test_augmentation_is_deterministic_and_varied() -> None:
    tf = ImageTransform(6, center_crop=False, random_flip=True)
    img = noise(13, 9)
    assert torch.equal(tf(img, 7), tf(img, 7))
    assert tf.draw(None) == Augment(flip=False, crop_y=0.5, crop_x=0.5)
    draws = [tf.draw(s) for s in range(20)]
    assert {d.flip for d in draws} == {True, False}
    assert len({(d.crop_y, d.crop_x) for d in draws}) == 20
    assert all(0.0 <= d.crop_y <= 1.0 and 0.0 <= d.crop_x <= 1.0 for d in draws)
    # crop offsets index the prepared array at the drawn position
    prepared = tf.prepare(img)
    left = tf.apply(prepared, Augment(crop_x=0.0, crop_y=0.0))
    right = tf.apply(prepared, Augment(crop_x=1.0, crop_y=1.0))
    expect = torch.from_numpy(prepared.transpose(2, 0, 1).copy()).float() / 127.5 - 1
    assert torch.equal(left, expect[:, :6, :6]) and torch.equal(right, expect[:, -6:, -6:])
    # toggling flip does not shift the crop stream
    no_flip = ImageTransform(6, center_crop=False, random_flip=False)
    assert [(d.crop_y, d.crop_x) for d in draws] == [(e.crop_y, e.crop_x) for e in map(no_flip.draw, range(20))]


def test_flip_mirrors_and_disabled_flip_never_flips() -> None:
    tf = ImageTransform(6, random_flip=True)
    img = noise(11, 8)
    draws = {tf.draw(s).flip: s for s in range(20)}
    flipped, plain = tf(img, draws[True]), tf(img, draws[False])
    assert torch.equal(plain, tf(img))  # center crop, no flip == no augmentation
    assert torch.equal(flipped, torch.flip(plain, dims=[2]))
    assert not torch.equal(flipped, plain)
    off = ImageTransform(6, random_flip=False)
    assert not any(off.draw(s).flip for s in range(50))
    assert all(torch.equal(off(img, s), plain) for s in range(5))


# ------------------------------------------------------------------------------------------- dataset


def _folder(root: Path, sizes: list[tuple[int, int]]) -> Path:
    for n, (w, h) in enumerate(sizes):
        save(root / f"{n}.png", noise(w, h, seed=n))
        (root / f"{n}.txt").write_text(f"caption {n}")
    return root


def test_preload_matches_lazy_exactly(tmp_path: Path) -> None:
    root = _folder(tmp_path, [(13, 9), (9, 17), (6, 6)])
    tf = ImageTransform(6, center_crop=False, random_flip=True)
    lazy, eager = ImageCaptionFolder(root, tf), ImageCaptionFolder(root, tf, preload=True)
    assert eager.preloaded and not lazy.preloaded
    for i in range(3):
        for seed in (None, 0, 1, 2, 3):
            assert torch.equal(lazy.example(i, seed)["pixel_values"], eager.example(i, seed)["pixel_values"])
    sub = eager.subset([2, 0])
    assert type(sub) is ImageCaptionFolder and sub.preloaded and sub.transform is tf
    assert sub.captions == ["caption 2", "caption 0"] and len(eager) == 3
    assert torch.equal(sub.example(1, 5)["pixel_values"], lazy.example(0, 5)["pixel_values"])
    assert [e["file"] for e in sub.manifest()] == ["2.png", "0.png"]


def test_collate(tmp_path: Path) -> None:
    ds = ImageCaptionFolder(_folder(tmp_path, [(8, 8), (9, 5)]), TF)
    batch = ImageCaptionDataset.collate([ds.example(1, 3), ds.example(0, 4)])
    assert batch["pixel_values"].shape == (2, 3, 4, 4)
    assert batch["caption"] == ["caption 1", "caption 0"]
    assert batch["index"].dtype == torch.long and batch["index"].tolist() == [1, 0]
    generic = collate_examples([{"latents": torch.zeros(4, 2, 2), "seed": 9, "meta": None}] * 3)
    assert generic["latents"].shape == (3, 4, 2, 2) and generic["seed"].tolist() == [9, 9, 9]
    assert generic["meta"] == [None, None, None]
    with pytest.raises(DataError, match="latents"):
        collate_examples([{"latents": torch.zeros(2)}, {"latents": torch.zeros(3)}])
    with pytest.raises(DataError):
        collate_examples([])


def test_write_imagefolder_round_trip_and_overwrite(tmp_path: Path) -> None:
    images = [noise(7, 5, seed=1), noise(5, 9, seed=2), Image.new("RGBA", (6, 6), (255, 0, 0, 0))]
    captions = ["one", "twö, \"quoted\"\u2028line", ""]
    dest = write_imagefolder(tmp_path / "cache", images, captions)
    loaded = ImageCaptionFolder(dest, TF)
    assert loaded.captions == captions
    in_memory = ImageCaptionList(images, captions, TF)
    for i in range(3):
        assert torch.equal(loaded[i]["pixel_values"], in_memory[i]["pixel_values"])

    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    with pytest.raises(DataError, match="already exists"):
        write_imagefolder(dest, images[:1], ["new"])
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no partial sibling left behind

    write_imagefolder(dest, images[:1], ["new"], names=["sub/first"], overwrite=True)
    assert ImageCaptionFolder(dest, TF).captions == ["new"]
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*.png")) == ["sub/first.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]

    (tmp_path / "mine").mkdir()
    with pytest.raises(DataError, match="refusing to overwrite"):
        write_imagefolder(tmp_path / "mine", images[:1], ["x"], overwrite=True)
    with pytest.raises(DataError, match="collide"):
        write_imagefolder(tmp_path / "dup", images[:2], ["a", "b"], names=["A.png", "a"])
    assert not (tmp_path / "dup").exists()


def test_manifest_hashes_track_content(tmp_path: Path) -> None:
    root = _folder(tmp_path, [(6, 6), (7, 7)])
    first = ImageCaptionFolder(root, TF).manifest()
    assert first[0]["sha256"] == hashlib.sha256((root / "0.png").read_bytes()).hexdigest()
    assert first[0]["caption"] == "caption 0"
    save(root / "1.png", noise(7, 7, seed=99))
    second = ImageCaptionFolder(root, TF).manifest()
    assert second[0] == first[0] and second[1]["sha256"] != first[1]["sha256"]
    img = noise(3, 3)
    [entry] = ImageCaptionList([img], ["m"], TF).manifest()
    assert entry == {
        "file": "<memory:0>",
        "caption": "m",
        "sha256": hashlib.sha256(img.convert("RGBA").tobytes()).hexdigest(),
    }
