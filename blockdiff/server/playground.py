"""The live playground: a static page at `/` that drives the API with step events.

Plain HTML, CSS and JavaScript shipped in static/ (no build step, no CDN: the page must work
on an offline machine). The page talks to the public API only, with `return_steps`, so it
needs no private endpoint and shows exactly what any client could see.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"


def mount_playground(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})
