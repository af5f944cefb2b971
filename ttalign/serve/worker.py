"""One worker per pipeline: a bounded queue, request merging, one pipeline call at a time.

A diffusers pipeline is not safe to share between threads (the scheduler's step counter, fast tokenizers), and the
attention methods install processors on its denoiser for the length of a call, so the worker runs every call on one
thread of its own. Requests whose settings agree are merged into one call: each image keeps its own generator
(diffusers' per-image generator lists, which every method honours), so a request's images are the same whether it
ran alone or merged, and the outputs are split back. When a merged call fails, each of its requests runs again alone,
so a failing method fails only its own request.
"""

from __future__ import annotations

import inspect
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from .protocol import APIError, ImageRequest


@dataclass
class WorkerConfig:
    """How the worker queues and merges.

    Args:
        queue_size (`int`, defaults to 64): requests that may wait; the next one is refused with 429.
        batch_window_s (`float`, defaults to 0.02): how long the first request of a call waits for others to join.
        max_batch_images (`int`, defaults to 16): images per merged call (0 or 1: no merging).
        retry_after_s (`int`, defaults to 2): the `Retry-After` sent with a 429.
    """

    queue_size: int = 64
    batch_window_s: float = 0.02
    max_batch_images: int = 16
    retry_after_s: int = 2

    def __post_init__(self):
        if not isinstance(self.queue_size, int) or self.queue_size < 1:
            raise ValueError(f"queue_size must be an integer >= 1, got {self.queue_size!r}.")
        if not self.batch_window_s >= 0:
            raise ValueError(f"batch_window_s must be >= 0, got {self.batch_window_s!r}.")
        if not isinstance(self.max_batch_images, int) or self.max_batch_images < 0:
            raise ValueError(f"max_batch_images must be an integer >= 0, got {self.max_batch_images!r}.")


@dataclass(eq=False)
class Job:
    """One request in the worker: its methods, its images' seeds, and where its answer goes."""

    request: ImageRequest
    methods: list
    seeds: list[int]
    done: Future = field(default_factory=Future)
    cancelled: bool = False
    enqueued: float = field(default_factory=time.monotonic)
    #: For streaming requests: `preview(step_index, PIL image)`, called from the worker thread.
    preview: Callable | None = None

    @property
    def mergeable(self) -> bool:
        return self.preview is None


def new_seeds(request: ImageRequest) -> list[int]:
    """The seed of each of a request's images: the request's seed + i, or a random one."""
    base = request.seed if request.seed is not None else secrets.randbits(31)
    return [base + i for i in range(request.n)]


