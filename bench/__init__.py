"""
callward's benchmarks, each a module run from the repository root, e.g.
``.venv/bin/python -m bench.governance``; what they share is in ``bench._common``.
"""
