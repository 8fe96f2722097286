"""The model work of the serving app, with no Ray Serve in it: loading a served model
folder (a Hugging Face causal LM and its tokenizer, safetensors only), scoring (per-token
log-probs; the prompt's OpenAI ``logprobs`` for ``echo``), the ``model: "auto"`` router's
choice of a domain, and the health check's one-token forward pass. Generation (sampling,
stop strings, the chat prompt, streamed text) is ``serving.generation``'s.

Every function takes a ``Loaded`` model and plain values, so the engine is tested without
Ray or a server (``tests/test_engine.py``); ``serving/server.py`` runs it in a replica's
worker threads.

torch and transformers are imported inside the functions, deliberately: importing this
module (the serve driver's ``build_app``, the CLI) does not load them; a replica imports
them all once before its first request (``server.import_everything``).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Collection

import numpy as np

from slmfactory.data.clustering import encode, hashed as embed_hashed, load_minilm as _load_minilm, nearest_centroid

LOGIT_CHUNK_ELEMENTS = 1 << 22
"""Scoring holds at most this many logits (16 MiB of float32) at a time, whatever the
vocabulary, the context and the number of inputs: windows x context x vocabulary logits
and their log-softmax copy were tens of GB at a 32k vocabulary for one allowed request."""


class Deadline(Exception):
    """The request's deadline passed (answered 408)."""


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    context: int
    load_seconds: float = 0.0

    @cached_property
    def vocab(self) -> int:
        """Token ids this model takes: its embedding rows (a request's ids are checked
        against it, so an id past the tokenizer's own vocabulary still fails early)."""
        return min(len(self.tokenizer), int(self.model.config.vocab_size))

    @cached_property
    def token_texts(self) -> list[str]:
        """Every token id's text as ``tokenizer.decode([id])`` gives it, decoded once in
        one batch: a score response names each of its tokens, and a per-token ``decode``
        was a Python call into the tokenizer per token."""
        return self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])

    @cached_property
    def token_bytes(self) -> list[bytes]:
        """Every token id's bytes (OpenAI's chat ``logprobs`` send them: a character split
        over tokens has no text per token). A byte-level BPE (the project's tokenizers)
        spells each byte with one symbol of transformers' ``bytes_to_unicode``; other
        tokenizers: the token's text in UTF-8."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and type(backend.decoder).__name__ == "ByteLevel":
            from transformers.convert_slow_tokenizer import bytes_to_unicode  # lazy (module docstring)

            byte_of = {c: b for b, c in bytes_to_unicode().items()}
            pieces = self.tokenizer.convert_ids_to_tokens(list(range(len(self.tokenizer))))
            if all(c in byte_of for p in pieces if p for c in p):
                return [bytes(byte_of[c] for c in p) for p in pieces]
        return [t.encode("utf-8") for t in self.token_texts]

    @cached_property
    def max_token_bytes(self) -> int:
        """The most bytes one token spells (bounds how much text ``k`` tokens can span)."""
        return max(1, max(len(b) for b in self.token_bytes))

    def texts_of(self, ids: list[int]) -> list[str]:
        table = self.token_texts
        return [table[i] for i in ids]

    def encode(self, texts: list[str]) -> list[list[int]]:
        """``tokenizer(text, add_special_tokens=False)["input_ids"]`` of each text, in one
        call to the Rust tokenizer (the Python wrapper's per-call bookkeeping was most of
        the tokenising time of a short request)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None or backend.padding is not None or backend.truncation is not None:
            return [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]


def load(path: str) -> Loaded:
    """A served model folder (``export_hf``'s layout): the causal LM in float32, eval mode,
    and its tokenizer; the context is the model's ``max_position_embeddings``."""
    import torch  # lazy (module docstring)
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from slmfactory.models.arch import CONSTRUCTION_LOCK  # lazy: it imports torch

    t0 = time.perf_counter()
    # from_pretrained disables weight tying process-wide while it runs: no other model may
    # be built meanwhile (see CONSTRUCTION_LOCK).
    with CONSTRUCTION_LOCK:
        # use_safetensors: weights are loaded from safetensors only, never from a pickle.
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    return Loaded(model, tok, int(model.config.max_position_embeddings), time.perf_counter() - t0)


