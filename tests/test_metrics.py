"""Metric correctness against independent computations (NumPy/SciPy, torchmetrics' own per-pair code)."""

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from subjectops.config import Params
from subjectops.errors import ModelNotFoundError
from subjectops.metrics import backbones as B
from subjectops.metrics.encoders import Encoders, tiny_mode
from subjectops.metrics.evaluator import Evaluator
from subjectops.metrics.primitives import clip_t, cosine_matrix, frechet_distance, psnr_pairs, ssim_pairs


@pytest.fixture(scope="module")
def tiny_home(tmp_path_factory):
    import os

    home = os.environ.get("SUBJECTOPS_HOME")
    os.environ["SUBJECTOPS_HOME"] = str(tmp_path_factory.mktemp("home"))
    yield
    if home is None:
        os.environ.pop("SUBJECTOPS_HOME", None)
    else:
        os.environ["SUBJECTOPS_HOME"] = home


@pytest.fixture(scope="module")
def evaluator(tiny_home):
    return Evaluator(Params.model_validate({"evaluate": {"tiny": True, "batch_size": 4}}))


def _images(n, seed, size=48):
    g = torch.Generator().manual_seed(seed)
    # smooth random images: more image-like than white noise, so SSIM/LPIPS are not degenerate
    low = torch.rand(n, 3, 6, 6, generator=g)
    return F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def _by_key(records):
    return {r.metric: r for r in records}


def test_identical_images_give_perfect_scores(evaluator):
    x = _images(1, 0)
    refs = evaluator.references_from_tensor(x.repeat(4, 1, 1, 1))
    gen = x.repeat(6, 1, 1, 1)
    r = _by_key(evaluator.score_batches("s", "1", gen.split(4), ["a photo of sks teapot"] * 6, ["sks"] * 6, refs))
    assert r["dino"].mean == pytest.approx(1.0, abs=1e-6) and r["dino"].std == pytest.approx(0.0, abs=1e-6)
    assert r["clip-i"].mean == pytest.approx(1.0, abs=1e-6)
    assert r["lpips"].mean == pytest.approx(0.0, abs=1e-6)
    assert r["ssim"].mean == pytest.approx(1.0, abs=1e-6)
    assert r["psnr"].mean == float("inf")
    # the set equal to the references: the matching pairs (diagonal) are perfect, the others are not
    refs_px = _images(4, 1)
    refs = evaluator.references_from_tensor(refs_px)
    d = cosine_matrix(evaluator.enc.dino.embed(refs_px), refs.dino)
    assert torch.allclose(torch.diagonal(d), torch.ones(4, dtype=d.dtype), atol=1e-6)
    lp = evaluator.enc.lpips.pairwise(evaluator.enc.lpips.features(refs_px), refs.lpips)
    assert torch.allclose(torch.diagonal(lp), torch.zeros(4), atol=1e-6)
    assert (lp + torch.eye(4)).min() > 0


def test_pairing_counts_equal_generated_times_references(evaluator):
    refs = evaluator.references_from_tensor(_images(3, 2))
    gen = _images(7, 3)
    recs = evaluator.score_batches("s", "1", gen.split(4), ["a photo of sks dog"] * 7, ["sks"] * 7, refs)
    r = _by_key(recs)
    for k in ("dino", "clip-i", "lpips", "ssim", "psnr"):
        assert r[k].n_pairs == 7 * 3, k
        assert r[k].n_generated == 7 and r[k].n_reference == 3
        assert len(r[k].per_image) == 7
    assert r["clip-t"].n_pairs == 7
    assert r["fid"].n_pairs is None and r["fid"].std is None
    # every number says where it came from, and random weights are never called pretrained
    for rec in recs:
        d = rec.to_dict()
        assert {"metric", "prompt_set", "backbone", "pretrained", "n_pairs", "mean", "std"} <= set(d)
        if rec.metric in ("ssim", "psnr"):
            assert d["backbone"] is None and d["pretrained"] is None
        else:
            assert d["backbone"] == "tiny" and d["pretrained"] is False


