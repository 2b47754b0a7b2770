"""The scheduler: up to `parallel` sessions decode together over one loaded model, one worker
thread, continuous batching.

Requests (`Job`) wait in a bounded queue; between steps the worker moves them into free slots
(each slot is a Session with its own KV cache, planned up front as `n_seq=parallel`). A step is:
up to `prefill_chunk` tokens of new requests' prompts (one chunk of a long prompt, or several
short prompts whole), so a long prompt never stalls the running streams for long; every
generation with fresh logits samples and streams its token; then one batched forward (LoadedModel.decode) over every generation that needs its next logits:
all of them through each weight matrix at once, which on a memory-bound CPU costs little more
than one. A job that finished, or whose client went away (`cancel`), leaves and frees its slot
before the next step. One worker thread keeps sessions single-threaded.

The HTTP layer reads a job's output through `Job.events`, an asyncio queue fed from the worker
with `call_soon_threadsafe`; nothing here knows about HTTP.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from dataclasses import dataclass, field

from ..errors import NumallmError


class OverloadedError(NumallmError):
    """Every slot is busy and the queue is full: try again later (HTTP 503 + Retry-After)."""

    def __init__(self, msg: str, retry_after: int):
        super().__init__(msg)
        self.retry_after = retry_after


class ShuttingDownError(NumallmError):
    """The server is stopping; the job was cancelled or not accepted."""


@dataclass
class Job:
    """One request: prompt tokens and Session.stream keyword arguments."""

    tokens: list[int]
    max_tokens: int
    sampling: dict
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None     # GenerationChunk ..., then None (end) or an exception
    id: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    t_submit: float = 0.0

    def cancel(self) -> None:
        """The client went away: the worker drops the job at its next step."""
        self.cancelled.set()

    def _put(self, item) -> None:
        if self.loop is None or self.loop.is_closed():
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:                 # the loop closed between the check and the call
            pass


@dataclass
class Stats:
    """Counters for /metrics (written by the worker and the HTTP layer; ints and floats only)."""

    requests: collections.Counter = field(default_factory=collections.Counter)  # by outcome
    prompt_tokens: int = 0
    generation_tokens: int = 0
    busy_seconds: float = 0.0
    decode_steps: int = 0        # batched decode forwards
    prefill_chunks: int = 0      # prompt chunks fed


class Scheduler:
    def __init__(self, loaded, parallel: int = 1, max_queue: int = 16, prefill_chunk: int = 128):
        if parallel < 1:
            raise NumallmError(f"--parallel {parallel} must be at least 1")
        if max_queue < 0:
            raise NumallmError(f"--max-queue {max_queue} must be 0 or more")
        self.loaded = loaded
        self.parallel = parallel
        self.max_queue = max_queue
        self.prefill_chunk = max(1, prefill_chunk)
        self.slots = [loaded.session() for _ in range(parallel)]   # the planned n_seq caches
        self.free = list(range(parallel))
        self.active: dict[int, tuple[Job, object]] = {}            # slot -> (job, Generation)
        self.queue: collections.deque[Job] = collections.deque()
        self.stats = Stats()
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (t, tokens)
        self._job_seconds = 1.0               # running mean, for Retry-After
        self._ids = itertools.count(1)
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="numallm-scheduler", daemon=True)
        self._thread.start()

    # -- the HTTP side -----------------------------------------------------------------------------
    def submit(self, tokens: list[int], max_tokens: int, sampling: dict,
               loop: asyncio.AbstractEventLoop) -> Job:
        job = Job(list(tokens), max_tokens, sampling, loop, asyncio.Queue(), t_submit=time.monotonic())
        with self._cv:
            if self._stopping:
                raise ShuttingDownError("the server is shutting down")
            if len(self.queue) + len(self.active) >= self.parallel + self.max_queue:
                self.stats.requests["rejected"] += 1
                raise OverloadedError(
                    f"all {self.parallel} slots are busy and {len(self.queue)} requests are queued "
                    f"(--parallel {self.parallel}, --max-queue {self.max_queue}); retry later",
                    self.retry_after())
            job.id = next(self._ids)
            self.queue.append(job)
            self._cv.notify()
        return job

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: queued jobs x mean job time / slots."""
        return max(1, round(self._job_seconds * (len(self.queue) + 1) / self.parallel))

    def queue_depth(self) -> int:
        return len(self.queue)

    def n_active(self) -> int:
        return len(self.active)

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Generated tokens per second over the last `window` seconds (all streams together)."""
        now = time.monotonic()
        with self._cv:
            n = sum(k for t, k in self._recent if t >= now - window)
        return n / window

    def stop(self) -> None:
        """Refuse new jobs; the worker cancels queued and in-flight ones (their clients get a
        ShuttingDownError) after the step it is in. Returns at once (safe in a signal handler)."""
        with self._cv:
            self._stopping = True
            self._cv.notify()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def close(self, timeout: float = 10.0) -> None:
        """stop(), then wait for the worker to finish."""
        self.stop()
        self._thread.join(timeout)

    # -- the worker --------------------------------------------------------------------------------
    def _pick_slot(self, job: Job) -> int:
        """The free slot whose cached tokens share the longest prefix with the job's prompt: its
        KV cache is reused (a system prompt, a previous turn) and only the rest is prefilled."""
        def shared(i: int) -> int:
            cached, n = self.slots[i].cached, 0
            for a, b in zip(cached, job.tokens):
                if a != b:
                    break
                n += 1
            return n
        best = max(self.free, key=shared)
        self.free.remove(best)
        return best

    def _admit(self) -> None:
        while self.queue and self.free:
            job = self.queue.popleft()
            if job.cancelled.is_set():
                self.stats.requests["cancelled"] += 1
                job._put(None)
                continue
            slot = self._pick_slot(job)
            try:
                gen = self.slots[slot].start(job.tokens, job.max_tokens, **job.sampling)
            except Exception as exc:  # noqa: BLE001 - the request fails, the server goes on
                self.free.append(slot)
                self.stats.requests["failed"] += 1
                job._put(exc)
                continue
            self.active[slot] = (job, gen)

    def _leave(self, slot: int, outcome: str) -> None:
        job, _ = self.active.pop(slot)
        self.free.append(slot)       # its session's cache holds what `cached` says, whatever the step
        self.stats.requests[outcome] += 1
        took = time.monotonic() - job.t_submit
        self._job_seconds = 0.8 * self._job_seconds + 0.2 * took

    def _fail(self, slots: list[int], exc: Exception) -> None:
        with self._cv:
            for slot in slots:
                self.active[slot][0]._put(exc)
                self._leave(slot, "failed")

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self.queue and not self.active:
                    self._cv.wait()
                if self._stopping:
                    break
                self._admit()
                for slot in [s for s, (job, _) in self.active.items() if job.cancelled.is_set()]:
                    self._leave(slot, "cancelled")
            self._prefill()
            self._emit()
            self._decode()
        # stopping: every waiting client gets an error end, and every session its cache back
        err = ShuttingDownError("the server is shutting down; the request was cancelled")
        with self._cv:
            for slot in list(self.active):
                self.active[slot][0]._put(err)
                self._leave(slot, "cancelled")
            while self.queue:
                self.queue.popleft()._put(err)
                self.stats.requests["cancelled"] += 1

    def _prefill(self) -> None:
        """Prompt chunks of the jobs still prefilling, earliest admitted first, up to
        `prefill_chunk` tokens in all: a long prompt gets one chunk per step, and a burst of
        short ones goes in together, so none waits a decode step per request ahead of it."""
        budget = self.prefill_chunk
        for _, slot in sorted((job.id, slot) for slot, (job, g) in self.active.items()
                              if not g.prefilled):
            if budget <= 0:
                return
            job, gen = self.active[slot]
            start, t0 = gen.next_prompt, time.monotonic()
            try:
                gen.prefill(budget)
            except Exception as exc:  # noqa: BLE001
                self._fail([slot], exc)
                continue
            budget -= gen.next_prompt - start
            with self._cv:
                self.stats.busy_seconds += time.monotonic() - t0
                self.stats.prefill_chunks += 1
                if gen.finish_reason is not None:      # max_tokens=0: the prompt only
                    job._put(None)
                    self._leave(slot, "completed")

    def _emit(self) -> None:
        """Every generation with fresh logits samples its token and streams it."""
        for slot, (job, gen) in list(self.active.items()):
            if gen.logits is None:
                continue
            try:
                chunk = gen.emit()
            except Exception as exc:  # noqa: BLE001
                self._fail([slot], exc)
                continue
            now = time.monotonic()
            with self._cv:
                self.stats.generation_tokens += 1
                if chunk.generation_tokens == 1:
                    self.stats.prompt_tokens += chunk.prompt_tokens
                self._recent.append((now, 1))
                while self._recent and self._recent[0][0] < now - 60:
                    self._recent.popleft()
            job._put(chunk)
            if chunk.finish_reason is not None:
                job._put(None)
                with self._cv:
                    self._leave(slot, "completed")

    def _decode(self) -> None:
        """One batched forward over every generation waiting for its next logits."""
        batch = [(slot, gen) for slot, (job, gen) in self.active.items()
                 if gen.prefilled and gen.logits is None and gen.finish_reason is None]
        if not batch:
            return
        t0 = time.monotonic()
        try:
            self.loaded.decode([gen for _, gen in batch])
        except Exception as exc:  # noqa: BLE001 - the requests fail, the server goes on
            self._fail([slot for slot, _ in batch], exc)
            return
        with self._cv:
            self.stats.busy_seconds += time.monotonic() - t0
            self.stats.decode_steps += 1