def load_minilm():
    """The clustering's MiniLM on the CPU (what ``auto`` routes with)."""
    from slmfactory.models.arch import CONSTRUCTION_LOCK  # lazy: it imports torch

    with CONSTRUCTION_LOCK:  # a from_pretrained inside (see CONSTRUCTION_LOCK)
        return _load_minilm("cpu")


@lru_cache(maxsize=4)
def _hashed_model(path: str):
    return embed_hashed.load(Path(path))


def uses_minilm(router: dict) -> bool:
    """Whether ``router``'s clustering embedded with MiniLM (routing then needs it loaded)."""
    return router.get("embedder", "minilm") != embed_hashed.NAME


def route_embedding(router: dict, texts: list[str], minilm=None) -> np.ndarray:
    """``texts`` embedded as the clustering embedded its windows, so that they compare with
    ``router["centroids"]``: MiniLM (``minilm``, loaded by the caller), or the fitted
    hashed-tfidf model at ``router["embedder_model"]`` (loaded once per process)."""
    if uses_minilm(router):
        if minilm is None:
            raise ValueError("route_embedding: this clustering embedded with MiniLM; pass the loaded model")
        return encode(minilm, list(texts), router["batch_size"])
    return embed_hashed.transform(_hashed_model(router["embedder_model"]), list(texts))[0]


def pick_domain(router: dict, served: Collection[str], embedding: np.ndarray) -> tuple[str, dict]:
    """``model: "auto"`` by the clustering (``serving.auto_route: cluster``): the served
    domain whose in-domain histogram gives the cluster nearest to ``embedding`` (one row)
    the highest share; ``router`` is ``catalog.router_data``'s. Returns the domain and what
    the response tells about it."""
    c = int(nearest_centroid(embedding, np.asarray(router["centroids"], dtype=np.float32))[0])
    shares = {d: h[c] for d, h in router["histograms"].items() if d in served}
    domain = max(sorted(shares), key=lambda d: shares[d])
    return domain, {"routed_to": domain, "by": "cluster", "cluster": c, "share": shares[domain]}


# -- routing by the served models' own scores (serving.auto_route: nll) ------------------------

