"""SamplingParams refuses bad values with one clear line."""

from __future__ import annotations

import math

import pytest

from runtime import GenerationError, SamplingParams


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "invalid temperature | expected a finite number >= 0 (0 = greedy) | got -0.1"),
        ({"temperature": math.nan}, "invalid temperature | expected a finite number >= 0 (0 = greedy) | got nan"),
        ({"temperature": math.inf}, "invalid temperature"),
        ({"temperature": "1"}, "invalid temperature"),
        ({"top_p": 0.0}, "invalid top_p | expected a number in (0, 1] (1 = off) | got 0.0"),
        ({"top_p": 1.5}, "invalid top_p | expected a number in (0, 1] (1 = off) | got 1.5"),
        ({"top_p": math.nan}, "invalid top_p"),
        ({"top_k": -1}, "invalid top_k | expected an integer >= 0 (0 = off) | got -1"),
        ({"top_k": 2.5}, "invalid top_k"),
        ({"repetition_penalty": 0.0}, "invalid repetition_penalty | expected a finite number > 0 (1 = off) | got 0.0"),
        ({"repetition_penalty": -1.0}, "invalid repetition_penalty"),
        ({"seed": -3}, "invalid seed"),
        ({"min_new_tokens": -1}, "invalid min_new_tokens | expected an integer >= 0 | got -1"),
        ({"stop": ("ok", "")}, "invalid stop string | expected non-empty strings | got ''"),
        ({"stop_token_ids": (3, -1)}, "invalid stop token id | expected integers >= 0 | got -1"),
    ],
)
def test_bad_sampling_params(kwargs: dict, message: str) -> None:
    with pytest.raises(GenerationError) as info:
        SamplingParams(**kwargs)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_defaults_are_greedy_and_lists_become_tuples() -> None:
    p = SamplingParams()
    assert p.greedy and (p.min_p, p.presence_penalty, p.frequency_penalty) == (0.0, 0.0, 0.0)
    q = SamplingParams(temperature=0.7, stop="###", stop_token_ids=[5, 6])
    assert q.stop == ("###",) and q.stop_token_ids == (5, 6)
    assert not q.greedy
    assert SamplingParams(temperature=1.0, top_k=1).greedy
    assert not SamplingParams(temperature=1.0, top_k=7).greedy
    assert hash(q) == hash(SamplingParams(temperature=0.7, stop=("###",), stop_token_ids=(5, 6)))
