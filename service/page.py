"""The operator page at `/`: pick a product, drop part images, see verdicts and heatmaps.

Plain HTML and a little JavaScript from the package's own files: no build step, no CDN.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from service.docs import SAME_ORIGIN_ONLY

router = APIRouter(include_in_schema=False)
PAGE = files("service") / "static" / "operator.html"


@router.get("/", response_class=HTMLResponse)
async def operator_page() -> HTMLResponse:
    return HTMLResponse(PAGE.read_text(encoding="utf-8"), headers=SAME_ORIGIN_ONLY)
