"""Run-time domains: a domain created while serving (``POST /v1/domains``, ``slmfactory
specialize``), its store entry under ``<workdir>/instant/domains`` that every replica reads,
its build by the instant builder, its optional Ray Train fine-tune and its MLflow run.

- ``store.py``: the store, one JSON entry per domain, and the one name rule's check.
- ``runtime.py``: the build, fine-tune and MLflow run, the request schema, the handlers a
  replica runs.
"""

from slmfactory.platform.exports import lazy_exports

EXPORTS = {
    "runtime": ("DomainRequest", "RuntimeDomains", "compared_view", "create_domain", "finetune_and_swap",
                "register_in_mlflow"),
    "store": ("DomainStore", "check_name"),
}
__all__, __getattr__ = lazy_exports(__name__, EXPORTS)
