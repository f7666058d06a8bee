"""The registered model: an MLflow pyfunc that generates through the inference strategy infer used.

`mlflow.pyfunc.load_model("models:/NAME@champion").predict(pd.DataFrame({"prompt": [...], "seed": [...]}))`
returns a DataFrame with `prompt`, `seed`, `width`, `height` and `image` (base64 PNG). In a prompt, `{subject}`
stands for the identifier and class word ("sks teapot"). The model config's `inference` is the spec infer
recorded (strategy, scheduler, steps, guidance scale, resolution, strategy settings); it is not overridable
per request, so a prompt and seed evaluated by infer come back as the very image infer wrote.

The model directory holds the finetune output (`artifacts/finetune/`), every other stage output the strategy
requires (e.g. `artifacts/refine/` for references and masks), and for the offline `tiny` presets the base
pipeline too (`artifacts/base/`); a real base model is loaded by hub id or path through `subjectops.models`,
exactly as training loaded it.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd


class PersonalizedDiffusion(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from subjectops.config import ModelCfg
        from subjectops.inference import InferenceSpec, StageInputs, load_strategy

        cfg = dict(context.model_config or {})
        base_dir = context.artifacts.get("base")
        model = ModelCfg(base=str(base_dir), revision=None) if base_dir else ModelCfg(base=cfg["base_model"],
                                                                                      revision=cfg.get("revision"))
        self.strategy = load_strategy(InferenceSpec.model_validate(cfg["inference"]),
                                      StageInputs.from_dirs(model, context.artifacts))
        self.cfg = cfg

    def _prompt(self, text: str) -> str:
        from subjectops.inference.base import fill_subject

        return fill_subject(text, self.cfg.get("identifier") or "", self.cfg.get("class_word") or "")

    # the hint is MLflow's "no schema from the hint" type: the explicit signature (below) validates the input, and
    # MLflow's "add type hints to predict" warning has nothing to ask for
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if isinstance(model_input, str):
            model_input = [model_input]
        if isinstance(model_input, (list, tuple)):
            model_input = pd.DataFrame({"prompt": list(model_input)})
        if isinstance(model_input, dict):
            model_input = pd.DataFrame(model_input)
        if "prompt" not in model_input.columns:
            raise ValueError("the model input needs a 'prompt' column (and optionally 'seed')")
        default_seed = int(self.cfg.get("seed", 0))
        prompts, seeds = [], []
        for i, row in enumerate(model_input.itertuples(index=False)):
            rowd = row._asdict()
            seed = rowd.get("seed")
            seeds.append(default_seed + i if seed is None or (isinstance(seed, float) and seed != seed) else int(seed))
            prompts.append(self._prompt(rowd["prompt"]))
        rows = []
        for prompt, seed, image in zip(prompts, seeds, self.strategy.generate(prompts, seeds)):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            rows.append({"prompt": prompt, "seed": seed, "width": image.width, "height": image.height,
                         "image": base64.b64encode(buf.getvalue()).decode("ascii")})
        return pd.DataFrame(rows, columns=["prompt", "seed", "width", "height", "image"])


def decode_image(b64: str):
    """A PIL image from the `image` column of the model's output."""
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


def signature():
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "seed", required=False)]),
        outputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "seed"), ColSpec("long", "width"),
                        ColSpec("long", "height"), ColSpec("string", "image")]),
    )


def save_pyfunc(path: Path, artifacts: dict[str, Path], model_config: dict, pip_requirements: list[str]) -> Path:
    """Write the pyfunc model directory (MLmodel, the model's code, artifacts/; nothing pickled): `artifacts`
    maps `finetune`, each stage output the strategy requires, and `base` (tiny presets) to the directories to
    package."""
    import warnings

    with warnings.catch_warnings():
        # an input example would make MLflow load the base model and draw an image while saving; the explicit
        # signature is what validates requests
        warnings.filterwarnings("ignore", message=".*input example was not provided", category=UserWarning)
        mlflow.pyfunc.save_model(
            path=str(path),
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),  # model from code: nothing pickled
            artifacts={name: str(d) for name, d in artifacts.items()},
            model_config=json.loads(json.dumps(model_config)),
            signature=signature(),
            pip_requirements=pip_requirements,
        )
    return path
