"""The FastAPI app: the OpenAI Images API over an aligned pipeline, health, models, metrics and the playground."""

from __future__ import annotations

import asyncio
import base64
import hmac
import inspect
import io
import json
import os
import time
import uuid
from dataclasses import dataclass, field

from fastapi import Request

from .metrics import ServerMetrics
from .protocol import OUTPUT_FORMATS, APIError, Limits, check_method_budget, parse_request
from .worker import Job, PipelineWorker, WorkerConfig, new_seeds

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


@dataclass
class ServeConfig:
    """What the operator decides at start-up.

    Args:
        model_name (`str`): the model id the API reports (`GET /v1/models`) and accepts as `model`.
        alignment (`list[str]`): method specs applied to requests that name none (`NAME[:key=value,...]`).
        allow (`list[str]`): method names requests may ask for in `extra_body={"ttalign": {"alignment": [...]}}`.
        api_key (`str`, *optional*): when set, every `/v1` route and `/metrics` need `Authorization: Bearer <key>`.
        limits (`Limits`), worker (`WorkerConfig`).
        request_timeout_s (`float`, defaults to 600): a request not answered by then gets 504.
        max_body_bytes (`int`, defaults to 1 MB).
        call_defaults (`dict`): keyword arguments of every pipeline call (steps, guidance scale).
    """

    model_name: str = "ttalign"
    alignment: list[str] = field(default_factory=list)
    allow: list[str] = field(default_factory=list)
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    request_timeout_s: float = 600.0
    max_body_bytes: int = 1 << 20
    call_defaults: dict = field(default_factory=dict)

    def __post_init__(self):
        from ttalign.methods import METHODS, method_from_spec

        unknown = sorted(set(self.allow) - set(METHODS))
        if unknown:
            raise ValueError(f"Cannot allow unknown method {unknown[0]!r}; methods: {', '.join(sorted(METHODS))}.")
        for spec in self.alignment:
            method_from_spec(spec)  # a bad default fails at start-up, in one line
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s!r}.")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (leave it unset to serve without a key).")


