"""Kubeflow pipelines of subjectops: `personalize` (one subject) and `benchmark` (many subjects).

`pipelines/compiled/*.yaml` are the checked-in compiled specs (regenerate with
`python -m pipelines.compile`; tests/test_pipelines_compiled.py fails when they are stale).
"""
