"""The DreamBench benchmark in one place: which (method, subject) pairs it runs and the leaderboard of what they
registered (`leaderboard`), their aggregate and its gate against the champions (`aggregate`), and the pipeline's
aggregation step (`step`). Submitting and scheduling it is `subjectops.kfp_submit`; `pipelines/benchmark.py` only
wires the components."""
