"""`subjectops models check`: which real weights the configured run needs (the base model, the metric encoders,
what the planned method declares), and which are on this machine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from subjectops import world
from subjectops.config import Params
from subjectops.errors import ModelNotFoundError
from subjectops.methods import configured_method
from subjectops.models.loading import how_to_provide, is_tiny, is_world


@dataclass
class WeightStatus:
    purpose: str
    ident: str
    present: bool
    how: str


def hub_present(ident: str, cache_dir: str | None = None) -> bool:
    """A local directory, or a hub id whose snapshot is in the local cache (no network is used)."""
    if Path(ident).expanduser().exists():
        return True
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(ident, local_files_only=True, cache_dir=cache_dir)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not in the cache"
        return False


def check_weights(params: Params) -> list[WeightStatus]:
    rows = []
    base = params.model.base
    if is_tiny(params.model):
        rows.append(WeightStatus("base model", base, True, "built offline with random weights (plumbing only)"))
    elif is_world(params.model):
        rows.append(WeightStatus("base model", base, _found(lambda: world.model_dir(base)),
                                 "pretrained on the miniature world: run `subjectops world build`"))
    else:
        rows.append(WeightStatus("base model", base, hub_present(base, params.model.cache_dir), how_to_provide(base)))
    for purpose, ident in (("DINO metric encoder", params.evaluate.backbones.dino),
                           ("CLIP metric encoder", params.evaluate.backbones.clip)):
        if ident not in ("tiny", "world"):
            rows.append(WeightStatus(purpose, ident, hub_present(ident), how_to_provide(ident)))
    # The method says which weights it loads, from its config (an ablated loss term loads nothing).
    rows += [WeightStatus(need.purpose, need.ident, _found(need.locate), need.how)
             for need in configured_method(params).required_weights()]
    if params.evaluate.backbones.inception != "none":
        from subjectops.metrics.backbones import INCEPTION_FILE, find_inception

        rows.append(WeightStatus("Inception (FID; else DINO features)", params.evaluate.backbones.inception,
                                 _found(lambda: find_inception(params.evaluate.backbones.inception)),
                                 f"put torch-fidelity's {INCEPTION_FILE} in the torch hub cache or point "
                                 "evaluate.backbones.inception at it"))
    if params.refine.mask_backend == "sam":
        ckpt = params.refine.sam_checkpoint or "(unset)"
        rows.append(WeightStatus("SAM masks", ckpt, bool(params.refine.sam_checkpoint) and Path(ckpt).is_file(),
                                 "set refine.sam_checkpoint to a segment-anything .pth file"))
    return rows


def _found(locate) -> bool:
    """Whether a weight-file lookup finds its file (lookups raise or return None when it is absent)."""
    try:
        return locate() is not None
    except ModelNotFoundError:
        return False
