"""SLM-d: distillation. The LLM teacher (generic-pretrained, then fine-tuned on the
domain) supervises the generic-pretrained SLM student's fine-tuning with its next-token
distributions (response-based KD, docs/paper.md#slm-d).

Student loss per token: (1 − w)·NLL + w·τ²·KL(teacher_τ ‖ student_τ), with
w = ``strategy.slm-d.distill_weight`` and τ = ``strategy.slm-d.distill_temperature`` (the paper gives
neither: both are config). τ² keeps the KL gradient's scale independent of τ (Hinton et
al. 2015).

Cost: teacher and student pretraining are *generic* (shared by all domains); the teacher's
fine-tuning, the student's fine-tuning and the teacher's forward passes during it are
*specialisation* cost (docs/paper.md#claim-3: SLM-d loses once teacher cost is counted).

Budget: the sweep's spec axis pays for all of it: the teacher's fine-tuning gets
``strategy.slm-d.teacher_finetune_share`` of the budget, the student the rest (with a
FLOP budget the student's share covers its own training *and* the teacher's forward
passes). The teacher has its own, longer pretraining (``teacher_pretrain_multiple`` x the
student's generic budget by default, or ``teacher_pretrain_tokens``/``_flops``): the
paper's claim is about teachers pretrained far longer than the student.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slmfactory.data.tokens import Batch, split_source
from slmfactory.models.train import (
    DomainData, budget_share, evaluate_ppl, finetune_lm, finish, lm_flops_per_token, load_lm, phase_work,
    pretrain_lm)
from slmfactory.models.strategies.base import Strategy, register
from slmfactory.models.train import GenericArtifact, SpecializedModel, StrategyContext, Trainer
from slmfactory.platform.config import from_dict
from slmfactory.platform.cost import INFERENCE, TRAIN, Work, inference_flops_per_token, model_flop_terms
from slmfactory.platform.errors import ConfigError
from slmfactory.platform.stages import Stage
from slmfactory.trial import TrialRecord


@dataclass(frozen=True, kw_only=True)
class Settings:
    distill_weight: float = 0.5
    """Weight of the KL-to-teacher term; (1 - weight) goes to next-token NLL."""
    distill_temperature: float = 1.0
    """Softmax temperature of teacher and student in the KL term."""
    teacher_pretrain_tokens: int = 0
    """The teacher's generic budget in tokens (0 = ``teacher_pretrain_multiple`` x ``pretrain.max_tokens``)."""
    teacher_pretrain_flops: float = -1.0
    """The teacher's generic FLOP budget (-1 = ``teacher_pretrain_multiple`` x ``pretrain.max_flops``; 0 = none)."""
    teacher_pretrain_multiple: float = 4.0
    """The teacher's default generic budget as a multiple of the student's."""
    teacher_finetune_share: float = 0.5
    """Share of the specialisation budget the teacher's fine-tuning spends; the student gets the rest."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ConfigError(f"distill_weight: expected in [0, 1], got {self.distill_weight!r}")
        if self.distill_temperature <= 0:
            raise ConfigError(f"distill_temperature: expected > 0, got {self.distill_temperature!r}")
        if self.teacher_pretrain_tokens < 0:
            raise ConfigError(f"teacher_pretrain_tokens: expected >= 0, got {self.teacher_pretrain_tokens!r}")
        if self.teacher_pretrain_flops < -1:
            raise ConfigError(f"teacher_pretrain_flops: expected >= -1, got {self.teacher_pretrain_flops!r}")
        if self.teacher_pretrain_multiple < 1:
            raise ConfigError(f"teacher_pretrain_multiple: expected >= 1, got {self.teacher_pretrain_multiple!r}")
        if not 0.0 < self.teacher_finetune_share < 1.0:
            raise ConfigError(f"teacher_finetune_share: expected in (0, 1), got {self.teacher_finetune_share!r}")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      weight: float, temperature: float) -> torch.Tensor:
    """(1 − w)·NLL + w·τ²·KL(softmax(t/τ) ‖ softmax(s/τ)), each averaged over tokens.

    ``student_logits``/``teacher_logits``: (B, T, V) predicting position t+1 from t;
    ``labels``: (B, T) token ids (the inputs: the shift happens here, as in HF).
    """
    s = student_logits[:, :-1].float()                        # (B, T-1, V)
    t = teacher_logits[:, :-1].float()                        # (B, T-1, V)
    y = labels[:, 1:]                                         # (B, T-1)
    nll = F.cross_entropy(s.reshape(-1, s.shape[-1]), y.reshape(-1))
    if weight == 0.0:
        return nll
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    # KL(p_t ‖ p_s) = Σ_v p_t (log p_t − log p_s), summed over the vocabulary, mean over tokens.
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean()
    return (1.0 - weight) * nll + weight * temperature ** 2 * kl


class DistillTrainer(Trainer):
    """The shared loop with a frozen teacher inside ``compute_loss``.

    The teacher is rebuilt on the worker from plain data (config dict + weights path) so the
    trainer factory stays picklable for Ray workers.
    """

    def __init__(self, *args, teacher_cfg: dict, teacher_key: str, teacher_weights: str,
                 distill_weight: float, distill_temperature: float, **kwargs):
        # The teacher must exist before Trainer.__init__ calls compute_flops_per_token().
        self.teacher = load_lm(from_dict(teacher_cfg), teacher_key, teacher_weights)
        self.teacher.requires_grad_(False).eval()
        self.teacher.to(kwargs.get("device", "cpu"))
        self.distill_weight, self.distill_temperature = distill_weight, distill_temperature
        super().__init__(*args, **kwargs)

    def compute_flops_per_token(self) -> float:
        # Student training (6·N_s + attention) plus one teacher forward (2·N_t + attention).
        return super().compute_flops_per_token() + inference_flops_per_token(self.teacher, self.seq_len)

    def cost_work(self, tokens: int, steps: int) -> list[Work]:
        # Two models, two utilisations: the student trains, the teacher only runs forward.
        teacher = inference_flops_per_token(self.teacher, self.seq_len)
        return [Work(TRAIN, tokens, tokens * (self.flops_per_token - teacher), model_flop_terms(self.model)[0],
                     steps, workers=self.world_size),
                Work(INFERENCE, tokens, tokens * teacher, model_flop_terms(self.teacher)[0], workers=self.world_size)]

    def compute_loss(self, batch: Batch) -> torch.Tensor:
        x = batch.input_ids.to(self.device, non_blocking=True)   # (B, T)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=x).logits     # (B, T, V)
        student_logits = self.step_model(input_ids=x).logits      # (B, T, V)
        return distillation_loss(student_logits, teacher_logits, x, self.distill_weight,
                                 self.distill_temperature)


@register("slm-d", settings=Settings)
class Distillation(Strategy):
    requires = frozenset({"teacher"})
    generic_family = "slm-d"
    generic_phases = ("pretrain_llm", "pretrain")
    spec_phases = ("finetune_llm", "distill")

    def projected_work(self, cfg):
        slm, _, n_slm = lm_flops_per_token(cfg, "slm")
        llm, llm_forward, n_llm = lm_flops_per_token(cfg, "llm")
        generic = [phase_work(cfg, self.teacher_pretrain_config(cfg), llm, n_llm),
                   phase_work(cfg, cfg.pretrain, slm, n_slm)]
        # The student's steps are budgeted on student + teacher-forward FLOPs (DistillTrainer).
        student = phase_work(cfg, self.student_config(cfg), slm + llm_forward, n_slm)
        teacher = phase_work(cfg, self.student_config(cfg), slm + llm_forward, n_llm, kind=INFERENCE)
        return generic, [phase_work(cfg, self.teacher_finetune_config(cfg), llm, n_llm),
                         dataclasses.replace(student, flops=student.tokens * slm),
                         dataclasses.replace(teacher, flops=teacher.tokens * llm_forward)]

    def teacher_pretrain_config(self, cfg):
        s = self.settings(cfg)
        flops = s.teacher_pretrain_flops if s.teacher_pretrain_flops >= 0 else \
            cfg.pretrain.max_flops * s.teacher_pretrain_multiple
        return dataclasses.replace(
            cfg.pretrain, max_tokens=s.teacher_pretrain_tokens or int(cfg.pretrain.max_tokens * s.teacher_pretrain_multiple),
            max_flops=flops)

    def teacher_finetune_config(self, cfg):
        return budget_share(cfg.finetune, self.settings(cfg).teacher_finetune_share, cfg.data.seq_len)

    def student_config(self, cfg):
        return budget_share(cfg.finetune, 1.0 - self.settings(cfg).teacher_finetune_share, cfg.data.seq_len)

    def pretrain(self, ctx: StrategyContext) -> GenericArtifact:
        cfg = ctx.cfg
        tcfg = self.teacher_pretrain_config(cfg)
        # Same stage keys as the `llm` and `slm` strategies: their generic phases are reused
        # when the budgets agree.
        teacher = pretrain_lm(ctx, "llm", split_source(cfg, "generic", "train", tcfg.max_tokens), name="llm",
                              train_cfg=tcfg)
        student = pretrain_lm(ctx, "slm", split_source(cfg, "generic", "train", cfg.pretrain.max_tokens), name="slm")
        stage = Stage.of(cfg.root, "generic", self.name, teacher=teacher.stage, student=student.stage)
        return GenericArtifact.record(stage, self.name, teacher.cost + student.cost, {
            "weights": stage.relative(student.weights().path), "teacher_weights": stage.relative(teacher.weights().path),
            "teacher_generic_valid_nll": teacher.info["generic_valid_nll"],
            "generic_valid_nll": student.info["generic_valid_nll"], "epochs": student.info.get("epochs", 0.0),
            "generic_ppl": student.info.get("generic_ppl"), "teacher_generic_ppl": teacher.info.get("generic_ppl"),
            "teacher_cost": teacher.cost.to_dict(), "student_cost": student.cost.to_dict()}, cfg.device)

    def specialize(self, ctx: StrategyContext, generic: GenericArtifact | None, domain: str) -> SpecializedModel:
        cfg = ctx.cfg
        s = self.settings(cfg)
        if generic is None:
            generic = self.pretrain(ctx)
        student_init, teacher_init = generic.weights("weights"), generic.weights("teacher_weights")
        data = DomainData.of(cfg, domain)
        # 1. The teacher is fine-tuned on the domain (specialisation cost).
        teacher, fit_t = finetune_lm(ctx, "llm", teacher_init, data, f"{self.name}/{domain}/teacher",
                                     train_cfg=self.teacher_finetune_config(cfg))
        teacher_test_ppl = evaluate_ppl(cfg, teacher.cpu().eval(), data.test_sample())[1]
        del teacher
        teacher_weights = str(fit_t.checkpoint / "model.safetensors")  # best-validation weights
        # 2. The student is fine-tuned against the domain text and the teacher's distributions.
        before = evaluate_ppl(cfg, load_lm(cfg, "slm", student_init), data.test_sample())[1]
        model, fit = finetune_lm(ctx, "slm", student_init, data, f"{self.name}/{domain}/student",
                                 train_cfg=self.student_config(cfg), key_inputs={"teacher": fit_t.stage_key, "distill": s},
                                 resources="distill",
                                 trainer_cls=DistillTrainer,
                                 teacher_cfg=cfg.to_tree(), teacher_key="llm",
                                 teacher_weights=teacher_weights,
                                 distill_weight=s.distill_weight,
                                 distill_temperature=s.distill_temperature)
        return finish(ctx, self.name, domain, model, fit, generic, data, before,
                      extra_spec_cost=fit_t.result.cost,
                      extra_metrics={TrialRecord.TEACHER_TEST_PPL: teacher_test_ppl,
                                     "teacher_finetune_flops": fit_t.result.flops,
                                     "student_finetune_flops": fit.result.flops})
