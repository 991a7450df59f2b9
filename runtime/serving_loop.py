"""The scheduler on a background thread: submit from any thread or event loop, stream the outputs.

The engine is not thread-safe, so one thread owns it and steps the scheduler while there is work;
other threads only put requests (checked first, in the caller's thread) and aborts into an inbox.
An error inside a step ends the requests it touched with that error and the loop serves on: one
bad request never stops the others or the server.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from specontext_compiler.runtime.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Output:
    """One piece of a request's result: a token and the text it added, or the end."""

    token_id: int | None
    text: str
    finish_reason: str | None = None     # "stop", "length", "abort" or "error" on the last Output
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Handle:
    """A submitted request, for abort(); its scheduler Request once the loop has taken it."""

    def __init__(self, sink: Callable[[Output], None]):
        self.sink = sink
        self.request = None
        self.aborted = False


class ServingLoop:
    """Owns an Engine's scheduler on one thread; submit() and stream() from anywhere."""

    def __init__(self, engine, idle_wait_s: float = 0.05):
        self.engine = engine
        self.scheduler = engine.scheduler
        self.idle_wait_s = idle_wait_s
        self.failed_steps = 0
        self.started_s = time.perf_counter()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._rate = deque(maxlen=512)           # (time, tokens generated so far), one per step
        self._thread = threading.Thread(target=self._run, name="specontext-serving", daemon=True)

    # -- control -----------------------------------------------------------------------------
    def start(self) -> "ServingLoop":
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Abort what is left and end the thread."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Output], None]) -> Handle:
        """Queue a request (RequestError here if it cannot be served); sink gets its Outputs on the loop thread."""
        self.scheduler.check(prompt_ids, params)
        handle = Handle(sink)
        self._inbox.put(("add", handle, list(prompt_ids), params))
        self._wake.set()
        return handle

    def abort(self, handle: Handle) -> None:
        handle.aborted = True
        self._inbox.put(("abort", handle))
        self._wake.set()

    async def stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Output]:
        """Outputs of one request in an asyncio program; leaving the loop early aborts the request."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        handle = self.submit(prompt_ids, params, lambda out: loop.call_soon_threadsafe(outputs.put_nowait, out))
        try:
            while True:
                out = await outputs.get()
                yield out
                if out.finish_reason is not None:
                    return
        finally:
            if handle.request is None or not handle.request.finished:
                self.abort(handle)

    # -- numbers -----------------------------------------------------------------------------
    def metrics(self) -> dict:
        """Throughput over the last ten seconds, queue, running requests, KV bytes."""
        now, window = time.perf_counter(), 10.0
        recent = [(t, n) for t, n in list(self._rate) if now - t <= window]
        rate = (recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0]) if len(recent) > 1 and recent[-1][0] > recent[0][0] else 0.0
        store = self.engine.ctx.store
        return {"tokens_per_s": rate, "generated_tokens": self.scheduler.generated_tokens,
                "queue_length": len(self.scheduler.waiting) + self._inbox.qsize(),
                "running_requests": self.scheduler.running, "slots": len(self.scheduler.slots),
                "decode_steps": self.scheduler.decode_steps, "prefill_chunks": self.scheduler.prefill_chunks,
                "failed_steps": self.failed_steps, "device_kv_bytes": store.device_bytes(),
                "host_kv_bytes": store.host_bytes(), "uptime_s": now - self.started_s}

    # -- the thread --------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._take_inbox()
            if not self.scheduler.has_work():
                self._wake.wait(self.idle_wait_s)
                self._wake.clear()
                continue
            try:
                self.scheduler.step()
            except Exception as exc:          # noqa: BLE001 - one failed step must not end serving
                self.failed_steps += 1
                log.exception("a serving step failed; its requests end with the error")
                self._fail_all(f"{type(exc).__name__}: {exc}".splitlines()[0])
            self._rate.append((time.perf_counter(), self.scheduler.generated_tokens))
        self._fail_all("the server is shutting down")

    def _take_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if item[0] == "add":
                _, handle, prompt_ids, params = item
                if handle.aborted:
                    continue
                handle.request = self.scheduler.add(prompt_ids, params, _forward_to(handle))
            elif item[1].request is not None:
                self.scheduler.abort(item[1].request)

    def _fail_all(self, reason: str) -> None:
        """End every queued and running request with an error Output."""
        requests = list(self.scheduler.waiting) + [r for r in self.scheduler.slots if r is not None]
        for request in requests:
            self.scheduler.abort(request)
            if request.on_output is not None:
                _safe(request.on_output.sink, Output(None, "", "error", reason, len(request.prompt_ids),
                                                     len(request.token_ids)))


def _forward_to(handle: Handle):
    """The scheduler's on_output for a handle: each token becomes an Output for its sink."""
    def on_output(request, token_id: int, delta: str, reason: str | None) -> None:
        _safe(handle.sink, Output(token_id, delta, reason, None, len(request.prompt_ids), len(request.token_ids)))
    on_output.sink = handle.sink
    return on_output


def _safe(sink, output: Output) -> None:
    try:
        sink(output)
    except Exception:                         # noqa: BLE001 - a client gone away ends only itself
        log.exception("a request's output sink failed")
