"""Caption augmentation (kohya semantics): caption dropout, keep_tokens, shuffle, tag dropout."""
import random

import pytest

CAPTION = "sks, dog, red collar, grass, sunny day, park, bokeh"
TAGS = ["sks", "dog", "red collar", "grass", "sunny day", "park", "bokeh"]


@pytest.fixture(scope="module")
def captions(comfy_runtime):
    return comfy_runtime.pack_import("trainers.data.captions")


def _opts(captions, **kwargs):
    return captions.CaptionOptions(**kwargs)


def _split(text):
    return text.split(", ") if text else []


def test_defaults_are_identity_and_leave_captions_untouched(captions):
    """Nothing on: the caption passes through byte for byte (kohya does not re-join it) and no
    randomness is consumed."""
    options = _opts(captions)
    assert captions.is_identity(options)
    rng = random.Random(0)
    state = rng.getstate()
    for text in (CAPTION, "  odd ,spacing,,x ", "", "a photo of sks dog"):
        assert captions.process_caption(text, options, rng) == text
    assert rng.getstate() == state
    # keep_tokens alone changes nothing (as in kohya): it only matters with shuffle/dropout.
    assert captions.is_identity(_opts(captions, keep_tokens=2))


@pytest.mark.parametrize("kwargs", [
    {"shuffle_tags": True}, {"tag_dropout": 0.1}, {"caption_dropout": 0.1}, {"keep_tokens_separator": "|||"},
])
def test_is_identity_false_when_anything_can_change(captions, kwargs):
    assert not captions.is_identity(_opts(captions, **kwargs))


def test_same_seed_same_output(captions):
    """A given rng state gives the same caption; caption_rng is a pure function of its triple."""
    options = _opts(captions, shuffle_tags=True, keep_tokens=1, tag_dropout=0.3, caption_dropout=0.1)
    first = [captions.process_caption(CAPTION, options, captions.caption_rng(7, 2, i)) for i in range(50)]
    again = [captions.process_caption(CAPTION, options, captions.caption_rng(7, 2, i)) for i in range(50)]
    assert first == again
    assert len(set(first)) > 10  # and it does vary between samples
    other_epoch = [captions.process_caption(CAPTION, options, captions.caption_rng(7, 3, i)) for i in range(50)]
    assert other_epoch != first
    a, b = random.Random(123), random.Random(123)
    assert [captions.process_caption(CAPTION, options, a) for _ in range(20)] == \
        [captions.process_caption(CAPTION, options, b) for _ in range(20)]


def test_caption_rng_is_stable_across_processes(captions):
    """Pinned values: the stream must not depend on PYTHONHASHSEED or the process."""
    rng = captions.caption_rng(0, 0, 0)
    assert isinstance(rng, random.Random)
    values = [captions.caption_rng(0, 0, 0).random() for _ in range(2)]
    assert values == [0.539482248023553, 0.539482248023553]
    assert captions.caption_rng(3, 1, 2).randrange(10**9) == 519333336
    assert captions.caption_rng(0, 0, 1).random() != values[0]
    assert captions.caption_rng(1, 0, 0).random() != values[0]
    assert captions.caption_rng(0, 1, 0).random() != values[0]
    with pytest.raises(ValueError, match="`epoch`"):
        captions.caption_rng(0, 1.5, 0)


def test_keep_tokens_never_moved_or_dropped(captions):
    options = _opts(captions, shuffle_tags=True, keep_tokens=2, tag_dropout=0.5)
    rng = random.Random(1)
    for _ in range(500):
        out = _split(captions.process_caption(CAPTION, options, rng))
        assert out[:2] == ["sks", "dog"]
        assert set(out[2:]) <= set(TAGS[2:]) and len(out[2:]) == len(set(out[2:]))


def test_keep_tokens_larger_than_caption(captions):
    options = _opts(captions, shuffle_tags=True, keep_tokens=10, tag_dropout=1.0)
    assert captions.process_caption(CAPTION, options, random.Random(0)) == ", ".join(TAGS)


