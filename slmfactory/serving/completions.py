"""The completion routes' work in a replica (``POST /v1/completions``, ``POST
/v1/chat/completions``): the prompt checked against the model's context and the request's
settings against its vocabulary, generation through the replica's ``scheduler.Scheduler``,
the whole answer or its server-sent events stream.

``Completions`` is a part of ``server.DomainServer`` (its base class), apart from it because
generation and streaming are the larger half of a replica's request work and read best
together. It uses what ``DomainServer`` sets up: ``model_for`` (the domain's model),
``_token_ids``, ``_charge`` (the per-key rates), ``count_tokens``, ``scheduler``, ``limits``,
``chat_template``, ``timeout`` and the metrics ``m``.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

from fastapi.responses import StreamingResponse

from slmfactory.serving import replies
from slmfactory.serving.api import ApiError
from slmfactory.serving.engine import Deadline, Loaded, token_logprobs
from slmfactory.serving.generation import Sampling, TextStream, chat_prompt, check_stop
from slmfactory.serving.scheduler import PARTS, Job
from slmfactory.serving.schemas import ChatRequest, CompletionRequest
from slmfactory.serving.timing import mark, timer


class Completions:
    """The completion and chat completion handlers of ``server.DomainServer``."""

    # -- generation, through the replica's scheduler ----------------------------------------
    async def _generated(self, loaded: Loaded, ids: list[list[int]], s: Sampling, deadline: float) -> list:
        """Each prompt's ``s.n`` completions, through the scheduler (iteration-level
        batching with every other request of the domain). A request given up (the deadline
        of ``_respond``, the client gone) leaves the batch at the next token."""
        cancel = threading.Event()
        jobs = [self.scheduler.submit(loaded, x, s, deadline, cancel) for x in ids]
        waits = [asyncio.wrap_future(j.future) for j in jobs]
        for w in waits:  # a failure beside the one raised is retrieved, not logged as lost
            w.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            results = await asyncio.gather(*waits)
        finally:
            cancel.set()
        self._step_marks(jobs)
        if time.monotonic() > deadline:
            raise Deadline()
        return results

    @staticmethod
    def _step_marks(jobs: list[Job]) -> None:
        """The request's time in the scheduler, in its ``Server-Timing``: ``queue`` (waiting
        to join), its share of each part of the steps it was in (``schedule``, ``prefill``,
        ``forward``, ``logits``, ``emit``), ``steps_other`` (the rest: the other rows' shares
        and other domains' steps)."""
        t = timer()
        if t is None:
            return
        now = time.perf_counter()
        waited = (now - t.last) * 1e3
        own = 0.0
        for part in ("queue", *PARTS):
            v = sum(j.parts[part] for j in jobs) * 1e3
            t.parts[part] = t.parts.get(part, 0.0) + v
            own += v
        t.parts["steps_other"] = t.parts.get("steps_other", 0.0) + max(0.0, waited - own)
        t.note("batch", max(j.most for j in jobs))
        t.last = now

    def _check_sampling(self, loaded: Loaded, s: Sampling) -> None:
        """What only the model can tell, found before generation rather than inside it: a
        stop string the vocabulary cannot form, a ``logit_bias`` token past the vocabulary
        (400s naming the field)."""
        try:
            check_stop(loaded.tokenizer, s.stop)
        except ValueError as e:
            raise ApiError(400, f"'stop': {e}", param="stop", code="invalid_value") from None
        bad = [t for t, _ in s.logit_bias if t >= loaded.vocab]
        if bad:
            raise ApiError(400, f"'logit_bias' holds token id {bad[0]}, outside the model's vocabulary "
                           f"(ids 0..{loaded.vocab - 1})", param="logit_bias", code="invalid_value")

    # -- completions and chat completions ---------------------------------------------------
    async def complete(self, c: CompletionRequest, caller, deadline: float):
        """``POST /v1/completions``: (domain, the answer or its stream)."""
        domain, loaded, extra = await self.model_for(c.model, c.prompts[0], "prompt", deadline)
        mark("model")
        ids = self._token_ids(loaded, c.prompts, "prompt")
        for i, x in enumerate(ids):
            if len(x) + c.max_tokens > min(loaded.context, self.limits.max_prompt_tokens + c.max_tokens):
                raise ApiError(400, f"prompt[{i}] has {len(x)} tokens; with max_tokens={c.max_tokens} it "
                               f"exceeds the model's context of {loaded.context} tokens",
                               param="max_tokens", code="context_length_exceeded")
        return await self._complete("completions", c, domain, loaded, extra, ids, Sampling.of(c), caller, deadline)

    async def chat(self, c: ChatRequest, caller, deadline: float):
        """``POST /v1/chat/completions``: the messages rendered with ``serving.chat_template``
        into one prompt, completed as ``complete`` does."""
        domain, loaded, extra = await self.model_for(c.model, c.text, "messages", deadline)
        mark("model")
        try:
            prompt = chat_prompt(loaded, c.messages, self.chat_template)
        except ValueError as e:
            raise ApiError(400, f"'messages': {e}", param="messages", code="invalid_value") from None
        ids = loaded.encode([prompt])[0]
        room = loaded.context - len(ids)
        if len(ids) > self.limits.max_prompt_tokens or room < 1:
            raise ApiError(400, f"the messages make a prompt of {len(ids)} tokens; at most "
                           f"{min(self.limits.max_prompt_tokens, loaded.context - 1)} leave room for a completion "
                           f"in the model's context of {loaded.context}", param="messages",
                           code="context_length_exceeded")
        cap = c.completion_cap
        if cap is not None and cap > room:
            field = "max_completion_tokens" if c.max_completion_tokens is not None else "max_tokens"
            raise ApiError(400, f"the messages make a prompt of {len(ids)} tokens; with {field}={cap} it exceeds "
                           f"the model's context of {loaded.context} tokens", param=field,
                           code="context_length_exceeded")
        sampling = Sampling.of(c, max_tokens=cap if cap is not None else min(self.limits.max_tokens, room))
        return await self._complete("chat", c, domain, loaded, extra, [ids], sampling, caller, deadline)

    async def _complete(self, kind: str, c, domain: str, loaded: Loaded, extra: dict, ids: list[list[int]],
                        s: Sampling, caller, deadline: float):
        self._check_sampling(loaded, s)
        await self._charge(caller, "tokens", sum(len(x) for x in ids) + s.max_tokens * s.n * len(ids))
        mark("tokenise")
        cid = f"{'cmpl' if kind == 'completions' else 'chatcmpl'}-{uuid.uuid4().hex[:24]}"
        if c.stream:
            return domain, StreamingResponse(self._stream(kind, cid, domain, loaded, ids[0], s, c, extra, deadline),
                                             media_type="text/event-stream")
        results = await self._generated(loaded, ids, s, deadline)
        choices, completion_tokens = [], 0
        for i, (x, outs) in enumerate(zip(ids, results)):
            for out in outs:
                completion_tokens += len(out["ids"])
                text, lp = out["text"], None
                if kind == "chat":
                    if s.logprobs is not None:
                        lp = replies.chat_logprobs(loaded, out["ids"], out["logprobs"])
                    choices.append(replies.choice(kind, len(choices), text, out["finish"], lp))
                    continue
                echoed = (c.prompts[i] if isinstance(c.prompts[i], str) else loaded.tokenizer.decode(x)) \
                    if c.echo else ""
                if s.logprobs is not None:
                    lp = replies.completion_logprobs(loaded, out["ids"], out["logprobs"], s.logprobs, len(echoed))
                    if c.echo:  # the prompt's own log-probs: a forward pass over the prompt
                        lp = replies.joined(await asyncio.to_thread(token_logprobs, loaded, x, 0, s.logprobs,
                                                                    deadline), lp)
                choices.append(replies.choice(kind, len(choices), echoed + text, out["finish"], lp))
        prompt_tokens = sum(len(x) for x in ids)
        self.count_tokens(completion_tokens, domain, kind)
        return domain, replies.answer(kind, cid, domain, choices, replies.usage(prompt_tokens, completion_tokens),
                                      extra)

    # -- streaming ------------------------------------------------------------------------
    async def _stream(self, kind: str, cid: str, domain: str, loaded: Loaded, ids: list[int], s: Sampling, c,
                      extra: dict, deadline: float):
        """Server-sent events: one chunk per generated piece of text (with its tokens'
        log-probs when asked), then the finish reason, the usage when asked
        (``stream_options.include_usage``), and ``[DONE]``. Every stream ends: if generation
        raises or the deadline passes, an OpenAI error event comes before ``[DONE]``; a
        client that goes away stops its generation."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        with_usage = c.include_usage
        eos = loaded.tokenizer.eos_token_id

        def event(text: str | None, finish: str | None = None, entries: list | None = None, offset: int = 0,
                  role: bool = False) -> str:
            lp = None
            if entries is not None and s.logprobs is not None:
                lp = replies.stream_logprobs(kind, loaded, [t for t, _ in entries], [e for _, e in entries],
                                             s.logprobs, offset)
            return "data: " + json.dumps(replies.chunk(kind, cid, domain, extra, text, finish, lp, with_usage,
                                                       role)) + "\n\n"

        def error_event(e: ApiError) -> str:
            self.m["requests"].labels(domain, kind, f"stream_{e.status}").inc()
            return "data: " + json.dumps(e.body()) + "\n\n"

        # Each token and then the end (None) through the queue, in the scheduler's order.
        job = self.scheduler.submit(loaded, ids, s, deadline, cancel,
                                    lambda new, steps: loop.call_soon_threadsafe(queue.put_nowait, (new, steps)))
        job.future.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, None))
        task = asyncio.wrap_future(job.future)
        task.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            offset = 0
            if kind == "chat":
                yield event("", role=True)
            elif c.echo:
                echoed = c.prompts[0] if isinstance(c.prompts[0], str) else loaded.tokenizer.decode(ids)
                if s.logprobs is not None:  # the prompt's own log-probs: a forward pass over the prompt
                    lp = await asyncio.to_thread(token_logprobs, loaded, ids, 0, s.logprobs, deadline)
                    yield "data: " + json.dumps(replies.chunk(kind, cid, domain, extra, echoed, None, lp,
                                                              with_usage)) + "\n\n"
                else:
                    yield event(echoed)
                offset = len(echoed)
            text = TextStream(loaded.tokenizer, s.stop)
            pending: list = []  # (token, log-prob entry) of tokens whose text is not sent yet
            sent = 0
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), max(0.0, deadline - time.monotonic()) + 1.0)
                except asyncio.TimeoutError:
                    raise Deadline() from None  # nothing at all within the deadline
                if item is None:
                    break
                new, steps = item
                if steps is not None:
                    pending.extend((t, e) for t, e in zip(new, steps) if t != eos)
                piece = text.push(new)
                if piece:
                    yield event(piece, entries=pending, offset=offset)
                    sent, offset, pending = sent + len(pending), offset + len(piece), []
            final = (await task)[0]
            rest = text.rest(final["text"])
            # Tokens past a stop string are not sent, nor their log-probs.
            pending = pending[:max(0, len(final["logprobs"]) - sent)] if final["logprobs"] is not None else []
            if rest or pending:
                yield event(rest, entries=pending, offset=offset)
            yield event(None if kind == "chat" else "", final["finish"])
            if with_usage:
                yield "data: " + json.dumps(replies.usage_chunk(kind, cid, domain, extra, replies.usage(
                    len(ids), len(final["ids"])))) + "\n\n"
            self.count_tokens(len(final["ids"]), domain, kind)
        except Deadline:
            cancel.set()
            yield error_event(ApiError(408, f"generation did not finish within the deadline of {self.timeout:g}s",
                                       code="request_timeout"))
        except Exception as e:  # noqa: BLE001  (a failed generation ends its stream, with the reason)
            cancel.set()
            yield error_event(ApiError(500, f"generation failed: {type(e).__name__}: {str(e)[:300]}",
                                       type_="server_error", code="generation_failed"))
        finally:
            # The client went away (GeneratorExit / cancellation) or the stream ended:
            # either way the generation thread stops at its next token.
            cancel.set()
        yield "data: [DONE]\n\n"
