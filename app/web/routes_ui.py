"""The console's page: GET /ui and its assets under /ui/ (HTML, CSS, plain
JavaScript modules, an SVG icon), shipped as package data in
app/web/console/ and read once at import; /favicon.ico is the same icon.
Open to anyone, like /health: static files only, never data (the page
fetches that from /console/, routes_console, with the user's token).

No file outside the shipped set is ever served: the names are a fixed
table, so a path like /ui/../app.py has nothing to match. The content
security policy keeps the page to its own origin: nothing loads from
anywhere else, even if a future edit tried.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

router = APIRouter(tags=["console"], include_in_schema=False)

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    # A node upgraded in place serves its new page at once; the files are a few kB.
    "cache-control": "no-cache",
}


def _load() -> dict[str, tuple[bytes, str]]:
    folder = resources.files("app.web") / "console"
    assets = {}
    for entry in folder.iterdir():
        suffix = entry.name[entry.name.rfind(".") :]
        if entry.is_file() and suffix in CONTENT_TYPES:
            assets[entry.name] = (entry.read_bytes(), CONTENT_TYPES[suffix])
    return assets


ASSETS = _load()


def _asset(name: str) -> Response:
    found = ASSETS.get(name)
    if found is None:
        return JSONResponse({"error": f"no console file {name!r}"}, status_code=404)
    body, content_type = found
    return Response(body, media_type=content_type, headers=SECURITY_HEADERS)


@router.get("/ui")
@router.get("/ui/")
async def page() -> Response:
    return _asset("index.html")


@router.get("/ui/{name}")
async def asset(name: str) -> Response:
    return _asset(name)


@router.get("/favicon.ico")
async def favicon() -> Response:
    return _asset("favicon.svg")
