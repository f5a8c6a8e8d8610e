"""Start the service under uvicorn (``orchestrator serve`` and ``make serve``)."""

from __future__ import annotations

import uvicorn

from orchestrator.app import create_app
from orchestrator.logs import configure_logging
from orchestrator.settings import Settings


def serve(settings: Settings | None = None) -> None:
    settings = settings or Settings()
    configure_logging(settings.log_level, settings.log_json)
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                timeout_graceful_shutdown=10)
