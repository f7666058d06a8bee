"""Rare-token scan (seed 002 sec. 3.1, app. A.2): scoring, ranking, determinism and the per-model cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from subjectops.config import ModelCfg
from subjectops.data import rare_tokens
from subjectops.data.rare_tokens import PAPER_TOKENS, TokenScanCfg


def noise_image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8))


def stand_in(token: str, seeds: list[int]) -> list[Image.Image]:
    """A constant-output model for `same` (one image whatever the seed), seed-dependent noise otherwise."""
    if token == "same":
        return [noise_image(0) for _ in seeds]
    return [noise_image(hash((token, s)) % 2**32) for s in seeds]


def test_identical_images_rank_below_varied_ones_and_references_are_flagged():
    ranked, refs = rare_tokens.rank_tokens(stand_in, ["same", "vary", "wild"], ["same"], [0, 1, 2])
    assert [s.token for s in ranked][-1] == "same"
    assert ranked[-1].score == pytest.approx(1.0, abs=1e-6)  # identical images: SSIM 1 for every pair
    assert ranked[0].score < 0.1
    ranking = rare_tokens.TokenRanking(ranked, refs, cache_file=None)
    assert ranking.best in ("vary", "wild")
    assert ranking.strong_prior(refs[0]) and not ranking.strong_prior(ranked[0])


def test_known_scores_are_reused_and_only_missing_tokens_render():
    rendered = []

    def render(token, seeds):
        rendered.append(token)
        return stand_in(token, seeds)

    ranked, _ = rare_tokens.rank_tokens(render, ["same", "vary"], ["sks"], [0, 1], known={"vary": 0.5})
    assert rendered == ["same", "sks"]
    assert [s.token for s in ranked] == ["vary", "same"]


def test_vocabulary_candidates_are_short_whole_words_outside_the_dictionary():
    vocab = {"immen</w>": 1, "table</w>": 2, "pasqu</w>": 3, "abc</w>": 4, "toolong</w>": 5, "iklan": 6,
             "Rapid</w>": 7}
    assert rare_tokens.vocabulary_candidates(vocab, {"table"}, 10, 0) == ["immen", "pasqu"]
    assert len(rare_tokens.vocabulary_candidates(vocab, set(), 1, 0)) == 1


def test_scan_on_the_base_model_is_deterministic_cached_and_feeds_best_token(tmp_path):
    model = ModelCfg(base="tiny-sdxl")
    cfg = TokenScanCfg(candidates=["immen", "pasqu"], images_per_token=2, steps=1, resolution=32,
                       cache_dir=str(tmp_path))
    best = rare_tokens.best_token(cfg, model)  # nothing cached: best_token runs the scan (sec. 3.1)
    first = rare_tokens.scan(cfg, model)  # every score now comes from the cache
    assert best == first.best
    again = rare_tokens.scan(cfg, model, force=True)
    assert [(s.token, s.score) for s in first.candidates] == [(s.token, s.score) for s in again.candidates]
    assert [s.token for s in first.references] == ["sks"]
    cached = json.loads(first.cache_file.read_text())
    assert set(cached["scores"]) == {"immen", "pasqu", "sks"} and cached["settings"]["resolution"] == 32
    assert rare_tokens.best_token(cfg, model) == first.best
    # a different seed is a different scan, cached beside the first
    other = rare_tokens.cache_file(cfg.model_copy(update={"seed": 1}), model)[0]
    assert other != first.cache_file and other.parent == first.cache_file.parent


def test_sigterm_stops_a_scan_after_the_token_in_progress_and_the_next_scan_resumes(tmp_path, monkeypatch):
    from subjectops import stopping
    from subjectops.models import sampling

    model = ModelCfg(base="tiny-sdxl")
    cfg = TokenScanCfg(candidates=["immen", "pasqu", "iklan"], images_per_token=2, steps=1, resolution=32,
                       cache_dir=str(tmp_path))
    rendered = []
    real_generate = sampling.generate

    def generate_then_sigterm(pipe, prompts, *args, **kwargs):
        rendered.append(prompts[0])
        stopping._requested.set()  # what SIGTERM's handler does, while the first token renders
        return real_generate(pipe, prompts, *args, **kwargs)

    monkeypatch.setattr(sampling, "generate", generate_then_sigterm)
    try:
        with pytest.raises(stopping.Stopped, match="token scan stopped by SIGTERM after 1 of 4 tokens"):
            rare_tokens.scan(cfg, model)
    finally:
        stopping._requested.clear()
    assert len(rendered) == cfg.images_per_token  # the token in progress finished, no other began
    path = rare_tokens.cache_file(cfg, model)[0]
    assert set(json.loads(path.read_text())["scores"]) == {"immen"}
    monkeypatch.setattr(sampling, "generate", real_generate)
    finished = rare_tokens.scan(cfg, model)  # resumes: the stopped scan's score is reused
    assert set(json.loads(finished.cache_file.read_text())["scores"]) == {"immen", "pasqu", "iklan", "sks"}


def test_default_candidates_are_the_papers_list():
    assert TokenScanCfg().candidates[:3] == ["immen", "pasqu", "iklan"] and len(PAPER_TOKENS) == 28
    assert TokenScanCfg().reference_tokens == ["sks"]


def test_cli_scan_prints_the_ranking_and_the_reference_tokens_prior(tmp_path, repo_root):
    from typer.testing import CliRunner

    from subjectops.cli import app

    sets = ["finetune.alchemy.token_scan.candidates=[immen, pasqu, iklan]", "finetune.alchemy.token_scan.steps=1",
            "finetune.alchemy.token_scan.images_per_token=2", "finetune.alchemy.token_scan.resolution=32",
            f"finetune.alchemy.token_scan.cache_dir={tmp_path}"]
    args = ["tokens", "scan", "--model", "tiny-sdxl", "--params", str(repo_root / "params.yaml")]
    result = CliRunner().invoke(app, args + [a for s in sets for a in ("--set", s)], terminal_width=200)
    assert result.exit_code == 0, result.output
    cached = json.loads(next(tmp_path.glob("*.json")).read_text())["scores"]
    best = min(("immen", "pasqu", "iklan"), key=lambda t: (cached[t], t))
    assert f"best: {best}" in result.output and "sks" in result.output
    assert ("strong" if cached["sks"] > sorted(cached[t] for t in ("immen", "pasqu", "iklan"))[1]
            else "weak") in result.output
