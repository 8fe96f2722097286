"""Pulse tests of the five cluster/teacher strategies on the tiny real-text sample, plus
the distillation loss checked against hand-computed KL and the registry's names.

Every strategy test shares one module-scoped workdir (one corpus, tokenizer, clustering),
so generic phases another strategy already trained are reused from the cache exactly as
in a real run (slm-d and llm-lora share the `llm` generic artifact).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from slmfactory.models.train.launch import LocalLauncher
from slmfactory.data.tokens.streams import TokenSource
from slmfactory.models.train.phases import evaluate_ppl
from slmfactory.models.strategies.base import StrategyContext, get_strategy
from slmfactory.platform.config import load_config

DOMAIN = "legal"
TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def work_cfg(tmp_path_factory):
    """The tiny recipe with 4 clusters on the real-text sample, built with the generic part
    and the one domain tested only: MiniLM embeds every domain's windows, and clustering is
    the slow part of this module."""
    from slmfactory.data.corpus.build import build_sample_corpus
    from slmfactory.data.tokens.tokenizer import ensure_tokenizer

    work = tmp_path_factory.mktemp("strategies") / "work"
    # A pulse needs only a few steps: 16 pretraining steps (4 per expert of slm-mix on
    # average) and up to 8 fine-tuning steps, validated every 4.
    cfg = load_config(TINY, {"workdir": str(work), "corpus.domains": [DOMAIN], "cluster.k": 4,
                             "strategy.slm-mix.experts": 4, "strategy.slm-pn.experts": 4,
                             "pretrain.max_tokens": 16 * 8 * 64, "pretrain.eval_every": 8,
                             "pretrain.checkpoint_every": 8, "finetune.max_tokens": 8 * 8 * 64,
                             "finetune.eval_every": 4})
    build_sample_corpus(cfg)
    ensure_tokenizer(cfg)
    return cfg


@pytest.fixture(scope="module")
def clustered_cfg(work_cfg):
    """``work_cfg`` after MiniLM + k-means clustering (once per module: it is the slow part)."""
    from slmfactory.data.clustering.pipeline import run_clustering

    run_clustering(work_cfg, progress=False)
    return work_cfg


class PhaseRecorder(LocalLauncher):
    """In-process training that records the resources kind (``scaling.<phase>``) every phase
    asks for."""

    def __init__(self):
        super().__init__(device="cpu", log=None)
        self.kinds: list = []

    def fit(self, factory, out_dir, phase, resources=None):
        self.kinds.append(resources)
        return super().fit(factory, out_dir, phase, resources)


def run_pulse(cfg, name: str):
    """pretrain → specialize, then check the exported folder is a plain HF model that gives
    the recorded test perplexity; and that every phase asked for the resources of a kind its
    strategy declares (what a sweep trains on the driver, ``generic_phases``, and what its
    trial reserves, ``spec_phases``): a phase of another kind would run on resources the
    trial never reserved."""
    from transformers import AutoModelForCausalLM

    from slmfactory.models.train.phases import DomainData

    launcher = PhaseRecorder()
    ctx = StrategyContext(cfg, launcher, log=None)
    strategy = get_strategy(name)
    generic = strategy.pretrain(ctx)
    assert set(launcher.kinds) <= set(strategy.generic_phases), (name, launcher.kinds, strategy.generic_phases)
    launcher.kinds.clear()
    rec = strategy.specialize(ctx, generic, DOMAIN)
    assert set(launcher.kinds) <= set(strategy.spec_phases), (name, launcher.kinds, strategy.spec_phases)
    model = AutoModelForCausalLM.from_pretrained(rec.path)
    assert type(model).__name__ == "LlamaForCausalLM"
    _, ppl = evaluate_ppl(cfg, model, DomainData.of(cfg, DOMAIN).test_sample())
    assert ppl == pytest.approx(rec.metrics["test_ppl"], rel=1e-4)
    assert math.isfinite(rec.metrics["test_ppl"]) and rec.spec_cost.flops > 0 and rec.spec_cost.tokens > 0
    return generic, rec


# -- slm-d ---------------------------------------------------------------------------------

def test_distillation_loss_matches_hand_computed_kl():
    from slmfactory.models.strategies.slm_d import distillation_loss

    # One sequence of 3 tokens over a vocabulary of 3: positions 0 and 1 predict tokens 1, 2.
    s = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [9.0, 9.0, 9.0]]])   # (B=1, T=3, V=3)
    t = torch.tensor([[[0.0, 2.0, 0.0], [1.0, -1.0, 0.5], [0.0, 0.0, 0.0]]])   # (B=1, T=3, V=3)
    y = torch.tensor([[0, 1, 2]])                                               # (B=1, T=3)
    w, tau = 0.3, 2.0

    def softmax(z):
        e = [math.exp(v / tau) for v in z]
        return [v / sum(e) for v in e]

    def log_softmax1(z, i):  # log softmax at temperature 1
        return z[i] - math.log(sum(math.exp(v) for v in z))

    kl, nll = 0.0, 0.0
    for pos in range(2):  # the last position has no next token
        ps, pt = softmax(s[0, pos].tolist()), softmax(t[0, pos].tolist())
        kl += sum(a * math.log(a / b) for a, b in zip(pt, ps)) / 2
        nll += -log_softmax1(s[0, pos].tolist(), int(y[0, pos + 1])) / 2
    expected = (1 - w) * nll + w * tau ** 2 * kl
    got = distillation_loss(s, t, y, weight=w, temperature=tau)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # w = 0 is plain next-token NLL; identical logits give zero KL.
    assert distillation_loss(s, t, y, 0.0, tau).item() == pytest.approx(nll, rel=1e-6)
    assert distillation_loss(s, s, y, 1.0, tau).item() == pytest.approx(0.0, abs=1e-7)


def _paper_flops_per_token(model, seq_len: int, per_param: float) -> float:
    """docs/paper.md#cost, counted by hand from the HF model: ``per_param``·N + ``per_param``·L·T·d
    (6 to train, 2 for a forward pass). With tied embeddings every parameter is one multiply-add
    per token: the input lookup is free and the same matrix is the output head's matmul."""
    c = model.config
    assert c.tie_word_embeddings
    n = sum(p.numel() for p in model.parameters())
    return per_param * n + per_param * c.num_hidden_layers * seq_len * c.hidden_size


