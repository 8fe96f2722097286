"""The training engine: the one trainer and its execution plan (precision, compile), the
launchers (in process, or Ray Train workers), evaluation, checkpoints, the phase library
the strategies compose (pretrain, fine-tune, evaluate, export), the artifacts phases and
strategies pass on, the experts' cluster streams, calibration and export-time serving rates.

- ``artifacts.py``: ``Weights``, ``GenericArtifact``, ``SpecializedModel``, ``StrategyContext``;
- ``trainer.py``: ``Trainer``; ``execution.py``: the execution plan (precision, compile);
- ``evaluation.py``: ``evaluate_nll``, per-sequence NLLs, the bootstrap;
- ``launch.py`` and ``distributed.py``: where a phase runs (``make_launcher``);
- ``phases.py``: the phase library; ``generic_eval.py``: generic (routed) perplexity;
- ``experts.py``: slm-mix's and slm-pn's clusters; ``calibration.py``: the device profile;
- ``serving_rate.py``: a served model's tokens/s, measured at export.
"""

from slmfactory.platform.exports import lazy_exports

EXPORTS = {
    "artifacts": ("GenericArtifact", "SpecializedModel", "StrategyContext", "Weights"),
    "calibration": ("calibrate", "write_profile"),
    "distributed": ("RayLauncher", "make_launcher"),
    "evaluation": ("evaluate_nll",),
    "experts": ("cluster_streams", "expert_clusters"),
    "generic_eval": ("routed_generic_nll",),
    "phases": ("DomainData", "budget_share", "evaluate_ppl", "export_hf", "finetune_lm", "finish", "lm_factory",
               "lm_flops_per_token", "load_lm", "phase_work", "pretrain_lm", "run_phase", "trained_tokens",
               "vocab_size_of"),
    "trainer": ("Trainer",),
}
__all__, __getattr__ = lazy_exports(__name__, EXPORTS)
