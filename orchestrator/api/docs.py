"""``/docs``: Swagger UI served from this process, not from a CDN.

FastAPI's default page loads Swagger UI's script and stylesheet from jsDelivr, so on a machine
without internet (or behind a strict proxy) ``/docs`` is a blank page. The assets come instead
from the PyPI package ``swagger-ui-bundle-v2`` (Swagger UI 5, which reads OpenAPI 3.1 as FastAPI
writes it) and are mounted under ``/docs/static``. ReDoc has no such package, so it is off: one
documentation page that works everywhere rather than two of which one is blank offline. No
OAuth2 redirect page either: the API's keys are bearer tokens typed into "Authorize".
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

DOCS_URL = "/docs"
STATIC_URL = "/docs/static"


def install(app: FastAPI) -> None:
    """Serve Swagger UI at ``/docs`` with local assets; the app must be built with
    ``docs_url=None, redoc_url=None`` so that FastAPI's CDN page is not registered first."""
    assert app.docs_url is None and app.redoc_url is None, "build the app with docs_url=None, redoc_url=None"
    app.mount(STATIC_URL, StaticFiles(directory=str(swagger_ui_path)), name="swagger-ui")

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{STATIC_URL}/swagger-ui-bundle.js", swagger_css_url=f"{STATIC_URL}/swagger-ui.css",
            swagger_favicon_url=f"{STATIC_URL}/favicon-32x32.png", oauth2_redirect_url=None,
            swagger_ui_parameters={"validatorUrl": None})  # no badge fetched from validator.swagger.io
