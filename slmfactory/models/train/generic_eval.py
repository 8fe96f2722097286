"""Generic perplexity of a generic phase, measured the same way for every strategy
(docs/paper.md#table-8): the first ``pretrain.eval_tokens`` tokens of the generic validation
split, cut into ``data.seq_len`` sequences. A dense model scores every sequence; a
mixture (slm-mix) or projected network (slm-pn) scores each sequence with the expert of
its own cluster (MiniLM embedding of the sequence's text, nearest centroid), so the
routed and the dense figures are over the very same sequences and contexts.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from slmfactory.data.tokens import as_sequences, ensure_tokenizer, load_tokenizer, split_source
from slmfactory.models.train.evaluation import sequence_nlls
from slmfactory.models.train.execution import autocast_for, eval_device


def generic_eval_sequences(cfg) -> np.ndarray:
    """(n, seq_len) int32: the generic evaluation sample every generic phase is scored on."""
    tokens = split_source(cfg, "generic", "valid", cfg.pretrain.eval_tokens).load()
    return as_sequences(tokens, cfg.data.seq_len, "generic valid")


def sequence_clusters(cfg, clusters, seqs: np.ndarray) -> np.ndarray:
    """(n,) cluster of each sequence: its decoded text embedded by MiniLM, nearest centroid."""
    tok = load_tokenizer(ensure_tokenizer(cfg))
    texts = tok.batch_decode(seqs.tolist(), skip_special_tokens=True)
    return np.asarray(clusters.assign_texts(texts), dtype=np.int64)


def generic_nll(cfg, model_of: Callable[[int], torch.nn.Module], route: np.ndarray | None = None,
                seqs: np.ndarray | None = None) -> dict[str, float]:
    """Mean NLL and perplexity of the generic evaluation sample; ``route[i]`` names the
    expert ``model_of`` builds for sequence i (None: one model, ``model_of(0)``)."""
    seqs = generic_eval_sequences(cfg) if seqs is None else seqs
    route = np.zeros(len(seqs), dtype=np.int64) if route is None else np.asarray(route)
    device = eval_device()
    total = 0.0
    for e in sorted(set(route.tolist())):
        model = model_of(e).eval()
        was = next(model.parameters()).device
        model.to(device)
        try:
            total += float(sequence_nlls(model, seqs[route == e].reshape(-1), cfg.data.seq_len,
                                         cfg.pretrain.batch_size, device, autocast_for(device)).sum())
        finally:
            model.to(was)
    nll = total / (len(seqs) * (cfg.data.seq_len - 1))
    return {"generic_valid_nll_sample": nll, "generic_ppl": math.exp(nll), "generic_eval_sequences": float(len(seqs))}


def routed_generic_nll(cfg, clusters, expert_model: Callable[[int], torch.nn.Module],
                       experts: list[int] | None = None) -> dict[str, float]:
    """``generic_nll`` with each sequence scored by its cluster's expert. A cluster without
    an expert (a mixture skips clusters too small to train) is served by the expert of the
    nearest centroid that has one."""
    have = sorted(experts) if experts is not None else list(range(clusters.k))
    if not have:
        return {}
    sim = clusters.centroids @ clusters.centroids[have].T                     # (k, |have|)
    to_expert = np.array([c if c in have else have[int(np.argmax(sim[c]))] for c in range(clusters.k)])
    seqs = generic_eval_sequences(cfg)
    route = to_expert[sequence_clusters(cfg, clusters, seqs)]
    out = generic_nll(cfg, expert_model, route, seqs)
    return {**out, "routed_generic_valid_nll": out["generic_valid_nll_sample"],
            "routed_generic_ppl": out["generic_ppl"], "routed_generic_tokens": float(len(seqs) * (cfg.data.seq_len - 1))}
