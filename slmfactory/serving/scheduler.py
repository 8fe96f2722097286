"""Iteration-level ("continuous") batching of generation: requests join and leave a
running batch at token boundaries, whatever their ``max_tokens``, sampling settings, stop
strings, seeds or streaming. Plain torch and transformers' model forward, no Ray or
server (``tests/test_scheduler.py`` drives it step by step); ``serving/server.py`` runs one
``Scheduler`` per replica, in its own thread.

One step of one domain's batch (``Scheduler.step``):

1. *schedule*: rows whose request was cancelled or passed its deadline leave; waiting
   requests of this domain join, first come first served, up to ``max_rows`` rows and
   ``prefill_tokens`` (left-padded) prompt tokens per step, so that a burst of long prompts
   does not stall the running rows for long;
2. *forward*: one decode forward of the running rows (their last token, on their KV cache:
   the prompt is never recomputed), and one prefill forward of the joiners (only the last
   position's logits); the joiners' cache is merged into the batch's (left padding to a
   common width; columns no row needs any more are trimmed when rows leave);
3. *logits*: every row's own settings at once, as tensors over the batch
   (``Rows.process``): ``logit_bias``, ``repetition_penalty``, ``presence_penalty``,
   ``frequency_penalty``, temperature, ``top_k``, ``top_p``; greedy rows take the argmax,
   sampled rows one inverse-CDF draw each: a seeded request draws from its own
   ``torch.Generator``, so its text is the same alone or in any batch;
4. *emit*: each row's token is appended and streamed; a row leaves at end of text, at a
   stop string (its text cut before it) or at ``max_tokens``; its request is answered
   when all its ``n`` rows have left.

Domains are interleaved fairly: the scheduler steps each domain with work in turn (one
model per batch). What a step's parts cost is kept per request (its share of each part:
the ``Server-Timing`` header) and in total (``Scheduler.totals``: ``bench/serve_bench.py``).
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable

from slmfactory.serving.engine import Deadline, Loaded
from slmfactory.serving.generation import Sampling, cut_at_stop, tokens_within

MAX_ROWS = 64
"""Rows (requests x n) one domain's running batch holds at most; more wait to join."""
PREFILL_TOKENS = 1024
"""Left-padded prompt tokens prefilled in one step (at least one request joins per step)."""
PARTS = ("schedule", "prefill", "forward", "logits", "emit")
"""What a step's time is spent on (see the module docstring); ``queue``: a request's wait
before it joins."""


class Cancelled(Exception):
    """The request's client went away: its rows left the batch."""


class Job:
    """One prompt of one request: its ``n`` rows, where their tokens go (``on_tokens(ids,
    logprob entries or None)``, from the scheduler's thread) and its result (``future``:
    ``n`` completions shaped as ``generation.generate``'s)."""

    def __init__(self, loaded: Loaded, prompt: list[int], s: Sampling, deadline: float,
                 cancel: threading.Event | None, on_tokens: Callable | None):
        self.loaded, self.prompt, self.s, self.deadline = loaded, list(prompt), s, deadline
        self.cancel = cancel or threading.Event()
        self.on_tokens = on_tokens
        self.future: Future = Future()
        self.outs: list[dict | None] = [None] * s.n
        self.left = s.n
        self.submitted = time.perf_counter()
        self.parts = dict.fromkeys(("queue",) + PARTS, 0.0)
        self.most = 0
        """The most rows a step this request was in held."""
        """Seconds: the wait to join, then this request's share of each part of the steps it was in."""

    def finish(self, j: int, out: dict) -> None:
        self.outs[j] = out
        self.left -= 1
        if self.left == 0 and not self.future.done():
            self.future.set_result(self.outs)

    def fail(self, error: BaseException) -> None:
        self.left = 0
        if not self.future.done():
            self.future.set_exception(error)


