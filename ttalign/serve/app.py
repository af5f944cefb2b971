"""The FastAPI app: the OpenAI Images API over an aligned pipeline, health, models, metrics and the playground."""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request

from .metrics import ServerMetrics
from .policy import RequestPolicy
from .protocol import OUTPUT_FORMATS, APIError, Limits, load_json, quote
from .worker import Job, PipelineWorker, WorkerConfig, new_seeds

if TYPE_CHECKING:
    from .labels import LabelService

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


#: Host names that always reach the server: this machine's own.
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
_BEARER = re.compile(r"bearer +(\S+) *", re.IGNORECASE)


def check_api_key(key: str | None) -> None:
    """Refuses (`ValueError`) a key that is empty, blank or holds whitespace (a bearer token cannot carry it)."""
    if key is None:
        return
    if not isinstance(key, str) or not key.strip():
        raise ValueError("The API key is empty or blank: set a real key, or leave it unset to serve without one.")
    if any(c.isspace() for c in key) or not key.isprintable():
        raise ValueError("The API key holds whitespace or control characters, which a bearer token cannot carry.")


@dataclass
class ServeConfig:
    """What the operator decides at start-up; a request can set none of it.

    Args:
        model_name (`str`): the model id the API reports (`GET /v1/models`) and accepts as `model`.
        alignment (`list[str]`): method specs applied to requests that name none (`NAME[:key=value,...]`).
        allow (`list[str]`): the methods requests may ask for, each as a spec whose options the server fixes, e.g.
            `"prompt_rewrite:model=qwen2.5-7b-instruct,base_url=http://127.0.0.1:8001/v1"`; a request sets only the
            options in `ttalign.serve.policy.REQUEST_OPTIONS` on top.
        rewards (`list[str]` or `dict`): rewards loaded at start-up that requests may name: specs
            `NAME[:key=value,...]` (`"vlm_judge:model=qwen2.5-vl-7b,base_url=http://127.0.0.1:8001/v1"`, requests name
            it `vlm_judge`), or a dict of name -> reward; the rewards the server's own specs name are loaded too.
        api_key (`str`, *optional*): when set, every `/v1` route and `/metrics` need `Authorization: Bearer <key>`.
        limits (`Limits`), worker (`WorkerConfig`).
        request_timeout_s (`float`, defaults to 600): a request not answered by then gets 504 and its call stops.
        max_body_bytes (`int`, defaults to 1 MiB): checked on `Content-Length` and while the body is read.
        body_timeout_s (`float`, defaults to 30): the time a client has to send its body.
        allowed_hosts (`list[str]`): `Host` names served besides this machine's own (`"*"`: any).
        cors_origins (`list[str]`): origins whose pages may call the API (CORS); none by default.
        method_cache_size (`int`, defaults to 64): built methods kept (least recently used dropped first).
        call_defaults (`dict`): keyword arguments of every pipeline call (steps, guidance scale).
        label_db (`str`, *optional*): a judgment database (SQLAlchemy URL or SQLite file) for the labelling page at
            `/label`; with `label_images` (the items' image folder) and `label_items` (a JSON-lines items file,
            imported at start-up), see :mod:`ttalign.serve.labels`.
    """

    model_name: str = "ttalign"
    alignment: list[str] = field(default_factory=list)
    allow: list[str] = field(default_factory=list)
    rewards: list[str] | dict = field(default_factory=list)
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    request_timeout_s: float = 600.0
    max_body_bytes: int = 1 << 20
    body_timeout_s: float = 30.0
    allowed_hosts: list[str] = field(default_factory=list)
    cors_origins: list[str] = field(default_factory=list)
    method_cache_size: int = 64
    call_defaults: dict = field(default_factory=dict)
    label_db: str | None = None
    label_images: str | None = None
    label_items: str | None = None

    def __post_init__(self):
        from ttalign.methods import parse_spec
        from ttalign.rewards import REWARDS, reward_spec_name

        names = dict.fromkeys(REWARDS)  # resolves reward names without loading any: checked here, loaded by the app
        if isinstance(self.rewards, dict):
            names.update(self.rewards)
        else:
            for spec in self.rewards:
                names[reward_spec_name(spec)] = None  # an unknown name or a malformed option fails now
        allowed = [parse_spec(spec, rewards=names)[0] for spec in self.allow]  # a bad spec fails now, in one line
        for spec in self.alignment:
            parse_spec(spec, rewards=names)
        if len(set(allowed)) != len(allowed):
            raise ValueError(f"A method is allowed twice: {sorted(allowed)}; give each once.")
        for key in ("request_timeout_s", "body_timeout_s"):
            if not 0 < getattr(self, key) < float("inf"):
                raise ValueError(f"{key} must be a finite number > 0, got {getattr(self, key)!r}.")
        if not isinstance(self.max_body_bytes, int) or self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be an integer >= 1024, got {self.max_body_bytes!r}.")
        if not isinstance(self.method_cache_size, int) or self.method_cache_size < 1:
            raise ValueError(f"method_cache_size must be an integer >= 1, got {self.method_cache_size!r}.")
        check_api_key(self.api_key)
        if (self.label_images or self.label_items) and not self.label_db:
            raise ValueError("--label-images and --label-items need --label-db (where the judgments go).")
        if self.label_db and not (self.label_images and os.path.isdir(self.label_images)):
            raise ValueError(f"--label-db needs --label-images, the items' image folder; got {self.label_images!r}.")
        for origin in self.cors_origins:
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(f"A CORS origin is 'scheme://host[:port]' (or '*'), got {origin!r}.")


