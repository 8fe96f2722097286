"""Projected networks (SLM-pn, docs/paper.md#slm-pn; v1 called them hypernetworks).

A Llama whose MLP weights are expert-specific and everything else (embeddings,
attention, norms, head) is shared. For expert i, layer l and each MLP matrix
p ∈ {gate, up, down}:

    W[l,p,i][o, j] = Σ_q Σ_r E[i, q] · M[l][q, r] · T[l,p][r, o, j]

with expert vectors E (k, m), a per-layer mixing matrix M[l] (m, h) shared by the three
matrices of the layer, and per-matrix tensors T[l,p] (h, out, in) that hold most
parameters (h = capacity multiplier). T is stored rank-first so W is one
(h,)·(h, out·in) product. A batch is routed to a single expert (every example of a batch
comes from the same cluster), so the W's are computed once per batch.

``instantiate(i)`` returns a plain ``LlamaForCausalLM`` with expert i's W's baked in: the
served model is a plain SLM. The hard mixture is the special case h = k, E = I, M = I
(W[l,p,i] = T[l,p][i]).

The module is single-device and returns HF outputs with ``.loss`` (the trainer's
contract); routing and data live in the strategy (``strategies/slm_pn.py``).
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
from torch import nn

from slmfactory.models.arch.lm import llama_config

MLP_MATRICES = ("gate_proj", "up_proj", "down_proj")


class ProjectedLlama(nn.Module):
    """A ``LlamaForCausalLM`` whose MLP weights are projections of a shared tensor."""

    def __init__(self, config, n_experts: int, expert_dim: int, capacity: int, seed: int = 0):
        from transformers import LlamaForCausalLM

        super().__init__()
        torch.manual_seed(seed)
        self.config = config
        self.n_experts, self.expert_dim, self.capacity = n_experts, expert_dim, capacity
        self.base = LlamaForCausalLM(config)
        d, f, L, h, m = config.hidden_size, config.intermediate_size, config.num_hidden_layers, capacity, expert_dim
        std = config.initializer_range
        # NOTE: init so that an expert's W has the standard Llama init scale (std 0.02): with
        # T ~ N(0, σ²) i.i.d., W = κ Σ_r c_r T_r has std σ·κ·‖c‖₂, so σ = std / (κ · RMS over
        # experts of ‖c‖₂), c = E[i] M[l] (E ~ N(0, 1/m), M ~ N(0, 1): experts start distinct).
        self.expert_vectors = nn.Parameter(torch.randn(n_experts, m) / math.sqrt(m))    # E: (k, m)
        self.mixing = nn.ParameterList([nn.Parameter(torch.randn(m, h)) for _ in range(L)])  # M[l]: (m, h)
        shapes = {"gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}         # (out, in)
        self.tensors = nn.ModuleList()
        # κ[l] = 1 / mean over experts of ‖c‖₁, fixed at init (a buffer, saved with the
        # weights). Why: Adam moves every T_r element by about ±lr per step whatever its
        # gradient's scale, so W = Σ_r c_r T_r would move by lr·‖c‖₁ ≈ 0.8·h·lr (17x the SLM's
        # step at the paper's h = 21); with κ an expert's W moves by lr on average, as the
        # SLM's own weights do. A constant (not a per-expert norm) keeps W linear in the
        # expert vector (instant domains mix experts by histogram) and the hard mixture
        # (one-hot c, κ = 1) exact.
        scale = torch.ones(L)
        for l, (layer, M) in enumerate(zip(self.base.model.layers, self.mixing)):
            coef = self.expert_vectors.detach() @ M.detach()                            # (k, h)
            # (On the meta device, used to count parameters at paper scale, there is no value.)
            if not coef.is_meta:
                scale[l] = 1.0 / float(coef.abs().sum(-1).mean().clamp_min(1e-12))
            sigma = std if coef.is_meta else std / float(scale[l] * coef.pow(2).sum(-1).mean().sqrt())
            per = nn.ParameterDict({p: nn.Parameter(torch.randn(h, *shapes[p]) * sigma)
                                    for p in MLP_MATRICES})                             # T[l,p]: (h, out, in)
            self.tensors.append(per)
            # The layer's own MLP weights are replaced by computed tensors: delete the
            # Parameters so they are neither trained, counted nor saved.
            for p in MLP_MATRICES:
                del getattr(layer.mlp, p).weight
        self.register_buffer("coef_scale", scale)                                        # κ: (L,)

    # -- the projection ---------------------------------------------------------------
    def expert_vector(self, expert: "int | None | torch.Tensor | Sequence[float]") -> torch.Tensor:
        """The (m,) expert vector: E[i] for an expert id, the mean of E for None/-1
        (validation on data with no routing), or h @ E for a (k,) mixing vector h (a new
        domain's cluster histogram: E_domain = Σ_c h_c E_c)."""
        if expert is None or (isinstance(expert, numbers.Integral) and expert < 0):
            return self.expert_vectors.mean(0)
        if isinstance(expert, numbers.Integral):
            return self.expert_vectors[int(expert)]
        h = torch.as_tensor(expert, dtype=self.expert_vectors.dtype, device=self.expert_vectors.device)
        if h.shape != (self.n_experts,) or not bool(torch.isfinite(h).all()):
            raise ValueError(f"mixing vector: expected {self.n_experts} finite weights, got shape {tuple(h.shape)}")
        return h @ self.expert_vectors                                                              # (k,)·(k, m)

    def coefficients(self, expert: "int | None | torch.Tensor | Sequence[float]") -> list[torch.Tensor]:
        """Per layer, the (h,) coefficients κ[l] · e · M[l] of the expert vector
        ``expert_vector(expert)`` (κ: the step-matching constant set at init)."""
        e = self.expert_vector(expert)                                                              # (m,)
        return [(e @ M) * k for M, k in zip(self.mixing, self.coef_scale)]                          # (h,) each

    def expert_weights(self, expert: "int | None | torch.Tensor | Sequence[float]") -> list[dict[str, torch.Tensor]]:
        """W[l,p,i] for every layer l and matrix p: (out, in) tensors, differentiable."""
        out = []
        for c, per in zip(self.coefficients(expert), self.tensors):
            out.append({p: torch.tensordot(c, per[p], dims=1) for p in MLP_MATRICES})  # (h,)·(h,o,i) → (o,i)
        return out

    def _set_weights(self, expert: int | None) -> None:
        for layer, ws in zip(self.base.model.layers, self.expert_weights(expert)):
            for p, w in ws.items():
                # A plain tensor attribute (not a Parameter): nn.Linear.forward reads it and
                # autograd flows back into E, M and T.
                setattr(getattr(layer.mlp, p), "weight", w)

    def _clear_weights(self) -> None:
        for layer in self.base.model.layers:
            for p in MLP_MATRICES:
                getattr(layer.mlp, p).__dict__.pop("weight", None)

    # -- HF-like surface (what the trainer, evaluation and cost code use) -------------
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, expert: int | None = None,
                **kwargs):
        """input_ids, labels: (B, T); ``expert``: the batch's cluster id (all examples of a
        batch share it) or None/-1 for the mean expert. Returns the HF output (``.loss``)."""
        if torch.is_tensor(expert):
            expert = int(expert.reshape(-1)[0])
        self._set_weights(expert)
        try:
            return self.base(input_ids=input_ids, labels=labels, **kwargs)
        finally:
            # The autograd graph keeps the W's it needs; dropping the attributes keeps the
            # module stateless between calls (deepcopy/pickle never meet non-leaf tensors).
            self._clear_weights()

    def get_input_embeddings(self) -> nn.Module:
        return self.base.get_input_embeddings()

    def mlp_params_per_expert(self) -> int:
        """Parameters of one instantiated expert's MLPs (L · 3 · d · d_mlp)."""
        return sum(per[p][0].numel() for per in self.tensors for p in MLP_MATRICES)

    def params_beyond_expert(self) -> int:
        """Parameters the optimiser updates beyond one instantiated expert's (T, M, E less
        one expert's MLPs): what the whole network costs over a plain SLM per step. Counted
        from shapes, so it works on the meta device too."""
        expert = sum(p.numel() for p in self.base.parameters()) + self.mlp_params_per_expert()
        return sum(p.numel() for p in self.parameters()) - expert

    def projection_flops(self) -> float:
        """FLOPs to compute every W of one expert once, forward + backward (≈ 3 × 2·h·|W|);
        paid once per batch, whatever the batch size."""
        return 6.0 * self.capacity * self.mlp_params_per_expert()

    @torch.no_grad()
    def instantiate(self, expert: "int | torch.Tensor | Sequence[float]"):
        """Expert ``expert`` (an id, or a (k,) mixing vector over the experts) as a plain
        ``LlamaForCausalLM`` (W computed once)."""
        from transformers import LlamaForCausalLM

        plain = LlamaForCausalLM(self.config)
        state = {k: v for k, v in self.base.state_dict().items()}
        for l, ws in enumerate(self.expert_weights(expert)):
            for p, w in ws.items():
                state[f"model.layers.{l}.mlp.{p}.weight"] = w.detach().clone()
        missing, unexpected = plain.load_state_dict(state, strict=False)
        # A tied head may be reported missing (it is the embedding); nothing else may be.
        assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
        plain.tie_weights()
        return plain.to(next(self.parameters()).device).eval()


