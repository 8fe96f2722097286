"""Run-time domains: a domain created while serving (``POST /v1/domains``, ``slmfactory
specialize``), its store entry under ``<workdir>/instant/domains`` that every replica reads,
its build by the instant builder, its optional Ray Train fine-tune and its MLflow run.

- ``runtime.py``: the store, the request schema, the handlers a replica runs.
"""

from slmfactory.platform.exports import lazy_exports

EXPORTS = {
    "runtime": ("DomainRequest", "DomainStore", "RuntimeDomains", "check_name", "compared_view", "create_domain",
                "finetune_and_swap", "register_in_mlflow"),
}
__all__, __getattr__ = lazy_exports(__name__, EXPORTS)