def test_shuffle_permutes_only_the_non_kept_tags(captions):
    options = _opts(captions, shuffle_tags=True, keep_tokens=1)
    rng = random.Random(2)
    seen = set()
    for _ in range(300):
        out = _split(captions.process_caption(CAPTION, options, rng))
        assert out[0] == "sks"
        assert sorted(out) == sorted(TAGS)  # nothing dropped, nothing added
        seen.add(tuple(out[1:]))
    assert len(seen) > 100  # really shuffled (6! = 720 orders)
    first_positions = {order[0] for order in seen}
    assert first_positions == set(TAGS[1:])


def test_tag_dropout_rate(captions):
    """Each non-kept tag is dropped independently at the configured rate (2000 draws, fixed seed)."""
    options = _opts(captions, keep_tokens=1, tag_dropout=0.25)
    rng = random.Random(3)
    kept = 0
    draws = 2000
    for _ in range(draws):
        out = _split(captions.process_caption(CAPTION, options, rng))
        assert out[0] == "sks"
        assert out[1:] == [t for t in TAGS[1:] if t in out[1:]]  # order kept without shuffle
        kept += len(out) - 1
    rate = 1 - kept / (draws * (len(TAGS) - 1))
    assert abs(rate - 0.25) < 0.02
    assert captions.process_caption(CAPTION, _opts(captions, keep_tokens=1, tag_dropout=1.0), rng) == "sks"


def test_caption_dropout_rate(captions):
    options = _opts(captions, caption_dropout=0.1, shuffle_tags=True, keep_tokens=1)
    rng = random.Random(4)
    outputs = [captions.process_caption(CAPTION, options, rng) for _ in range(2000)]
    empty = sum(out == "" for out in outputs)
    assert abs(empty / 2000 - 0.1) < 0.02
    assert all(out.startswith("sks, ") for out in outputs if out)
    assert captions.process_caption(CAPTION, _opts(captions, caption_dropout=1.0), rng) == ""


def test_empty_caption(captions):
    options = _opts(captions, shuffle_tags=True, keep_tokens=1, tag_dropout=0.5)
    assert captions.process_caption("", options, random.Random(0)) == ""
    assert captions.process_caption("  ,  , ", options, random.Random(0)) == ""


def test_whitespace_and_empty_tags_are_normalised_when_processing(captions):
    # With caption choices off a line break is whitespace inside the tag list (on, lines are alternatives).
    options = _opts(captions, shuffle_tags=True, keep_tokens=2, caption_choices=False)
    out = captions.process_caption("  sks ,dog,, \tgrass  ,\n park ", options, random.Random(5))
    parts = _split(out)
    assert parts[:2] == ["sks", "dog"]
    assert sorted(parts[2:]) == ["grass", "park"]
    assert all(p == p.strip() and p for p in parts)


def test_keep_tokens_separator(captions):
    """kohya's `|||`: fixed prefix ||| shuffled/dropped middle ||| fixed suffix; keep_tokens ignored."""
    options = _opts(captions, shuffle_tags=True, tag_dropout=0.3, keep_tokens=5, keep_tokens_separator="|||")
    text = "sks, dog ||| grass, park, bokeh, sunny day ||| masterpiece"
    rng = random.Random(6)
    for _ in range(200):
        out = _split(captions.process_caption(text, options, rng))
        assert out[:2] == ["sks", "dog"] and out[-1] == "masterpiece"
        assert set(out[2:-1]) <= {"grass", "park", "bokeh", "sunny day"}
    # Without shuffle/dropout the marker is still removed, order kept.
    plain = _opts(captions, keep_tokens_separator="|||")
    assert captions.process_caption(text, plain, rng) == "sks, dog, grass, park, bokeh, sunny day, masterpiece"
    # A caption without the marker falls back to keep_tokens.
    fallback = _opts(captions, shuffle_tags=True, keep_tokens=1, keep_tokens_separator="|||")
    assert _split(captions.process_caption(CAPTION, fallback, rng))[0] == "sks"
    assert captions.process_caption(CAPTION, plain, rng) == CAPTION


