"""Evaluation throughput: all metrics in one pass against one pass per metric, measured in one run.

    .venv/bin/python bench/eval_throughput.py [--n 50] [--refs 4] [--size 512] [--backbones full|tiny] [--rounds 3]
        [--photos DIR]

"together": the evaluator reads and decodes each image once, runs DINO, CLIP and the LPIPS backbone once
per image, and derives DINO, CLIP-I, CLIP-T, FID (on the DINO embeddings), LPIPS, SSIM and PSNR from that.
"separate": each metric makes its own pass: it reads and decodes the images, computes its own reference
features, and runs the encoders it needs (FID recomputes DINO; CLIP-T recomputes CLIP image embeddings).
Both use the same code and encoders (loaded once, outside the timings) and must give the same numbers.

--backbones full: randomly initialised encoders of the real shapes (DINO ViT-S/16 at 224 px, CLIP ViT-B/32
with a 12-layer text tower, AlexNet LPIPS), so the compute is that of a real evaluation; no weights are
needed. --backbones tiny: the tiny test encoders (dominated by image decoding and SSIM).
Images are real photos (the DreamBench subjects shipped in examples/subjects/), resized to
--size: the subject-region metrics segment every image, and GrabCut on noise images takes ~10x longer than on
photos. Rounds interleave the two modes; the ratio is taken within each round, and the median and range printed.
Images per second = generated images scored / wall time. Numbers say nothing about quality.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from subjectops.config import METRIC_NAMES, Params  # noqa: E402
from subjectops.metrics import backbones as B  # noqa: E402
from subjectops.metrics.encoders import Encoders  # noqa: E402
from subjectops.metrics.evaluator import Evaluator  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SUBJECTS = REPO / "examples" / "subjects"  # DreamBench photos shipped with the repository (CC-BY 4.0)


def make_images(photos: Path, root: Path, n: int, refs: int, size: int) -> tuple[list[Path], list[Path]]:
    """References: the first subject's photos; generated: PNGs (as infer writes them) cycling through the others."""
    subjects = sorted(d for d in photos.iterdir() if d.is_dir())
    files = lambda d: sorted(p for p in d.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))  # noqa: E731
    ref_photos = files(subjects[0])
    others = [p for d in subjects[1:] for p in files(d)] or ref_photos
    if len(ref_photos) < refs:
        raise SystemExit(f"{subjects[0]} has {len(ref_photos)} photos, fewer than --refs {refs}")

    def save(src: Path, path: Path) -> Path:
        Image.open(src).convert("RGB").resize((size, size), Image.BICUBIC).save(path)
        return path

    root.mkdir(parents=True, exist_ok=True)
    return ([save(others[i % len(others)], root / f"gen_{i:04d}.png") for i in range(n)],
            [save(ref_photos[i], root / f"ref_{i:02d}.png") for i in range(refs)])


def full_shape_encoders(device: torch.device) -> Encoders:
    """Random encoders with the real architectures (no weights exist here; compute is what matters)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, ViTConfig, ViTModel

    from subjectops.models.tokenizer import train_clip_bpe

    torch.manual_seed(0)
    dino = ViTModel(ViTConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                              image_size=224, patch_size=16), add_pooling_layer=False)
    tok_dir = train_clip_bpe(Path(tempfile.mkdtemp()) / "tok")
    tok = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
    v = len(tok)
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=v, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, bos_token_id=v - 2, eos_token_id=v - 1,
                         pad_token_id=v - 1),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=224, patch_size=32),
        projection_dim=512))
    pre_dino = B.Preprocess(None, (224, 224), None, B.IMAGENET_MEAN, B.IMAGENET_STD, "bicubic")
    pre_clip = B.Preprocess(224, None, (224, 224), B.CLIP_MEAN, B.CLIP_STD, "bicubic")
    info = lambda role, d: B.BackboneInfo(role, f"random-{d}", False, "bench", d)  # noqa: E731
    return Encoders.from_parts(
        dino=B.DinoEncoder(dino, pre_dino, info("dino", "ViT-S/16"), device),
        clip=B.ClipEncoder(clip, tok, pre_clip, info("clip", "ViT-B/32"), device),
        lpips=B.load_lpips("tiny", device), fid_features="dino", device=device, tiny=True)


def run(ev: Evaluator, gen: list[Path], refs: list[Path], prompts: list[str]) -> list:
    r = ev.references(refs)
    return ev.score_paths("bench", "1", gen, prompts, ["sks"] * len(gen), r)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50, help="generated images (Hypnos B.3: 50)")
    ap.add_argument("--refs", type=int, default=4, help="reference images (Hypnos B.3: 4)")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (SD 1.5: 512)")
    ap.add_argument("--backbones", choices=("full", "tiny"), default="full")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (together, then separate)")
    ap.add_argument("--photos", type=Path,
                    default=SUBJECTS,
                    help="a folder of subject folders of photos")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    params = Params.model_validate({"evaluate": {"tiny": True, "batch_size": args.batch_size}})
    metrics = list(METRIC_NAMES)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("SUBJECTOPS_HOME", str(Path(tmp) / "home"))
        gen, refs = make_images(args.photos, Path(tmp) / "img", args.n, args.refs, args.size)
        prompts = [f"a photo of sks teapot, variant {i % 5}" for i in range(args.n)]
        enc = full_shape_encoders(device) if args.backbones == "full" else Encoders(params, metrics)
        together = Evaluator(params, metrics, encoders=enc)
        separate = [Evaluator(params, [m], encoders=enc) for m in metrics]
        run(together, gen[:2], refs, prompts[:2])  # warm-up (allocator, kernels, caches)

        t_together, t_separate, per_metric = [], [], {m: float("inf") for m in metrics}
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            rec_t = run(together, gen, refs, prompts)
            t_together.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            rec_s = []
            for m, ev in zip(metrics, separate):
                t1 = time.perf_counter()
                rec_s += run(ev, gen, refs, prompts)
                per_metric[m] = min(per_metric[m], time.perf_counter() - t1)
            t_separate.append(time.perf_counter() - t0)

    a = {r.metric: r.mean for r in rec_t}
    b = {r.metric: r.mean for r in rec_s}
    same = all(abs(a[k] - b[k]) <= 1e-6 * max(1.0, abs(a[k])) or a[k] == b[k] for k in a)
    ratios = [s_ / t_ for t_, s_ in zip(t_together, t_separate)]
    print(f"eval throughput: {args.n} generated x {args.refs} references at {args.size} px, "
          f"backbones={args.backbones}, "
          f"device={device}, torch {torch.__version__}, {os.cpu_count()} cpus, python {platform.python_version()}")
    print(f"  per-metric passes (best of {args.rounds}): "
          + ", ".join(f"{m} {per_metric[m]:.2f}s" for m in metrics))
    for name, times in (("together", t_together), ("separate", t_separate)):
        med = statistics.median(times)
        print(f"  {name}: median {med:.2f} s = {args.n / med:.2f} images/s  (rounds: "
              f"{', '.join(f'{t:.2f}' for t in times)})")
    print(f"  ratio together/separate throughput: median {statistics.median(ratios):.2f}x, range "
          f"{min(ratios):.2f}-{max(ratios):.2f}x over {len(ratios)} rounds   same numbers: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
