"""A small Python client for the fine-tuning service (`freezeasguard serve`).

    from .client import Client
    c = Client("http://127.0.0.1:8000", api_key="fag_...")
    job = c.submit("data/my-images", method="lora", steps=200)
    job = c.wait(job["id"])
    c.download(job["id"], "downloads/")

Needs `httpx` (in the `serve` and `client` extras). The URL and key default to the environment variables
FREEZEASGUARD_URL and FREEZEASGUARD_API_KEY.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import FreezeAsGuardError

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = ("succeeded", "failed", "cancelled")


class ServiceError(FreezeAsGuardError):
    """The service refused a request; `status`, `code` and `param` come from its error object."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(f"{message} ({code}, HTTP {status})")
        self.status, self.code, self.message, self.param = status, code, message, param


@contextmanager
def zipped(data: str | Path) -> Iterator[Path]:
    """`data` as a zip file: a .zip is used as is, a folder is zipped to a temporary file (hidden files left out)."""
    p = Path(data)
    if p.is_file():
        if not zipfile.is_zipfile(p):
            raise FreezeAsGuardError(f"{p}: not a zip archive; pass an image-caption folder or a .zip of one")
        yield p
        return
    if not p.is_dir():
        raise FreezeAsGuardError(f"{p}: no such folder or zip file")
    fd, tmp = tempfile.mkstemp(suffix=".zip", prefix=f"{p.name}-")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for f in sorted(p.rglob("*")):
                rel = f.relative_to(p)
                if f.is_file() and not f.is_symlink() and not any(part.startswith(".") for part in rel.parts):
                    zf.write(f, rel.as_posix())
        yield Path(tmp)
    finally:
        os.unlink(tmp)


class Client:
    def __init__(self, url: str | None = None, api_key: str | None = None, *, timeout: float = 120.0,
                 transport: Any = None) -> None:
        import httpx

        self.url = (url or os.environ.get("FREEZEASGUARD_URL") or DEFAULT_URL).rstrip("/")
        key = api_key or os.environ.get("FREEZEASGUARD_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            r = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ServiceError(0, "connection_error", f"{self.url}{path}: {exc}") from exc
        if r.status_code >= 400:
            self._raise_for(r)
        return r

    # ---------------------------------------------------------------- API
    def models(self) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/models").json()["data"]

    def submit(self, data: str | Path, *, method: str | None = None, steps: int | None = None,
               batch_size: int | None = None, learning_rate: float | None = None, lora_rank: int | None = None,
               seed: int | None = None) -> dict[str, Any]:
        """Upload `data` (an image-caption folder or a zip of one) and queue a job; unset options take the
        publisher's defaults."""
        fields = {k: str(v) for k, v in (("method", method), ("steps", steps), ("batch_size", batch_size),
                                         ("learning_rate", learning_rate), ("lora_rank", lora_rank),
                                         ("seed", seed)) if v is not None}
        with zipped(data) as archive, open(archive, "rb") as fh:
            name = Path(data).name + ("" if str(data).endswith(".zip") else ".zip")
            return self._call("POST", "/v1/fine-tunes", data=fields,
                              files={"file": (name, fh, "application/zip")}).json()

    def status(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/fine-tunes/{job_id}").json()

    def list(self, limit: int = 20) -> list[dict[str, Any]]:
        return self._call("GET", "/v1/fine-tunes", params={"limit": limit}).json()["data"]

    def events(self, job_id: str, after: int = 0) -> list[dict[str, Any]]:
        return self._call("GET", f"/v1/fine-tunes/{job_id}/events", params={"after": after}).json()["data"]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/fine-tunes/{job_id}/cancel").json()

    def artifacts(self, job_id: str) -> list[dict[str, Any]]:
        return self._call("GET", f"/v1/fine-tunes/{job_id}/artifacts").json()["data"]

    def wait(self, job_id: str, *, poll: float = 2.0, timeout: float | None = None) -> dict[str, Any]:
        """Poll until the job is succeeded, failed or cancelled; returns the final job object."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.status(job_id)
            if job["status"] in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(poll)

    def download(self, job_id: str, out: str | Path, *, overwrite: bool = False) -> list[Path]:
        """Download every artefact of a succeeded job into `out`, checking each file's SHA-256. A file of the
        same name already in `out` is never replaced without `overwrite` (checked before anything is fetched)."""
        dest = Path(out)
        artifacts = self.artifacts(job_id)
        clashes = [Path(a["name"]).name for a in artifacts if (dest / Path(a["name"]).name).exists()]
        if clashes and not overwrite:
            raise FileExistsError(f"{dest}: would replace {', '.join(sorted(clashes))}; choose another folder or "
                                  "pass overwrite=True (--overwrite)")
        dest.mkdir(parents=True, exist_ok=True)
        written = []
        for art in artifacts:
            name = Path(art["name"]).name  # never a path from the server
            target = dest / name
            tmp = dest / f".{name}.part"
            h = hashlib.sha256()
            with self._http.stream("GET", f"/v1/fine-tunes/{job_id}/artifacts/{name}") as r:
                if r.status_code >= 400:
                    r.read()
                    self._raise_for(r)
                with open(tmp, "wb") as fh:
                    for chunk in r.iter_bytes():
                        h.update(chunk)
                        fh.write(chunk)
            if h.hexdigest() != art["sha256"]:
                tmp.unlink()
                raise ServiceError(0, "checksum_mismatch", f"{name}: downloaded bytes do not match the listed SHA-256")
            os.replace(tmp, target)
            written.append(target)
        return written

    @staticmethod
    def _raise_for(r: Any) -> None:
        try:
            err = r.json()["error"]
        except (ValueError, KeyError, TypeError):
            err = {"code": "http_error", "message": r.text[:500]}
        raise ServiceError(r.status_code, err.get("code", "http_error"), err.get("message", ""), err.get("param"))
