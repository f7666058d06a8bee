"""No code from data: a crafted pickle (its __reduce__ creates a marker file) planted where subjectops reads
weights or state never runs; a clear error names the file or folder, or the planted file is ignored and reported.
Checkpoints are covered by tests/test_training.py (test_a_crafted_pickle_in_the_checkpoint_folder_...)."""

import json
import pathlib
import pickle
import shutil

import pytest
from helpers import record_outputs

from subjectops.errors import SubjectopsError
from subjectops.models.loading import load_pipeline, resolve


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def plant(path, marker):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(Exploit(marker)))


@pytest.fixture
def marker(tmp_path):
    yield tmp_path / "code-ran"
    assert not (tmp_path / "code-ran").exists(), "a planted pickle was unpickled"


def test_a_base_model_on_the_volume_with_pickled_weights_is_refused(tiny_params, tmp_path, marker):
    from subjectops.config_base import ModelCfg

    model_dir = tmp_path / "volume" / "model"
    shutil.copytree(resolve(tiny_params.model), model_dir)
    (model_dir / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    plant(model_dir / "unet" / "diffusion_pytorch_model.bin", marker)
    with pytest.raises(SubjectopsError) as err:
        load_pipeline(ModelCfg(base=str(model_dir)))
    said = str(err.value)
    assert str(model_dir) in said and "diffusion_pytorch_model.safetensors" in said


def test_a_finetune_output_with_pickled_weights_is_refused(tiny_params, tmp_path, marker):
    from subjectops.methods import load_finetuned

    pipe = load_pipeline(tiny_params.model)
    finetuned = tmp_path / "registry-artifact" / "finetune"
    (finetuned / "unet").mkdir(parents=True)
    shutil.copy(pathlib.Path(resolve(tiny_params.model)) / "unet" / "config.json", finetuned / "unet")
    plant(finetuned / "unet" / "diffusion_pytorch_model.bin", marker)
    (finetuned / "method.json").write_text(json.dumps({"method": "dreambooth", "identifier": "sks",
                                                       "class_word": "teapot"}))
    record_outputs(finetuned)  # its manifest matches: the pickle itself must be what is refused
    with pytest.raises(SubjectopsError) as err:
        load_finetuned(pipe, finetuned)
    assert f"cannot load the finetune output {finetuned}" in str(err.value)
    assert "safetensors" in str(err.value)


def test_a_pickle_planted_in_the_prior_cache_is_never_read_and_the_entry_is_regenerated(tiny_params, example_subject,
                                                                                       tmp_path, marker, capsys):
    from subjectops.stages.priors import priors
    from subjectops.stages.refine import refine

    refine(tiny_params, example_subject, "teapot", tmp_path / "refine")
    priors(tiny_params, tmp_path / "refine", tmp_path / "a")
    entry = tmp_path / "prior-cache" / json.loads((tmp_path / "a" / "priors.json").read_text())["cache_key"]
    (entry / "images").chmod(0o755)
    plant(entry / "images" / "0001.png", marker)  # replaces a class image
    capsys.readouterr()
    priors(tiny_params, tmp_path / "refine", tmp_path / "b")
    err = " ".join(capsys.readouterr().err.split())
    assert f"prior cache entry {entry} failed verification (images/0001.png differ" in err
    assert json.loads((tmp_path / "b" / "priors.json").read_text())["generated"] is True


def test_the_registered_model_is_code_not_a_pickle(tmp_path):
    import yaml

    from subjectops.tracking.pyfunc import save_pyfunc

    model = save_pyfunc(tmp_path / "model", {}, {"base_model": "tiny-sd15"}, [])
    flavor = yaml.safe_load((model / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["model_code_path"].endswith("pyfunc_model.py") and "python_model" not in flavor
    assert not [p for p in model.rglob("*") if p.suffix in (".pkl", ".pickle", ".bin", ".pt", ".pth")]
