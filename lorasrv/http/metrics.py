"""`GET /metrics` (Prometheus text) and the middleware that counts HTTP requests by route/status.

The instruments live in `lorasrv.metrics` (the engine's own registry); this module only reads the
scheduler and adapter snapshots at scrape time and renders.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from lorasrv.errors import LorasrvError
from lorasrv.http.state import ENGINE_KEY
from lorasrv.messages import AdapterStatus
from lorasrv.metrics import CONTENT_TYPE, EngineSnapshot

#: the `status` label of a request whose client vanished before an answer (nginx's convention)
CLIENT_GONE = "499"


async def metrics(request: web.Request) -> web.Response:
    engine = request.app[ENGINE_KEY]
    adapters: tuple[AdapterStatus, ...] = ()
    healthy = engine.is_healthy()
    if healthy:
        try:
            adapters = await engine.describe_adapters()
        except LorasrvError:
            healthy = False  # died between the check and the answer: report what is known
    stats = engine.last_stats
    snapshot = EngineSnapshot(
        num_running=stats.num_running,
        num_waiting=stats.num_waiting + stats.num_acquiring,
        num_kv_pages=stats.num_kv_pages,
        num_kv_pages_used=stats.num_kv_pages_used,
        num_cached_pages=stats.num_cached_pages,
        num_lora_rows=stats.num_lora_rows,
        num_lora_rows_used=stats.num_lora_rows_used,
        lora_capacity=stats.lora_capacity,
        is_healthy=healthy,
        adapters=adapters,
    )
    body = engine.metrics.render(snapshot)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


@web.middleware
async def count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost, so 401s and error bodies are counted too. Routes are templates, not paths."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    status = CLIENT_GONE
    try:
        response = await handler(request)
        status = str(response.status)
        return response
    except web.HTTPException as exc:
        status = str(exc.status)
        raise
    finally:
        counter = request.app[ENGINE_KEY].metrics.http_requests
        counter.labels(request.method, route, status).inc()
