"""Every bad value is a clear error before work starts: prompt templates with placeholders they may not use (str.format
reaches attributes), YAML alias bombs and oversized params files, and output folders or caches that cannot be
written. Each names the key, file or path, and leaves nothing behind."""

import os
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from subjectops.cli import app
from subjectops.config import ConfigError, load_params
from subjectops.errors import SubjectopsError
from subjectops.kfp_pod import resolve_params
from subjectops.params_yaml import MAX_PARAMS_BYTES
from subjectops.stages.common import partial_dir
from subjectops.stages.refine import refine


@pytest.mark.parametrize("key, template, shown", [
    ("priors.prompt", "{class_word.__class__.__name__}", "{class_word.__class__.__name__}"),
    ("infer.prompt_invariant.template", "a photo of {token} {class_word[0]}", "{class_word[0]}"),
    ("infer.prompt_varying.template", "a {image_type} of {token} {colour}", "{colour}"),
    ("finetune.validation_prompt", "a photo of {token!r}", "{token!r}"),
    ("finetune.dreambooth.instance_prompt", "{class_word:{token.__init__}}", "{class_word:{token.__init__}}"),
    ("finetune.hypnos.instance_prompt", "{token} {class_word}, {background} {0}", "{0}"),
    ("finetune.textual_inversion.initializer", "{}", "{}"),
    ("finetune.alchemy.token_scan.prompt", "a photo of {class_word}", "{class_word}"),
    ("registry.model_name", "subjectops-{subject.__dict__}", "{subject.__dict__}"),
])
def test_template_placeholders_are_plain_documented_names(repo_root, key, template, shown):
    with pytest.raises(ConfigError) as err:
        load_params(repo_root / "params.yaml", [f"{key}={template!r}"])
    assert f"{key} = {template!r}: placeholder {shown} is not allowed" in err.value.message
    assert "plain name" in err.value.message


def test_documented_templates_load(repo_root):
    params = load_params(repo_root / "params.yaml", [
        "priors.prompt='a {class_word} on a table, {{literal braces}}'",
        "finetune.hypnos.instance_prompt='{placeholder} {class_word} on {background}'",
        "registry.model_name='{method}-{subject}'"])
    assert params.priors.prompt.format(class_word="vase") == "a vase on a table, {literal braces}"
    assert params.registry.model_name == "{method}-{subject}"


def test_template_with_a_stray_brace_names_the_key(repo_root):
    with pytest.raises(ConfigError, match=r"priors.prompt = 'a \{ photo': not a valid template"):
        load_params(repo_root / "params.yaml", ["priors.prompt='a { photo'"])


LEVELS = list(zip("abcdefgh", "bcdefghi"))
# 9^9 strings once expanded: gigabytes. As a file, and as one flow-style line for a --set value.
BILLION_LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{n}: &{n} [{', '.join(['*' + p] * 9)}]\n" for p, n in LEVELS)
BILLION_LAUGHS_LINE = "[&a [lol, lol, lol, lol, lol, lol, lol, lol, lol], " + ", ".join(
    f"&{n} [{', '.join(['*' + p] * 9)}]" for p, n in LEVELS) + "]"


def test_yaml_alias_bomb_is_refused_at_once_with_the_file_named(tmp_path):
    bomb = tmp_path / "params.yaml"
    bomb.write_text(BILLION_LAUGHS)  # 9^9 strings once expanded: gigabytes
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_params(bomb)
    assert time.perf_counter() - start < 2
    assert f"{bomb}: YAML aliases expand this document past 4,000,000 characters" in err.value.message
    with pytest.raises(ConfigError, match="the params_yaml pipeline parameter: YAML aliases expand"):
        resolve_params(BILLION_LAUGHS)
    small = tmp_path / "small.yaml"
    small.write_text("{}")
    with pytest.raises(ConfigError, match="the value of override 'priors.prompt=.*': YAML aliases expand"):
        load_params(small, ["priors.prompt=" + BILLION_LAUGHS_LINE])


def test_recursive_alias_and_oversized_file_are_refused(tmp_path):
    loop = tmp_path / "loop.yaml"
    loop.write_text("finetune: &f {method: dreambooth, again: *f}\n")
    with pytest.raises(ConfigError, match=f"{loop}: a YAML alias refers to the node that contains it"):
        load_params(loop)
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * (MAX_PARAMS_BYTES // 10 + 1))
    with pytest.raises(ConfigError, match=f"{big} is 1,000,010 bytes, above the limit of 1,000,000"):
        load_params(big)


def test_yaml_only_types_are_refused_with_the_key(tmp_path):
    dated = tmp_path / "params.yaml"
    dated.write_text("tracking:\n  experiment: 2026-11-24\n")
    with pytest.raises(ConfigError, match="tracking.experiment holds a YAML date, not a params value") as err:
        load_params(dated)
    assert "quote the value of tracking.experiment" in err.value.fix


def test_output_under_a_file_is_refused_before_work(tiny_params, example_subject, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    out = blocker / "run"
    result = CliRunner().invoke(app, ["run", str(example_subject), "--class", "teapot", "--out", str(out),
                                      "--model", "tiny-sd15", "--no-track"])
    assert result.exit_code == 2, result.output
    assert f"the run folder (--out) {out} cannot be created: {blocker} is a file" in " ".join(result.output.split())
    with pytest.raises(SubjectopsError, match=f"the folder of refine \\(--out\\) {blocker} cannot be created"):
        refine(tiny_params, example_subject, "teapot", blocker / "refine")
    assert blocker.read_text() == "x" and list(tmp_path.iterdir()) == [blocker]


def test_read_only_output_and_cache_are_refused_before_work(example_subject, tmp_path):
    """A read-only bind mount in a private mount namespace: unlike chmod, it stops root too."""
    locked = tmp_path / "locked"
    (locked / "cache").mkdir(parents=True)
    # One interpreter runs both commands (an import of the CLI and the photo checks cost seconds each).
    commands = [["--out", f"{locked}/run"],
                ["--out", f"{tmp_path}/run", "--set", f"priors.cache_dir={locked}/cache/priors"]]
    program = ("from typer.testing import CliRunner; from subjectops.cli import app\n"
               f"for extra in {commands!r}:\n"
               f"    r = CliRunner().invoke(app, ['run', '{example_subject}', '--class', 'teapot', '--model', "
               "'tiny-sd15',"
               " '--no-track', *extra])\n"
               "    print(r.output, 'rc=%d' % r.exit_code, repr(r.exception) if r.exit_code != 2 else '')\n")
    script = f"mount --bind -o ro {locked} {locked} || exit 99\nexec {sys.executable} -c \"$0\""
    env = {**os.environ, "COLUMNS": "400"}
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, program], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first, second = proc.stdout.split("rc=2")[:2]
    assert f"the run folder (--out) {locked}/run is not writable: Read-only file system (in {locked})" in first
    assert f"the class-image cache (priors.cache_dir) {locked}/cache/priors is not writable: Read-only file system" \
        in second
    assert proc.stdout.count("rc=2") == 2 and "Traceback" not in proc.stdout + proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["locked"]  # no run folder, no partial output
    assert [p.name for p in locked.iterdir()] == ["cache"] and not any((locked / "cache").iterdir())
    assert not partial_dir(tmp_path / "run" / "refine").exists()
