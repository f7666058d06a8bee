"""Copy the source tree to a new folder and plant one named bug in the copy, so that the benchmark's regression gate
can be shown to catch it (issue 25, item 3): run `subjectops benchmark run --champion CLEAN_OUT` with the copy's
`src` first on PYTHONPATH.

    python scripts/inject_bug.py BUG [--dest DIR]      # prints the copy's src folder
    python scripts/inject_bug.py --list

Each bug is an exact replacement of one line of the real code; when that line has changed, the script refuses
rather than plant nothing.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Bug:
    what: str
    path: str  # relative to the repository
    old: str
    new: str
    methods: tuple[str, ...] = ()  # the methods it breaks (empty: every method)

    def breaks(self, method: str) -> bool:
        return not self.methods or method in self.methods


BUGS = {
    # the UNet is told the mirrored timestep (T - 1 - t) of the noise level it sees: the loss trains it backwards
    "mirrored-timestep": Bug(
        "the training loss conditions the UNet on the mirrored timestep T-1-t",
        "src/subjectops/training/models.py",
        "        pred = self.call(self.unet, noisy, t, cond.prompt_embeds, added_cond_kwargs=cond.added_cond_kwargs)"
        ".sample",
        "        pred = self.call(self.unet, noisy, schedule.num_train_timesteps - 1 - t, cond.prompt_embeds, "
        "added_cond_kwargs=cond.added_cond_kwargs).sample"),
    "lr-100x": Bug(
        "every training phase's learning rate is 100 times too small",
        "src/subjectops/training/loop.py",
        "        optimizer = self._optimizer(params, phase.lr, phase.use_8bit_adam, "
        "self.method.optimizer_settings(phase))",
        "        optimizer = self._optimizer(params, phase.lr / 100, phase.use_8bit_adam, "
        "self.method.optimizer_settings(phase))"),
    "lora-not-loaded": Bug(
        "the trained LoRA is never loaded at inference (the base model is sampled)",
        "src/subjectops/methods/lora.py",
        "        pipe.load_lora_weights(str(finetune_dir), weight_name=LORA_FILE)",
        "        return None  # injected bug: the LoRA is never loaded",
        methods=("lora",)),
}


class StaleBug(Exception):
    """The code a bug replaces has changed."""


def inject(name: str, dest: Path) -> Path:
    """A copy of the repository's src/ and params.yaml in `dest` with bug `name` planted; returns `dest / "src"`."""
    bug = BUGS[name]
    shutil.copytree(REPO / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copyfile(REPO / "params.yaml", dest / "params.yaml")
    target = dest / bug.path
    text = target.read_text()
    if text.count(bug.old) != 1:
        raise StaleBug(f"{bug.path} no longer holds the line the {name} bug replaces")
    target.write_text(text.replace(bug.old, bug.new))
    return dest / "src"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bug", nargs="?", choices=sorted(BUGS))
    ap.add_argument("--dest", type=Path, default=None, help="an empty or new folder (default: a temporary one)")
    ap.add_argument("--list", action="store_true", help="list the bugs")
    args = ap.parse_args(argv)
    if args.list or args.bug is None:
        for name, bug in BUGS.items():
            print(f"{name}: {bug.what} ({bug.path})")
        return 0
    dest = args.dest or Path(tempfile.mkdtemp(prefix=f"subjectops-{args.bug}-"))
    if dest.exists() and any(dest.iterdir()):
        print(f"error: {dest} is not empty\nfix: pass a new or empty --dest", file=sys.stderr)
        return 2
    try:
        print(inject(args.bug, dest))
    except StaleBug as exc:
        print(f"error: {exc}\nfix: update BUGS[{args.bug!r}] in {Path(__file__).name} to the current code",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