class PipelineWorker:
    """Runs the pipeline calls of the requests it is given, one call at a time, on a thread of its own.

    Args:
        pipe: an aligned pipeline.
        config (`WorkerConfig`).
        metrics (`ServerMetrics`, *optional*).
        call_defaults (`dict`): keyword arguments of every call (e.g. the shapes model's steps and guidance).
    """

    def __init__(self, pipe, config: WorkerConfig | None = None, metrics=None, call_defaults: dict | None = None):
        self.pipe, self.config, self.metrics = pipe, config or WorkerConfig(), metrics
        self.call_defaults = dict(call_defaults or {})
        steps = inspect.signature(pipe.__call__).parameters.get("num_inference_steps")
        self.default_steps = steps.default if steps is not None and isinstance(steps.default, int) else 50
        self.jobs: list[Job] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # --- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None and not self._stopping:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="ttalign-pipeline-worker", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            if self._thread is None:
                return
            self._stopping = True
            for job in self.jobs:
                job.done.set_exception(APIError(503, "The server is shutting down.", code="shutting_down"))
            self.jobs.clear()
            self._cond.notify_all()
        self._thread.join(timeout=30)
        self._thread = None
        self._stopping = False

    @property
    def queue_depth(self) -> int:
        return len(self.jobs)

    def submit(self, job: Job) -> Job:
        """Queues a job; raises `APIError(429)` with `Retry-After` when the queue is full."""
        self.start()  # the app's lifespan starts the worker; an ASGI host that skips lifespan events still works
        with self._cond:
            if len(self.jobs) >= self.config.queue_size:
                if self.metrics is not None:
                    self.metrics.rejected.labels("queue_full").inc()
                raise APIError(429, f"The queue is full ({self.config.queue_size} requests waiting); retry shortly.",
                               code="queue_full", headers={"Retry-After": str(self.config.retry_after_s)})  # fmt: skip
            self.jobs.append(job)
            self._gauge()
            self._cond.notify_all()
        return job

    def cancel(self, job: Job, reason: str) -> None:
        """Drops a job that has not started (its client left, or it timed out)."""
        with self._cond:
            job.cancelled = True
            if job in self.jobs:
                self.jobs.remove(job)
                self._gauge()
                if self.metrics is not None:
                    self.metrics.rejected.labels(reason).inc()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self.jobs))

    # --- the loop -----------------------------------------------------------------------------------------------

    def _take_batch(self) -> list[Job] | None:
        """Waits for a job, then for compatible jobs to join it within the batch window."""
        with self._cond:
            while not self.jobs and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            first = self.jobs.pop(0)
            batch, images = [first], first.request.n
            limit = self.config.max_batch_images
            if first.mergeable and limit > 1:
                deadline = time.monotonic() + self.config.batch_window_s
                key = first.request.merge_key()
                while True:
                    for job in list(self.jobs):
                        if (job.mergeable and job.request.merge_key() == key and images + job.request.n <= limit
                                and job.methods == first.methods):  # fmt: skip
                            self.jobs.remove(job)
                            batch.append(job)
                            images += job.request.n
                    remaining = deadline - time.monotonic()
                    if images >= limit or remaining <= 0 or self._stopping:
                        break
                    self._cond.wait(remaining)
            self._gauge()
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            batch = [job for job in batch if not job.cancelled and job.done.set_running_or_notify_cancel()]
            if batch:
                self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        try:
            results = self._call(batch)
        except Exception as err:  # noqa: BLE001 - the failure belongs to the requests, the worker goes on
            if len(batch) > 1:  # find the request that failed: each runs again alone
                for job in batch:
                    self._run_alone(job)
                return
            batch[0].done.set_exception(err)
            return
        for job, result in zip(batch, results):
            job.done.set_result(result)

    def _run_alone(self, job: Job) -> None:
        try:
            result = self._call([job])[0]
        except Exception as err:  # noqa: BLE001
            job.done.set_exception(err)
        else:
            job.done.set_result(result)

    def _call(self, batch: list[Job]) -> list[dict]:
        """One pipeline call for the whole batch; returns each job's images, seeds, rewards and compute."""
        from ttalign.methods.trace import PreviewX0

        request = batch[0].request
        prompts = [job.request.prompt for job in batch for _ in range(job.request.n)]
        seeds = [s for job in batch for s in job.seeds]
        kwargs = dict(self.call_defaults)
        for key, value in (("num_inference_steps", request.steps), ("guidance_scale", request.guidance_scale),
                           ("negative_prompt", request.negative_prompt), ("eta", request.eta),
                           ("width", request.width), ("height", request.height)):  # fmt: skip
            if value is not None:
                kwargs[key] = value
        methods = list(batch[0].methods)
        job = batch[0]
        if job.preview is not None:
            steps = kwargs.get("num_inference_steps", self.default_steps)

            def preview(step, images, job=job):
                job.preview(step, _to_pil(images)[0])

            methods.append(PreviewX0(at=PreviewX0.evenly(request.partial_images, steps), callback=preview))
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        start = time.perf_counter()
        out = self.pipe(prompts, num_images_per_prompt=1, generator=generators, output_type="pil", alignment=methods,
                        **kwargs)  # fmt: skip
        seconds = time.perf_counter() - start
        compute = dict(out.traces["compute"])
        total = len(prompts)
        rewards = None if out.rewards is None else [float(r) for r in out.rewards.float().cpu()]
        if self.metrics is not None:
            self.metrics.batch_requests.observe(len(batch))
            self.metrics.batch_images.observe(total)
            self.metrics.nfe.inc(compute.get("nfe", 0))
        # per image: the call's denoiser evaluations and decodes shared out; the call's passes, reward calls and time
        share = {
            "nfe_per_image": compute.get("nfe", 0) / total,
            "vae_decodes_per_image": compute.get("vae_decodes", 0) / total,
            "denoiser_calls": compute.get("denoiser_calls", 0),
            "reward_calls": compute.get("reward_calls", 0),
            "wall_time_s": seconds,
            "batch_requests": len(batch),
            "batch_images": total,
        }
        results, k = [], 0
        for job in batch:
            n = job.request.n
            results.append({"images": out.images[k : k + n], "seeds": job.seeds,
                            "rewards": None if rewards is None else rewards[k : k + n], "compute": share})  # fmt: skip
            k += n
        return results


def _to_pil(images: torch.Tensor) -> list:
    """Float `[N, 3, H, W]` in `[0, 1]` -> PIL images."""
    from PIL import Image

    arrays = (images.permute(0, 2, 3, 1).cpu().float().numpy() * 255).round().clip(0, 255).astype("uint8")
    return [Image.fromarray(a) for a in arrays]
