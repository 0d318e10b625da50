"""Swagger UI and ReDoc served from files installed with the package, never from a CDN: a
plant network often has no internet, and the pages would load blank."""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs-assets"
# The browser may load nothing from elsewhere: ReDoc's footer links a logo on its CDN, which a
# plant network without internet would wait for. Inline script and style are the pages' own;
# blob: workers are ReDoc's search, data: and blob: images the pages' heatmaps and previews.
SAME_ORIGIN_ONLY = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; worker-src 'self' blob:"
}


def add_docs(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc, with their scripts under /docs-assets."""
    folder = files("fastapi_offline") / "static"
    app.mount(ASSETS, StaticFiles(directory=str(folder)), name="docs-assets")
    router = APIRouter(include_in_schema=False)
    spec, title, icon = (
        app.openapi_url or "/openapi.json",
        f"{app.title} - API",
        ASSETS + "/favicon.png",
    )

    @router.get("/docs")
    async def swagger() -> HTMLResponse:
        return _same_origin_only(
            get_swagger_ui_html(
                openapi_url=spec,
                title=title,
                swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
                swagger_css_url=f"{ASSETS}/swagger-ui.css",
                swagger_favicon_url=icon,
                # Swagger UI would otherwise ask validator.swagger.io for a badge.
                swagger_ui_parameters={"validatorUrl": None},
            )
        )

    @router.get("/redoc")
    async def redoc() -> HTMLResponse:
        return _same_origin_only(
            get_redoc_html(
                openapi_url=spec,
                title=title,
                redoc_js_url=f"{ASSETS}/redoc.standalone.js",
                redoc_favicon_url=icon,
                with_google_fonts=False,
            )
        )

    app.include_router(router)


def _same_origin_only(page: HTMLResponse) -> HTMLResponse:
    page.headers.update(SAME_ORIGIN_ONLY)
    return page
