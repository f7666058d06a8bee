"""The registered model: an MLflow pyfunc that loads the base pipeline plus the run's finetune output.

`mlflow.pyfunc.load_model("models:/NAME@champion").predict(pd.DataFrame({"prompt": [...], "seed": [...]}),
params={"num_inference_steps": 30})` returns a DataFrame with `prompt`, `seed`, `width`, `height` and
`image` (base64 PNG). In a prompt, `{subject}` stands for the identifier and class word
("sks teapot").

The model directory holds the finetune output (`artifacts/finetune/`), and for the offline `tiny`
presets the base pipeline too (`artifacts/base/`); a real base model is loaded by hub id or path
through `subjectops.models`, exactly as training loaded it.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import mlflow.pyfunc

DEFAULT_STEPS = 30


def _load_finetune_into(pipe, finetune_dir: Path):
    """Apply a finetune output directory to a base pipeline, through the method registry."""
    from subjectops import methods

    loader = getattr(methods, "load_finetuned", None)
    if loader is None:
        raise RuntimeError("subjectops.methods.load_finetuned is missing: this subjectops cannot apply a finetune directory")
    loader(pipe, finetune_dir)  # modifies the pipeline in place; returns method.json
    return pipe


class PersonalizedDiffusion(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import torch

        from subjectops.config import ModelCfg
        from subjectops.models.loading import load_pipeline

        cfg = dict(context.model_config or {})
        base_dir = context.artifacts.get("base")
        base = base_dir if base_dir else cfg["base_model"]
        model = ModelCfg(base=str(base), revision=None if base_dir else cfg.get("revision"))
        pipe = load_pipeline(model, dtype=torch.float32)
        pipe = _load_finetune_into(pipe, Path(context.artifacts["finetune"]))
        if torch.cuda.is_available():
            pipe = pipe.to("cuda")
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.cfg = cfg

    def _prompt(self, text: str) -> str:
        subject = f"{self.cfg.get('identifier', '')} {self.cfg.get('class_word', '')}".strip()
        return str(text).replace("{subject}", subject)

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd
        import torch

        params = dict(params or {})
        if isinstance(model_input, str):
            model_input = [model_input]
        if isinstance(model_input, (list, tuple)):
            model_input = pd.DataFrame({"prompt": list(model_input)})
        if isinstance(model_input, dict):
            model_input = pd.DataFrame(model_input)
        if "prompt" not in model_input.columns:
            raise ValueError("the model input needs a 'prompt' column (and optionally 'seed')")
        steps = int(params.get("num_inference_steps") or self.cfg.get("steps") or DEFAULT_STEPS)
        guidance = float(params.get("guidance_scale", self.cfg.get("guidance_scale", 7.5)))
        height = params.get("height") or None
        width = params.get("width") or None
        default_seed = int(self.cfg.get("seed", 0))
        rows = []
        for i, row in enumerate(model_input.itertuples(index=False)):
            rowd = row._asdict()
            seed = rowd.get("seed")
            seed = default_seed + i if seed is None or (isinstance(seed, float) and seed != seed) else int(seed)
            prompt = self._prompt(rowd["prompt"])
            gen = torch.Generator(device="cpu").manual_seed(seed)
            kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, generator=gen)
            if height:
                kwargs["height"] = int(height)
            if width:
                kwargs["width"] = int(width)
            image = self.pipe(prompt, **kwargs).images[0]
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
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "seed", required=False)]),
        outputs=Schema([ColSpec("string", "prompt"), ColSpec("long", "seed"), ColSpec("long", "width"),
                        ColSpec("long", "height"), ColSpec("string", "image")]),
        params=ParamSchema([
            ParamSpec("num_inference_steps", "long", 0),
            ParamSpec("guidance_scale", "double", 7.5),
            ParamSpec("height", "long", 0),
            ParamSpec("width", "long", 0),
        ]),
    )


def save_pyfunc(path: Path, finetune_dir: Path, model_config: dict, base_dir: Path | None, pip_requirements: list[str]) -> Path:
    """Write the pyfunc model directory (MLmodel, python_model.pkl, artifacts/)."""
    artifacts = {"finetune": str(finetune_dir)}
    if base_dir is not None:
        artifacts["base"] = str(base_dir)
    import warnings

    with warnings.catch_warnings():
        # mlflow suggests type hints and an input example; the explicit signature covers both here
        warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\..*")
        mlflow.pyfunc.save_model(
            path=str(path),
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),  # model from code: nothing pickled
            artifacts=artifacts,
            model_config=json.loads(json.dumps(model_config)),
            signature=signature(),
            pip_requirements=pip_requirements,
        )
    return path
