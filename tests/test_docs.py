"""``/docs`` works offline: the page references only this service, and each asset it names is served."""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from orchestrator import Settings
from tests.servers import running_server


@pytest.fixture
def backend() -> str:  # the page does not depend on the database
    return "sqlite"


async def test_swagger_ui_is_served_from_the_service_itself(make_settings: Callable[..., Settings]) -> None:
    async with running_server(make_settings()) as base, httpx.AsyncClient(base_url=base, timeout=30) as client:
        page = await client.get("/docs")
        assert page.status_code == 200 and "SwaggerUIBundle" in page.text
        refs = re.findall(r"""(?:src|href)=["']([^"']+)["']|url:\s*'([^']+)'""", page.text)
        urls = [a or b for a, b in refs]
        assert len(urls) >= 4, urls  # stylesheet, icon, script, the OpenAPI document
        assert not re.search(r"https?://", page.text), "the page names a URL outside the service"
        for url in urls:
            absolute = urljoin(f"{base}/docs", url)
            assert urlsplit(absolute).netloc == urlsplit(base).netloc, url
            asset = await client.get(absolute)
            assert asset.status_code == 200 and asset.content, url
        script = await client.get("/docs/static/swagger-ui-bundle.js")
        assert "javascript" in script.headers["content-type"]
        assert (await client.get("/redoc")).status_code == 404  # ReDoc would load from a CDN: off
