"""`numallm serve`: an OpenAI-compatible HTTP server over one loaded model.

    scheduler.py  up to --parallel sessions decode, a bounded queue, slots freed between steps
    app.py        FastAPI routes: /v1/models, /v1/chat/completions, /v1/completions, /health, /metrics
    protocol.py   request bodies (pydantic) and the response / chunk dicts OpenAI clients parse
    metrics.py    Prometheus text

The web dependencies (FastAPI, uvicorn, sse-starlette) come with `pip install 'numallm[serve]'`;
importing `app` without them raises ModuleNotFoundError, which `numallm serve` turns into one line.
"""
from __future__ import annotations

from .scheduler import Job, OverloadedError, Scheduler, ShuttingDownError

__all__ = ["Job", "OverloadedError", "Scheduler", "ShuttingDownError"]
