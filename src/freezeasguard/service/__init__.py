"""The publisher's guarded fine-tuning service: `freezeasguard serve` (HTTP API) and `freezeasguard worker`.

Needs the `serve` extra (FastAPI, uvicorn, SQLAlchemy, python-multipart): `pip install 'freezeasguard[serve]'`.
Nothing is imported here, so `import freezeasguard.service.config` stays light; the web stack loads in
`service.api`, the database layer in `service.db`.

Layout: the API process validates uploads and writes job rows; worker processes claim queued jobs from the
database table with one atomic UPDATE (a lease renewed by a heartbeat), run `finetune` under the publisher's
guard, check the result with `verify`, and only then publish the artefacts.
"""

SERVE_EXTRA_MODULES = ("fastapi", "uvicorn", "sqlalchemy", "python_multipart")


def require_serve_extra() -> None:
    """Raise ImportError naming the extra to install when the web stack is missing."""
    import importlib

    missing = []
    for name in SERVE_EXTRA_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"the fine-tuning service needs {', '.join(missing)}: "
                          "install the 'serve' extra: pip install 'freezeasguard[serve]'")