def _host_name(value: str) -> str:
    """The name of a `Host` header (or an origin's authority) without its port, lower-cased."""
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:8000
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class _Guard:
    """ASGI middleware in front of every route: the `Host` allow-list (against DNS rebinding), and cross-origin
    browser requests refused unless their origin is configured for CORS (a page on another site cannot drive the
    server; same-origin pages, the playground among them, pass)."""

    def __init__(self, app, hosts: list[str], origins: list[str], metrics: ServerMetrics):
        self.app, self.metrics = app, metrics
        self.any_host = "*" in hosts
        self.hosts = {_host_name(h) for h in (*LOOPBACK_HOSTS, *hosts)}
        self.origins = set(origins)

    def _refusal(self, headers: dict) -> APIError | None:
        host = headers.get("host", "")
        if not self.any_host and _host_name(host) not in self.hosts:
            self.metrics.rejected.labels("invalid_host").inc()
            return APIError(
                400,
                f"The Host {quote(host)} is not served here; an operator adds names with --allowed-host.",
                code="invalid_host",
            )
        origin = headers.get("origin")
        if origin is None or "*" in self.origins or origin in self.origins:
            return None
        same = re.fullmatch(r"https?://([^/]+)", origin)
        if same is not None and same[1].lower() == host.strip().lower():
            return None
        self.metrics.rejected.labels("forbidden_origin").inc()
        return APIError(
            403,
            f"Requests from the origin {quote(origin)} are not allowed; an operator allows origins "
            "with --cors-origin.",
            code="forbidden_origin",
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        error = self._refusal({k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]})
        if error is None:
            return await self.app(scope, receive, send)
        body = json.dumps(error.body()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": error.status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


class _ReplicaHeader:
    """ASGI middleware adding `x-ttalign-replica: <id of this app instance>` to every response."""

    def __init__(self, app, value: str):
        self.app, self.header = app, (b"x-ttalign-replica", value.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        return await self.app(scope, receive, send_with_header)


class _Previews:
    """Carries a streaming job's previews from the worker thread to the event loop of its response."""

    def __init__(self):
        self.loop, self.events, self.early = None, None, []

    def attach(self, loop) -> asyncio.Queue:
        self.loop, self.events = loop, asyncio.Queue()
        for item in self.early:
            self.events.put_nowait(item)
        return self.events

    def __call__(self, step, image) -> None:  # the worker thread
        if self.loop is None:
            self.early.append((step, image))
        else:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (step, image))


def _encode(image, output_format: str) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=OUTPUT_FORMATS[output_format])
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _error_for(err: BaseException) -> APIError:
    """An exception of a request's pipeline call -> its API error (a bad value the pipeline refused is a 400)."""
    if isinstance(err, APIError):
        return err
    message = " ".join(str(err).split())[:500] or type(err).__name__
    if isinstance(err, ValueError):
        return APIError(400, message, code="invalid_value")
    # a method that failed fails the same way again: tell the client not to retry
    return APIError(500, f"{type(err).__name__}: {message}", code="method_failed", headers={"x-should-retry": "false"})


