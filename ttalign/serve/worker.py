"""One worker per pipeline: a bounded queue, request merging, one pipeline call at a time, calls that stop when
nobody waits for them.

A diffusers pipeline is not safe to share between threads (the scheduler's step counter, fast tokenizers), and the
attention methods install processors on its denoiser for the length of a call, so the worker runs every call on one
thread of its own. Requests whose settings agree are merged into one call: each image keeps its own generator
(diffusers' per-image generator lists, which every method honours), so a request's images are the same whether it
ran alone or merged, and the outputs are split back.

- Cancellation: a job is cancelled when its client leaves or its deadline passes. A queued job is dropped; a running
  call whose every job is cancelled stops at its next denoiser evaluation (a forward pre-hook on the denoiser raises
  :class:`CallCancelled`, which the pipeline's `finally` turns into a clean stop: processors and modes restored), so
  the worker is free for the next request within one step, also inside a search's or an optimizer's own loop.
- Failures: members are validated before they merge (the request policy), so a merged call rarely fails; when one
  does, it is split in halves and each half runs again: a half that succeeds answers its members, and the failing
  request ends up alone with its own error, after about `2 log2(members)` reruns instead of one per member.
- Out of memory: the failed call's frames are cleared and memory collected (the CUDA cache emptied) before the halves
  run; a request that runs out of memory alone is tried once more, then answered 503.
- Health: `alive` is false once the thread died; `stuck` is true when a call has made no denoiser evaluation for
  `stuck_after_s`.
"""

from __future__ import annotations

import gc
import secrets
import threading
import time
import traceback
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
        stuck_after_s (`float`, defaults to 300): a call with no denoiser evaluation for this long makes `/health`
            answer 503.
    """

    queue_size: int = 64
    batch_window_s: float = 0.02
    max_batch_images: int = 16
    retry_after_s: int = 2
    stuck_after_s: float = 300.0

    def __post_init__(self):
        if isinstance(self.queue_size, bool) or not isinstance(self.queue_size, int) or self.queue_size < 1:
            raise ValueError(f"queue_size must be an integer >= 1, got {self.queue_size!r}.")
        if not self.batch_window_s >= 0:
            raise ValueError(f"batch_window_s must be >= 0, got {self.batch_window_s!r}.")
        if not isinstance(self.max_batch_images, int) or self.max_batch_images < 0:
            raise ValueError(f"max_batch_images must be an integer >= 0, got {self.max_batch_images!r}.")
        if not self.stuck_after_s > 0:
            raise ValueError(f"stuck_after_s must be > 0, got {self.stuck_after_s!r}.")


class CallCancelled(Exception):
    """Raised inside a pipeline call whose every request was cancelled (client gone, deadline passed)."""


@dataclass(eq=False)
class Job:
    """One request in the worker: its methods, its images' seeds, and where its answer goes."""

    request: ImageRequest
    methods: list
    seeds: list[int]
    done: Future = field(default_factory=Future)
    #: Why the job was cancelled (`"disconnected"`, `"timeout"`), or `None`.
    cancelled: str | None = None
    enqueued: float = field(default_factory=time.monotonic)
    #: Seconds after `enqueued` at which the job is cancelled as `"timeout"` (`None`: no deadline).
    timeout_s: float | None = None
    #: For streaming requests: `preview(step_index, PIL image)`, called from the worker thread.
    preview: Callable | None = None

    @property
    def mergeable(self) -> bool:
        return self.preview is None

    @property
    def deadline(self) -> float | None:
        """`time.monotonic()` after which the job is cancelled as `"timeout"`."""
        return None if self.timeout_s is None else self.enqueued + self.timeout_s

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline

    def cancellation_error(self) -> APIError:
        """The answer of a cancelled job, whichever side noticed first: 504 past its deadline, 499 when its client
        left, 503 when the server shuts down."""
        if self.cancelled == "timeout":
            return APIError(
                504,
                f"The request was not answered within {self.timeout_s:g} s.",
                code="timeout",
                headers={"x-should-retry": "false"},
            )
        if self.cancelled == "shutdown":
            return APIError(503, "The server is shutting down.", code="shutting_down")
        return APIError(499, "The client closed the request.", code="client_closed")


def new_seeds(request: ImageRequest) -> list[int]:
    """The seed of each of a request's images: the request's seed + i, or a random one."""
    base = request.seed if request.seed is not None else secrets.randbits(31)
    return [base + i for i in range(request.n)]


