"""Instant specialisation: a plain small model for a new domain from a handful of its
documents, without a gradient step.

The documents are cut into windows of ``cluster.window_tokens`` tokens (as the clustering
cuts the corpus), embedded with the clustering's embedder (MiniLM, or its fitted
hashed-tfidf model) and assigned to the nearest centroid of the experts' generic
clustering; the counts give the domain's cluster histogram h (k,). Four candidates are
then instantiated from the trained generic phases:

- ``pn-histogram``: the projected network with the expert vector mixed by the histogram,
  E_domain = Σ_c h_c E_c (``ProjectedLlama.instantiate(h)``);
- ``pn-most-frequent``: the projected network's expert of the most frequent cluster (the
  paper's rule, without the fine-tuning);
- ``mix-histogram``: the hard mixture's experts averaged parameter by parameter with the
  histogram's weights, Σ_c h_c θ_c (renormalised over the clusters that have an expert);
- ``mix-most-frequent``: the hard mixture's expert of the most frequent cluster.

Every fifth document (at least one; the tail fifth of the tokens for a single document) is
held out: the histogram is taken on the others, and the candidate with the lowest held-out
NLL is chosen. Each candidate is a stage keyed by the documents' digest, the generic
phase's stage key and the rule, holding a plain Hugging Face folder, so a rerun with the
same documents rebuilds nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from slmfactory.data.clustering import encode, hashed as embed_hashed, load_clusters, load_minilm, nearest_centroid
from slmfactory.data.tokens import TokenSource, ensure_tokenizer, load_tokenizer, tokenize_texts
from slmfactory.models.arch import CONSTRUCTION_LOCK, build_projected, count_params
from slmfactory.models.strategies import get_strategy
from slmfactory.models.train import (
    DomainData, RayLauncher, StrategyContext, Weights, evaluate_nll, export_hf, finetune_lm, load_lm, make_launcher,
    vocab_size_of)
from slmfactory.platform.cost import inference_flops_per_token
from slmfactory.platform.errors import DataError
from slmfactory.platform.stages import Stage

RULES = ("pn-histogram", "pn-most-frequent", "mix-histogram", "mix-most-frequent")
FAMILY = {"pn": "slm-pn", "mix": "slm-mix"}
HOLDOUT_EVERY = 5
"""Every fifth document is held out to choose among the candidates."""
WINDOWS_PER_DOC = 2
MAX_HISTOGRAM_WINDOWS = 64
"""Windows embedded for the histogram: at most two per document, evenly spread, and 64 in
all. MiniLM on a replica's one CPU thread embeds ~10 windows/s, and this is most of the
seconds a new domain costs; the histogram is over the experts' k (4-32) clusters, which
64 windows estimate to a few points."""
MAX_HELDOUT_TOKENS = 8192
"""Held-out tokens each candidate is scored on (the first ones): enough to rank four
candidates, and scoring is most of a candidate's seconds."""
MIN_TOKENS = 16
CODE_VERSION = "instant-v1"


@dataclass(frozen=True)
class DomainDocs:
    """A new domain's documents, tokenized, with the held-out slice that picks the rule."""

    texts: tuple[str, ...]
    digest: str
    train_texts: tuple[str, ...]
    train: np.ndarray
    """int32 tokens of the training documents, each followed by eos."""
    heldout: np.ndarray


def documents_digest(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:16]