def create_app(pipe, config: ServeConfig | None = None):
    """The server's FastAPI app over `pipe` (an aligned pipeline). The configured rewards are loaded and the method
    specs parsed now (never per request); the pipeline worker starts with the app."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    config = config or ServeConfig()
    metrics = ServerMetrics()
    worker = PipelineWorker(pipe, config.worker, metrics, config.call_defaults)
    policy = RequestPolicy.from_config(config, pipe)

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    labels = None
    if config.label_db:
        from .labels import LabelService

        labels = LabelService(config.label_db, config.label_images, config.label_items)

    app = FastAPI(title="ttalign", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker, app.state.metrics, app.state.config, app.state.policy = worker, metrics, config, policy
    # tells replicas apart (Ray Serve); plain ASGI middlewares, which leave disconnect detection alone
    app.add_middleware(_ReplicaHeader, value=uuid.uuid4().hex[:12])
    if config.cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(_Guard, hosts=list(config.allowed_hosts), origins=list(config.cors_origins), metrics=metrics)

    def error_response(err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def api_error(request, err: APIError):
        return error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, err):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return error_response(APIError(err.status_code, str(err.detail), code=code))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, err):
        return error_response(APIError(400, "Invalid request.", code="invalid_value"))

    @app.exception_handler(Exception)
    async def unexpected(request, err):
        return error_response(APIError(500, f"Internal error: {type(err).__name__}.", code="internal_error"))

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        match = _BEARER.fullmatch(request.headers.get("authorization", ""))  # RFC 6750: "Bearer" 1*SP token
        if match is None:
            metrics.rejected.labels("unauthorized").inc()
            raise APIError(401, "Missing API key: send `Authorization: Bearer <key>`.", code="invalid_api_key")
        if not hmac.compare_digest(match[1].encode(), config.api_key.encode()):
            metrics.rejected.labels("unauthorized").inc()
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def read_body(request: Request) -> bytes:
        """The body as JSON bytes: `Content-Type: application/json` (415 otherwise), at most `max_body_bytes` by
        `Content-Length` and while reading (413), within `body_timeout_s` (408)."""
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            metrics.rejected.labels("unsupported_media_type").inc()
            raise APIError(
                415,
                f"The body must be JSON with `Content-Type: application/json`, got {quote(media)}.",
                code="unsupported_media_type",
            )
        limit = config.max_body_bytes
        too_large = APIError(413, f"The request body is over {limit} bytes.", code="body_too_large")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or len(length) > 12 or int(length) > limit):
            metrics.rejected.labels("body_too_large").inc()
            raise too_large

        async def read() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    metrics.rejected.labels("body_too_large").inc()
                    raise too_large
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            return await asyncio.wait_for(read(), timeout=config.body_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(
                408, f"The request body did not arrive within {config.body_timeout_s:g} s.", code="body_timeout"
            ) from None

    @app.get("/health")
    async def health():
        status = "ok" if worker.alive and not worker.stuck else ("dead" if not worker.alive else "stuck")
        body = {"status": status, "model": config.model_name, "queue_depth": worker.queue_depth}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {
            "object": "list",
            "data": [{"id": config.model_name, "object": "model", "created": 0, "owned_by": "ttalign"}],
        }

    @app.get("/v1/ttalign/methods")
    async def allowed_methods(request: Request):
        authorize(request)
        return policy.describe()

    @app.get("/metrics")
    async def prometheus(request: Request):
        authorize(request)
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        with open(os.path.join(STATIC, "playground.html"), encoding="utf-8") as f:
            return HTMLResponse(f.read())

    def labelling() -> LabelService:
        if labels is None:
            raise APIError(404, "This server collects no judgments (start it with --label-db).", code="not_found")
        return labels

    @app.get("/label", response_class=HTMLResponse)
    async def label_page():
        labelling()
        with open(os.path.join(STATIC, "label.html"), encoding="utf-8") as f:
            return HTMLResponse(f.read())

    @app.get("/v1/label/next")
    async def label_next(request: Request, labeller: str = ""):
        authorize(request)
        return await asyncio.to_thread(labelling().next, labeller)

    @app.get("/v1/label/items/{item_id}/images/{index}")
    async def label_image(request: Request, item_id: int, index: int):
        from fastapi.responses import FileResponse

        authorize(request)
        path, media = await asyncio.to_thread(labelling().image, item_id, index)
        return FileResponse(path, media_type=media, headers={"cache-control": "private, max-age=3600"})

    @app.post("/v1/label/items/{item_id}")
    async def label_record(request: Request, item_id: int):
        authorize(request)
        service = labelling()
        body = load_json(await read_body(request))
        return await asyncio.to_thread(service.record, item_id, body)

    def answered(status: int, start: float) -> None:
        metrics.requests.labels(str(status)).inc()
        metrics.latency.labels(str(status)).observe(time.monotonic() - start)

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        start = time.monotonic()
        try:
            authorize(request)
            admission = policy.admit(load_json(await read_body(request)))
            metrics.cached_methods.set(policy.cached_methods)
        except APIError as err:
            if err.status in (400, 404):
                metrics.rejected.labels("over_budget" if err.code == "over_budget" else "invalid").inc()
            answered(err.status, start)
            return error_response(err)
        req = admission.request
        job = Job(req, admission.methods, new_seeds(req), enqueued=start, timeout_s=config.request_timeout_s)
        if req.stream:
            job.preview = _Previews()
        try:
            worker.submit(job)  # 429 when the queue is full, before any byte of a stream is sent
        except APIError as err:
            if err.code == "worker_dead":
                metrics.rejected.labels("worker_dead").inc()
            answered(err.status, start)
            return error_response(err)
        if req.stream:
            return StreamingResponse(_stream(job, req, start), media_type="text/event-stream")
        try:
            result = await _wait(request, job)
            if not result["images"]:
                raise APIError(500, "The pipeline returned no image.", code="no_image")
            data = []
            for i, image in enumerate(result["images"]):
                item = {
                    "b64_json": _encode(image, req.output_format),
                    "revised_prompt": None,
                    "seed": result["seeds"][i],
                    "compute": result["compute"],
                }
                if result["rewards"] is not None:
                    item["reward"] = result["rewards"][i]
                data.append(item)
        except Exception as err:  # noqa: BLE001 - every failure is answered with an error body
            api = _error_for(err)
            answered(api.status, start)
            return error_response(api)
        _count(result)
        answered(200, start)
        width, height = result["images"][0].size
        return {
            "created": int(time.time()),
            "data": data,
            "output_format": req.output_format,
            "size": f"{width}x{height}",
        }

    def _count(result: dict) -> None:
        metrics.images.inc(len(result["images"]))
        if result["rewards"]:
            metrics.reward.observe(sum(result["rewards"]) / len(result["rewards"]))

    async def _wait(request, job: Job) -> dict:
        """Waits for a job; cancels it (dropped if queued, stopped at its next step if running) when the client
        leaves (`request` given) or the deadline passes."""
        future = asyncio.wrap_future(job.done)
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(future), timeout=0.25)
            except asyncio.TimeoutError:
                pass
            if request is not None and await request.is_disconnected():
                worker.cancel(job, "disconnected")
            elif job.expired(time.monotonic()):
                worker.cancel(job, "timeout")
            if job.cancelled is not None:  # by whichever side noticed first: the answer says why
                raise job.cancellation_error()

    async def _stream(job: Job, req, start: float):
        """Server-sent events in the client's format: partial images (x0 previews), then the completed image."""
        events = job.preview.attach(asyncio.get_running_loop())
        size = f"{req.width}x{req.height}" if req.width else "auto"
        common = {"background": "opaque", "output_format": req.output_format, "quality": "auto", "size": size}
        # the streaming response watches the connection itself and cancels this generator when the client leaves
        waiter = asyncio.ensure_future(_wait(None, job))
        index = 0
        try:
            while True:
                getter = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    _, image = getter.result()
                    event = {
                        "type": "image_generation.partial_image",
                        "b64_json": _encode(image, req.output_format),
                        "partial_image_index": index,
                        "created_at": int(time.time()),
                        **common,
                    }
                    index += 1
                    yield f"data: {json.dumps(event)}\n\n"
                    continue
                getter.cancel()
                while not events.empty():  # previews that arrived with the final image
                    _, image = events.get_nowait()
                    event = {
                        "type": "image_generation.partial_image",
                        "b64_json": _encode(image, req.output_format),
                        "partial_image_index": index,
                        "created_at": int(time.time()),
                        **common,
                    }
                    index += 1
                    yield f"data: {json.dumps(event)}\n\n"
                result = waiter.result()
                image = result["images"][0]
                usage = {
                    "input_tokens": 0,
                    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
                    "output_tokens": 0,
                    "total_tokens": 0,
                }
                event = {
                    "type": "image_generation.completed",
                    "b64_json": _encode(image, req.output_format),
                    "created_at": int(time.time()),
                    "usage": usage,
                    "seed": result["seeds"][0],
                    "reward": None if result["rewards"] is None else result["rewards"][0],
                    "compute": result["compute"],
                    **common,
                    "size": "{}x{}".format(*image.size),
                }
                _count(result)
                answered(200, start)
                yield f"data: {json.dumps(event)}\n\n"
                yield "data: [DONE]\n\n"
                return
        except Exception as err:  # noqa: BLE001 - a failure after the stream started is sent as an error event
            api = _error_for(err)
            answered(api.status, start)
            yield f"data: {json.dumps(api.body())}\n\n"
        finally:
            if not job.done.done():  # the client left: drop the job, or stop its call at the next step
                worker.cancel(job, "disconnected")
                waiter.cancel()

    return app