def test_pairwise_values_match_independent_per_pair_computations(evaluator):
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    refs_px, gen = _images(3, 4), _images(5, 5)
    refs = evaluator.references_from_tensor(refs_px)
    # DINO / CLIP-I: NumPy cosine of every pair
    for enc, ref_emb in ((evaluator.enc.dino, refs.dino), (evaluator.enc.clip, refs.clip)):
        a, b = enc.embed(gen).numpy().astype(np.float64), ref_emb.numpy().astype(np.float64)
        expect = np.array([[x @ y / np.linalg.norm(x) / np.linalg.norm(y) for y in b] for x in a])
        np.testing.assert_allclose(cosine_matrix(enc.embed(gen), ref_emb).numpy(), expect, rtol=1e-6, atol=1e-6)
    # LPIPS from cached features == torchmetrics' LPIPS forward on each pair
    lp = evaluator.enc.lpips.pairwise(evaluator.enc.lpips.features(gen), refs.lpips)
    net = evaluator.enc.lpips.net
    expect = torch.tensor([[float(net(gen[i:i + 1], refs_px[j:j + 1], normalize=True)) for j in range(3)]
                           for i in range(5)])
    torch.testing.assert_close(lp, expect, rtol=1e-4, atol=1e-6)
    # SSIM / PSNR: torchmetrics on each pair alone; PSNR also from NumPy
    ss, ps = ssim_pairs(gen, refs_px), psnr_pairs(gen, refs_px)
    for i in range(5):
        for j in range(3):
            s1 = structural_similarity_index_measure(gen[i:i + 1], refs_px[j:j + 1], data_range=1.0)
            assert float(ss[i, j]) == pytest.approx(float(s1), abs=1e-5)
            p1 = peak_signal_noise_ratio(gen[i:i + 1], refs_px[j:j + 1], data_range=1.0)
            mse = np.mean((gen[i].numpy().astype(np.float64) - refs_px[j].numpy()) ** 2)
            assert float(ps[i, j]) == pytest.approx(float(p1), rel=1e-5)
            assert float(ps[i, j]) == pytest.approx(10 * np.log10(1.0 / mse), rel=1e-4)
    # mean / std are over all pairs (Hypnos B.3), std with ddof=1
    r = _by_key(evaluator.score_batches("s", "1", [gen], ["p"] * 5, ["sks"] * 5, refs))
    assert r["ssim"].mean == pytest.approx(float(ss.mean()), rel=1e-6)
    assert r["ssim"].std == pytest.approx(float(np.std(ss.numpy(), ddof=1)), rel=1e-6)


