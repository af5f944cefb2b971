"""`ttalign serve --ray`: the same app as a Ray Serve deployment, one replica per GPU.

Each replica loads its own pipeline and runs the same FastAPI app (built on the replica, so the pipeline never
crosses processes); Ray Serve routes requests to replicas with one request in flight per replica
(`max_ongoing_requests=1`), queues at most `--max-queued-requests`, and answers past that with 429 and `Retry-After`
(`BackpressureConfig`). Replicas ask for `--gpus-per-replica` GPUs each; with 0 they run on CPUs (for tests). A local
Ray cluster binds `--ray-node-ip` (loopback by default) and Serve's HTTP proxy `--host`; the request policy, the budget
and cancellation are the app's, so they hold on every replica. Ray's proxy is its own HTTP server: the header deadline
and connection cap of `ttalign serve` without `--ray` do not apply to it.
"""

from __future__ import annotations

import time

# seconds each of Ray Serve's readiness checks of its HTTP proxy waits on a local cluster (Ray's own default: 5)
PROXY_READY_CHECK_TIMEOUT_S = 60.0


def build_application(
    model: str,
    config,
    dtype: str = "float32",
    device: str | None = None,
    replicas: int = 1,
    gpus_per_replica: float = 1.0,
    cpus_per_replica: float = 1.0,
    max_queued_requests: int = 64,
):
    """The Ray Serve application: `replicas` copies of the server app over `model`."""
    from ray import serve
    from ray.serve.config import BackpressureConfig

    if not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {replicas!r}.")
    if gpus_per_replica < 0 or cpus_per_replica <= 0:
        raise ValueError(f"Bad replica resources: {gpus_per_replica} GPUs, {cpus_per_replica} CPUs.")

    def build_asgi_app():  # runs on each replica
        from ttalign.loading import load_pipeline
        from ttalign.serve.app import create_app

        pipe = load_pipeline(model, dtype, device)
        pipe.set_progress_bar_config(disable=True)
        return create_app(pipe, config)

    options = {"num_cpus": cpus_per_replica}
    if gpus_per_replica > 0:
        options["num_gpus"] = gpus_per_replica
    deployment = serve.deployment(
        serve.ingress(build_asgi_app)(),
        name="ttalign",
        num_replicas=replicas,
        ray_actor_options=options,
        max_ongoing_requests=1,
        max_queued_requests=max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=config.worker.retry_after_s),
    )
    return deployment.bind()


def run_ray(args, config) -> int:
    """Starts Ray (locally, or joins `RAY_ADDRESS`), deploys the app on `args.host:args.port`, serves until stopped."""
    import os
    import signal

    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions

    def stop(*_):
        raise KeyboardInterrupt

    app = build_application(
        args.model,
        config,
        args.dtype,
        args.device,
        args.replicas,
        args.gpus_per_replica,
        max_queued_requests=args.max_queued_requests,
    )
    if os.environ.get("RAY_ADDRESS"):  # joins a cluster its operator set up
        ray.init(include_dashboard=False, ignore_reinit_error=True)
    else:  # a local cluster: its processes, the dashboard's agents included, bind the loopback unless told otherwise
        # Serve kills its HTTP proxy after three readiness checks of 5 s each; on a machine busy with other jobs the
        # proxy's start takes longer than that. The cluster's processes inherit this environment.
        os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", str(PROXY_READY_CHECK_TIMEOUT_S))
        ray.init(
            include_dashboard=False,
            dashboard_host="127.0.0.1",
            _node_ip_address=args.ray_node_ip,
            ignore_reinit_error=True,
        )
    # after ray.init, which installs handlers of its own: SIGTERM stops Serve and the local cluster cleanly, also while
    # they start, and so does an error in the start (a replica that fails to build)
    signal.signal(signal.SIGTERM, stop)
    try:
        serve.start(http_options=HTTPOptions(host=args.host, port=args.port))
        serve.run(app, name="ttalign", route_prefix="/")
        print(
            f"serving {config.model_name} with Ray Serve on http://{args.host}:{args.port} ({args.replicas} "
            f"replicas, {args.gpus_per_replica:g} GPU each)",
            flush=True,
        )
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