def route_pieces(ids: list[int], k: int, eos: int) -> list[list[int]]:
    """What ``model: "auto"`` scores of a prompt's token ``ids``: at most ``k`` tokens
    (``serving.route_tokens``). The prompt is scored after an ``eos``, the boundary every
    training document follows (its first token is predicted too): the whole prompt when it
    has at most ``k`` tokens, else its first ``k - k // 2`` tokens and, as a second piece,
    its last ``k // 2`` (the piece holds one more token before them, as their context). The
    head says what the text is about, the tail what the model is to continue."""
    if len(ids) <= k:
        return [[eos, *ids]]
    return [[eos, *ids[:k - k // 2]], list(ids[-(k // 2 + 1):])]


def route_entry(loaded: Loaded, pieces: list[list[int]], logprobs: list[list[float]]) -> dict:
    """One candidate's score of a prompt, from ``score_ids(loaded, pieces)``: ``nll`` (mean
    per scored token), ``tokens`` (scored), ``bytes`` (their UTF-8 bytes) and ``ids``
    (what was scored, with the context that windows it: candidates compare per token only
    when they scored the same tokens)."""
    lps = [v for lp in logprobs for v in lp]
    n = len(lps)
    scored = [t for p, lp in zip(pieces, logprobs) for t, v in zip(p, with_firsts(p, lp, loaded.context))
              if v is not None]
    table = loaded.token_bytes
    total = -math.fsum(lps)
    return {"nll": total / n if n else math.inf, "sum": total, "tokens": n,
            "bytes": sum(len(table[t]) if t < len(table) else 1 for t in scored),
            "ids": (tuple(map(tuple, pieces)), loaded.context)}


def pick_by_nll(entries: dict[str, dict]) -> tuple[str, dict]:
    """``model: "auto"``: the candidate whose own model gives the prompt the lowest mean NLL
    per token (``route_entry``'s); when the candidates' tokenizers cut the prompt
    differently (per-token NLLs are not comparable then), the lowest NLL per byte of the
    text scored. A non-finite score (a broken model) never wins unless every one is; ties
    go to the first name. Returns the domain and what the response tells about it."""
    if not entries:
        raise ValueError("pick_by_nll: no candidate")
    same = len({e["ids"] for e in entries.values()}) == 1
    unit = "token" if same else "byte"

    def key(d: str) -> tuple[float, str]:
        e = entries[d]
        v = e["nll"] if same else (e["sum"] / e["bytes"] if e["bytes"] else math.inf)
        return (v if math.isfinite(v) else math.inf), d

    domain = min(entries, key=key)
    nlls = {d: (round(e["nll"], 6) if math.isfinite(e["nll"]) else None) for d, e in sorted(entries.items())}
    return domain, {"routed_to": domain, "by": "nll", "unit": unit, "scored_tokens": entries[domain]["tokens"],
                    "nll": nlls}


def route_ids(loaded: Loaded, text: str, k: int) -> list[list[int]]:
    """``route_pieces`` of ``text`` under ``loaded``'s tokenizer, tokenising no more of a long
    text than its two ends: ``k + 2`` tokens span at most ``k + 2`` times the longest
    token's bytes, so a text longer than twice that holds more than ``k`` tokens, and its
    head and tail pieces are cut from the tokens of its first and last such span (a 1 MB
    body is never tokenised whole once per served domain just to be routed)."""
    eos = route_eos(loaded)
    reach = (k + 2) * loaded.max_token_bytes
    if len(text) <= 2 * reach:
        return route_pieces(loaded.encode([text])[0], k, eos)
    head, tail = loaded.encode([text[:reach], text[-reach:]])
    return [[eos, *head[:k - k // 2]], list(tail[-(k // 2 + 1):])]


def route_nlls(models: dict[str, Loaded], text: str, k: int, deadline: float = math.inf) -> dict[str, dict]:
    """Every candidate's ``route_entry`` of ``text``, in this thread (what a replica computes
    through its scoring batches; the bench and tests call it directly)."""
    out = {}
    for d, loaded in models.items():
        pieces = route_ids(loaded, text, k)
        out[d] = route_entry(loaded, pieces, score_ids(loaded, pieces, deadline))
    return out


def route_eos(loaded: Loaded) -> int:
    """The document boundary a prompt is scored after (the tokenizer's eos; pad or 0 if none)."""
    tok = loaded.tokenizer
    return int(next(t for t in (tok.eos_token_id, tok.pad_token_id, 0) if t is not None))


# -- scoring ------------------------------------------------------------------------------

def _logit_chunks(loaded: Loaded, x, mask, deadline: float = math.inf):
    """(row, first position, log-sum-exp, logits) per chunk of ``x``'s positions, never
    more than ``LOGIT_CHUNK_ELEMENTS`` logits at once: the decoder's hidden states are
    computed per group of rows, the head per group of positions."""
    import torch  # lazy (module docstring)

    model = loaded.model
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings()
    vocab = int(model.config.vocab_size)
    positions = max(1, LOGIT_CHUNK_ELEMENTS // vocab)
    rows_per = max(1, positions // max(1, x.shape[1]))
    with torch.no_grad():
        for r0 in range(0, x.shape[0], rows_per):
            if time.monotonic() > deadline:
                raise Deadline()
            xs, ms = x[r0:r0 + rows_per], mask[r0:r0 + rows_per]
            if decoder is None or head is None:
                logits_all = model(input_ids=xs, attention_mask=ms).logits.float()
                hidden = None
            else:
                hidden = decoder(input_ids=xs, attention_mask=ms).last_hidden_state
            for r in range(xs.shape[0]):
                for p0 in range(0, xs.shape[1], positions):
                    logits = (head(hidden[r, p0:p0 + positions]) if hidden is not None
                              else logits_all[r, p0:p0 + positions]).float()
                    yield r0 + r, p0, torch.logsumexp(logits, -1), logits


def score_ids(loaded: Loaded, batch: list[list[int]], deadline: float = math.inf) -> list[list[float]]:
    """Log-probability of every token after the first of each id list, in windows of the
    model's context (each window's first token has no prediction: the same convention
    as the project's evaluation, ``trainer.evaluate_nll``). The log-softmax is gathered
    at the target tokens only, chunk by chunk (bounded memory)."""
    import torch  # lazy (module docstring)

    windows, owner = [], []
    for i, ids in enumerate(batch):
        for s in range(0, len(ids), loaded.context):
            windows.append(ids[s:s + loaded.context])
            owner.append(i)
    width = max(len(w) for w in windows)
    pad = loaded.tokenizer.pad_token_id or 0
    x = torch.full((len(windows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(x)
    for j, w in enumerate(windows):  # right padding: causal attention never sees it
        x[j, :len(w)] = torch.tensor(w)
        mask[j, :len(w)] = 1
    per_window: list[list[float]] = [[] for _ in windows]
    for j, p0, lse, logits in _logit_chunks(loaded, x, mask, deadline):
        n = len(windows[j])
        hi = min(p0 + logits.shape[0], n - 1)  # predictions for positions p0..hi-1
        if hi <= p0:
            continue
        tgt = x[j, p0 + 1:hi + 1]
        got = logits[:hi - p0].gather(-1, tgt[:, None])[:, 0] - lse[:hi - p0]
        per_window[j].extend(got.tolist())
    out: list[list[float]] = [[] for _ in batch]
    for j, lp in enumerate(per_window):
        out[owner[j]].extend(lp)
    return out


def with_firsts(ids: list[int], logprobs: list[float], context: int) -> list[float | None]:
    """Per-token log-probs aligned with ``ids``: None where a context window starts."""
    out: list[float | None] = []
    it = iter(logprobs)
    for p in range(len(ids)):
        out.append(None if p % context == 0 else next(it))
    return out


def token_logprobs(loaded: Loaded, ids: list[int], start: int, top: int, deadline: float = math.inf) -> dict:
    """OpenAI ``logprobs`` of ``ids[start:]`` (the first token of a text has none),
    gathered chunk by chunk like ``score_ids``."""
    import torch  # lazy (module docstring)

    tok = loaded.tokenizer
    x = torch.tensor([ids])
    values: list[float | None] = [None] * len(ids)
    tops: list[dict | None] = [None] * len(ids)
    for _, p0, lse, logits in _logit_chunks(loaded, x, torch.ones_like(x), deadline):
        for q in range(logits.shape[0]):
            p = p0 + q + 1  # the token this position predicts
            if p >= len(ids) or p < start:
                continue
            values[p] = float(logits[q, ids[p]] - lse[q])
            if top:
                v, i = (logits[q] - lse[q]).topk(top)
                tops[p] = {tok.decode([int(a)]): float(b) for b, a in zip(v, i)}
    tokens = loaded.texts_of(ids[start:])
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {"tokens": tokens, "token_logprobs": values[start:], "top_logprobs": tops[start:] if top else None,
            "text_offset": offsets}


def one_token_forward(model, lock: threading.Lock, timeout_s: float) -> None:
    """A one-token forward pass of ``model`` (none: nothing to run) under the generation
    ``lock``, waited for at most ``timeout_s`` (the replica's health check)."""
    import torch  # lazy (module docstring)

    if not lock.acquire(timeout=timeout_s):
        raise RuntimeError("the generation lock is held past the health deadline")
    try:
        with torch.no_grad():
            if model is not None:
                model(input_ids=torch.zeros((1, 1), dtype=torch.long))
    finally:
        lock.release()
