"""The model service: one background thread runs the engine for every front door (API, web pages, CLI).

submit(query, history, options) returns a Reply handle at once; iterate it (for / async for) for the text deltas
of the reply, read .result when it ends, cancel() it to stop. Preparing a request (validating its options,
fitting its history into the context, tokenizing) happens on a second thread, so neither an event loop nor the
other requests' decoding waits for a long input. Requests are admitted first come, first served; at most
max_queue wait, beyond that submit() raises QueueFull with a retry-after hint (the API's 503).
"""
import asyncio
import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import List, Optional

from . import openmp
from .context import fit_history
from .engine import Engine, Sequence
from .text import History, TextDeltas, build_prompt
from .validation import GenerationOptions, check_history, check_text

log = logging.getLogger("chatglm.service")
_END = object()


class QueueFull(RuntimeError):
    """Too many requests are waiting; retry_after: seconds after which trying again is likely to succeed."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"server busy: {waiting} requests are already waiting; retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Result:
    response: str
    history: History           # the history the reply was generated with (fitted), plus this turn
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str         # stop | length | cancelled
    dropped_turns: int = 0     # oldest turns fit_history left out


class Reply:
    """A submitted request. Iterating yields the reply's text deltas (their concatenation is result.response);
    an invalid request raises its InputError / ContextTooLongError from the iterator before any delta."""

    def __init__(self, query: str, history, options: GenerationOptions):
        self.query, self.history, self.options = query, history, options
        self.seq: Optional[Sequence] = None
        self.result: Optional[Result] = None
        self.error: Optional[BaseException] = None
        self.submitted = time.monotonic()
        self.cancelled = False
        self.dropped_turns = 0
        self.admitted = False  # taken off the queue by the engine
        self.prepared = threading.Event()  # set once validated, fitted and tokenized (or refused: .error)
        self._deltas = TextDeltas()
        self._items: deque = deque()
        self._lock = threading.Condition()
        self._waiters: List = []  # (event loop, asyncio.Event) of async iterators

    def wait_for_output(self, timeout: float) -> bool:
        """True once a delta, the end or an error is there to read; False after `timeout` seconds without one."""
        with self._lock:
            return bool(self._lock.wait_for(lambda: self._items, timeout))

    def cancel(self):
        """Stop generating (Stop button, client gone); the iterator ends and result.finish_reason is "cancelled"."""
        self.cancelled = True
        if self.seq is not None:
            self.seq.cancelled = True

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None

    def __iter__(self):
        """The deltas; leaving the loop early (break, an exception, Ctrl-C) cancels the reply."""
        try:
            while True:
                with self._lock:
                    while not self._items:
                        self._lock.wait()
                    item = self._items.popleft()
                if item is _END:
                    if self.error is not None:
                        raise self.error
                    return
                yield item
        finally:
            if not self.done:
                self.cancel()

    async def __aiter__(self):
        """The deltas, awaited without blocking the event loop; leaving early (client gone) cancels the reply."""
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiters.append(waiter)
        try:
            while True:
                with self._lock:
                    item = self._items.popleft() if self._items else None
                    if item is None:
                        waiter[1].clear()
                if item is None:
                    await waiter[1].wait()
                elif item is _END:
                    if self.error is not None:
                        raise self.error
                    return
                else:
                    yield item
        finally:
            with self._lock:
                self._waiters.remove(waiter)
            if not self.done:
                self.cancel()

    # ---- called on the service's threads ---------------------------------------------------------------------
    def _push(self, item):
        with self._lock:
            self._items.append(item)
            self._lock.notify_all()
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that event loop is closed: nobody is listening any more
                self.cancel()

    def _progress(self):
        seq = self.seq
        if seq.finished:
            rest = self._deltas.finish(seq.response) if seq.finish_reason != "cancelled" else ""
            if rest:
                self._push(rest)
            self.result = Result(seq.response, self.history + [(self.query, seq.response)], seq.n_prompt,
                                 len(seq.ids) - seq.n_prompt, seq.finish_reason, self.dropped_turns)
            self._push(_END)
        else:
            new = self._deltas.step(seq.visible)
            if new:
                self._push(new)

    def _fail(self, error: BaseException):
        self.error = error
        self.prepared.set()
        self._push(_END)


class ModelService:
    """One engine on one thread for the whole process. kv_budget: bytes for KV caches (None: the engine's
    default from free memory); max_queue: requests that may wait for admission."""

    def __init__(self, model, tokenizer, max_queue: int = 64, kv_budget: Optional[int] = None):
        self.model, self.tokenizer, self.max_queue = model, tokenizer, max_queue
        self.engine = Engine(model, kv_budget)
        self._inbox: "queue.Queue" = queue.Queue()     # prepared sequences for the engine thread
        self._preparing: "queue.Queue" = queue.Queue()  # submitted replies to validate, fit and tokenize
        self._waiting = 0  # replies submitted but not yet admitted
        self._lock = threading.Lock()
        self._replies: List[Reply] = []
        self._recent_seconds: deque = deque([5.0], maxlen=16)
        self._closed = False
        openmp.release_workers()  # the loading thread's OpenMP workers would slow the engine thread's (openmp.py)
        self._threads = [threading.Thread(target=self._prepare_loop, name="chatglm-prepare", daemon=True),
                         threading.Thread(target=self._engine_loop, name="chatglm-engine", daemon=True)]
        for t in self._threads:
            t.start()

    @property
    def kv_budget(self) -> int:
        return self.engine.kv_budget

    @property
    def kv_bytes_per_token(self) -> int:
        return self.engine.bytes_per_token

    @property
    def waiting(self) -> int:
        """Requests submitted but not yet generating."""
        return self._waiting

    @property
    def running(self) -> int:
        """Replies being generated now."""
        return len(self.engine.running)

    def ahead_of(self, reply: Reply) -> int:
        """While `reply` waits in the engine for room (its KV budget), the replies being generated plus those
        waiting before it; 0 once it runs (or before it reaches the engine). A snapshot for a notice."""
        waiting = list(self.engine.waiting)  # copied in C: the engine thread cannot interleave
        if reply.seq not in waiting:  # (Sequence compares by identity)
            return 0
        return len(self.engine.running) + waiting.index(reply.seq)

    def describe(self) -> str:
        """One start-up line: the KV budget and what it holds."""
        per_seq = self.model.config.max_sequence_length * self.kv_bytes_per_token
        size = f"{self.kv_budget / 2**30:.1f} GiB" if self.kv_budget >= 2**30 else f"{self.kv_budget / 2**20:.1f} MiB"
        return (f"KV cache budget {size} ({self.kv_bytes_per_token / 2**10:.0f} KiB per "
                f"token; {self.kv_budget // per_seq} full-context replies at once, more for shorter ones)")

    def submit(self, query: str, history: Optional[History] = None, options: Optional[GenerationOptions] = None,
               seed: Optional[int] = None) -> Reply:
        """Queue a request; returns its Reply at once. QueueFull when max_queue requests already wait."""
        options = options or GenerationOptions()
        if seed is not None:
            options = options.with_(seed=seed)
        reply = Reply(query, history, options)
        with self._lock:
            if self._closed:
                raise RuntimeError("the model service is shut down")
            if self._waiting >= self.max_queue:
                raise QueueFull(self._waiting, self._retry_after())
            self._waiting += 1
            self._replies.append(reply)
        self._preparing.put(reply)
        return reply

    def close(self, timeout: float = 10.0):
        """Cancel everything and stop the threads (Ctrl-C, server shutdown); every open Reply ends, cancelled."""
        with self._lock:
            self._closed = True
            replies = list(self._replies)
        for reply in replies:
            reply.cancel()
        self._preparing.put(None)
        self._threads[0].join(timeout)  # everything it prepared is in the inbox before the engine's None
        self._inbox.put(None)
        self._threads[1].join(timeout)

    # ---- the preparing thread ----------------------------------------------------------------------------------
    def _prepare_loop(self):
        while True:
            reply = self._preparing.get()
            if reply is None:
                return
            try:
                reply.seq = self._prepare(reply)
            except Exception as e:  # InputError, ContextTooLongError: the caller's iterator raises it
                self._admitted(reply)
                self._ended(reply)
                reply._fail(e)
                continue
            reply.seq.cancelled = reply.cancelled
            reply.prepared.set()
            self._inbox.put(reply)

    def _prepare(self, reply: Reply) -> Sequence:
        """Validate, fit the history into the context, tokenize: the slow parts of a long input."""
        config = self.model.config
        query, history = check_text(reply.query, "query"), check_history(reply.history)
        options = reply.options.validate(config)
        history, reply.dropped_turns = fit_history(self.tokenizer, query, history, options.max_length,
                                                   config.max_sequence_length)
        reply.history = history
        return Sequence(self.tokenizer.encode(build_prompt(query, history)), options, self.tokenizer, config)

    # ---- the engine thread -------------------------------------------------------------------------------------
    def _engine_loop(self):
        owners = {}  # id(sequence) -> its Reply
        while True:
            closing = self._take_inbox(owners)
            if closing:
                for reply in owners.values():
                    reply.cancel()
            try:
                changed = self.engine.step()
            except Exception as e:  # a bug or out of memory: those requests fail, the service keeps serving
                log.exception("engine step failed")
                changed = []
                for reply in owners.values():
                    if not reply.admitted:
                        self._admitted(reply)
                    self._ended(reply)
                    reply._fail(e)
                owners.clear()
                self.engine.waiting.clear()
                self.engine.running.clear()
            for seq in changed:
                self._progress(owners, seq)
            if closing:
                return

    def _take_inbox(self, owners) -> bool:
        """Move prepared requests into the engine (waiting for one while idle); True once close() was called."""
        block = self.engine.idle
        while True:
            try:
                reply = self._inbox.get(block=block)
            except queue.Empty:
                return False
            if reply is None:
                return True
            owners[id(reply.seq)] = reply
            self.engine.add(reply.seq)
            block = False

    def _progress(self, owners, seq: Sequence):
        reply = owners[id(seq)]
        if not reply.admitted:
            reply.admitted = True
            self._admitted(reply)
        reply._progress()
        if seq.finished:
            del owners[id(seq)]
            self._ended(reply)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _retry_after(self) -> int:
        per_reply = sum(self._recent_seconds) / len(self._recent_seconds)
        return max(1, math.ceil(per_reply * self._waiting / max(1, len(self.engine.running))))

    def _admitted(self, reply: Reply):
        with self._lock:
            self._waiting -= 1

    def _ended(self, reply: Reply):
        with self._lock:
            if reply in self._replies:
                self._replies.remove(reply)
            self._recent_seconds.append(time.monotonic() - reply.submitted)
