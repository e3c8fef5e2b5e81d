"""A real uvicorn process serving the production HTTP app (`cli.composition.build_http_app`)
over a given index, for the memory tests: ``python -m tests.serving.http_server CONFIG.json``
with ``{"database_url", "port", "spool": DIR or null, "http": {HttpSettings keys}}``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import uvicorn

from cli.composition import build_http_app
from core.settings import HttpSettings
from dicom_node.ingest import Ingest
from store.index import Index
from store.spool import Spool
from workspace.app import ApiContext
from workspace.metrics import Metrics


def main(config_path: str) -> None:
    config = json.loads(Path(config_path).read_text())
    index = Index(config["database_url"])
    ingest = Ingest(Spool(Path(config["spool"]), 0), index) if config.get("spool") else None
    http = HttpSettings(**config.get("http", {}))
    ctx = ApiContext(index=index, metrics=Metrics(), ingest=ingest, http=http)
    uvicorn.run(build_http_app(ctx), host="127.0.0.1", port=config["port"], log_level="warning")


if __name__ == "__main__":
    main(sys.argv[1])