def test_slm_d_pulse(work_cfg):
    from transformers import AutoModelForCausalLM

    from slmfactory.models.train.phases import load_lm

    cfg = work_cfg
    generic, rec = run_pulse(cfg, "slm-d")
    # Teacher and student pretraining are both generic cost.
    assert generic.cost.flops == pytest.approx(generic.info["teacher_cost"]["flops"]
                                               + generic.info["student_cost"]["flops"])
    assert rec.params < 2 * 10 ** 6 and math.isfinite(rec.metrics["teacher_test_ppl"])

    # The student's fine-tuning pays for the teacher's forward passes: its FLOPs are the
    # student's training (6·N_s per token) plus one teacher forward (2·N_t per token) on each
    # of its tokens, counted here from the two models and the steps the student took.
    seq, per_step = cfg.data.seq_len, cfg.finetune.batch_size * cfg.data.seq_len
    student = AutoModelForCausalLM.from_pretrained(rec.path)
    teacher = load_lm(cfg, "llm", None)
    student_train = _paper_flops_per_token(student, seq, 6.0)
    teacher_train = _paper_flops_per_token(teacher, seq, 6.0)
    teacher_forward = _paper_flops_per_token(teacher, seq, 2.0)
    tokens = rec.metrics["finetune_steps"] * per_step
    assert tokens > 0 and sum(p.numel() for p in teacher.parameters()) > rec.params  # the larger model
    assert rec.metrics["student_finetune_flops"] == pytest.approx(tokens * (student_train + teacher_forward),
                                                                  rel=1e-9)
    # The teacher's forward passes are priced as the teacher's inference work (device-hours
    # come from these items), not folded into the student's training.
    forward = [w for w in rec.spec_cost.work if w["kind"] == "inference"]
    assert len(forward) == 1 and forward[0]["tokens"] == tokens
    assert forward[0]["params"] == sum(p.numel() for p in teacher.parameters())
    assert forward[0]["flops"] == pytest.approx(tokens * teacher_forward, rel=1e-9)
    # The teacher's own fine-tuning: whole steps of 6·N_t per token, within its budget share.
    teacher_steps = rec.metrics["teacher_finetune_flops"] / (per_step * teacher_train)
    assert teacher_steps == pytest.approx(round(teacher_steps), abs=1e-6)
    assert 1 <= round(teacher_steps) <= cfg.finetune.max_tokens // per_step
    # Specialisation = the teacher's fine-tuning + the student's (forward passes included).
    assert rec.spec_cost.flops == pytest.approx(rec.metrics["teacher_finetune_flops"]
                                                + rec.metrics["student_finetune_flops"], rel=1e-9)


