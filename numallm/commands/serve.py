"""`numallm serve MODEL`: an OpenAI-compatible HTTP server (numallm.server)."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from ..errors import NumallmError
from .common import add_model_args, load_model

WEB_DEPS = ("fastapi", "uvicorn", "sse_starlette")


def register(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, ...)")
    add_model_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    g.add_argument("--parallel", "-np", type=int, default=1, metavar="N",
                   help="requests that decode at once, each with its own KV cache of -c tokens "
                        "(default 1)")
    g.add_argument("--max-queue", type=int, default=16, metavar="N",
                   help="requests that may wait for a slot; beyond it: 503 + Retry-After (default 16)")
    g.add_argument("--prefill-chunk", type=int, default=128, metavar="N",
                   help="prompt tokens fed between two decode steps of the running requests "
                        "(default 128): smaller keeps their streams smoother while a long prompt "
                        "comes in, larger prefills it faster")
    g.add_argument("--api-key", default=os.environ.get("NUMALLM_API_KEY"), metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $NUMALLM_API_KEY, "
                        "else none)")
    g.add_argument("--alias", default=None, metavar="NAME",
                   help="model id in /v1/models and responses (default: the file name)")
    g.add_argument("--chat-template-file", default=None, metavar="FILE",
                   help="Jinja chat template to use instead of the model's")
    p.set_defaults(func=serve)


def missing_web_deps() -> list[str]:
    return [m for m in WEB_DEPS if importlib.util.find_spec(m) is None]


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def serve(args) -> int:
    missing = missing_web_deps()
    if missing:
        raise NumallmError(f"numallm serve needs {', '.join(missing)}: pip install 'numallm[serve]'")
    if args.parallel < 1 or args.max_queue < 0 or args.prefill_chunk < 1:
        raise NumallmError("--parallel and --prefill-chunk must be at least 1 and --max-queue 0 or more")
    import uvicorn

    from ..server.app import create_app
    from ..server.scheduler import Scheduler

    loaded = load_model(args, args.chat_template_file, n_seq=args.parallel)
    name = args.alias or Path(loaded.path).name
    scheduler = Scheduler(loaded, args.parallel, args.max_queue, args.prefill_chunk)
    app = create_app(loaded, scheduler, name, args.api_key)
    plan = loaded.plan
    print(f"numallm: serving {name} on http://{args.host}:{args.port}/v1 | context {loaded.n_ctx} "
          f"x {args.parallel} slots: KV cache {_mib(plan.kv_bytes)} ({plan.cache_label}), weights "
          f"{_mib(plan.weight_bytes)} | queue {args.max_queue}"
          f"{' | API key required' if args.api_key else ''}", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=5)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            scheduler.stop()      # in-flight streams end with an error event, queued ones too
            super().handle_exit(sig, frame)

    server = Server(config)
    try:
        server.run()          # SIGINT/SIGTERM: stop accepting, streams cancelled, then return
    finally:
        scheduler.close()
        loaded.close()
    return 0