def is_out_of_memory(err: BaseException) -> bool:
    """Whether `err` is an allocator's failure (CUDA's `OutOfMemoryError`, the CPU allocator's, `MemoryError`)."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(err, RuntimeError) and ("out of memory" in str(err) or "can't allocate memory" in str(err))


def release_memory(err: BaseException | None = None) -> None:
    """Frees what a failed call left: the locals of `err`'s frames (its tensors), then a collection and, on CUDA,
    the allocator's cache."""
    if err is not None and err.__traceback__ is not None:
        traceback.clear_frames(err.__traceback__)
        err.__traceback__ = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
        from ttalign.pipelines.base import call_default

        self.default_steps = self.call_defaults.get("num_inference_steps") or call_default(
            pipe, "num_inference_steps", 50
        )
        self.jobs: list[Job] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        #: The exception that ended the worker's thread, once it died.
        self.died: BaseException | None = None
        self._running: list[Job] = []
        self.busy_since: float | None = None
        self.progress_at: float | None = None

    # --- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None and not self._stopping:
            self._thread = threading.Thread(target=self._loop, name="ttalign-pipeline-worker", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            if self._thread is None:
                return
            self._stopping = True
            for job in self.jobs:
                self._settle(job, error=APIError(503, "The server is shutting down.", code="shutting_down"))
            self.jobs.clear()
            for job in self._running:
                job.cancelled = job.cancelled or "shutdown"
            self._cond.notify_all()
        self._thread.join(timeout=30)
        self._thread = None
        self._stopping = False

    @property
    def queue_depth(self) -> int:
        return len(self.jobs)

    @property
    def alive(self) -> bool:
        """False once the worker's thread has died (it is started on the first request or by the app's lifespan)."""
        return self.died is None and (self._thread is None or self._thread.is_alive())

    @property
    def stuck(self) -> bool:
        """True when a call has run for `stuck_after_s` without a denoiser evaluation."""
        progress = self.progress_at
        return (
            self.busy_since is not None
            and progress is not None
            and time.monotonic() - progress > self.config.stuck_after_s
        )

    def submit(self, job: Job) -> Job:
        """Queues a job; raises `APIError(429)` with `Retry-After` when the queue is full, 503 when the worker died."""
        self.start()  # the app's lifespan starts the worker; an ASGI host that skips lifespan events still works
        with self._cond:
            if not self.alive:
                raise APIError(
                    503, "The pipeline worker has stopped; the server must be restarted.", code="worker_dead"
                )
            if len(self.jobs) >= self.config.queue_size:
                if self.metrics is not None:
                    self.metrics.rejected.labels("queue_full").inc()
                raise APIError(
                    429,
                    f"The queue is full ({self.config.queue_size} requests waiting); retry shortly.",
                    code="queue_full",
                    headers={"Retry-After": str(self.config.retry_after_s)},
                )
            self.jobs.append(job)
            self._gauge()
            self._cond.notify_all()
        return job

    def cancel(self, job: Job, reason: str) -> None:
        """Cancels a job (its client left, or it timed out): dropped if queued, and answered at once with its
        cancellation error; if running, its call stops at the next denoiser evaluation once every job of the call is
        cancelled, and the call answers it."""
        with self._cond:
            if job.cancelled is not None or job.done.done():
                return
            job.cancelled = reason
            if job in self.jobs:
                self.jobs.remove(job)
                self._gauge()
            if job not in self._running:
                self._settle(job, error=job.cancellation_error())
            if self.metrics is not None:
                self.metrics.cancelled.labels(reason).inc()

    def _settle(self, job: Job, result=None, error: BaseException | None = None) -> bool:
        """Answers a job once: the worker's thread and the server's (cancelling) may both try; the first wins."""
        with self._cond:
            if job.done.done():
                return False
            if error is not None:
                job.done.set_exception(error)
            else:
                job.done.set_result(result)
            return True

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
                        if (
                            job.mergeable
                            and job.request.merge_key() == key
                            and images + job.request.n <= limit
                            and job.methods == first.methods
                        ):
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
        batch: list[Job] = []
        try:
            while True:
                batch = self._take_batch()
                if batch is None:
                    return
                now = time.monotonic()
                for job in batch:
                    if job.cancelled is None and job.expired(now):
                        self.cancel(job, "timeout")
                with self._cond:  # atomic with `cancel`, which may answer a job from the server's thread
                    batch = [job for job in batch if job.cancelled is None and job.done.set_running_or_notify_cancel()]
                if batch:
                    self._run(batch)
        except BaseException as err:  # the thread dies: nobody may wait for it
            self.died = err
            dead = APIError(
                503,
                f"The pipeline worker stopped ({type(err).__name__}); the server must be restarted.",
                code="worker_dead",
            )
            with self._cond:
                waiting, self.jobs = self.jobs + (batch or []), []
            for job in waiting:
                self._settle(job, error=dead)
            if self.metrics is not None:
                self.metrics.failed.labels("worker_dead").inc(len(waiting))
            raise

    def _run(self, batch: list[Job], retried: bool = False) -> None:
        """Runs `batch` as one call; on failure, runs its halves (see the module's docstring)."""
        batch = [job for job in batch if job.cancelled is None]
        if not batch:
            return
        failure, oom = None, False
        try:
            results = self._call(batch)
        except CallCancelled:
            self._count_call("cancelled")
            for job in batch:
                self._settle(job, error=job.cancellation_error())
            return
        except Exception as err:  # noqa: BLE001 - the failure belongs to the requests, the worker goes on
            oom = is_out_of_memory(err)
            self._count_call("out_of_memory" if oom else "failed")
            if oom:
                release_memory(err)  # the failed call's tensors go before anything runs again
                failure = APIError(
                    503,
                    "The server ran out of memory for this request: ask for fewer images, "
                    "candidates or a smaller size.",
                    code="out_of_memory",
                    headers={"x-should-retry": "false"},
                )
            else:
                failure = err
        else:
            self._count_call("ok")
            for job, result in zip(batch, results):
                if isinstance(result, BaseException):
                    self._fail(job, result)
                else:
                    self._settle(job, result=result)
            return
        if oom:
            gc.collect()
        if len(batch) > 1:
            half = len(batch) // 2
            self._run(batch[:half])
            self._run(batch[half:])
        elif oom and not retried:
            self._run(batch, retried=True)
        else:
            self._fail(batch[0], failure)

    def _fail(self, job: Job, err: BaseException) -> None:
        if self.metrics is not None:
            code = getattr(err, "code", None) or ("invalid_value" if isinstance(err, ValueError) else "method_failed")
            self.metrics.failed.labels(code).inc()
        self._settle(job, error=err)

    def _count_call(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.calls.labels(outcome).inc()

    def _interrupt_hook(self, batch: list[Job]):
        """A forward pre-hook for the denoiser: marks progress, and stops the call once every job is cancelled."""

        def hook(module, args):
            now = time.monotonic()
            self.progress_at = now
            for job in batch:
                if job.cancelled is None and job.expired(now):
                    self.cancel(job, "timeout")
            if all(job.cancelled is not None for job in batch):
                raise CallCancelled()

        return hook

    def _call(self, batch: list[Job]) -> list:
        """One pipeline call for the whole batch; returns each job's images, seeds, rewards and compute (or the
        exception that splitting its share raised)."""
        from ttalign.methods.trace import PreviewX0

        request = batch[0].request
        prompts = [job.request.prompt for job in batch for _ in range(job.request.n)]
        seeds = [s for job in batch for s in job.seeds]
        kwargs = dict(self.call_defaults)
        for key, value in (
            ("num_inference_steps", request.steps),
            ("guidance_scale", request.guidance_scale),
            ("negative_prompt", request.negative_prompt),
            ("eta", request.eta),
            ("width", request.width),
            ("height", request.height),
        ):
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
        self._running = batch
        self.busy_since = self.progress_at = time.monotonic()
        handle = self.pipe.family.denoiser.register_forward_pre_hook(self._interrupt_hook(batch))
        start = time.perf_counter()
        try:
            out = self.pipe(
                prompts, num_images_per_prompt=1, generator=generators, output_type="pil", alignment=methods, **kwargs
            )
        finally:
            handle.remove()
            self._running, self.busy_since = [], None
        seconds = time.perf_counter() - start
        compute = dict(out.traces["compute"])
        total = len(prompts)
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
        for job in batch:  # each member's share on its own: one that cannot be split back fails alone
            n = job.request.n
            try:
                rewards = None if out.rewards is None else [float(r) for r in out.rewards[k : k + n].float().cpu()]
                images = out.images[k : k + n]
                if len(images) != n:
                    raise RuntimeError(f"the pipeline returned {len(images)} images for a request of {n}")
                results.append({"images": images, "seeds": job.seeds, "rewards": rewards, "compute": share})
            except Exception as err:  # noqa: BLE001
                results.append(err)
            k += n
        return results


def _to_pil(images: torch.Tensor) -> list:
    """Float `[N, 3, H, W]` in `[0, 1]` -> PIL images."""
    from PIL import Image

    arrays = (images.permute(0, 2, 3, 1).cpu().float().numpy() * 255).round().clip(0, 255).astype("uint8")
    return [Image.fromarray(a) for a in arrays]