class Row:
    """One completion being generated: its request, which of its ``n`` it is, its tokens."""

    __slots__ = ("job", "j", "ids", "lps", "gen", "done")

    def __init__(self, job: Job, j: int):
        import torch  # lazy (engine's module docstring)

        self.job, self.j = job, j
        self.ids: list[int] = []
        self.lps: list | None = [] if job.s.logprobs is not None else None
        self.gen = None
        if job.s.seed is not None and job.s.temperature > 0:
            # The request's own generator (choice j of n: its own stream): its draws do not
            # depend on what else is in the batch.
            self.gen = torch.Generator().manual_seed((job.s.seed * 65537 + j) % (1 << 63))
        self.done = False


class Rows:
    """A domain's running batch: its rows, their KV cache (a transformers
    ``DynamicCache``), attention mask (left padding), next positions, last tokens (not yet
    in the cache) and the per-row settings as tensors."""

    def __init__(self, loaded: Loaded):
        self.loaded = loaded
        self.rows: list[Row] = []
        self.cache = None
        self.mask = self.pos = self.last = None
        self.settings: dict[str, Any] | None = None  # rebuilt when rows join or leave
        self.seen = None    # rows x vocabulary: token in prompt or completion (repetition_penalty)
        self.counts = None  # rows x vocabulary: times in the completion (presence/frequency)
        self.broken: list[int] = []  # rows whose last logits were not finite

    def __len__(self) -> int:
        return len(self.rows)

    # -- membership -------------------------------------------------------------------
    def keep(self, idx: list[int]) -> None:
        """Only rows ``idx`` stay; columns that no remaining row uses are trimmed."""
        import torch

        if len(idx) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in idx]
        self.settings = None
        if not idx:
            self.cache = self.mask = self.pos = self.last = self.seen = self.counts = None
            return
        sel = torch.tensor(idx)
        self.cache.batch_select_indices(sel)
        self.mask, self.pos, self.last = self.mask[sel], self.pos[sel], self.last[sel]
        self.seen = self.seen[sel] if self.seen is not None else None
        self.counts = self.counts[sel] if self.counts is not None else None
        first = int(self.mask.any(0).int().argmax())  # leading columns that are padding in every row
        if first:
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]

    def join(self, rows: list[Row], cache, mask) -> None:
        """``rows`` (prefilled: their ``cache`` and ``mask``) join the batch."""
        import torch
        import torch.nn.functional as F

        self.settings = None
        if not self.rows:
            self.rows, self.cache, self.mask = list(rows), cache, mask
            self.pos = mask.sum(1)
            self.seen = self.counts = None
            return
        width = max(self.mask.shape[1], mask.shape[1])
        a, b = width - self.mask.shape[1], width - mask.shape[1]
        for old, new in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([F.pad(old.keys, (0, 0, a, 0)), F.pad(new.keys, (0, 0, b, 0))])
            old.values = torch.cat([F.pad(old.values, (0, 0, a, 0)), F.pad(new.values, (0, 0, b, 0))])
        self.mask = torch.cat([F.pad(self.mask, (a, 0)), F.pad(mask, (b, 0))])
        self.pos = torch.cat([self.pos, mask.sum(1)])
        self.rows.extend(rows)
        self.seen = self.counts = None  # rebuilt with the new rows by ``process``

    # -- per-row settings -------------------------------------------------------------
    def _settings(self, vocab: int) -> dict[str, Any]:
        """The rows' settings as tensors; a setting no row uses is None (no work for it)."""
        import torch

        if self.settings is not None:
            return self.settings
        ss = [r.job.s for r in self.rows]
        t = {"greedy": torch.tensor([s.temperature <= 0 for s in ss])}
        t["all_greedy"] = bool(t["greedy"].all())
        t["temperature"] = torch.tensor([s.temperature if s.temperature > 0 else 1.0 for s in ss])
        t["top_k"] = (torch.tensor([s.top_k if 0 < s.top_k < vocab else vocab for s in ss])
                      if any(0 < s.top_k < vocab for s in ss) else None)
        t["top_p"] = (torch.tensor([s.top_p if s.top_p < 1 else math.inf for s in ss])
                      if any(s.top_p < 1 for s in ss) else None)
        t["repetition"] = (torch.tensor([s.repetition_penalty for s in ss])[:, None]
                           if any(s.repetition_penalty != 1.0 for s in ss) else None)
        t["presence"] = (torch.tensor([s.presence_penalty for s in ss])[:, None]
                         if any(s.presence_penalty for s in ss) else None)
        filtered = [i for i, s in enumerate(ss) if s.temperature > 0 and (0 < s.top_k < vocab or s.top_p < 1)]
        t["filtered"] = torch.tensor(filtered) if filtered else None
        t["frequency"] = (torch.tensor([s.frequency_penalty for s in ss])[:, None]
                          if any(s.frequency_penalty for s in ss) else None)
        bias = None
        if any(s.logit_bias for s in ss):
            bias = torch.zeros(len(ss), vocab)
            for i, s in enumerate(ss):
                for tok, b in s.logit_bias:
                    if tok < vocab:
                        bias[i, tok] += b
        t["bias"] = bias
        t["seeded"] = [i for i, r in enumerate(self.rows) if r.gen is not None]
        t["logprobs"] = [i for i, s in enumerate(ss) if s.logprobs is not None]
        t["top"] = max((ss[i].logprobs for i in t["logprobs"]), default=0)
        if t["repetition"] is not None and self.seen is None:
            self.seen = torch.zeros(len(ss), vocab, dtype=torch.bool)
            for i, r in enumerate(self.rows):
                self.seen[i, torch.tensor([x for x in r.job.prompt + r.ids if x < vocab], dtype=torch.long)] = True
        if (t["presence"] is not None or t["frequency"] is not None) and self.counts is None:
            self.counts = torch.stack([torch.bincount(torch.tensor(r.ids, dtype=torch.long), minlength=vocab)[:vocab]
                                       for r in self.rows]).float()
        self.settings = t
        return t

    def process(self, logits, rng):
        """Each row's next token, and (for rows that asked) the log-softmax its log-probs
        come from: every row's own settings applied to the batch's logits at once."""
        import torch

        vocab = logits.shape[-1]
        t = self._settings(vocab)
        scores = logits.float()
        # transformers' order: sequence bias, repetition penalty, then our processors, then
        # the warpers (temperature, top-k, top-p).
        if t["bias"] is not None:
            scores = scores + t["bias"]
        if t["repetition"] is not None:
            pen = t["repetition"]
            scores = torch.where(self.seen, torch.where(scores < 0, scores * pen, scores / pen), scores)
        if t["presence"] is not None:
            scores = scores - t["presence"] * (self.counts > 0).to(scores.dtype)
        if t["frequency"] is not None:
            scores = scores - t["frequency"] * self.counts
        broken = ~torch.isfinite(scores.amax(-1))  # one reduction: NaN and +inf propagate through max
        self.broken = broken.nonzero()[:, 0].tolist() if bool(broken.any()) else []
        if t["all_greedy"]:
            return scores.argmax(-1), scores, None
        warped = scores / t["temperature"][:, None]
        if t["filtered"] is not None:  # only the rows with a top-k or top-p are sorted
            idx = t["filtered"]
            vals, order = warped[idx].sort(-1, descending=True)
            rank = torch.arange(vocab)
            if t["top_k"] is not None:
                vals = vals.masked_fill(rank >= t["top_k"][idx, None], -math.inf)
            if t["top_p"] is not None:
                probs = vals.softmax(-1)
                # transformers' TopP: drop a token when the tokens less likely than it hold
                # at most 1 - top_p of the mass; the most likely token always stays.
                drop = (probs.cumsum(-1) - probs) >= t["top_p"][idx, None]
                drop[:, 0] = False
                vals = vals.masked_fill(drop, -math.inf)
            warped[idx] = torch.empty_like(vals).scatter_(1, order, vals)
        probs = warped.softmax(-1)
        cdf = probs.cumsum(-1)
        u = torch.rand(len(self.rows), generator=rng)
        for i in t["seeded"]:
            u[i] = torch.rand((), generator=self.rows[i].gen)
        drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp_(max=vocab - 1)
        greedy = t["greedy"]
        chosen = torch.where(greedy, scores.argmax(-1), drawn) if bool(greedy.any()) else drawn
        return chosen, scores, warped

    def record(self, tokens) -> None:
        """The tokens just chosen, in the penalties' state."""
        import torch

        self.last = tokens
        if self.seen is not None:
            self.seen[torch.arange(len(tokens)), tokens] = True
        if self.counts is not None:
            self.counts[torch.arange(len(tokens)), tokens] += 1


