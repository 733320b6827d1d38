"""The one thread that owns the model: it loads it, runs the continuous batch, and hands each
request its tokens.

Requests come from the event loop as `Job`s through a queue; between engine steps the thread
submits new jobs to the `Batcher`, applies cancellations, runs one step and posts every job's new
tokens back to the loop that waits on them, already turned into text (its `TextStream`s, one per
sample: the per-token decoding and stop-string checks stay off the event loop; a sample that
meets a stop string is cancelled here, before the next step). When nothing is running it sleeps
on the queue. A job whose row fails (its logits are not finite, its sampling raises) gets an error and leaves;
the rest of the batch goes on. Only a step that fails as a whole fails every job in it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from minigpt.engine import Engine, EngineError, GeneratedSequence, Sampling, TokenLogprob
from minigpt.serve.metrics import Metrics
from minigpt.serve.text import TextStream

log = logging.getLogger("minigpt.serve")


@dataclass(frozen=True)
class Event:
    """A new token of choice `index` of a job (sample j of prompt p is choice p * n + j), the
    text it lets the client see, finish_reason once that choice has ended ("stop" too when a
    stop string appeared), the token's logprob when asked for, and on a choice's first event
    its prompt's logprobs when asked for."""

    index: int
    token: int
    finish_reason: str | None
    text: str = ""
    logprob: TokenLogprob | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class Job:
    """One request's generation: what to run and the loop-side queue its events arrive on.
    Each of its prompts gets n samples; logprobs / prompt_logprobs as `Batcher.submit`."""

    prompts: list[list[int]]
    max_tokens: list[int]  # one per prompt
    sampling: Sampling
    n: int
    stop_ids: frozenset[int]
    seed: int | None
    loop: asyncio.AbstractEventLoop
    streams: list[TextStream] = field(default_factory=list)  # one per choice; none: no text
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.perf_counter)
    sequences: list[GeneratedSequence] = field(default_factory=list)
    waiting: bool = True  # not yet given rows

    def post(self, item: list[Event] | Exception) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop has closed (a forced shutdown): nobody is waiting
            pass


# id(sequence) -> the sequence, its job, and its choice index in the job's response
Jobs = dict[int, tuple[GeneratedSequence, Job, int]]


class QueueFull(Exception):
    """No room for another waiting request."""


