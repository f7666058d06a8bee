"""replace: HiFi Tuner's personalized subject replacement (seed 001 sec. 3.4, alg. 3).

The source image is captioned (c^r), DDIM-inverted (eq. 3) and null-text optimised per step (eq. 4, K steps);
regenerating with the optimised phi_t* records the cross-attention maps a_t^{r*}. The subject word is then
swapped for the run's class word w_g with the step-wise subject embeddings c_s^t in the padding rows (c^g), and
the image regenerated from x*_T with a_t^{r*} for every token except w_g and c_s^t (prompt-to-prompt).

Writes source.png (the image as inverted), reconstruction.png (null-text reconstruction), replaced.png and
replace.json (captions, the settings, the reconstruction error).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

from subjectops.config import Params, SubjectCfg
from subjectops.errors import SubjectopsError
from subjectops.stages.common import require_stage_dir, stage_output, write_manifest

if TYPE_CHECKING:
    from PIL import Image


def open_source(image_path: Path, cfg: SubjectCfg) -> Image.Image:
    from PIL import Image, UnidentifiedImageError

    from subjectops.data.subject import check_photo_file

    if not Path(image_path).is_file():
        raise SubjectopsError(f"{image_path} does not exist (or is not a file)",
                              fix="pass the path of a JPEG or PNG photo that contains the subject to replace")
    check_photo_file(Path(image_path), cfg)  # the subject photos' size limits, from the header, before decoding
    try:
        with Image.open(image_path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise SubjectopsError(f"{image_path} is not an image subjectops replace can use ({exc})",
                              fix="pass a JPEG or PNG photo that contains the subject to replace") from None


def caption_span(tokenizer, ids: list[int], word: str, text: str) -> tuple[int, int]:
    """Where `word`'s tokens sit in the caption's token ids (alg. 3 swaps and reuses attention by position)."""
    from subjectops.inference.prompt_to_prompt import word_span

    try:
        return word_span(ids, tokenizer(" " + word.lower(), add_special_tokens=False).input_ids)
    except ValueError:
        raise SubjectopsError(f"the tokens of {word!r} do not occur in the tokenized caption {text!r}",
                              fix="pass --word exactly as the caption writes the subject (one word of it)") from None


def _captions(params: Params, source, image_path: Path, word: str, class_word: str) -> tuple[str, str]:
    """c^r, the source's caption (it must name `word`), and c^g, the caption with `word` swapped for the run's
    class word w_g."""
    from subjectops.inference.reference_guided import caption, load_captioner

    text_r = caption(load_captioner(params.replace.captioner), source, f"a photo of a {word}")
    pattern = re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE)
    if not pattern.search(text_r):
        raise SubjectopsError(f"the caption of {image_path} ({text_r!r}) does not name {word!r}",
                              fix="pass --word with the word the caption uses for the subject to replace")
    return text_r, pattern.sub(class_word, text_r, count=1)


def _regenerate(pipe, sampler, traj, phis, c_r, c_g, attention):
    """Alg. 3's loop: x^r regenerated with phi_t* while a_t^{r*} is recorded, x^g with [c^g, c_s^t] reusing it."""
    import torch

    from subjectops.training.contract import Conditioning

    subject = pipe.subject_embeddings
    with torch.no_grad():
        x_r, x_g = traj[0], traj[0]
        for i, t in enumerate(sampler.timesteps):
            x_r = sampler.step(x_r, i, c_r, phis[i], attention.recording(i))  # A^(t): x_{t-1}^r and a_t^{r*}
            c_gs = Conditioning(subject.apply(c_g.prompt_embeds, t), c_g.added_cond_kwargs)
            x_g = sampler.step(x_g, i, c_gs, phis[i], attention.reusing(i))  # F~ with [c^g, c_s^t]
    return x_r, x_g


def replace(params: Params, image_path: Path, run_dir: Path, word: str, out: Path) -> Path:
    import torch

    from subjectops.data.subject import fit
    from subjectops.inference.ddim import DdimSampler, decode_latents, encode_image, encoder
    from subjectops.inference.prompt_to_prompt import AttentionReuse, source_index
    from subjectops.methods import load_finetuned, require_provides
    from subjectops.methods.base import STEPWISE_SUBJECT_EMBEDDINGS
    from subjectops.models.loading import load_pipeline
    from subjectops.models.sampling import use_scheduler

    photo = open_source(image_path, params.subject)
    finetune_dir = require_stage_dir(Path(run_dir) / "finetune", "finetune", "replace")
    info = json.loads((finetune_dir / "method.json").read_text())
    require_provides(finetune_dir, info, STEPWISE_SUBJECT_EMBEDDINGS, "replace",
                     "the step-wise subject embeddings (alg. 3)")
    resolution = info["resolution"]
    source = fit(photo, resolution, "center-crop")
    cfg = params.replace
    text_r, text_g = _captions(params, source, image_path, word, info["class_word"])

    pipe = load_pipeline(params.model.model_copy(update={"base": info["base_model"]}), dtype=torch.float32)
    load_finetuned(pipe, finetune_dir)
    use_scheduler(pipe, "ddim")
    models = encoder(pipe)
    tok = models.tokenizer
    ids_r, ids_g = (tok(t, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
                    for t in (text_r, text_g))
    span_r = caption_span(tok, ids_r, word, text_r)
    span_g = caption_span(tok, ids_g, info["class_word"], text_g)

    sampler = DdimSampler.from_pipe(pipe, params.infer.steps, params.infer.guidance_scale)
    c_r, c_g = models.encode_prompts([text_r], resolution), models.encode_prompts([text_g], resolution)
    phi = models.encode_prompts([""], resolution)
    x0 = encode_image(pipe, source, resolution)
    traj = sampler.invert(x0, c_r)  # eq. 3
    phis = sampler.null_text(traj, lambda i: c_r, phi, cfg.null_text_steps, cfg.null_text_lr)  # eq. 4

    n = pipe.subject_embeddings.embeds.shape[1]
    fresh = torch.zeros(len(ids_g), dtype=torch.bool)
    fresh[span_g[0]:span_g[1]] = True  # w_g
    fresh[-n:] = True  # c_s^t
    attention = AttentionReuse(pipe.unet, fresh, source_index(len(ids_g), span_g, span_r))
    x_r, x_g = _regenerate(pipe, sampler, traj, phis, c_r, c_g, attention)
    error = float((x_r - x0).pow(2).mean())

    with stage_output(out) as work:
        source.save(work / "source.png")
        decode_latents(pipe, x_r).save(work / "reconstruction.png")
        decode_latents(pipe, x_g).save(work / "replaced.png")
        record = {"image": str(image_path), "word": word, "class_word": info["class_word"], "caption": text_r,
                  "caption_replaced": text_g, "captioner": cfg.captioner or "template: a photo of a {word}",
                  "steps": sampler.steps, "guidance_scale": sampler.guidance, "null_text_steps": cfg.null_text_steps,
                  "null_text_lr": cfg.null_text_lr, "reconstruction_mse": error}
        (work / "replace.json").write_text(json.dumps(record, indent=2))
        write_manifest(work, "replace", params, {"finetune": finetune_dir}, replace=record)
    return Path(out)