class Scheduler:
    """Iteration-level batching of every domain's generation in one thread (see the
    module docstring). ``submit`` from any thread; ``step`` runs one step of one domain
    (what the thread does in a loop, and what tests call directly with ``start=False``).
    ``lock`` is held during each step; ``stalled`` says how long a step has been running
    with work waiting (the replica's health check)."""

    def __init__(self, max_rows: int = MAX_ROWS, prefill_tokens: int = PREFILL_TOKENS,
                 lock: threading.Lock | None = None, start: bool = True, seed: int | None = None):
        import torch

        self.max_rows, self.prefill_tokens = max_rows, prefill_tokens
        self.lock = lock or threading.Lock()
        self.cv = threading.Condition()
        self.waiting: dict[int, deque[Job]] = {}
        self.batches: dict[int, Rows] = {}
        self.order: deque[int] = deque()  # domains (models) with work, in turn
        self.rng = torch.Generator().manual_seed(random.SystemRandom().getrandbits(63) if seed is None else seed)
        self.totals = dict.fromkeys(PARTS, 0.0) | {"steps": 0, "tokens": 0, "row_steps": 0}
        self.last_step = time.monotonic()
        self.thread = None
        if start:
            self.thread = threading.Thread(target=self._run, name="slmfactory-scheduler", daemon=True)
            self.thread.start()

    # -- requests ---------------------------------------------------------------------
    def submit(self, loaded: Loaded, prompt: list[int], s: Sampling, deadline: float = math.inf,
               cancel: threading.Event | None = None, on_tokens: Callable | None = None) -> Job:
        """Queue one prompt's generation; its ``future`` gets the ``n`` completions (or
        ``Deadline``, ``Cancelled``, the step's error)."""
        if not prompt:
            raise ValueError("an empty prompt has nothing to continue")
        job = Job(loaded, prompt, s, deadline, cancel, on_tokens)
        key = id(loaded)
        with self.cv:
            if key not in self.waiting:
                self.waiting[key] = deque()
                self.batches[key] = Rows(loaded)
                self.order.append(key)
            self.waiting[key].append(job)
            self.cv.notify()
        return job

    def busy(self) -> bool:
        with self.cv:
            return any(self.waiting.values()) or any(len(b) for b in self.batches.values())

    def stalled(self) -> float:
        """Seconds since the last step ended while there was work (0 when idle): what the
        replica's health check reads (a wedged forward never ends its step)."""
        return time.monotonic() - self.last_step if self.busy() else 0.0

    # -- the loop ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.cv:
                while not (any(self.waiting.values()) or any(len(b) for b in self.batches.values())):
                    self.cv.wait()
                    self.last_step = time.monotonic()  # idle until now: no stall
            self.step()

    def step(self) -> int | None:
        """One step of the next domain with work (in turn); returns its key, None if idle."""
        with self.cv:
            key = None
            for _ in range(len(self.order)):
                k = self.order[0]
                self.order.rotate(-1)
                if self.waiting[k] or len(self.batches[k]):
                    key = k
                    break
                # a domain with nothing left is forgotten (its model may leave the cache)
                self.order.pop()
                del self.waiting[k], self.batches[k]
            if key is None:
                return None
            batch = self.batches[key]
        with self.lock:
            self.joining: list[Job] = []
            try:
                self._step(batch, self.waiting[key])
            except Exception as e:  # noqa: BLE001  (a broken model: its requests fail, the others go on)
                for job in [r.job for r in batch.rows] + self.joining:
                    job.fail(e)
                batch.keep([])
        self.last_step = time.monotonic()
        return key

    def _admit(self, batch: Rows, waiting: deque[Job]) -> list[Job]:
        now = time.monotonic()
        joiners: list[Job] = []
        rows, width = len(batch), 0
        with self.cv:
            while waiting:
                job = waiting[0]
                if job.cancel.is_set() or now > job.deadline:
                    waiting.popleft()
                    job.fail(Cancelled() if job.cancel.is_set() else Deadline())
                    continue
                w = max(width, len(job.prompt))
                if joiners and (rows + job.s.n > self.max_rows or w * (len(joiners) + 1) > self.prefill_tokens):
                    break
                if not joiners and rows and rows + job.s.n > self.max_rows:
                    break
                joiners.append(waiting.popleft())
                rows, width = rows + job.s.n, w
        return joiners

    def _step(self, batch: Rows, waiting: deque[Job]) -> None:
        import torch

        loaded = batch.loaded
        model = loaded.model
        t0 = time.perf_counter()
        now = time.monotonic()
        staying = []
        for i, r in enumerate(batch.rows):
            if r.job.cancel.is_set():
                r.job.fail(Cancelled())
            elif now > r.job.deadline:
                r.job.fail(Deadline())
            elif r.job.left > 0:
                staying.append(i)
        batch.keep(staying)
        joiners = self.joining = self._admit(batch, waiting)
        if not batch.rows and not joiners:  # every row left and nobody could join
            return
        t1 = time.perf_counter()
        logits, old = [], len(batch)
        with torch.no_grad():
            if old:
                mask = torch.cat([batch.mask, batch.mask.new_ones((old, 1))], 1)
                out = model(input_ids=batch.last[:, None], attention_mask=mask, position_ids=batch.pos[:, None],
                            cache=batch.cache, use_cache=True)
                batch.mask, batch.pos = mask, batch.pos + 1
                logits.append(out.logits[:, -1])
            t2 = time.perf_counter()
            if joiners:
                new_rows, cache, mask, last = self._prefill(loaded, joiners)
                logits.append(last)
            t3 = time.perf_counter()
            if joiners:
                batch.join(new_rows, cache, mask)
            logits = logits[0] if len(logits) == 1 else torch.cat(logits)
            t4 = time.perf_counter()
            tokens, scores, warped = batch.process(logits, self.rng)
            for i in batch.broken:  # NaN or +inf logits (a broken model): that request fails
                batch.rows[i].done = True
                batch.rows[i].job.fail(ValueError("the model's next-token logits are not finite (NaN or inf): "
                                                  "no token can be drawn"))
            batch.record(tokens)
            lps = self._logprobs(batch, tokens, scores, warped)
        t5 = time.perf_counter()
        self.totals["tokens"] += self._emit(batch, tokens.tolist(), lps)
        t6 = time.perf_counter()
        # Each part's time, shared out among the rows it served.
        n = len(batch.rows)
        shares = {"schedule": ((t1 - t0) + (t4 - t3)) / n, "forward": (t2 - t1) / max(1, old),
                  "logits": (t5 - t4) / n, "emit": (t6 - t5) / n}
        for i, r in enumerate(batch.rows):
            r.job.most = max(r.job.most, n)
            for part, v in shares.items():
                if part != "forward" or i < old:
                    r.job.parts[part] += v
            if i >= old:
                r.job.parts["prefill"] += (t3 - t2) / (n - old)
        for part, v in (("schedule", (t1 - t0) + (t4 - t3)), ("forward", t2 - t1), ("prefill", t3 - t2),
                        ("logits", t5 - t4), ("emit", t6 - t5)):
            self.totals[part] += v
        self.totals["steps"] += 1
        self.totals["row_steps"] += n
        batch.keep([i for i, r in enumerate(batch.rows) if not r.done and r.job.left > 0])

    def _prefill(self, loaded: Loaded, joiners: list[Job]):
        """The joiners' prompts in one left-padded forward: their rows (``n`` per
        request), cache, mask and last position's logits."""
        import torch
        from transformers import DynamicCache

        now = time.perf_counter()
        width = max(len(j.prompt) for j in joiners)
        pad = loaded.tokenizer.pad_token_id or 0
        x = torch.full((len(joiners), width), pad, dtype=torch.long)
        mask = torch.zeros_like(x)
        for i, j in enumerate(joiners):
            x[i, width - len(j.prompt):] = torch.tensor(j.prompt)
            mask[i, width - len(j.prompt):] = 1
            j.parts["queue"] += now - j.submitted
        cache = DynamicCache(config=loaded.model.config)
        out = loaded.model(input_ids=x, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_(min=0),
                           cache=cache, use_cache=True, logits_to_keep=1)
        last = out.logits[:, -1]
        rows = [Row(j, k) for j in joiners for k in range(j.s.n)]
        if len(rows) > len(joiners):  # n > 1: one prefill per prompt, its cache row repeated
            sel = torch.tensor([i for i, j in enumerate(joiners) for _ in range(j.s.n)])
            cache.batch_select_indices(sel)
            mask, last = mask[sel], last[sel]
        return rows, cache, mask, last

    @staticmethod
    def _logprobs(batch: Rows, tokens, scores, warped) -> dict[int, tuple[float, list | None]]:
        """(log-prob, top alternatives) of the chosen token of each row that asked, from
        the scores it was chosen from (greedy: the processed logits; sampled: after
        temperature, top-k and top-p), normalised as ``compute_transition_scores`` does."""
        t = batch.settings
        if not t["logprobs"]:
            return {}
        import torch

        from slmfactory.serving.generation import _top

        idx = torch.tensor(t["logprobs"])
        final = scores[idx] if warped is None else torch.where(t["greedy"][idx, None], scores[idx], warped[idx])
        lsm = final.log_softmax(-1)
        chosen = lsm.gather(1, tokens[idx][:, None])[:, 0].tolist()
        tops = _top(lsm, t["top"]) if t["top"] else [None] * len(idx)
        out = {}
        for k, i in enumerate(t["logprobs"]):
            want = batch.rows[i].job.s.logprobs
            out[i] = (chosen[k], tops[k][:want] if tops[k] is not None and want else None)
        return out

    @staticmethod
    def _emit(batch: Rows, tokens: list[int], lps: dict) -> int:
        """Each row's new token appended, streamed, and the rows that end finished; returns
        how many tokens were generated."""
        tok = batch.loaded.tokenizer
        eos = tok.eos_token_id
        emitted = 0
        for i, (r, t) in enumerate(zip(batch.rows, tokens)):
            job, s = r.job, r.job.s
            if r.done:
                continue
            if t == eos:
                _finish(r, tok, True)
                continue
            r.ids.append(t)
            emitted += 1
            entry = lps.get(i)
            if r.lps is not None:
                r.lps.append(entry)
            if job.on_tokens is not None:
                job.on_tokens([t], [entry] if entry is not None else None)
            if s.stop and cut_at_stop(tok.decode(r.ids), s.stop)[1]:
                _finish(r, tok, False)
            elif len(r.ids) >= s.max_tokens:
                _finish(r, tok, False)
        return emitted


def _finish(r: Row, tok, ended: bool) -> None:
    """Row ``r`` leaves: its completion as ``generation.generate`` gives one."""
    s = r.job.s
    text, stopped = cut_at_stop(tok.decode(r.ids), s.stop)
    lps = None
    if r.lps is not None:
        k = tokens_within(tok, r.ids, text) if stopped else len(r.ids)
        lps = r.lps[:k]
    r.done = True
    r.job.finish(r.j, {"ids": list(r.ids), "text": text, "finish": "stop" if (ended or stopped) else "length",
                       "logprobs": lps})
