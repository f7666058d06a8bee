"""The shared class-prior cache: read-only entries verified on reuse, copies for runs, one generation per entry."""

import json
import os
import subprocess
import sys

from PIL import Image

from subjectops.digest import sha256_file
from subjectops.stages.priors import priors
from subjectops.stages.refine import refine


def cache_entries(cache_dir):
    return sorted(p.name for p in cache_dir.iterdir() if p.is_dir())


def image_hashes(priors_dir):
    return {p.name: sha256_file(p) for p in sorted((priors_dir / "images").glob("*.png"))}


def test_entries_are_read_only_runs_get_copies_and_a_tampered_entry_is_regenerated(tiny_params, example_subject,
                                                                                     tmp_path, capsys):
    refine(tiny_params, example_subject, "teapot", tmp_path / "refine")
    priors(tiny_params, tmp_path / "refine", tmp_path / "a")
    entry = tmp_path / "prior-cache" / json.loads((tmp_path / "a" / "priors.json").read_text())["cache_key"]
    recorded = json.loads((entry / "cache.json").read_text())["files"]
    original = image_hashes(tmp_path / "a")
    assert {f"images/{k}": v for k, v in original.items()} == recorded
    cached = sorted((entry / "images").glob("*.png"))
    assert all(os.stat(p).st_mode & 0o222 == 0 for p in [*cached, entry / "cache.json"])  # read-only
    assert os.stat(entry).st_mode & 0o222 == 0  # no file can be added or removed either

    # a run's copy is its own: changing it leaves the cache and the other runs' copies as they were
    run_copy = tmp_path / "a" / "images" / cached[0].name
    assert not os.path.samefile(run_copy, cached[0])
    Image.new("RGB", (64, 64), "red").save(run_copy)
    assert sha256_file(cached[0]) == recorded[f"images/{cached[0].name}"]

    # someone with write access changes a cached image: the next reuse notices, says so and regenerates
    cached[0].chmod(0o644)
    Image.new("RGB", (64, 64), "blue").save(cached[0])
    capsys.readouterr()
    priors(tiny_params, tmp_path / "refine", tmp_path / "b")
    said = " ".join(capsys.readouterr().err.split())
    assert f"prior cache entry {entry} failed verification (images/{cached[0].name} differ" in said
    assert json.loads((tmp_path / "b" / "priors.json").read_text())["generated"] is True
    assert image_hashes(tmp_path / "b") == original  # the same images as first generated
    assert {f"images/{k}": sha256_file(entry / "images" / k) for k in original} == recorded

    # an intact entry is reused without generating
    priors(tiny_params, tmp_path / "refine", tmp_path / "c")
    assert json.loads((tmp_path / "c" / "priors.json").read_text())["generated"] is False


def test_two_runs_of_one_class_started_together_generate_one_entry_once(tiny_overrides, example_subject, tmp_path,
                                                                        tiny_params):
    refine(tiny_params, example_subject, "teapot", tmp_path / "refine")
    sets = [a for s in tiny_overrides for a in ("--set", s)]
    # two runs: each its own folder (two writers into one run folder are refused by its lock)
    procs = [subprocess.Popen([sys.executable, "-m", "subjectops.cli", "priors", "--refine", str(tmp_path / "refine"),
                               "--out", str(tmp_path / name / "priors"), "--params", "params.yaml", *sets],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for name in ("a", "b")]
    for proc in procs:
        output = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, output
    infos = [json.loads((tmp_path / name / "priors" / "priors.json").read_text()) for name in ("a", "b")]
    assert sorted(i["generated"] for i in infos) == [False, True]  # one generation
    cache = tmp_path / "prior-cache"
    assert cache_entries(cache) == [infos[0]["cache_key"]]  # one entry, no partial folder left
    recorded = json.loads((cache / infos[0]["cache_key"] / "cache.json").read_text())["files"]
    for name in ("a", "b"):  # both runs got the entry's images
        assert {f"images/{k}": v for k, v in image_hashes(tmp_path / name / "priors").items()} == recorded
        assert len(recorded) == tiny_params.priors.num_images