class MethodCache:
    """Builds each method spec once (methods hold configuration only, so calls can share them)."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self._cache: dict = {}

    def methods(self, specs: tuple[str, ...] | None) -> list:
        from ttalign.hooks import AlignmentRunner
        from ttalign.methods import method_from_spec

        from_request = specs is not None
        specs = specs if from_request else tuple(self.config.alignment)
        methods = []
        for spec in specs:
            if spec not in self._cache:
                try:
                    method = method_from_spec(spec, allowed=set(self.config.allow) if from_request else None,
                                              allow_imports=not from_request)  # fmt: skip
                    check_method_budget(method, spec, self.config.limits)
                except ValueError as err:
                    raise APIError(400, str(err), param="ttalign.alignment", code="invalid_method") from None
                if len(self._cache) < 256:
                    self._cache[spec] = method
            else:
                method = self._cache[spec]
            methods.append(method)
        try:
            AlignmentRunner(methods)  # refuses bad combinations now, before the request is queued
        except (ValueError, TypeError) as err:
            raise APIError(400, str(err), param="ttalign.alignment", code="invalid_method") from None
        return methods


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
    """The server's FastAPI app over `pipe` (an aligned pipeline). The pipeline worker starts with the app."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    config = config or ServeConfig()
    metrics = ServerMetrics()
    worker = PipelineWorker(pipe, config.worker, metrics, config.call_defaults)
    methods = MethodCache(config)
    size_multiple = max(8, pipe.family.size_multiple)  # SD3, FLUX: 16 (the VAE's 8 times 2x2 patches)
    call_parameters = inspect.signature(pipe.__call__).parameters

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            worker.stop()

    app = FastAPI(title="ttalign", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker, app.state.metrics, app.state.config = worker, metrics, config
    # tells replicas apart (Ray Serve); a plain ASGI middleware, which leaves disconnect detection alone
    app.add_middleware(_ReplicaHeader, value=uuid.uuid4().hex[:12])

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
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not given:
            metrics.rejected.labels("unauthorized").inc()
            raise APIError(401, "Missing API key: send `Authorization: Bearer <key>`.", code="invalid_api_key")
        if not hmac.compare_digest(given.encode(), config.api_key.encode()):
            metrics.rejected.labels("unauthorized").inc()
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": config.model_name, "queue_depth": worker.queue_depth}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                             "owned_by": "ttalign"}]}  # fmt: skip

    @app.get("/v1/ttalign/methods")
    async def allowed_methods(request: Request):
        authorize(request)
        return {"allow": sorted(config.allow), "default_alignment": list(config.alignment)}

    @app.get("/metrics")
    async def prometheus(request: Request):
        authorize(request)
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        with open(os.path.join(STATIC, "playground.html"), encoding="utf-8") as f:
            return HTMLResponse(f.read())

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        start = time.monotonic()
        try:
            authorize(request)
            raw = await request.body()
            if len(raw) > config.max_body_bytes:
                raise APIError(400, f"The request body is over {config.max_body_bytes} bytes.", code="body_too_large")
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                raise APIError(400, "The request body is not valid JSON.", code="invalid_json") from None
            req = parse_request(body, config.limits, config.model_name, size_multiple)
            if req.eta is not None and "eta" not in call_parameters:
                raise APIError(400, f"ttalign.eta: {type(pipe).__name__} takes no eta (a flow-matching sampler); "
                               "leave it out.", param="ttalign.eta", code="invalid_value")  # fmt: skip
            job = Job(req, methods.methods(req.alignment), new_seeds(req))
        except APIError as err:
            if err.status in (400, 404):
                metrics.rejected.labels("invalid").inc()
            metrics.requests.labels(str(err.status)).inc()
            metrics.latency.labels(str(err.status)).observe(time.monotonic() - start)
            return error_response(err)
        if req.stream:
            job.preview = _Previews()
        try:
            worker.submit(job)  # 429 when the queue is full, before any byte of a stream is sent
        except APIError as err:
            metrics.requests.labels(str(err.status)).inc()
            return error_response(err)
        if req.stream:
            return StreamingResponse(_stream(job, req, start), media_type="text/event-stream")
        status = 200
        try:
            result = await _wait(request, job)
            if not result["images"]:
                raise APIError(500, "The pipeline returned no image.", code="no_image")
        except Exception as err:  # noqa: BLE001 - every failure is answered with an error body
            api = _error_for(err)
            status = api.status
            metrics.requests.labels(str(status)).inc()
            metrics.latency.labels(str(status)).observe(time.monotonic() - start)
            return error_response(api)
        data = []
        for i, image in enumerate(result["images"]):
            item = {"b64_json": _encode(image, req.output_format), "revised_prompt": None, "seed": result["seeds"][i],
                    "compute": result["compute"]}  # fmt: skip
            if result["rewards"] is not None:
                item["reward"] = result["rewards"][i]
            data.append(item)
        _count(result)
        metrics.requests.labels(str(status)).inc()
        metrics.latency.labels(str(status)).observe(time.monotonic() - start)
        width, height = result["images"][0].size
        return {"created": int(time.time()), "data": data, "output_format": req.output_format,
                "size": f"{width}x{height}"}  # fmt: skip

    def _count(result: dict) -> None:
        metrics.images.inc(len(result["images"]))
        if result["rewards"]:
            metrics.reward.observe(sum(result["rewards"]) / len(result["rewards"]))

    async def _wait(request, job: Job) -> dict:
        """Waits for a queued job, dropping it if the client leaves (`request` given) or it times out."""
        future = asyncio.wrap_future(job.done)
        deadline = time.monotonic() + config.request_timeout_s
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(future), timeout=0.25)
            except asyncio.TimeoutError:
                pass
            if request is not None and await request.is_disconnected():
                worker.cancel(job, "disconnected")
                raise APIError(499, "The client closed the request.", code="client_closed")
            if time.monotonic() > deadline:
                worker.cancel(job, "timeout")
                raise APIError(504, f"The request was not answered within {config.request_timeout_s:g} s.",
                               code="timeout", headers={"x-should-retry": "false"})  # fmt: skip

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
                    event = {"type": "image_generation.partial_image", "b64_json": _encode(image, req.output_format),
                             "partial_image_index": index, "created_at": int(time.time()), **common}  # fmt: skip
                    index += 1
                    yield f"data: {json.dumps(event)}\n\n"
                    continue
                getter.cancel()
                while not events.empty():  # previews that arrived with the final image
                    _, image = events.get_nowait()
                    event = {"type": "image_generation.partial_image", "b64_json": _encode(image, req.output_format),
                             "partial_image_index": index, "created_at": int(time.time()), **common}  # fmt: skip
                    index += 1
                    yield f"data: {json.dumps(event)}\n\n"
                result = waiter.result()
                image = result["images"][0]
                usage = {"input_tokens": 0, "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
                         "output_tokens": 0, "total_tokens": 0}  # fmt: skip
                event = {"type": "image_generation.completed", "b64_json": _encode(image, req.output_format),
                         "created_at": int(time.time()), "usage": usage, "seed": result["seeds"][0],
                         "reward": None if result["rewards"] is None else result["rewards"][0],
                         "compute": result["compute"], **common, "size": "{}x{}".format(*image.size)}  # fmt: skip
                _count(result)
                metrics.requests.labels("200").inc()
                metrics.latency.labels("200").observe(time.monotonic() - start)
                yield f"data: {json.dumps(event)}\n\n"
                yield "data: [DONE]\n\n"
                return
        except Exception as err:  # noqa: BLE001 - a failure after the stream started is sent as an error event
            api = _error_for(err)
            metrics.requests.labels(str(api.status)).inc()
            yield f"data: {json.dumps(api.body())}\n\n"
        finally:
            if not job.done.done():  # the client left: drop the job if it has not started
                worker.cancel(job, "disconnected")
                waiter.cancel()

    return app
