"""The shared checks every front door applies: unencodable text, history shapes, generation options."""
import math
import re
from types import SimpleNamespace

import pytest

from chatglm.validation import MAX_SEED, GenerationOptions, InputError, check_history, check_text

CONFIG = SimpleNamespace(max_sequence_length=2048, vocab_size=1844)


@pytest.mark.parametrize("text,what", [("a\ud800b", "U+D800"), ("x\x00", "NUL")])
def test_text_the_tokenizer_cannot_encode_is_refused_by_name(text, what):
    with pytest.raises(InputError, match=re.escape(what)) as e:
        check_text(text, "prompt")
    assert e.value.field == "prompt" and "prompt" in str(e.value)


def test_history_must_be_pairs_of_text():
    assert check_history([["q", "a"]]) == [("q", "a")]
    for bad in ([["q"]], [[1, "a"]], "qa", [["q", "a\udfff"]]):
        with pytest.raises(InputError, match="history"):
            check_history(bad)


def test_defaults_are_upstreams_and_validate():
    o = GenerationOptions().validate(CONFIG)
    assert (o.max_length, o.top_p, o.temperature, o.top_k) == (2048, 0.7, 0.95, 50)


@pytest.mark.parametrize("field,value", [
    ("repetition_penalty", math.nan), ("temperature", math.inf), ("top_p", 0), ("seed", MAX_SEED + 1),
    ("seed", -1), ("max_length", 2049), ("max_length", True), ("top_k", 1.5), ("logit_bias", {"²": 1}),
    ("logit_bias", {"5": math.nan}), ("logit_bias", {"99999": 1}), ("stop", [""]), ("stop", ["a\ud800"]),
    ("temperature", "0.5"), ("stop", ["x" * 501]), ("logit_bias", {str(i): 1 for i in range(301)}),
])
def test_bad_values_are_refused_naming_the_field(field, value):
    with pytest.raises(InputError) as e:
        GenerationOptions.build(**{field: value}).validate(CONFIG)
    assert e.value.field.startswith(field.split("[")[0]) or field in str(e.value)


def test_build_normalises_stop_and_bias_and_none_means_default():
    o = GenerationOptions.build(stop="\n", logit_bias={"7": 2}, top_k=None).validate(CONFIG)
    assert o.stop == ("\n",) and o.logit_bias == ((7, 2.0),) and o.top_k == 50
    with pytest.raises(InputError, match="unknown"):
        GenerationOptions.build(nonsense=1)


def test_a_history_far_beyond_any_context_is_refused_by_its_length():
    from chatglm.validation import MAX_HISTORY_TURNS
    assert len(check_history([["q", "a"]] * MAX_HISTORY_TURNS)) == MAX_HISTORY_TURNS
    with pytest.raises(InputError, match=f"history has {MAX_HISTORY_TURNS + 1} entries; at most {MAX_HISTORY_TURNS}"):
        check_history([["q", "a"]] * (MAX_HISTORY_TURNS + 1))