def build_projected(cfg, vocab_size: int, n_experts: int) -> ProjectedLlama:
    """The projected SLM for ``cfg`` (``cfg.slm`` dims, ``strategy.slm-pn.capacity`` h and
    ``strategy.slm-pn.expert_dim`` m). Module-level so trainer factories stay picklable."""
    return ProjectedLlama(llama_config(cfg.slm, vocab_size, cfg.data.seq_len), n_experts,
                          cfg.strategy.of("slm-pn").expert_dim, cfg.strategy.of("slm-pn").capacity,
                          seed=cfg.pretrain.seed)


def hard_mixture_from_experts(experts: list) -> ProjectedLlama:
    """A projected network equal to the hard mixture of ``experts`` (plain Llamas of one
    config): h = k, E = I, M = I, T[l,p][i] = expert i's W[l,p], shared weights from
    expert 0. Used to check the equivalence the paper states (docs/paper.md#hard-mixture-as-a-special-case)."""
    k = len(experts)
    cfg = experts[0].config
    pn = ProjectedLlama(cfg, n_experts=k, expert_dim=k, capacity=k)
    with torch.no_grad():
        pn.expert_vectors.copy_(torch.eye(k))
        pn.coef_scale.fill_(1.0)  # one-hot coefficients: no step scaling
        for M in pn.mixing:
            M.copy_(torch.eye(k))
        shared = {k_: v for k_, v in experts[0].state_dict().items() if ".mlp." not in k_}
        pn.base.load_state_dict(shared, strict=False)
        for l, per in enumerate(pn.tensors):
            for p in MLP_MATRICES:
                per[p].copy_(torch.stack([getattr(e.model.layers[l].mlp, p).weight for e in experts]))
    return pn