class Scheduler:
    """Owns the engine on its own thread. `load` builds it (called on that thread, so a slow
    load does not block the server from answering /health)."""

    def __init__(
        self,
        load: Callable[[], Engine],
        max_batch: int,
        max_queue: int,
        metrics: Metrics,
        max_prefill_tokens: int | None = None,
    ) -> None:
        self.load = load
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self.max_queue = max_queue
        self.metrics = metrics
        self.engine: Engine | None = None
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.on_load_error: Callable[[str], None] | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiting = 0  # submitted jobs not yet running
        self._running = 0  # rows in the batch, running or prefilling
        self._thread = threading.Thread(target=self._run, name="minigpt-scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._inbox.put(("stop", None))
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        """Queue a job, or raise QueueFull when max_queue requests already wait beyond the
        batch's free rows."""
        with self._lock:
            if self._waiting >= self.max_queue + max(0, self.max_batch - self._running):
                raise QueueFull
            self._waiting += 1
        self.metrics.queue_depth.set(self._waiting)
        self._inbox.put(("submit", job))

    def cancel(self, job: Job, index: int | None = None) -> None:
        """Stop sample `index` of a job, or all of it; its rows are free for the next step."""
        self._inbox.put(("cancel", (job, index)))

    def _run(self) -> None:
        try:
            self.engine = self.load()
            self.batch = self.engine.batcher(
                self.max_batch, max_prefill_tokens=self.max_prefill_tokens
            )
        except Exception as e:  # a bad --model must stop the server with its message
            self.load_error = str(e) or type(e).__name__
            log.error("could not load the model: %s", self.load_error)
            if self.on_load_error is not None:
                self.on_load_error(self.load_error)
            return
        self.ready.set()
        jobs: Jobs = {}
        while True:
            commands = [self._inbox.get()] if self.batch.idle else []
            while True:
                try:
                    commands.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for kind, payload in commands:
                if kind == "stop":
                    return
                if kind == "submit":
                    self._submit(payload, jobs)
                else:
                    job, index = payload
                    for seq in job.sequences:
                        if index is None or seq.index == index:
                            self.batch.cancel(seq)
                    if job.waiting and index is None:
                        self._admitted(job)
            try:
                events = self.batch.step()
            except Exception as e:  # never leave requests hanging on a crashed step
                log.exception("engine step failed")
                for job in {id(j): j for _, j, _ in jobs.values()}.values():
                    job.post(RuntimeError(f"generation failed: {type(e).__name__}"))
                    for seq in job.sequences:
                        self.batch.cancel(seq)
                jobs.clear()
                continue
            self._fail_rows(jobs)
            self._deliver(events, jobs)

    def _submit(self, job: Job, jobs: Jobs) -> None:
        """Queue each of the job's prompts; an error in any leaves none of them queued."""
        choices = []
        try:
            for p, (prompt, max_tokens) in enumerate(zip(job.prompts, job.max_tokens, strict=True)):
                sequences = self.batch.submit(
                    prompt,
                    max_tokens,
                    job.sampling,
                    n=job.n,
                    stop_ids=job.stop_ids,
                    seed=job.seed,
                    logprobs=job.logprobs,
                    prompt_logprobs=job.prompt_logprobs,
                )
                job.sequences += sequences
                choices += [p * job.n + seq.index for seq in sequences]
        except EngineError as e:
            for seq in job.sequences:
                self.batch.cancel(seq)
            self._admitted(job)
            job.post(e)
            return
        for seq, choice in zip(job.sequences, choices, strict=True):
            jobs[id(seq)] = (seq, job, choice)

    def _admitted(self, job: Job) -> None:
        with self._lock:
            if job.waiting:
                job.waiting = False
                self._waiting -= 1

    def _fail_rows(self, jobs: Jobs) -> None:
        """End each job with a row the last step failed."""
        failed = {id(job): (job, seq) for seq, job, _ in (jobs[id(s)] for s in self.batch.failed)}
        for job, seq in failed.values():
            log.error("generation failed for one request: %s", seq.error)
            self._fail(job, seq.error, jobs)

    def _fail(self, job: Job, why: str, jobs: Jobs) -> None:
        """Post an error to `job` and end all of it; the rest of the batch goes on."""
        job.post(RuntimeError(f"generation failed: {why}"))
        self._admitted(job)
        for seq in job.sequences:
            self.batch.cancel(seq)
            jobs.pop(id(seq), None)

    def _event(self, job: Job, seq: GeneratedSequence, choice: int, token: int) -> Event:
        """The token as the client's text; a stop string ends the sample here and now."""
        reason = seq.finish_reason
        logprob = seq.token_logprobs[-1] if seq.logprobs is not None else None
        prompt = seq.prompt_logprobs if len(seq.tokens) == 1 else None
        if not job.streams:
            return Event(choice, token, reason, "", logprob, prompt)
        stream = job.streams[choice]
        text = "" if token in job.stop_ids else stream.push(token)
        if stream.stopped:
            self.batch.cancel(seq)  # its row is free at the next step
            reason = "stop"
        elif reason:
            text += stream.finish()
        return Event(choice, token, reason, text, logprob, prompt)

    def _deliver(self, events: list[tuple[GeneratedSequence, int]], jobs: Jobs) -> None:
        by_job: dict[int, tuple[Job, list[Event]]] = {}
        for seq, token in events:
            if id(seq) not in jobs:  # its job failed this step
                continue
            _, job, choice = jobs[id(seq)]
            try:
                event = self._event(job, seq, choice, token)
            except Exception as e:  # this job's text alone: the others go on
                log.exception("could not turn a request's tokens into text")
                self._fail(job, type(e).__name__, jobs)
                by_job.pop(id(job), None)
                continue
            by_job.setdefault(id(job), (job, []))[1].append(event)
        with self._lock:  # before any client hears of this step, so it can count on it
            self._running = self.batch.occupied
        for job, job_events in by_job.values():
            if job.waiting:
                self._admitted(job)
                self.metrics.time_to_first_token.observe(time.perf_counter() - job.submitted)
            job.post(job_events)
        for key in [key for key, (seq, _, _) in jobs.items() if seq.done]:
            del jobs[key]
        self.metrics.generated_tokens.inc(len(events))
        if self.engine.prefix_cache is not None:
            self.metrics.observe_prefix_cache(self.engine.prefix_cache)
        self.metrics.batch_size.set(self.batch.running)
        self.metrics.queue_depth.set(self._waiting)
