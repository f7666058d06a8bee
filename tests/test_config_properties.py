"""Property-based: generated `--set` overrides and params files thrown at config loading either validate or raise
ConfigError naming a key (or the file), never another exception. The number of cases each test ran is printed
(pytest -s) and checked; derandomized so that CI sees the same cases every time."""

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from subjectops.config import ConfigError, Params, load_params


def leaf_keys(data, prefix=""):
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from leaf_keys(value, path + ".")
        else:
            yield path, value


DEFAULTS = dict(leaf_keys(Params().model_dump(mode="json")))
KEYS = sorted(DEFAULTS)
SECTIONS = sorted({k.rsplit(".", 1)[0] for k in KEYS if "." in k})
PLACEHOLDERS = ["{token}", "{class_word}", "{placeholder}", "{class_word.__class__}", "{token[0]}", "{0}", "{}",
                "{token!r}", "{class_word:>{token}}", "{", "}", "{{literal}}", "{subject}", "{background}"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(PLACEHOLDERS))
values = st.recursive(scalars,
                      lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                      max_leaves=6)


@st.composite
def override(draw):
    typed_key = st.text(st.characters(exclude_characters="="), min_size=1, max_size=15)  # the first = ends the key
    key = draw(st.one_of(st.sampled_from(KEYS), st.sampled_from(SECTIONS), typed_key,
                         st.sampled_from(KEYS).map(lambda k: k + ".x")))
    kind = draw(st.sampled_from(["default", "generated", "raw", "template"]))
    if kind == "default":  # a valid value of the key (when the key is one), often unchanged
        raw = yaml.safe_dump(DEFAULTS.get(key), default_flow_style=True).removesuffix("\n...\n").strip()
    elif kind == "generated":
        raw = yaml.safe_dump(draw(values), default_flow_style=True).removesuffix("\n...\n").strip()
    elif kind == "template":
        raw = repr(draw(st.lists(st.sampled_from(PLACEHOLDERS + ["a photo of", " "]), max_size=4).map("".join)))
    else:  # anything a user might type after `=`, valid YAML or not
        raw = draw(st.text(max_size=20))
    return key, f"{key}={raw}"


def names_a_key(message: str, keys: list[str]) -> bool:
    """The message names a key, a section above it, or (a key with odd characters) the key quoted."""
    return any(k and (k in message or k.split(".")[0] in message or repr(k.split(".")[0]) in message) for k in keys)


def test_generated_overrides_validate_or_name_a_key(tmp_path):
    outcomes = {"valid": 0, "refused": 0}
    params_file = tmp_path / "params.yaml"  # small: the repo's file takes ~0.1 s to parse, the cases are the point
    params_file.write_text("finetune:\n  method: dreambooth\ninfer:\n  steps: 50\n")

    @settings(max_examples=250, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(override(), min_size=1, max_size=3))
    def check(pairs):
        # --set strips the key; a blank key is named by its override
        keys = [k.strip() for k, _ in pairs] + [repr(text) for _, text in pairs]
        try:
            load_params(params_file, [text for _, text in pairs])
            outcomes["valid"] += 1
        except ConfigError as err:
            assert names_a_key(err.message, keys), err.message
            outcomes["refused"] += 1

    check()
    cases = outcomes["valid"] + outcomes["refused"]
    print(f"--set: {cases} cases ({outcomes['valid']} valid, {outcomes['refused']} refused with the key named)")
    assert cases >= 250 and outcomes["valid"] >= 10 and outcomes["refused"] >= 10


@st.composite
def params_document(draw):
    """A params file: real sections and keys with generated values, unknown keys, or arbitrary YAML text."""
    kind = draw(st.sampled_from(["keys", "keys", "yaml", "text"]))
    if kind == "text":
        return draw(st.text(max_size=60)), []
    if kind == "yaml":
        data = draw(values)
        return yaml.safe_dump(data), list(data) if isinstance(data, dict) else []
    data: dict = {}
    for key in draw(st.lists(st.sampled_from(KEYS) | st.text(min_size=1, max_size=8), min_size=1, max_size=4)):
        node, parts = data, key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        node[parts[-1]] = draw(st.one_of(st.just(DEFAULTS.get(key)), values))
    return yaml.safe_dump(data), [str(k) for k in data]


def test_generated_params_files_validate_or_name_a_key(tmp_path):
    outcomes = {"valid": 0, "refused": 0}
    path = tmp_path / "params.yaml"

    @settings(max_examples=250, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(params_document())
    def check(document):
        text, keys = document
        path.write_text(text)
        try:
            load_params(path)
            outcomes["valid"] += 1
        except ConfigError as err:
            assert names_a_key(err.message, keys + [str(path)]), err.message
            outcomes["refused"] += 1

    check()
    cases = outcomes["valid"] + outcomes["refused"]
    print(f"params files: {cases} cases ({outcomes['valid']} valid, {outcomes['refused']} refused naming a key or the "
          "file)")
    assert cases >= 250 and outcomes["valid"] >= 10 and outcomes["refused"] >= 10