# -- slm-pn --------------------------------------------------------------------------------

def test_cluster_routed_batches_are_deterministic_and_proportional(work_cfg, tmp_path):
    from slmfactory.models.arch.projected import build_projected
    from slmfactory.data.tokens.streams import PackedBatches, split_tokens
    from slmfactory.models.train.phases import vocab_size_of
    from slmfactory.models.strategies.slm_pn import ClusterRoutedTrainer

    cfg = work_cfg
    toks = split_tokens(cfg, "generic", "train")
    # Three "clusters": contiguous slices of real generic text of sizes 1 : 3 : 6.
    cuts = (np.array([0.0, 0.1, 0.4, 1.0]) * len(toks)).astype(int)
    path = tmp_path / "c.npy"
    np.save(path, toks[: cuts[-1]])
    sources = [TokenSource(str(path), "three-slices", int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]
    tcfg = cfg.replace(**{"pretrain.max_tokens": 8 * 64 * 400}).pretrain

    def trainer():
        model = build_projected(cfg, vocab_size_of(cfg), n_experts=3)
        return ClusterRoutedTrainer(model, PackedBatches(sources[0].load(), 64, 8), tcfg, seq_len=64,
                                    cluster_sources=sources, log=None)

    a, b = trainer(), trainer()
    share = np.bincount(a.route, minlength=3) / len(a.route)
    np.testing.assert_allclose(share, [0.1, 0.3, 0.6], atol=0.06)
    for step in (0, 5, 399):
        ba, bb = a.batch_at(step), b.batch_at(step)
        assert ba.expert == bb.expert and torch.equal(ba.input_ids, bb.input_ids)  # pure function of step
        lo, hi = cuts[ba.expert], cuts[ba.expert + 1]
        cluster_text = toks[lo:hi]
        row = ba.input_ids[0].numpy()
        # Every row is a sequence of the routed cluster's own slice.
        hits = np.flatnonzero(cluster_text[: len(cluster_text) - 63] == row[0])
        assert any(np.array_equal(cluster_text[h:h + 64], row) for h in hits)


@pytest.mark.ray
@pytest.mark.slow
def test_slm_pn_pulse(clustered_cfg):
    from slmfactory.data.clustering.clusters import load_clusters

    generic, rec = run_pulse(clustered_cfg, "slm-pn")
    assert generic.cost.flops > 0 and generic.info["experts"] == 4
    assert rec.metrics["expert"] == load_clusters(clustered_cfg).most_frequent(DOMAIN)
    # The generic phase records the routed generic perplexity (docs/paper.md#table-8).
    assert math.isfinite(generic.info["routed_generic_ppl"]) and generic.info["routed_generic_tokens"] > 0
    # The served model is a plain SLM: same size as the `slm` strategy's.
    from slmfactory.models.train.phases import load_lm
    assert rec.params == sum(p.numel() for p in load_lm(clustered_cfg, "slm", None).parameters())


# -- slm-mix -------------------------------------------------------------------------------

@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("rule", ["most-frequent", "best-before-finetune", "best-after-finetune"])
def test_slm_mix_pulse(clustered_cfg, rule):
    from slmfactory.data.clustering.clusters import load_clusters

    cfg = clustered_cfg.replace(**{"strategy.slm-mix.selection": rule})
    generic, rec = run_pulse(cfg, "slm-mix")
    clusters = load_clusters(cfg)
    experts = {int(c) for c in generic.info["experts"]}
    assert math.isfinite(generic.info["routed_generic_ppl"])
    assert experts <= set(range(clusters.k)) and len(experts) >= 2
    # The split budget: the experts together spend about one SLM's pretraining tokens.
    step = cfg.pretrain.batch_size * cfg.data.seq_len
    from slmfactory.models.train.phases import trained_tokens

    assert abs(trained_tokens(generic.cost) - cfg.pretrain.max_tokens) <= len(experts) * step
    if rule == "most-frequent":
        counts = clusters.counts(DOMAIN)
        assert rec.metrics["expert"] == max(experts, key=lambda c: counts[c])
    elif rule == "best-before-finetune":
        before = {c: rec.metrics[f"valid_nll_before_e{c}"] for c in experts}
        assert rec.metrics["expert"] == min(before, key=before.get)
    else:
        after = {c: rec.metrics[f"valid_nll_after_e{c}"] for c in experts}
        assert rec.metrics["expert"] == min(after, key=after.get)
        # Every expert was fine-tuned and paid for: more than the kept fine-tuning alone.
        kept = rec.metrics["finetune_steps"] * cfg.finetune.batch_size * cfg.data.seq_len
        assert rec.spec_cost.tokens >= kept + (len(experts) - 1) * cfg.finetune.batch_size * cfg.data.seq_len


# -- llm-lora ------------------------------------------------------------------------------

def test_llm_lora_pulse(work_cfg):
    generic, rec = run_pulse(work_cfg, "llm-lora")
    assert generic.cost.flops > 0
    # Only the adapters trained: far fewer parameters than the served (merged) model.
    assert 0 < rec.metrics["lora_trainable_params"] < rec.params / 5
    # Frozen weights skip their weight gradients: cheaper per token than full fine-tuning
    # (6·N), dearer than a forward pass (2·N).
    from slmfactory.models.train.phases import load_lm
    from slmfactory.platform.cost import inference_flops_per_token, train_flops_per_token

    llm = load_lm(work_cfg, "llm", None)
    per_token = rec.spec_cost.flops / rec.spec_cost.tokens
    seq = work_cfg.data.seq_len
    assert inference_flops_per_token(llm, seq) < per_token < train_flops_per_token(llm, seq)
    # The merged model moved away from the generic LLM (the adapters were not a no-op).
    assert rec.metrics["test_ppl"] != pytest.approx(rec.metrics["test_ppl_before"], rel=1e-6)


# -- slm-is --------------------------------------------------------------------------------

@pytest.mark.ray
@pytest.mark.slow
def test_slm_is_pulse(clustered_cfg):
    from slmfactory.models.train.phases import trained_tokens
    from slmfactory.data.clustering.clusters import load_clusters

    generic, rec = run_pulse(clustered_cfg, "slm-is")
    # No generic phase: its only generic cost is embedding and clustering the generic corpus.
    cl = load_clusters(clustered_cfg)
    assert generic is None and cl.embedding_cost("generic").flops > 0
    assert rec.generic_cost.flops == pytest.approx(cl.embedding_cost("generic").flops)
    # The fresh SLM's pretraining is inside the specialisation cost, and with the domain's
    # embedding it spends the spec budget it is labelled with, within one step.
    assert rec.spec_cost.flops > rec.metrics["resample_pretrain_flops"] > 0
    step = clustered_cfg.finetune.batch_size * clustered_cfg.data.seq_len
    assert clustered_cfg.finetune.max_tokens - step < trained_tokens(rec.spec_cost) <= clustered_cfg.finetune.max_tokens
    assert rec.spec_cost.flops > rec.metrics["resample_pretrain_flops"] + rec.metrics["cost/clustering_domain_flops"]
    assert rec.metrics["cost/clustering_domain_flops"] == pytest.approx(cl.embedding_cost(DOMAIN).flops)
    assert cl.embedding_cost(DOMAIN).flops > 0
    assert 0.0 <= rec.metrics["resample_tv_distance"] <= 1.0
    assert rec.metrics["test_ppl_lo"] < rec.metrics["test_ppl"] < rec.metrics["test_ppl_hi"]


def test_slm_nopt_spends_the_spec_budget_from_scratch(work_cfg):
    """Training from scratch happens once the domain is known: the spec axis's tokens, not a
    budget of its own (it trained 65,536 tokens under a 32,768 label)."""
    from slmfactory.models.train.phases import trained_tokens

    cfg = work_cfg.replace(**{"finetune.patience": 0, "finetune.max_tokens": 6 * 8 * 64})
    generic, rec = run_pulse(cfg, "slm-nopt")
    assert generic is None and rec.generic_cost is None
    assert trained_tokens(rec.spec_cost) == 6 * 8 * 64 and rec.metrics["finetune_steps"] == 6
    from slmfactory.models.train.phases import DomainData

    sequences = len(DomainData.of(cfg, DOMAIN).train.load()) // 64
    assert rec.metrics["epochs/spec"] == pytest.approx(6 * 8 / sequences)


@pytest.mark.ray
@pytest.mark.slow
def test_routed_and_dense_generic_perplexity_score_the_same_sequences(clustered_cfg):
    """Table 8's routed figure (mix, pn) and a dense model's are over the same sequences: a
    'mixture' whose every expert is one model gives exactly that model's figure."""
    from slmfactory.models.train.experts import expert_clusters
    from slmfactory.models.train.generic_eval import generic_nll, routed_generic_nll
    from slmfactory.models.train.phases import load_lm

    model = load_lm(clustered_cfg, "slm", None)
    dense = generic_nll(clustered_cfg, lambda _: model)
    routed = routed_generic_nll(clustered_cfg, expert_clusters(clustered_cfg, 4), lambda _: model)
    assert routed["routed_generic_ppl"] == pytest.approx(dense["generic_ppl"], rel=1e-9)
    from slmfactory.models.train.generic_eval import generic_eval_sequences

    n = len(generic_eval_sequences(clustered_cfg))   # the first eval_tokens of the split, whole sequences
    assert 0 < n <= clustered_cfg.pretrain.eval_tokens // clustered_cfg.data.seq_len
    assert dense["generic_eval_sequences"] == n


def test_the_test_sample_spans_the_whole_split_and_is_the_same_every_time(work_cfg):
    from slmfactory.data.tokens.streams import as_sequences
    from slmfactory.models.train.phases import DomainData

    cfg = work_cfg.replace(**{"data.test_tokens": 8 * 64})
    data = DomainData.of(cfg, DOMAIN)
    every = as_sequences(data.test.load(), 64)
    sample = data.test_sample().reshape(-1, 64)
    assert len(sample) == 8 and len(every) > 16
    picked = [int(np.flatnonzero((every == row).all(1))[0]) for row in sample]
    assert picked == sorted(picked) and max(picked) >= 8      # not the split's first 8 sequences
    assert np.array_equal(DomainData.of(cfg, DOMAIN).test_sample(), data.test_sample())


# -- registry ------------------------------------------------------------------------------

def test_registry_holds_exactly_the_documented_strategies():
    """The README's strategy table is the documentation: the registry must match it."""
    import re

    from slmfactory.platform.config import strategy_settings
    from slmfactory.platform.registry import STRATEGIES, strategies, strategy_names

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("| config name | strategy ([docs/paper.md](docs/paper.md#strategies)) |"):]
    table = table[: table.index("\n\n")]
    documented = re.findall(r"^\| `([a-z-]+)` \|", table, flags=re.M)
    assert sorted(strategies()) == sorted(documented) == sorted(strategy_settings())
    assert len(documented) == 8
    # A config knows the names without importing the strategies: from the file names. Each
    # file registers exactly the strategy its name says (slm_nopt.py: slm-nopt).
    assert strategy_names() == tuple(sorted(documented))
    for name in strategy_names():
        assert STRATEGIES[name].__module__ == "slmfactory.models.strategies." + name.replace("-", "_")


