"""Kubeflow pipelines of subjectops: `personalize` (one subject) and `benchmark` (many subjects).

`pipelines/compiled/*.yaml` are the checked-in compiled specs (regenerate with
`python -m pipelines.compile`; tests/test_pipelines_compiled.py fails when they are stale).
"""

import functools


def built_on_first_use(name: str, build):
    """A module `__getattr__` (PEP 562) that builds the pipeline `name`, with the default images, on first use.

    A build takes seconds in a process that has torch loaded (kfp inspects the call stack at every task setting);
    importers that only want the builder (the compiler, `subjectops submit`, the tests) need not pay for it.
    """

    @functools.cache
    def pipeline():
        from components import build_components

        return build(build_components())

    def __getattr__(attr: str):
        if attr == name:
            return pipeline()
        raise AttributeError(f"no attribute {attr!r}")

    return __getattr__
