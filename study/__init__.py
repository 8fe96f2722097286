"""One study's write-up, outside the wheel: ``docs/results.md`` from the study's runs
(``results``: the CSV; ``claims``: the paper's claims, each decided by a rule; ``page``: the
page and its figures). Run by ``scripts/study_page.py``; tested by ``tests/test_results.py``."""