def _frechet_scipy(x, y):
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_distance_matches_scipy_on_known_gaussians():
    rng = np.random.default_rng(0)
    d = 16
    a = rng.normal(size=(d, d))
    cov1 = a @ a.T / d + 0.1 * np.eye(d)
    b = rng.normal(size=(d, d))
    cov2 = b @ b.T / d + 0.2 * np.eye(d)
    x = rng.multivariate_normal(np.zeros(d), cov1, size=3000)
    y = rng.multivariate_normal(np.full(d, 0.5), cov2, size=2000)
    ours = frechet_distance(torch.from_numpy(x), torch.from_numpy(y))
    ref = _frechet_scipy(x, y)
    assert ours == pytest.approx(ref, rel=1e-4)
    # and it is close to the closed form of the true Gaussians (sanity: it measures what it claims)
    true = float(d * 0.25 + np.trace(cov1 + cov2 - 2 * scipy.linalg.sqrtm(cov1 @ cov2).real))
    assert ours == pytest.approx(true, rel=0.1)
    assert frechet_distance(torch.from_numpy(x), torch.from_numpy(x)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(Exception, match="at least 2"):
        frechet_distance(torch.from_numpy(x[:1]), torch.from_numpy(y))


def test_clip_t_ignores_removed_identifier_and_follows_the_prompt(evaluator):
    clip = evaluator.enc.clip
    emb = clip.embed(_images(2, 6))
    with_id = clip_t(clip, emb, ["a photo of sks teapot"] * 2, ["sks"] * 2)
    without = clip_t(clip, emb, ["a photo of teapot"] * 2, ["sks"] * 2)
    other_id = clip_t(clip, emb, ["a photo of <subject> teapot"] * 2, ["<subject>"] * 2)
    torch.testing.assert_close(with_id, without)
    torch.testing.assert_close(with_id, other_id)
    kept = clip_t(clip, emb, ["a photo of sks teapot"] * 2, ["zzz"] * 2)  # identifier not removed
    assert not torch.allclose(with_id, kept)
    changed = clip_t(clip, emb, ["a watercolor painting of dog on the beach"] * 2, ["sks"] * 2)
    assert not torch.allclose(with_id, changed)
    # each image against its own prompt: per-image prompts are not mixed up
    mixed = clip_t(clip, emb, ["a photo of sks teapot", "a watercolor painting of dog on the beach"], ["sks"] * 2)
    assert float(mixed[0]) == pytest.approx(float(with_id[0]), abs=1e-6)
    assert float(mixed[1]) == pytest.approx(float(changed[1]), abs=1e-6)


def test_fid_uses_dino_features_without_inception_and_says_so(evaluator):
    assert evaluator.enc.fid_features == "dino"
    refs = evaluator.references_from_tensor(_images(4, 7))
    r = _by_key(evaluator.score_batches("s", "1", [_images(6, 8)], ["p"] * 6, ["sks"] * 6, refs))
    assert "dino features" in r["fid"].note and r["fid"].backbone == "tiny"
    expect = frechet_distance(refs.dino, evaluator.enc.dino.embed(_images(6, 8)))
    assert r["fid"].mean == pytest.approx(expect, rel=1e-6)


def test_missing_real_encoders_fail_at_once_with_the_fix(tiny_home, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="facebook/dino-vits16") as e:
        B.load_dino("facebook/dino-vits16", torch.device("cpu"))
    assert "evaluate.backbones.dino" in str(e.value) and "evaluate.tiny=true" in str(e.value)
    with pytest.raises(ModelNotFoundError, match="openai/clip-vit-base-patch32"):
        B.load_clip("openai/clip-vit-base-patch32", torch.device("cpu"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty torch hub cache
    with pytest.raises(ModelNotFoundError, match="alexnet-owt") as e:
        B.load_lpips("alex", torch.device("cpu"))
    assert "nothing is downloaded" in str(e.value)
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        B.load_dino(str(tmp_path), torch.device("cpu"))
    # a real (non-tiny) configuration fails before computing anything
    with pytest.raises(ModelNotFoundError):
        Evaluator(Params.model_validate({"evaluate": {"tiny": False, "metrics": ["dino"]}}))
    with pytest.raises(ModelNotFoundError, match="Inception weights are not present"):
        Encoders(Params.model_validate({"evaluate": {"tiny": False, "metrics": ["fid"],
                                                       "fid_features": "inception"}}), ["fid"])


def test_tiny_mode_is_chosen_by_the_base_model_or_the_setting():
    assert tiny_mode(Params.model_validate({"model": {"base": "tiny-sd15"}}))
    assert tiny_mode(Params.model_validate({"model": {"base": "tiny-sdxl"}}))
    assert not tiny_mode(Params())
    assert tiny_mode(Params.model_validate({"evaluate": {"tiny": True}}))
    assert not tiny_mode(Params.model_validate({"model": {"base": "tiny-sd15"}, "evaluate": {"tiny": False}}))


def test_tiny_encoders_are_seeded_and_reloaded_through_from_pretrained(evaluator):
    # built once into a directory with a marker; loading again gives the same weights
    again = B.load_dino("tiny", torch.device("cpu"))
    x = _images(2, 9)
    torch.testing.assert_close(again.embed(x), evaluator.enc.dino.embed(x))
    assert (B.tiny_dino_dir() / B.TINY_MARKER).exists()
    assert again.info.pretrained is False
    assert len(evaluator.enc.clip.tokenizer) >= B.MIN_TOKENIZER_SIZE
