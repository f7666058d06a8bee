"""params.yaml validation: a bad value fails before any work, naming the key, the value and what is allowed."""

import pytest

from subjectops.config import ConfigError, load_params


def test_repo_params_validate_and_keep_paper_defaults(repo_root):
    params = load_params(repo_root / "params.yaml")
    # seed 004, section 4.1: 100 embedding steps at 5e-4, then UNet steps at 5e-6.
    assert params.finetune.two_stage.embedding_steps == 100
    assert params.finetune.two_stage.embedding_lr == pytest.approx(5e-4)
    assert params.finetune.two_stage.unet_lr == pytest.approx(5e-6)
    assert params.finetune.two_stage.initializer == "rare"
    assert params.finetune.dreambooth.prior_loss_weight == 1.0
    # issue 25's fidelity fixes, as params.yaml states them
    assert params.infer.alchemy.composite is False  # seed 002 sec. 3.4: the img2img output is the image
    assert params.infer.dreamblend.max_resolution is None  # every cross-attention layer, as pix2pix-zero
    hifi = params.finetune.hifi_tuner
    assert (hifi.weight_decay, hifi.max_grad_norm) == (0.0, None)  # seed 001 sec. 4: Adam


def test_two_stage_records_that_its_schedule_was_set_on_sd21_base(repo_root):
    from subjectops.methods import get_method

    params = load_params(repo_root / "params.yaml", ["finetune.method=two-stage", "model.base=tiny-sd15"])
    extra = get_method("two-stage")(params, "dog", None).manifest_extra()
    assert extra == {"two_stage": {"paper_base_model": "stabilityai/stable-diffusion-2-1-base",
                                   "base_model": "tiny-sd15"}}


def test_override_parses_yaml_values(repo_root):
    params = load_params(repo_root / "params.yaml", ["finetune.lora.lr=1e-5", "finetune.gradient_checkpointing=true",
                                                      "finetune.lora.target_modules=[to_q, to_v]"])
    assert params.finetune.lora.lr == pytest.approx(1e-5)
    assert params.finetune.gradient_checkpointing is True
    assert params.finetune.lora.target_modules == ["to_q", "to_v"]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("finetune.lora.lr=abc", ["finetune.lora.lr", "'abc'", "number"]),
        ("finetune.lora.lr=-1", ["finetune.lora.lr", "-1", "greater than 0"]),
        ("finetune.method=magic", ["finetune.method", "'magic'", "dreambooth", "lora", "two-stage"]),
        ("finetune.mixed_precision=fp8", ["finetune.mixed_precision", "'fp8'", "bf16"]),
        ("finetune.lora.rnak=8", ["finetune.lora.rnak", "unknown key"]),
        ("subject.resolution=100", ["subject.resolution", "100", "multiple of 8"]),
    ],
)
def test_invalid_value_names_key_value_and_allowed(repo_root, override, expected):
    with pytest.raises(ConfigError) as err:
        load_params(repo_root / "params.yaml", [override])
    for fragment in expected:
        assert fragment in str(err.value)


def test_malformed_override_is_rejected(repo_root):
    with pytest.raises(ConfigError, match="key.path=value"):
        load_params(repo_root / "params.yaml", ["finetune.lora.lr"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_params(repo_root / "params.yaml", ["finetune.seed.x=1"])


def test_missing_params_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_params(tmp_path / "nope.yaml")


def test_cli_rejects_bad_value_before_any_work(tmp_path, example_subject):
    from typer.testing import CliRunner

    from subjectops.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(example_subject), "--class", "teapot", "--out", str(out),
                                      "--model", "tiny-sd15", "--set", "finetune.lora.rank=0"])
    assert result.exit_code == 2
    assert "finetune.lora.rank" in result.output and "greater than or equal to 1" in result.output
    assert not out.exists()