def split_documents(cfg, texts: list[str], tokenizer=None) -> DomainDocs:
    """Tokenize ``texts`` and hold out every ``HOLDOUT_EVERY``-th document (the last one
    when there are fewer; the tail fifth of the tokens of a single document)."""
    if not texts:
        raise DataError("documents: no documents given")
    tok = tokenizer or load_tokenizer(ensure_tokenizer(cfg))
    held = [i for i in range(len(texts)) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1] or \
        ([len(texts) - 1] if len(texts) > 1 else [])
    train_texts = [t for i, t in enumerate(texts) if i not in held]
    if held:
        train = tokenize_texts(tok, train_texts)
        heldout = tokenize_texts(tok, [texts[i] for i in held])
    else:
        all_ = tokenize_texts(tok, texts)
        cut = len(all_) - max(2, len(all_) // HOLDOUT_EVERY)
        train, heldout = all_[:cut], all_[cut:]
    total = len(train) + len(heldout)
    if total < MIN_TOKENS or len(heldout) < 2 or len(train) < 2:
        raise DataError(f"documents: {total} tokens in all; at least {MIN_TOKENS} are needed")
    return DomainDocs(tuple(texts), documents_digest(texts), tuple(train_texts),
                      np.asarray(train, np.int32), np.asarray(heldout, np.int32))


def histogram_windows(cfg, texts: tuple[str, ...] | list[str], tokenizer) -> list[str]:
    """The window texts embedded for the histogram: each document cut into windows of
    ``cluster.window_tokens`` tokens (the clustering's windowing), at most
    ``WINDOWS_PER_DOC`` evenly spread per document, ``MAX_HISTOGRAM_WINDOWS`` in all."""
    w = cfg.cluster.window_tokens
    per_doc = max(1, min(WINDOWS_PER_DOC, MAX_HISTOGRAM_WINDOWS // max(1, len(texts))))
    spans: list[list[int]] = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        starts = list(range(0, len(ids), w))
        if not starts:
            continue
        pick = sorted({starts[int(j)] for j in np.linspace(0, len(starts) - 1, min(per_doc, len(starts)))})
        spans.extend(ids[s:s + w] for s in pick)
    if len(spans) > MAX_HISTOGRAM_WINDOWS:  # many documents: an even sample of them
        spans = [spans[int(j)] for j in np.linspace(0, len(spans) - 1, MAX_HISTOGRAM_WINDOWS)]
    return [t for t in tokenizer.batch_decode(spans, skip_special_tokens=True) if t.strip()]


def minilm_flops(model, texts: list[str]) -> float:
    """Forward FLOPs of embedding ``texts`` with MiniLM: 2 · parameters · word pieces."""
    n_params = sum(p.numel() for p in model.parameters())
    pieces = sum(len(x) for x in model.tokenizer(list(texts), truncation=True,
                                                 max_length=model.max_seq_length)["input_ids"])
    return 2.0 * n_params * pieces


# -- the generic phases the candidates come from ------------------------------------------

class _NoTraining:
    """The launcher of a lookup: a generic phase that is not trained yet is not trained
    here (a serving replica must never start a pretraining)."""

    def fit(self, factory, out_dir, phase, resources=None):
        raise GenericPhaseMissing(f"{phase}: not trained yet")


class GenericPhaseMissing(DataError):
    pass


@dataclass
class Family:
    """One trained generic phase (``slm-pn`` or ``slm-mix``) and its experts' clustering."""

    name: str
    artifact: object
    clusters: object


def generic_families(cfg, train: bool = False, log: Callable[[str], None] | None = None) -> dict[str, Family]:
    """The trained generic phases of SLM-pn and SLM-mix for ``cfg`` (their stages, the same
    ones the sweep's trials use). ``train``: train what is missing (``slmfactory
    specialize``); otherwise a missing one is left out (the serving app)."""
    with CONSTRUCTION_LOCK:  # the lookup loads artifacts: see CONSTRUCTION_LOCK
        return _generic_families(cfg, train, log)


def _generic_families(cfg, train: bool, log) -> dict[str, Family]:
    out: dict[str, Family] = {}
    for short, name in FAMILY.items():
        strategy = get_strategy(name)
        k = strategy.settings(cfg).experts
        kcfg = cfg.replace(**{"cluster.k": k}) if k != cfg.cluster.k else cfg
        if not train:
            try:
                load_clusters(kcfg, domains=False)
            except DataError:
                continue  # the experts' clustering was never computed: nothing trained on it
        ctx = StrategyContext(cfg, make_launcher(cfg, log=log) if train else _NoTraining(), log=log)
        try:
            art = strategy.pretrain(ctx)
        except GenericPhaseMissing:
            continue
        out[short] = Family(name, art, load_clusters(kcfg, domains=False))
    if not out:
        raise GenericPhaseMissing("instant specialisation needs the trained generic phase of slm-pn or slm-mix "
                                  "(run `slmfactory train --strategy slm-pn` or the sweep first)")
    return out


def pn_model(cfg, fam: Family):
    from safetensors.torch import load_model

    with CONSTRUCTION_LOCK:  # built untied next to a loading thread otherwise
        pn = build_projected(cfg, vocab_size_of(cfg), fam.artifact.info["experts"])
        load_model(pn, fam.artifact.weights().path, device="cpu")
    return pn.eval()


def mix_experts(cfg, fam: Family) -> dict[int, str]:
    return {int(c): str(fam.artifact.stage.path(e["weights"])) for c, e in fam.artifact.info["experts"].items()}


@torch.no_grad()
def mixed_state(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Σ_i w_i θ_i, parameter by parameter (float32). A one-hot ``weights`` returns the
    chosen state exactly: 1·x + 0·y == x."""
    out = {}
    for name in states[0]:
        acc = torch.zeros_like(states[0][name], dtype=torch.float32)
        for s, w in zip(states, weights):
            acc += float(w) * s[name].float()
        out[name] = acc.to(states[0][name].dtype)
    return out


def mix_average(cfg, fam: Family, histogram: np.ndarray):
    """The hard mixture's experts averaged with the histogram's weights, renormalised over
    the clusters that have an expert (a mixture skips clusters too small to train)."""
    experts = mix_experts(cfg, fam)
    have = sorted(experts)
    w = np.asarray([histogram[c] for c in have], dtype=np.float64)
    if w.sum() <= 0:  # the domain falls only in clusters with no expert: the nearest ones
        w = np.ones(len(have))
    w = w / w.sum()
    keep = [i for i, x in enumerate(w) if x > 0]
    # Through the model (not the raw file): a tied head is stored once in safetensors but is
    # in every state_dict, so the mixed state loads strictly.
    states = [load_lm(cfg, "slm", experts[have[i]]).state_dict() for i in keep]
    model = load_lm(cfg, "slm", None)
    model.load_state_dict(mixed_state(states, [w[i] for i in keep]), strict=True)
    model.tie_weights()
    return model.eval(), {have[i]: float(w[i]) for i in keep}


def mix_most_frequent(cfg, fam: Family, counts: np.ndarray):
    experts = mix_experts(cfg, fam)
    chosen = max(sorted(experts), key=lambda c: counts[c])  # among clusters that have an expert
    return load_lm(cfg, "slm", experts[chosen]).eval(), chosen


# -- scoring --------------------------------------------------------------------------

@torch.no_grad()
def tokens_nll(model, tokens: np.ndarray, seq_len: int, batch_size: int = 16) -> tuple[float, int]:
    """Summed NLL and predicted-token count over ``tokens``: full windows of ``seq_len``
    as the project's evaluation does, plus the shorter tail (a handful of documents may not
    fill one window)."""
    n_full = len(tokens) // seq_len
    s, n = evaluate_nll(model, tokens[:n_full * seq_len], seq_len, batch_size) if n_full else (0.0, 0)
    tail = tokens[n_full * seq_len:]
    if len(tail) >= 2:
        x = torch.from_numpy(np.asarray(tail, np.int64))[None]
        s += float(model(input_ids=x, labels=x).loss) * (len(tail) - 1)
        n += len(tail) - 1
    return s, n


# -- building ------------------------------------------------------------------------

@dataclass
class Candidate:
    rule: str
    path: Path
    """A plain HF model folder (an ``instant`` stage)."""
    stage_key: str
    heldout_nll: float
    heldout_ppl: float
    seconds: float
    """Wall seconds of this candidate's own work (instantiate, score, export)."""
    flops: float
    """FLOPs of its own work: computing the weights and scoring the held-out slice."""
    detail: dict = field(default_factory=dict)


@dataclass
class InstantDomain:
    docs: DomainDocs
    histogram: dict[str, list[float]]
    """Per family, the documents' cluster histogram over its experts' clustering."""
    candidates: dict[str, Candidate]
    chosen: str
    shared_seconds: float
    """Embedding and histogram (paid once for all candidates)."""
    shared_flops: float
    timings: dict[str, float]
    documents_path: str = ""

    @property
    def best(self) -> Candidate:
        return self.candidates[self.chosen]

    def summary(self) -> dict:
        return {"docs": self.docs.digest, "documents": len(self.docs.texts), "documents_path": self.documents_path,
                "chosen": self.chosen,
                "train_tokens": int(len(self.docs.train)), "heldout_tokens": int(len(self.docs.heldout)),
                "histogram": self.histogram, "shared_seconds": self.shared_seconds, "shared_flops": self.shared_flops,
                "timings": self.timings,
                "candidates": {r: {"path": str(c.path), "stage": c.stage_key, "heldout_nll": c.heldout_nll,
                                   "heldout_ppl": c.heldout_ppl, "seconds": c.seconds, "flops": c.flops, **c.detail}
                               for r, c in self.candidates.items()}}


def cluster_counts(cfg, windows: list[str], families: dict[str, Family],
                   embedder=None) -> tuple[dict[str, np.ndarray], float]:
    """Per family, the (k,) counts of ``windows`` over its experts' clusters, and the FLOPs
    of embedding them. Each family's windows are embedded by its clustering's own embedder
    (centroids only compare with vectors of that embedder): MiniLM (``embedder`` when
    given, else loaded once) or the clustering's fitted hashed-tfidf model; an embedding is
    computed once per embedder, however many families share it."""
    embedded: dict[str, np.ndarray] = {}
    flops = 0.0
    out: dict[str, np.ndarray] = {}
    for short, fam in families.items():
        cl = fam.clusters
        which = str(cl.embedder_path) if cl.embedder == embed_hashed.NAME else "minilm"
        if which not in embedded:
            if which == "minilm":
                embedder = embedder if embedder is not None else load_minilm("cpu")
                embedded[which] = encode(embedder, windows, cfg.cluster.embed_batch_size)
                flops += minilm_flops(embedder, windows)
            else:
                model = cl.hashed_model()
                embedded[which], _, features = embed_hashed.transform(model, windows)
                flops += embed_hashed.embedding_flops(len(windows), int(features.sum()), embed_hashed.dim_of(model))
        out[short] = np.bincount(nearest_centroid(embedded[which], cl.centroids), minlength=cl.k)
    return out, flops


@dataclass
class _Histograms:
    """What every candidate shares: the documents, their cluster counts and histogram per
    family, and what computing them cost."""

    docs: DomainDocs
    kept: Stage
    """The documents themselves, kept for a later fine-tuning (keyed by their digest)."""
    counts: dict[str, np.ndarray]
    hist: dict[str, np.ndarray]
    embed_flops: float
    timings: dict[str, float]
    seconds: float


def _histograms(cfg, texts: list[str], families: dict[str, Family], embedder, tokenizer,
                say: Callable[[str], None]) -> _Histograms:
    """Split ``texts``, keep them, cut and embed the training documents' windows and count
    them over each family's clusters."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    tok = tokenizer or load_tokenizer(ensure_tokenizer(cfg))
    docs = split_documents(cfg, texts, tok)
    kept = Stage.of(cfg.root, "instant", "documents", docs=docs.digest)
    kept.build(lambda work: (work / "documents.json").write_text(json.dumps(list(docs.texts))) and None)
    windows = histogram_windows(cfg, docs.train_texts, tok)
    if not windows:
        raise DataError("documents: no text left to embed")
    timings["tokenize"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    counts, embed_flops = cluster_counts(cfg, windows, families, embedder)
    timings["embed"] = time.perf_counter() - t1
    hist = {short: c / c.sum() for short, c in counts.items()}
    shared_seconds = time.perf_counter() - t0
    say(f"[instant] {len(texts)} documents, {len(windows)} windows embedded in {timings['embed']:.1f}s; "
        + "; ".join(f"{f} histogram {np.round(h, 2).tolist()}" for f, h in hist.items()))
    return _Histograms(docs, kept, counts, hist, embed_flops, timings, shared_seconds)


def _instantiate(cfg, short: str, how: str, fam: Family, shared: _Histograms,
                 pn: Callable[[], torch.nn.Module]) -> tuple[torch.nn.Module, dict, float]:
    """One rule's plain model, what it picked (expert or weights) and the FLOPs of making
    it. ``pn``: the family's projected network, loaded at most once per call of
    ``build_instant``."""
    detail: dict = {}
    if short == "pn":
        net = pn()
        if how == "histogram":
            plain = net.instantiate(torch.as_tensor(shared.hist[short], dtype=torch.float32))
        else:
            detail["expert"] = int(np.argmax(shared.counts[short]))
            plain = net.instantiate(detail["expert"])
        # h·|W| multiply-adds per MLP matrix, plus the (k,)·(k, m) and (m,)·(m, h) products.
        make_flops = 2.0 * net.capacity * net.mlp_params_per_expert()
    elif how == "histogram":
        plain, weights = mix_average(cfg, fam, shared.hist[short])
        detail["weights"] = {str(c): w for c, w in weights.items()}
        make_flops = 2.0 * len(weights) * count_params(plain)
    else:
        plain, detail["expert"] = mix_most_frequent(cfg, fam, shared.counts[short])
        make_flops = 0.0
    return plain, detail, make_flops


def _build_candidate(cfg, work: Path, rule: str, fam: Family, shared: _Histograms,
                     pn: Callable[[], torch.nn.Module]) -> dict:
    """A candidate stage's builder: instantiate ``rule``, score it on the held-out slice
    and export it to ``work`` as a plain HF folder; returns its info."""
    with CONSTRUCTION_LOCK:  # see CONSTRUCTION_LOCK: a replica loads models in other threads
        started = time.perf_counter()
        short, how = rule.split("-", 1)
        plain, detail, make_flops = _instantiate(cfg, short, how, fam, shared, pn)
        seq = cfg.data.seq_len
        s, n = tokens_nll(plain, shared.docs.heldout[:MAX_HELDOUT_TOKENS], seq, cfg.finetune.batch_size)
        flops = make_flops + n * inference_flops_per_token(plain, seq)
        info = {"heldout_nll": s / n, "heldout_ppl": math.exp(s / n), "heldout_tokens": n,
                "params": count_params(plain), "flops": flops, "rule": rule, **detail}
        info["seconds"] = time.perf_counter() - started  # its cost, kept when the stage is reused
        export_hf(cfg, plain, work, {"strategy": f"instant/{rule}", "domain": "", "params": info["params"],
                                     "test_ppl": info["heldout_ppl"], "instant": info})
        return info


def build_instant(cfg, texts: list[str], families: dict[str, Family], embedder=None, tokenizer=None,
                  rules: tuple[str, ...] = RULES, log: Callable[[str], None] | None = None) -> InstantDomain:
    """Embed ``texts``, take their histogram over each family's experts and instantiate
    every rule's model (a stage each); the one with the lowest held-out NLL is ``chosen``.
    ``embedder``: a loaded MiniLM to reuse (a serving replica keeps one) when the
    clustering embedded with MiniLM (``cluster_counts``)."""
    say = log or (lambda _m: None)
    shared = _histograms(cfg, texts, families, embedder, tokenizer, say)
    timings = dict(shared.timings)
    # Loaded on the first candidate that needs it (a cached candidate does not).
    pn = functools.cache(lambda: pn_model(cfg, families["pn"]))
    candidates: dict[str, Candidate] = {}
    for rule in rules:
        short = rule.split("-", 1)[0]
        if short not in families:
            continue
        fam = families[short]
        stage = Stage.of(cfg.root, "instant", rule, version=CODE_VERSION, docs=shared.docs.digest,
                         generic=fam.artifact.stage.key, clusters=fam.clusters.key,
                         windows=[cfg.cluster.window_tokens, WINDOWS_PER_DOC, MAX_HISTOGRAM_WINDOWS],
                         heldout_tokens=MAX_HELDOUT_TOKENS)
        tc = time.perf_counter()
        info = stage.build(lambda work, rule=rule, fam=fam: _build_candidate(cfg, work, rule, fam, shared, pn))
        candidates[rule] = Candidate(rule, stage.dir, stage.key, info["heldout_nll"], info["heldout_ppl"],
                                     info["seconds"], info["flops"],
                                     {k: info[k] for k in ("expert", "weights") if k in info})
        timings[rule] = time.perf_counter() - tc
    if not candidates:
        raise GenericPhaseMissing(f"no generic phase for the rules {list(rules)}")
    chosen = min(candidates, key=lambda r: candidates[r].heldout_nll)
    say("[instant] held-out ppl: " + ", ".join(f"{r} {c.heldout_ppl:.2f}" for r, c in candidates.items())
        + f" → {chosen}")
    return InstantDomain(shared.docs, {f: h.tolist() for f, h in shared.hist.items()}, candidates, chosen,
                         shared.seconds, shared.embed_flops, timings, str(shared.kept.path("documents.json")))


# -- fine-tuning within a budget -------------------------------------------------------

def finetune_instant(cfg, docs_train: np.ndarray, docs_heldout: np.ndarray, init: Candidate, budget_tokens: int,
                     work: Path, launcher=None, log: Callable[[str], None] | None = None) -> dict:
    """Fine-tune the chosen instant model on the training documents within
    ``budget_tokens`` (early-stopped on the held-out slice), on Ray Train unless
    ``launcher`` says otherwise; returns the exported model folder and its held-out ppl."""
    step = cfg.finetune.batch_size * cfg.data.seq_len
    if budget_tokens < step:
        raise DataError(f"finetune_budget: {budget_tokens} tokens is less than one step "
                        f"({cfg.finetune.batch_size} x {cfg.data.seq_len} = {step} tokens)")
    if len(docs_train) < cfg.data.seq_len + 1:
        raise DataError(f"finetune_budget: the documents hold {len(docs_train)} training tokens, "
                        f"less than one sequence of {cfg.data.seq_len}")
    work = Path(work)
    train = TokenSource.of_array(docs_train, work / "train.npy")
    held = TokenSource.of_array(docs_heldout, work / "heldout.npy")
    data = DomainData(train=train, valid=held if len(docs_heldout) >= cfg.data.seq_len else train, test=held)
    tcfg = dataclasses.replace(cfg.finetune, max_tokens=int(budget_tokens), checkpoint_every=0)
    ctx = StrategyContext(cfg, launcher or RayLauncher(cfg.scaling, log=log), log=log)
    weights = Weights(str(Path(init.path) / "model.safetensors"), init.stage_key)
    model, fit = finetune_lm(ctx, "slm", weights, data, f"instant/{init.rule}", train_cfg=tcfg)
    model = model.cpu().eval()
    stage = Stage.of(cfg.root, "instant", "finetuned", weights=fit.stage_key, heldout=held.identity())

    def export(out: Path) -> dict:
        s, n = tokens_nll(model, docs_heldout[:MAX_HELDOUT_TOKENS], cfg.data.seq_len, cfg.finetune.batch_size)
        info = {"heldout_nll": s / n, "heldout_ppl": math.exp(s / n), "params": count_params(model),
                "steps": fit.result.steps, "flops": fit.result.cost.flops,
                "seconds": fit.result.cost.wall_seconds, "rule": f"{init.rule}+finetune"}
        export_hf(cfg, model, out, {"strategy": f"instant/{init.rule}+finetune", "domain": "",
                                    "params": info["params"], "test_ppl": info["heldout_ppl"], "instant": info})
        return info

    info = stage.build(export)
    return {"path": str(stage.dir), "stage": stage.key, **info}
