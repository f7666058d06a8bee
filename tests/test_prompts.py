"""Prompt sets: deterministic, versioned, covering Hypnos' image types, DreamBench chosen by class."""

import json

import pytest

from subjectops.config import ConfigError, Params, load_params
from subjectops.data import prompts as P
from subjectops.stages.infer import build_prompt_sets


def _params(**infer) -> Params:
    return Params.model_validate({"infer": infer})


def test_prompt_invariant_is_one_prompt_with_distinct_seeds():
    (s,) = build_prompt_sets(_params(prompt_sets=["prompt-invariant"], seed=7), "sks", "teapot")
    assert s.name == "prompt-invariant" and s.version
    assert len(s.items) == 50  # Hypnos B.3
    assert {i.prompt for i in s.items} == {"a photo of sks teapot"}
    assert [i.seed for i in s.items] == list(range(7, 57))


def test_prompt_invariant_template_is_configurable_and_checked():
    p = load_params(overrides=["infer.prompt_invariant.template=a DSLR photo of {token} {class_word}",
                               "infer.prompt_invariant.num_images=3"])
    (s,) = build_prompt_sets(p, "<subject>", "backpack")
    assert [i.prompt for i in s.items] == ["a DSLR photo of <subject> backpack"] * 3
    with pytest.raises(ConfigError, match=r"infer.prompt_invariant.template = .*placeholder \{klass\} is not allowed"):
        load_params(overrides=["infer.prompt_invariant.template=a photo of {klass}"])  # refused when params load
    no_token = load_params(overrides=["infer.prompt_invariant.template=a photo of a {class_word}"])
    with pytest.raises(ConfigError, match=r"\{token\}"):
        build_prompt_sets(no_token, "sks", "teapot")


def test_prompt_varying_is_deterministic_for_a_seed_and_changes_with_it():
    a = build_prompt_sets(_params(prompt_sets=["prompt-varying"]), "sks", "teapot")[0]
    b = build_prompt_sets(_params(prompt_sets=["prompt-varying"]), "sks", "teapot")[0]
    assert [i.to_dict() for i in a.items] == [i.to_dict() for i in b.items]
    assert a.digest == b.digest
    c = build_prompt_sets(_params(prompt_sets=["prompt-varying"], prompt_varying={"sampler_seed": 1}),
                            "sks", "teapot")[0]
    assert [i.prompt for i in c.items] != [i.prompt for i in a.items]
    assert c.digest != a.digest
    assert len({i.prompt for i in a.items}) > 25  # varied, not one prompt


def test_prompt_varying_covers_every_image_type_and_style_follows_type():
    parts = P.sample_varying_parts(600, sampler_seed=123)
    types = [t for t, _, _ in parts]
    assert set(types) == set(P.IMAGE_TYPES)
    # balanced: every type appears in every round of len(IMAGE_TYPES) prompts
    n = len(P.IMAGE_TYPES)
    for r in range(0, 600, n):
        assert sorted(types[r:r + n]) == sorted(P.IMAGE_TYPES)
    for t, bg, style in parts:
        assert style in P.STYLES[t]  # style drawn from the sampled image type's list (sec. 3.5)
        assert bg in P.BACKGROUNDS
    assert {s for _, _, s in parts} == {s for v in P.STYLES.values() for s in v}
    assert {b for _, b, _ in parts} == set(P.BACKGROUNDS)
    s = P.prompt_varying(Params().infer.prompt_varying.template, 6, 123, "sks", "teapot")
    for item, (t, bg, st) in zip(s.items, parts[:6]):
        assert item.prompt == f"a {t} of sks teapot, {bg}, {st}"
        assert item.meta == {"image_type": t, "background": bg, "style": st}


def test_dreambench_chooses_prompts_by_class():
    obj = build_prompt_sets(_params(prompt_sets=["dreambench"]), "sks", "teapot")[0]
    live = build_prompt_sets(_params(prompt_sets=["dreambench"]), "sks", "dog")[0]
    assert len(obj.items) == 25 * 4 and len(live.items) == 25 * 4
    assert obj.config["kind"] == "object" and live.config["kind"] == "live"
    assert "a sks teapot in the jungle" == obj.items[0].prompt
    assert any("wearing a santa hat" in i.prompt for i in live.items)
    assert not any("wearing a santa hat" in i.prompt for i in obj.items)
    assert all(sum(1 for j in obj.items if j.prompt == i.prompt) == 4 for i in obj.items)
    assert len({i.seed for i in obj.items}) == 100
    forced = build_prompt_sets(_params(prompt_sets=["dreambench"], dreambench={"subject_type": "live"}),
                                 "sks", "teapot")[0]
    assert forced.config["kind"] == "live"
    assert "CC BY 4.0" in obj.config["license"] and "Ruiz" in obj.config["source"]


def test_sets_follow_config_order_and_roundtrip_json():
    sets = build_prompt_sets(_params(prompt_sets=["dreambench", "prompt-invariant", "prompt-varying"]),
                               "sks", "teapot")
    assert [s.name for s in sets] == ["dreambench", "prompt-invariant", "prompt-varying"]
    data = json.loads(json.dumps(P.prompt_sets_to_json(sets)))
    back = P.prompt_sets_from_json(data)
    assert [(s.name, s.version, s.digest) for s in back] == [(s.name, s.version, s.digest) for s in sets]
    with pytest.raises(ConfigError, match="list of prompt sets"):
        P.prompt_sets_from_json({"nope": 1})


def test_bad_identifier_or_class_fails_clearly():
    with pytest.raises(ConfigError, match="identifier"):
        build_prompt_sets(_params(), "two words", "teapot")
    with pytest.raises(ConfigError, match="class word"):
        build_prompt_sets(_params(), "sks", " ")
    with pytest.raises(ConfigError, match="names a set twice"):
        build_prompt_sets(_params(prompt_sets=["dreambench", "dreambench"]), "sks", "teapot")


def test_strip_identifier_removes_only_the_identifier():
    assert P.strip_identifier("a photo of sks teapot", "sks") == "a photo of teapot"
    assert P.strip_identifier("a sks, teapot on sksand", "sks") == "a, teapot on sksand"
    assert P.strip_identifier("a photo of <subject> on a desk", "<subject>") == "a photo of on a desk"
    assert P.strip_identifier("a painting of sks teapot, in a garden", "sks") == "a painting of teapot, in a garden"
