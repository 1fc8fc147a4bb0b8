"""Uploads are checked before a job is queued: each bad archive gets a 4xx naming the file, and nothing is
left behind (no job row, no job folder)."""

from __future__ import annotations

import json
import stat
import zipfile

import pytest

pytest.importorskip("fastapi")

from service_helpers import Api, api, dataset_members, guarded_model, make_zip, png_bytes, service_config  # noqa: E402,F401


def _symlink_zip() -> bytes:
    import io

    members = dataset_members()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        link = zipfile.ZipInfo("4.png")
        link.create_system = 3
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    return buf.getvalue()


def _with(extra: dict[str, bytes], drop: tuple[str, ...] = ()) -> bytes:
    members = {k: v for k, v in dataset_members().items() if k not in drop}
    members.update(extra)
    return make_zip(members)


def _metadata_without(missing: int) -> bytes:
    members = dataset_members()
    rows = [json.loads(r) for r in members["metadata.jsonl"].decode().splitlines()]
    members["metadata.jsonl"] = "\n".join(json.dumps(r) for r in rows if r["file_name"] != f"{missing}.png").encode()
    return make_zip(members)


def _sidecars_without(missing: int) -> bytes:
    members = {k: v for k, v in dataset_members().items() if k != "metadata.jsonl"}
    for i in range(4):
        if i != missing:
            members[f"{i}.txt"] = b"a red cat"
    return make_zip(members)


def _image_as(fmt: str) -> bytes:
    """A small image encoded as `fmt` (a format Pillow writes but the service does not decode)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format=fmt)
    return buf.getvalue()


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"

BAD_UPLOADS = {
    "tiff named .png": (_with({"4.png": _image_as("TIFF")}), 400, "4.png", "not a decodable image"),
    "eps named .png": (_with({"4.png": EPS}), 400, "4.png", "not a decodable image"),
    "traversal": (_with({"../evil.png": png_bytes()}), 400, "../evil.png", "traversal"),
    "nested traversal": (_with({"imgs/../../evil.png": png_bytes()}), 400, "imgs/../../evil.png", "traversal"),
    "absolute": (_with({"/tmp/evil.png": png_bytes()}), 400, "/tmp/evil.png", "absolute"),
    "windows absolute": (_with({"C:/evil.png": png_bytes()}), 400, "C:/evil.png", "absolute"),
    "symlink": (_symlink_zip(), 400, "4.png", "symbolic link"),
    "bomb by ratio": (_with({"big.bmp": bytes(3 << 19)}), 400, "big.bmp", "compression ratio"),
    "bomb by total size": (make_zip({**dataset_members(), "big.bmp": bytes(3 << 20)}, zipfile.ZIP_STORED), 413,
                           "inflates", "limit"),
    "non-image": (_with({"run.sh": b"#!/bin/sh\nrm -rf /\n"}), 400, "run.sh", "not an image"),
    "undecodable image": (_with({"4.png": b"\x89PNG\r\n\x1a\n not really"}), 400, "4.png", "not a decodable image"),
    "oversized image": (_with({"0.png": png_bytes(side=64)}), 400, "0.png", "pixels"),
    "missing caption (metadata)": (_metadata_without(2), 400, "2.png", "no row"),
    "missing caption (sidecar)": (_sidecars_without(1), 400, "1.png", "no caption"),
    "not a zip": (b"this is not an archive", 400, "zip", "not a readable zip"),
    "no images": (make_zip({"metadata.jsonl": b""}), 400, "no images", "no images"),
}


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_bad_upload_is_refused_naming_the_file_and_leaves_nothing(service_config, case):
    archive, status, name, why = BAD_UPLOADS[case]
    api = Api(service_config(max_uncompressed_bytes=2 << 20, max_image_pixels=40 * 40))
    headers = api.key()
    r = api.submit(headers, archive)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_training_file"
    assert name in err["message"] and why in err["message"], err["message"]
    assert api.jobs_in_db() == 0
    assert api.job_folders() == []
    assert api.client.get("/v1/fine-tunes", headers=headers).json()["data"] == []


def test_upload_over_the_size_limit_is_413_before_anything_is_stored(service_config):
    api = Api(service_config(max_upload_bytes=20_000))
    r = api.submit(api.key(), make_zip({**dataset_members(), "pad.bmp": bytes(100_000)}, zipfile.ZIP_STORED))
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "upload_too_large"
    assert api.jobs_in_db() == 0 and api.job_folders() == []


def test_folder_wrapped_archive_with_finder_junk_is_accepted(api):
    members = dataset_members(prefix="my-set/")
    members["__MACOSX/my-set/._0.png"] = b"junk"
    members["my-set/.DS_Store"] = b"junk"
    r = api.submit(api.key(), make_zip(members))
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["status"] == "queued"
    assert job["training_files"]["images"] == 4
    data = api.cfg.root / "jobs" / job["id"] / "data"
    assert sorted(p.name for p in data.iterdir()) == ["0.png", "1.png", "2.png", "3.png", "metadata.jsonl"]


def test_extract_upload_refuses_a_member_that_inflates_past_its_header(tmp_path, service_config):
    """A lying header (declared small, inflating big) is caught by counting the bytes actually written."""
    from freezeasguard.service.uploads import UploadError, extract_upload

    cfg = service_config(max_uncompressed_bytes=200_000)
    path = tmp_path / "liar.zip"
    path.write_bytes(make_zip({**dataset_members(), "pad.bmp": bytes(300_000)}))
    raw = bytearray(path.read_bytes())
    # Patch the declared uncompressed size of pad.bmp (local header and central directory) to 10 bytes.
    for sig, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        start = 0
        while (i := raw.find(sig, start)) >= 0:
            name_len_at = i + (26 if sig == b"PK\x03\x04" else 28)
            name_len = int.from_bytes(raw[name_len_at:name_len_at + 2], "little")
            name_at = i + (30 if sig == b"PK\x03\x04" else 46)
            if raw[name_at:name_at + name_len] == b"pad.bmp":
                raw[i + offset:i + offset + 4] = (10).to_bytes(4, "little")
            start = i + 4
    path.write_bytes(bytes(raw))
    dest = tmp_path / "out"
    with pytest.raises(UploadError, match="pad.bmp"):
        extract_upload(path, dest, cfg)
    assert not dest.exists()
