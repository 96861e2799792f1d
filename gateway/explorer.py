"""``GET /docs``: an interactive explorer of ``/openapi.json``, and the assets it runs on.

This module owns the ``/docs`` page and ``GET /docs/assets/{name}``. The page
runs Swagger UI, whose script, style sheet and icon come from the installed
``swagger-ui-py`` package (a main dependency): deployments may have no
internet, so the page names no other origin. Its own start-up code is served
as an asset too, never inline, so the page keeps to a Content-Security-Policy
that allows scripts from this origin only. Without JavaScript (``<noscript>``)
the page is a table of the routes with a link to ``/openapi.json``, as
``/docs`` was before it had an explorer.

It must never reference anything outside this origin (no CDN, no Swagger
validator), never serve a file of the package that is not in ``ASSETS``
(the name is looked up, never joined to a path), and never build the
OpenAPI document itself (``gateway.openapi`` does and hands it over).
"""

import functools
import hashlib
import html
import importlib.util
import logging
from pathlib import Path
from typing import Any, Final, NamedTuple

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.web_request import BaseRequest

logger = logging.getLogger("slotengine.gateway")

DOCS_PATH: Final = "/docs"
ASSETS_PATH: Final = "/docs/assets"
# The package whose files the explorer runs on (``pyproject.toml`` says why).
SWAGGER_UI_PACKAGE: Final = "swagger_ui"
# Our start-up code: Swagger UI on /openapi.json, without the Swagger
# validator (a call to another origin) or the standalone preset's URL bar
# (which would load any document a visitor types).
START_SCRIPT: Final = """\
"use strict";
window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",
    validatorUrl: null,
  });
});
"""
# The route table's looks, for browsers without JavaScript.
TABLE_STYLE: Final = (
    "noscript{font-family:sans-serif}"
    "noscript table{border-collapse:collapse;margin:1em 2em}"
    "noscript td,noscript th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left}"
)
# The gateway sets no Content-Security-Policy; the page sets its own, and
# allows this origin only: scripts, styles and calls from it, and data: images,
# the icons Swagger UI's style sheet carries (with every operation and model
# open, the page asks for nothing else: checked in a headless Chromium).
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# The page names each asset with its digest (``?v=``), so a new version of the
# package is fetched at once; an unchanged one may be kept a day, then
# revalidated with its ETag.
ASSET_CACHE_CONTROL: Final = "public, max-age=86400"


class Asset(NamedTuple):
    body: bytes
    content_type: str
    etag: str


# name -> (the package's static file, or None for START_SCRIPT / TABLE_STYLE; content type)
ASSETS: Final[dict[str, tuple[str | None, str]]] = {
    "swagger-ui.css": ("swagger-ui.css", "text/css"),
    "swagger-ui-bundle.js": ("swagger-ui-bundle.js", "text/javascript"),
    "favicon-32x32.png": ("favicon-32x32.png", "image/png"),
    "docs.js": (None, "text/javascript"),
    "docs.css": (None, "text/css"),
}
_OWN_ASSETS: Final = {"docs.js": START_SCRIPT, "docs.css": TABLE_STYLE}


def swagger_ui_static() -> Path | None:
    """The folder of Swagger UI's files in the installed package, if it is installed.

    Found without importing the package (its ``__init__`` loads templating
    this gateway does not use).
    """
    spec = importlib.util.find_spec(SWAGGER_UI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    static = Path(next(iter(spec.submodule_search_locations))) / "static"
    return static if static.is_dir() else None


@functools.cache
def load_assets() -> dict[str, Asset] | None:
    """Every asset, read once per process; None when the package is missing."""
    static = swagger_ui_static()
    if static is None:
        return None
    assets = {}
    for name, (file_name, content_type) in ASSETS.items():
        if file_name is None:
            body = _OWN_ASSETS[name].encode("utf-8")
        else:
            try:
                body = (static / file_name).read_bytes()
            except OSError:
                return None
        etag = f'"{hashlib.sha256(body).hexdigest()[:20]}"'
        assets[name] = Asset(body, content_type, etag)
    return assets


class _AssetResponse(web.Response):
    """An asset's answer, which says how long it may be kept.

    The gateway's middleware stamps its security headers, ``Cache-Control:
    no-store`` among them, on every answer a handler returns; an asset is the
    same bytes for as long as this process serves it, so its caching header is
    set as the answer is sent, after the stamp.
    """

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        self.headers["Cache-Control"] = ASSET_CACHE_CONTROL
        return await super().prepare(request)


def _url(name: str, asset: Asset) -> str:
    return f"{ASSETS_PATH}/{name}?v={asset.etag.strip(chr(34))}"


def render_docs(document: dict[str, Any], assets: dict[str, Asset] | None) -> str:
    """The ``/docs`` page: the explorer, and the route table for browsers without JavaScript."""
    rows = []
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            statuses = ", ".join(operation["responses"])
            rows.append(
                f"<tr><td><code>{method.upper()}</code></td><td><code>{html.escape(path)}"
                f"</code></td><td>{html.escape(operation['summary'])}</td>"
                f"<td>{html.escape(operation['description'])}</td><td>{statuses}</td></tr>"
            )
    version = html.escape(document["info"]["version"])
    table = (
        f"<h1>slotengine API {version}</h1>"
        "<p>The machine-readable document is <a href='/openapi.json'>/openapi.json</a>.</p>"
        "<table><tr><th>method</th><th>path</th><th>what</th><th>who</th><th>statuses</th></tr>"
        + "".join(rows)
        + "</table>"
    )
    head = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>slotengine API {version}</title>"
    )
    if assets is None:
        # Without the package: the table alone, as /docs was before the explorer.
        return f"{head}</head><body>{table}</body></html>"
    return (
        f"{head}<link rel='icon' type='image/png' "
        f"href='{_url('favicon-32x32.png', assets['favicon-32x32.png'])}'>"
        f"<link rel='stylesheet' href='{_url('swagger-ui.css', assets['swagger-ui.css'])}'>"
        f"<link rel='stylesheet' href='{_url('docs.css', assets['docs.css'])}'>"
        f"</head><body><noscript>{table}</noscript><div id='swagger-ui'></div>"
        f"<script src='{_url('swagger-ui-bundle.js', assets['swagger-ui-bundle.js'])}'></script>"
        f"<script src='{_url('docs.js', assets['docs.js'])}'></script>"
        "</body></html>"
    )


def add_docs(app: web.Application, document: dict[str, Any]) -> None:
    """Serve ``/docs`` and its assets for ``document`` (``/openapi.json``'s)."""
    assets = load_assets()
    if assets is None:
        logger.warning(
            "the package swagger-ui-py is not installed: /docs lists the routes without"
            " the interactive explorer (pip install swagger-ui-py)"
        )
    page = render_docs(document, assets)

    async def docs(_: web.Request) -> web.Response:
        response = web.Response(text=page, content_type="text/html")
        response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        return response

    async def asset(request: web.Request) -> web.Response:
        found = None if assets is None else assets.get(request.match_info["name"])
        if found is None:
            raise web.HTTPNotFound()
        headers = {"ETag": found.etag}
        if found.etag in request.headers.get("If-None-Match", ""):
            return _AssetResponse(status=304, headers=headers)
        charset = None if found.content_type.startswith("image/") else "utf-8"
        return _AssetResponse(
            body=found.body, content_type=found.content_type, charset=charset, headers=headers
        )

    app.router.add_get(DOCS_PATH, docs)
    app.router.add_get(ASSETS_PATH + "/{name}", asset)