def test_strategies_declare_what_they_need():
    needs = {name: get_strategy(name).requires for name in ("slm", "slm-is", "slm-mix", "slm-pn", "slm-d")}
    assert needs["slm"] == frozenset() and needs["slm-d"] == {"teacher"}
    assert all(needs[n] == {"clusters"} for n in ("slm-is", "slm-mix", "slm-pn"))


def test_paper_sizes_of_the_expert_strategies():
    """paper.yaml's models have the paper's parameter counts (docs/paper.md#model-sizes) within 3%: SLM 126M, LLM 771M,
    SLM-mix k x 126M, SLM-pn 756M / 1,422M at 16 / 32 experts (counted on the meta device:
    no memory is allocated for the 1.4B parameters)."""
    from slmfactory.models.arch.lm import build_model, count_params
    from slmfactory.models.arch.projected import build_projected

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "paper.yaml")
    vocab = cfg.tokenizer.vocab_size
    with torch.device("meta"):
        slm = count_params(build_model(cfg.slm, vocab, cfg.data.seq_len))
        llm = count_params(build_model(cfg.llm, vocab, cfg.data.seq_len))
        pn = {k: count_params(build_projected(cfg.replace(**{"strategy.slm-pn.capacity": h}), vocab, k))
              for k, h in ((16, 11), (32, cfg.strategy.of("slm-pn").capacity))}
    assert slm == pytest.approx(126e6, rel=0.03) and llm == pytest.approx(771e6, rel=0.03)
    mix = cfg.strategy.of("slm-mix").experts
    assert mix == 16 and mix * slm == pytest.approx(16 * 126e6, rel=0.03)
    assert 32 * slm == pytest.approx(4032e6, rel=0.03)
    assert cfg.strategy.of("slm-pn").experts == 32
    assert pn[16] == pytest.approx(756e6, rel=0.03) and pn[32] == pytest.approx(1422e6, rel=0.03)


@pytest.mark.ray
@pytest.mark.slow
def test_slm_mix_spends_a_flop_budget_once_in_total(clustered_cfg):
    """Under ``pretrain.max_flops`` each expert gets its cluster's share of the FLOPs (it
    used to get all of them: k x the generic cost)."""
    from slmfactory.models.strategies.base import StrategyContext

    probe = get_strategy("slm").pretrain(StrategyContext(clustered_cfg, LocalLauncher(device="cpu", log=None),
                                                         log=None))
    per_step = probe.cost.flops / probe.info["steps"]
    budget = 12 * per_step  # 12 steps in all, 3 per expert on average (max_tokens allows 16)
    cfg = clustered_cfg.replace(**{"pretrain.max_flops": budget})
    generic = get_strategy("slm-mix").pretrain(StrategyContext(cfg, LocalLauncher(device="cpu", log=None),
                                                               log=None))
    # Training FLOPs (the generic cost also carries the clustering's MiniLM inference).
    trained = sum(w["flops"] for w in generic.cost.work if w["kind"] == "train")
    assert 0.5 * budget <= trained <= budget + len(generic.info["experts"]) * per_step
    assert generic.cost.flops > trained
