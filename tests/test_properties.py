"""Property tests: arbitrary input never crashes the loaders with anything but `NLAError`.

The params loader, the sidecar loader and the labeler-response parser all read text that a
person or another program wrote. Whatever that text is, they either return a valid result
or raise `NLAError` with one non-empty line; no KeyError, ValueError, RecursionError or
AttributeError may escape to the user as a traceback.
"""

from __future__ import annotations

import re

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from nla.config import NLAConfig, config_from_dict, load_config
from nla.errors import NLAError
from nla.label.parse import Parsed, parse_response
from nla.sidecar import REQUIRED_KEYS, SIDECAR_NAME, read_sidecar, require

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# YAML scalars that stress the loader: impossible dates, huge ints, NaN/Inf, odd strings.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["2024-02-30", "1e400", ".nan", "-.inf", "0x1F", "~", "yes", "\n", ""]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)

DEFAULTS = NLAConfig().model_dump(mode="json")


def leaf_paths(tree: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for key, value in tree.items():
        out += leaf_paths(value, prefix + (key,)) if isinstance(value, dict) and value else [prefix + (key,)]
    return out


LEAVES = leaf_paths(DEFAULTS)


def one_line_error(err: NLAError) -> None:
    text = str(err)
    assert text.strip() and "\n" not in text, repr(text)


def expect_config_or_nla_error(load) -> None:
    try:
        assert isinstance(load(), NLAConfig)
    except NLAError as err:
        one_line_error(err)


@SETTINGS
@given(path=st.sampled_from(LEAVES), value=values, extra=st.dictionaries(st.text(max_size=10), values, max_size=2))
def test_config_from_dict_with_one_leaf_replaced(path, value, extra):
    """Every real field with an arbitrary value (and maybe stray keys): a config or one NLAError line."""
    data = yaml.safe_load(yaml.safe_dump(DEFAULTS))
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    node.update(extra)
    expect_config_or_nla_error(lambda: config_from_dict(data))


@SETTINGS
@given(
    data=st.one_of(values, st.dictionaries(st.sampled_from(sorted(DEFAULTS)) | st.text(max_size=8), values, max_size=5))
)
def test_config_from_arbitrary_structures(data):
    expect_config_or_nla_error(lambda: config_from_dict(data))


@SETTINGS
@given(text=st.text(max_size=200) | st.builds(lambda v: yaml.safe_dump(v), values))
@example(text="model: {layer: 2024-02-30}")  # yaml raises ValueError for impossible dates
@example(text="model: &a [*a]")  # a self-referencing alias
@example(text="[" * 3000)  # RecursionError inside the YAML parser
@example(text="model: !!python/object/apply:os.system [echo]")
@example(text="split: {fractions: {av_sft: .nan, ar_sft: 0, rl: 0, eval: 0}}")
def test_load_config_on_arbitrary_yaml_text(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("p") / "params.yaml"
    path.write_text(text, encoding="utf-8")
    expect_config_or_nla_error(lambda: load_config(path))


@SETTINGS
@given(raw=st.binary(max_size=200))
@example(raw=b"\xff\xfe model: 1")
def test_load_config_on_arbitrary_bytes(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("p") / "params.yaml"
    path.write_bytes(raw)
    expect_config_or_nla_error(lambda: load_config(path))


def test_load_config_on_a_folder(tmp_path):
    try:
        load_config(tmp_path)
        raise AssertionError("a folder loaded as params")
    except NLAError as err:
        one_line_error(err)
        assert "folder" in str(err)


# ----------------------------------------------------------------------------- sidecar

LIVE_MARKER = {"char": "㈀", "token_id": 7, "left_id": 5, "right_id": 9}
# Mostly-valid sidecars: each required key is either plausible or arbitrary, plus an arbitrary marker.
PLAUSIBLE = {
    "kind": st.sampled_from(["nla_dataset", "nla_model"]),
    "schema_version": st.just(1),
    "stage": st.just("extract"),
    "base_model": st.just("embedded"),
    "d_model": st.integers(-2, 1000),
    "layer": st.integers(-2, 40),
}
sidecar_like = st.fixed_dictionaries(
    {key: PLAUSIBLE[key] | values for key in REQUIRED_KEYS}, optional={"marker": values}
)


def expect_sidecar_or_nla_error(folder) -> None:
    try:
        meta = read_sidecar(folder)
        assert isinstance(meta, dict)
        require(meta, where="test", d_model=576, layer=20, marker=LIVE_MARKER)
    except NLAError as err:
        one_line_error(err)


@SETTINGS
@given(
    content=st.one_of(
        st.binary(max_size=200),
        st.text(max_size=200).map(str.encode),
        st.builds(lambda v: yaml.safe_dump(v).encode(), sidecar_like),
    )
)
@example(content=b"kind: nla_model\nschema_version: 1\nstage: x\nbase_model: m\nd_model: 576\nlayer: 20\nmarker: 3\n")
@example(content=b"created_at: 2024-02-30\n")
@example(content=b"{" * 3000)
def test_read_sidecar_on_arbitrary_contents(tmp_path_factory, content):
    folder = tmp_path_factory.mktemp("s")
    (folder / SIDECAR_NAME).write_bytes(content)
    expect_sidecar_or_nla_error(folder)


def test_read_sidecar_missing_or_unreadable(tmp_path):
    expect_sidecar_or_nla_error(tmp_path)
    (tmp_path / SIDECAR_NAME).mkdir()
    expect_sidecar_or_nla_error(tmp_path)


# ----------------------------------------------------------------------------- labeler responses

REASONS = {"no_analysis", "unclosed_analysis", "empty", "marker_leak", "too_few_features"}
MARKER_RANGES = NLAConfig().injection.marker_ranges
TAGS = re.compile(r"</?(?:analysis|explanation)>", re.I)  # the labeler's and the AV's answer tags
pieces = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        [
            "<analysis>",
            "</analysis>",
            "<ANALYSIS>",
            "\n",
            "\r\n",
            "- ",
            "1. ",
            "2) ",
            "**",
            "`",
            "---",
            "Feature 3: ",
            "• ",
            "# ",
            "\u3200",
            "\u25a0",
            "\u2028",
            "\x00",
            "</explanation>",
            "the token",
        ]
    ),
)
responses = st.lists(pieces, max_size=25).map("".join)


@SETTINGS
@given(
    raw=st.one_of(responses, st.text(max_size=300), st.none(), st.integers(), st.binary(max_size=20)),
    min_features=st.integers(1, 4),
)
@example(raw="<analysis>\n- A news story.\n- The final token is 'by'.\n</analysis>", min_features=2)
@example(raw="<analysis><analysis>a\nb</analysis>", min_features=1)  # a repeated opening tag
@example(raw="<analysis>a\nb</explanation> c</analysis>", min_features=1)  # would end the AV target early
def test_parse_response_gives_a_clean_explanation_or_a_documented_reason(raw, min_features):
    parsed = parse_response(raw, min_features, MARKER_RANGES)
    if parsed.explanation is None:
        assert parsed.reason in REASONS
        return
    assert parsed.reason is None
    lines = parsed.explanation.split("\n")
    assert len(lines) == parsed.n_features >= min_features
    for line in lines:
        assert line and line == " ".join(line.split())  # one feature per line, whitespace collapsed
    assert not TAGS.search(parsed.explanation), parsed.explanation  # no tag leaks into training targets
    assert not any(lo <= ord(c) <= hi for c in parsed.explanation for lo, hi in MARKER_RANGES)


def test_parse_response_on_the_documented_cases():
    ok = parse_response("x <analysis>\n1. **A news story.**\n2. The final token `by`.\n</analysis> y", 2, MARKER_RANGES)
    assert ok == Parsed("A news story.\nThe final token by.", 2, None)
    assert parse_response("no tags", 2, MARKER_RANGES).reason == "no_analysis"
    assert parse_response("<analysis> cut off", 2, MARKER_RANGES).reason == "unclosed_analysis"
    assert parse_response("<analysis>\n---\n</analysis>", 2, MARKER_RANGES).reason == "empty"
    assert parse_response("<analysis>a\nb \u3200</analysis>", 2, MARKER_RANGES).reason == "marker_leak"
    assert parse_response("<analysis>only one</analysis>", 2, MARKER_RANGES).reason == "too_few_features"
