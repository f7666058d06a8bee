"""Compile the pipelines to YAML: `python -m pipelines.compile [--check] [--out DIR]`.

The checked-in `pipelines/compiled/*.yaml` are made with the default images; `subjectops submit` and
`subjectops benchmark schedule` compile afresh when given other images or another parallelism.
"""

import argparse
import difflib
import sys
import tempfile
from pathlib import Path

import yaml
from kfp import compiler

from components import CPU_IMAGE, TRAINER_IMAGE, build_components
from pipelines.benchmark import DEFAULT_PARALLELISM, build_benchmark
from pipelines.personalize import build_personalize

COMPILED = Path(__file__).resolve().parent / "compiled"
PIPELINES = ("personalize", "benchmark")


def build(name: str, *, cpu_image: str = CPU_IMAGE, trainer_image: str = TRAINER_IMAGE,
          parallelism: int = DEFAULT_PARALLELISM):
    comps = build_components(cpu_image=cpu_image, trainer_image=trainer_image)
    if name == "personalize":
        return build_personalize(comps)
    if name == "benchmark":
        return build_benchmark(comps, parallelism=parallelism)
    raise ValueError(f"unknown pipeline {name!r}; choose one of {', '.join(PIPELINES)}")


def load_spec(text: str) -> list:
    """The YAML documents of a compiled pipeline (the pipeline spec, then its Kubernetes platform spec)."""
    return list(yaml.safe_load_all(text))


def same_spec(a: str, b: str) -> bool:
    try:
        return load_spec(a) == load_spec(b)
    except yaml.YAMLError:
        return False


def compile_pipeline(name: str, path: Path, **kw) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build(name, **kw), str(path))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=COMPILED)
    ap.add_argument("--check", action="store_true", help="fail when the files in --out differ from a fresh compile")
    args = ap.parse_args(argv)
    stale = []
    for name in PIPELINES:
        target = args.out / f"{name}.yaml"
        with tempfile.TemporaryDirectory() as tmp:
            fresh = compile_pipeline(name, Path(tmp) / f"{name}.yaml").read_text()
        current = target.read_text() if target.exists() else ""
        # Compare the documents, not the text: kfp's header comment lists dict defaults in an order that changes
        # from one process to the next (so an unchanged pipeline is not rewritten either).
        if same_spec(fresh, current):
            continue
        if args.check:
            stale.append(name)
            sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), fresh.splitlines(True),
                                                       str(target), "fresh compile", n=1))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(fresh)
            print(f"wrote {target}")
    if stale:
        print(f"\nstale: {', '.join(stale)}; run `python -m pipelines.compile` and commit pipelines/compiled/",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
