"""The repository stands on its own: a clone has nothing beside it, so no tracked file may read or send a reader to a
folder outside it, and the photos the tests use ship inside it with their attribution (CC-BY 4.0)."""

from __future__ import annotations

import re
import subprocess

from helpers import REPO

# `../<sibling>` in text, or `REPO.parent / "<sibling>"` / `parents[2] / "<sibling>"` in code; the name is split so
# that this file does not match itself.
SIBLING = "sha" + "red"
OUTSIDE = re.compile(r"\.\./" + SIBLING + r"\b|\bparents?(\[\d+\])?\s*/\s*[\"']" + SIBLING + r"[\"']")


def tracked_files() -> list:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return [REPO / name for name in out.decode().split("\0") if name]


def test_no_tracked_file_names_a_folder_beside_the_repository():
    files = tracked_files()
    assert len(files) > 100  # the listing worked
    hits = []
    for path in files:
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # images, weights
            continue
        hits += [f"{path.relative_to(REPO)}:{n}: {line.strip()[:120]}"
                 for n, line in enumerate(text.splitlines(), 1) if OUTSIDE.search(line)]
    assert not hits, "files that point outside the repository:\n" + "\n".join(hits)


def test_the_pattern_finds_what_it_is_for():
    assert OUTSIDE.search("see ../" + SIBLING + "/seeds/README.md")
    assert OUTSIDE.search('CAN = REPO.parent / "' + SIBLING + '" / "data"')
    assert OUTSIDE.search("Path(__file__).resolve().parents[2] / '" + SIBLING + "' / 'data'")
    assert not OUTSIDE.search("one shared registered model") and not OUTSIDE.search("shared/volume")


def test_every_shipped_subject_has_its_attribution():
    subjects = REPO / "examples" / "subjects"
    attribution = (subjects / "README.md").read_text()
    assert "Creative Commons Attribution 4.0" in attribution
    folders = sorted(d.name for d in subjects.iterdir() if d.is_dir())
    assert {"teapot", "can", "robot_toy"} <= set(folders)
    for name in folders:
        assert re.search(rf"^{name}:", attribution, re.M), f"{name} has no attribution in examples/subjects/README.md"
        assert len(list((subjects / name).glob("*.jpg"))) >= 3


def test_the_readme_cites_the_five_papers():
    readme = (REPO / "README.md").read_text()
    for title in ("Hypnos: Highly Precise Foreground-focused Diffusion Finetuning for Inanimate Objects",
                  "HiFi Tuner: High-Fidelity Subject-Driven Fine-Tuning for Diffusion Models",
                  "Image-Alchemy: Advancing Subject Fidelity in Personalized Text-to-Image Generation",
                  "DreamBlend: Advancing Personalized Fine-tuning of Text-to-Image Diffusion Models",
                  "An Improved Method for Personalizing Diffusion Models"):
        assert title in readme
