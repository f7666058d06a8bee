"""Runs a Python program (a script path or `-m module`) with two clocks inside it, the same for every program
the benches compare, and writes what they saw as JSON when the program exits:

- every optimizer step's end (torch's global optimizer step hook), so the training loop's steps per second is
  (n - 1) / (last - first): start-up, model loading, caching and saving are outside it;
- the first start and the last end of a text-to-image pipeline call, so the sampling rate of class-prior
  generation is timed without the process start-up around it.

    python bench/process_timer.py OUT.json script.py ARGS...
    python bench/process_timer.py OUT.json -m subjectops ARGS...
"""

from __future__ import annotations

import atexit
import json
import runpy
import sys
import time


def main() -> None:
    out, target, *args = sys.argv[1:]
    marks: dict[str, list[float]] = {"optimizer_steps": [], "pipeline_calls": []}

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(
        lambda *_: marks["optimizer_steps"].append(time.perf_counter()))

    def timed(call):
        def wrapper(self, *a, **kw):
            start = time.perf_counter()
            try:
                return call(self, *a, **kw)
            finally:
                marks["pipeline_calls"].append((start, time.perf_counter()))
        return wrapper

    for cls in (StableDiffusionPipeline, StableDiffusionXLPipeline):
        cls.__call__ = timed(cls.__call__)

    def write() -> None:
        steps, calls = marks["optimizer_steps"], marks["pipeline_calls"]
        summary = {
            "steps": len(steps),
            "loop_seconds": steps[-1] - steps[0] if len(steps) > 1 else None,
            "pipeline_calls": len(calls),
            "sampling_seconds": calls[-1][1] - calls[0][0] if calls else None,
        }
        with open(out, "w") as f:
            json.dump(summary, f)

    atexit.register(write)
    if target == "-m":
        module, *args = args
        sys.argv = [module, *args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = [target, *args]
        runpy.run_path(target, run_name="__main__")


if __name__ == "__main__":
    main()