def test_rng_consumed_only_by_active_features(captions):
    """Like kohya: no draw for a rate of 0, one draw for caption dropout."""
    rng, reference = random.Random(9), random.Random(9)
    captions.process_caption(CAPTION, _opts(captions, caption_dropout=0.5), rng)
    reference.random()
    assert rng.getstate() == reference.getstate()


@pytest.mark.parametrize("kwargs,field", [
    ({"tag_dropout": 1.5}, "tag_dropout"),
    ({"tag_dropout": -0.1}, "tag_dropout"),
    ({"caption_dropout": float("nan")}, "caption_dropout"),
    ({"caption_dropout": "0.1"}, "caption_dropout"),
    ({"keep_tokens": -1}, "keep_tokens"),
    ({"keep_tokens": 1.0}, "keep_tokens"),
    ({"shuffle_tags": "yes"}, "shuffle_tags"),
    ({"keep_tokens_separator": ","}, "keep_tokens_separator"),
    ({"keep_tokens_separator": "  "}, "keep_tokens_separator"),
])
def test_bad_options_name_the_field(captions, kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        captions.CaptionOptions(**kwargs)


def test_help_texts_for_tooltips(captions):
    import dataclasses
    for f in dataclasses.fields(captions.CaptionOptions):
        assert len(f.metadata["help"]) > 20
        assert captions.CaptionOptions.help(f.name) == f.metadata["help"]
    assert captions.CaptionOptions(tag_dropout=1).tag_dropout == 1.0


MULTI = "a sks cross\n\n  a purple sks cross  \n{big|small|tiny} sks cross\n"


def test_caption_choices_pick_one_line_and_one_option_per_group(captions):
    """A caption of several lines is alternatives (one line per draw, blank lines ignored); each {a|b|c}
    picks one option; braces without '|' stay as written (kohya's enable_wildcard, OneTrainer's files)."""
    options = _opts(captions)
    assert captions.has_choices(MULTI) and captions.has_choices("a {red|blue} ball")
    assert not captions.has_choices("a {literal} ball\n") and not captions.has_choices(CAPTION)
    draws = [captions.process_caption(MULTI, options, captions.caption_rng(0, 0, i)) for i in range(600)]
    counts = {text: draws.count(text) for text in set(draws)}
    assert set(counts) == {"a sks cross", "a purple sks cross", "big sks cross", "small sks cross", "tiny sks cross"}
    assert 150 < counts["a sks cross"] < 250 and 150 < counts["a purple sks cross"] < 250  # one line in three
    assert 40 < counts["tiny sks cross"] < 100  # one line in three, then one option in three
    assert captions.process_caption("a {literal} ball", options, random.Random(0)) == "a {literal} ball"
    assert captions.process_caption("{red | blue} {ball|cube}", options, random.Random(3)) in {
        "red ball", "red cube", "blue ball", "blue cube"}


def test_caption_choices_then_tags_and_identity(captions):
    """Choices come before tag processing (a chosen option may hold tags); with choices off the caption is
    used as written; is_identity looks at the captions themselves."""
    options = _opts(captions, shuffle_tags=True, keep_tokens=1)
    for i in range(40):
        drawn = captions.process_caption("sks, {red, shiny|blue}, ball", options, captions.caption_rng(1, 0, i))
        tags = _split(drawn)
        assert tags[0] == "sks" and sorted(tags[1:]) in (["ball", "red", "shiny"], ["ball", "blue"])
    off = _opts(captions, caption_choices=False)
    assert captions.process_caption(MULTI, off, random.Random(0)) == MULTI
    assert captions.is_identity(_opts(captions), [CAPTION, "a {literal}"])
    assert not captions.is_identity(_opts(captions), [CAPTION, MULTI])
    assert captions.is_identity(off, [CAPTION, MULTI])
    with pytest.raises(ValueError, match="`caption_choices`"):
        captions.CaptionOptions(caption_choices="yes")
