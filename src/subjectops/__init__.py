"""subjectops: personalize text-to-image diffusion models from a few photos of one subject."""

import os

# An unreachable hub makes from_pretrained hang for minutes; these machines never reach it. Users with a
# network set HF_HUB_OFFLINE=0 explicitly. Telemetry stays off everywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
# Our own rich progress bars replace the libraries' per-component tqdm bars.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

__version__ = "0.1.0"
