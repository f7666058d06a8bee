"""Rare-token selection (Image-Alchemy, seed 002 sec. 3.1 and app. A.2).

A token suits a new subject when the base model has no prior for it: prompted alone under different seeds, it
yields unrelated images. Each candidate is scored by the mean pairwise SSIM of K images from the unmodified base
model (seeds seed .. seed+K-1): lower means more varied images, a weaker prior. The scan ranks the candidates by
that score and caches the scores per model and scan settings, so `--method alchemy` can take the best-ranked token.

The default candidates are the paper's list (app. A.2); `vocabulary_candidates` draws others from a tokenizer's
vocabulary. Reference tokens (`sks` by default, which app. A.2 found to draw firearms on SDXL) are scored too and
reported as having a strong prior when they score above the candidates' median, but are never chosen.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from pydantic import Field

from subjectops.config_base import Seed, StrictModel, template
from subjectops.digest import digest_json
from subjectops.errors import SubjectopsError

if TYPE_CHECKING:
    from PIL import Image

    from subjectops.config_base import ModelCfg

# App. A.2's table, row by row.
PAPER_TOKENS = (
    "immen", "pasqu", "iklan", "rapi", "bhar", "ellu", "ffin", "icop", "aben", "mmor", "psal", "phyl",
    "rrrr", "wozni", "geaux", "koval", "ayles", "mccre", "fortn", "prote", "pascu", "lisam", "percu", "alfar",
    "insom", "offro", "syour", "redon",
)
TOKEN = r"^[^\s{}]+$"


ScanPrompt = template("token")


class TokenScanCfg(StrictModel):
    """How tokens are scanned; the paper fixes neither K, the prompt nor the sampler (our choices)."""

    candidates: list[str] = Field(default_factory=lambda: list(PAPER_TOKENS), min_length=1)
    reference_tokens: list[str] = ["sks"]
    images_per_token: int = Field(4, ge=2)  # K: the mean is over K(K-1)/2 pairs
    seed: Seed = 0
    prompt: ScanPrompt = "a photo of {token}"
    steps: int = Field(25, ge=1)
    guidance_scale: float = Field(7.5, ge=0)
    scheduler: str = Field("ddim", pattern="^(ddim|pndm|euler)$")
    resolution: Optional[int] = Field(None, ge=32, multiple_of=8)  # null: the model's native resolution
    cache_dir: str = "cache/tokens"


@dataclass(frozen=True)
class TokenScore:
    token: str
    score: float  # mean pairwise SSIM of its K images: lower = weaker prior
    reference: bool = False  # a reference token (e.g. sks): reported, never chosen


@dataclass(frozen=True)
class TokenRanking:
    candidates: list[TokenScore]  # best (lowest score) first
    references: list[TokenScore]
    cache_file: Path

    @property
    def best(self) -> str:
        return self.candidates[0].token

    def strong_prior(self, score: TokenScore) -> bool:
        """Whether a token's images agree more than the median candidate's: the model has a concept for it."""
        return score.score > statistics.median(s.score for s in self.candidates)


def mean_pairwise_ssim(images: Sequence[Image.Image]) -> float:
    """Mean SSIM over every unordered pair of the images (sec. 3.1's variability measure), with evaluate's SSIM
    settings (torchmetrics: gaussian 11x11, sigma 1.5, data range 1)."""
    import numpy as np
    import torch
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    if len(images) < 2:
        raise ValueError("mean pairwise SSIM needs at least two images")
    pixels = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
                          for im in images])
    first, second = torch.triu_indices(len(images), len(images), offset=1)
    return float(ssim(pixels[first], pixels[second], data_range=1.0, reduction="none").double().mean())


def rank_tokens(render: Callable[[str, list[int]], list[Image.Image]], candidates: Sequence[str],
                references: Sequence[str], seeds: list[int], known: dict[str, float] | None = None,
                on_score: Callable[[str, float], None] | None = None) -> tuple[list[TokenScore], list[TokenScore]]:
    """Score every token by the mean pairwise SSIM of `render(token, seeds)` (scores in `known` are reused) and
    rank the candidates, lowest score first (ties by name, so the order is deterministic)."""
    scores = dict(known or {})
    for token in dict.fromkeys([*candidates, *references]):
        if token not in scores:
            scores[token] = mean_pairwise_ssim(render(token, seeds))
            if on_score:
                on_score(token, scores[token])
    ranked = sorted((TokenScore(t, scores[t]) for t in dict.fromkeys(candidates)), key=lambda s: (s.score, s.token))
    refs = [TokenScore(t, scores[t], reference=True) for t in dict.fromkeys(references)]
    return ranked, refs


def vocabulary_candidates(vocab: dict[str, int], dictionary: set[str], limit: int, seed: int) -> list[str]:
    """Whole-word vocabulary entries of 4-5 lowercase letters that are not dictionary words (sec. 3.1), `limit` of
    them drawn with `seed` (CLIP's BPE marks a word's end with `</w>`)."""
    import random

    if limit < 1:
        raise SubjectopsError(f"--vocabulary {limit} asks for no words to scan",
                              fix="pass --vocabulary N with N >= 1 (words drawn from the vocabulary), or leave it out")
    words = sorted({m.group(1) for key in vocab if (m := re.fullmatch(r"([a-z]{4,5})</w>", key))} - dictionary)
    return sorted(random.Random(seed).sample(words, min(limit, len(words))))


def tokenizer_vocabulary(model: ModelCfg) -> dict[str, int]:
    """The base model's (first) CLIP tokenizer vocabulary."""
    from transformers import CLIPTokenizer

    from subjectops.models.loading import offline, resolve

    return CLIPTokenizer.from_pretrained(resolve(model), subfolder="tokenizer", revision=model.revision,
                                         cache_dir=model.cache_dir, local_files_only=offline()).get_vocab()


def read_dictionary(path: Path | None) -> set[str]:
    """A word list, one word a line: the words that have a meaning (so are not rare)."""
    if path is None or not Path(path).is_file():
        raise SubjectopsError(f"a vocabulary scan needs a dictionary word list; {path} is not a file",
                              fix="pass --dictionary PATH to a word list with one word a line (e.g. "
                                  "/usr/share/dict/words)")
    return {w.strip().lower() for w in Path(path).read_text(errors="replace").splitlines() if w.strip()}


def settings_key(cfg: TokenScanCfg, fingerprint: str, resolution: int) -> dict:
    """What decides a token's score: the model's weights and the generation settings (not the candidate list)."""
    return {"model": fingerprint, "prompt": cfg.prompt, "images_per_token": cfg.images_per_token, "seed": cfg.seed,
            "steps": cfg.steps, "guidance_scale": cfg.guidance_scale, "scheduler": cfg.scheduler,
            "resolution": resolution}


def cache_file(cfg: TokenScanCfg, model: ModelCfg) -> tuple[Path, dict]:
    from subjectops.models.loading import fingerprint, native_resolution

    key = settings_key(cfg, fingerprint(model), cfg.resolution or native_resolution(model))
    return Path(cfg.cache_dir) / f"{key['model']}-{digest_json(key)}.json", key


def _read_cache(path: Path) -> dict[str, float]:
    if not path.exists():
        return {}
    try:
        return {str(k): float(v) for k, v in json.loads(path.read_text())["scores"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SubjectopsError(f"token scan cache {path} is unreadable ({exc})",
                              fix=f"delete {path} and run `subjectops tokens scan` again") from None


def scan(cfg: TokenScanCfg, model: ModelCfg, candidates: Sequence[str] | None = None,
         force: bool = False) -> TokenRanking:
    """Rank `candidates` (default: cfg.candidates) with the unmodified base model, scoring only tokens the cache
    lacks (all of them when `force`); the cache is rewritten after each token, so a stopped scan resumes. Each
    score is shown as it comes, with the scan's progress and ETA (a token takes seconds to minutes)."""
    from subjectops.console import counted_columns, progress
    from subjectops.models.loading import load_pipeline
    from subjectops.models.sampling import generate, use_scheduler
    from subjectops.stopping import stop_if_requested

    path, key = cache_file(cfg, model)
    candidates = list(candidates or cfg.candidates)
    bad = [t for t in [*candidates, *cfg.reference_tokens] if not re.match(TOKEN, t)]
    if bad:
        raise SubjectopsError(f"tokens {bad} contain spaces or braces", fix="give single words as candidates")
    known = {} if force else _read_cache(path)
    pipe = None

    def render(token: str, seeds: list[int]) -> list[Image.Image]:
        nonlocal pipe
        if pipe is None:  # loaded only when some score is missing
            pipe = load_pipeline(model)
            use_scheduler(pipe, cfg.scheduler)
        prompt = cfg.prompt.format(token=token)
        return [generate(pipe, [prompt], [s], cfg.steps, cfg.guidance_scale, key["resolution"])[0] for s in seeds]

    def record(token: str, score: float) -> None:
        known[token] = score
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"settings": key, "base": model.base, "scores": known}, indent=2, sort_keys=True))
        tmp.replace(path)
        shown.update(task, advance=1, last=f"{token}: {score:.4f}")
        # a token takes seconds to minutes and a scan up to half an hour: SIGTERM stops it here, the scores kept
        stop_if_requested("token scan", f"after {sum(t in known for t in wanted)} of {len(wanted)} tokens (scores "
                                        f"kept in {path})")

    seeds = [cfg.seed + i for i in range(cfg.images_per_token)]
    wanted = list(dict.fromkeys([*candidates, *cfg.reference_tokens]))
    to_score = [t for t in wanted if t not in known]
    with progress(*counted_columns("last")) as shown:
        task = shown.add_task(f"token scan of {model.base}", total=len(to_score), last="")
        ranked, refs = rank_tokens(render, candidates, cfg.reference_tokens, seeds, known, record)
    return TokenRanking(ranked, refs, path)


def best_token(cfg: TokenScanCfg, model: ModelCfg) -> str:
    """The best-ranked candidate of the cached scan for this model and these settings."""
    path, _ = cache_file(cfg, model)
    scores = _read_cache(path)
    missing = [t for t in cfg.candidates if t not in scores]
    if missing:  # sec. 3.1: the token is chosen by the scan; run (or finish) it once for this model and settings
        from subjectops.console import console

        console.print(f"token scan for {model.base}: scoring {len(missing)} of {len(cfg.candidates)} candidates "
                      f"(cached in {path}; set finetune.alchemy.token to skip)", highlight=False)
        scan(cfg, model)
        scores = _read_cache(path)
    return min(cfg.candidates, key=lambda t: (scores[t], t))
