"""SamplingParams refuses bad values with one clear line."""

from __future__ import annotations

import math

import numpy as np
import pytest

from runtime import GenerationError, SamplingParams
from runtime.sampling import is_neutral, neutral_row, row_arrays


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "invalid temperature | expected a finite number >= 0 (0 = greedy) that float32 holds"),
        ({"temperature": math.nan}, "invalid temperature"
                                    " | expected a finite number >= 0 (0 = greedy) that float32 holds"),
        ({"temperature": math.inf}, "invalid temperature"),
        ({"temperature": "1"}, "invalid temperature"),
        ({"top_p": 0.0}, "invalid top_p | expected a number in (0, 1] (1 = off) that float32 holds"),
        ({"top_p": 1.5}, "invalid top_p"
                         " | expected a number in (0, 1] (1 = off) that float32 holds: at least 1.2e-38 | got 1.5"),
        ({"top_p": math.nan}, "invalid top_p"),
        ({"top_k": -1}, "invalid top_k | expected an integer in [0, 2**63) (0 = off) | got -1"),
        ({"top_k": 2.5}, "invalid top_k"),
        ({"repetition_penalty": 0.0}, "invalid repetition_penalty | expected a number in [1e-30, 1e+30] (1 = off"),
        ({"repetition_penalty": -1.0}, "invalid repetition_penalty"),
        ({"seed": -3}, "invalid seed"),
        ({"min_new_tokens": -1}, "invalid min_new_tokens | expected an integer in [0, 2**63) | got -1"),
        ({"stop": ("ok", "")}, "invalid stop string | expected non-empty strings | got ''"),
        ({"stop_token_ids": (3, -1)}, "invalid stop token id | expected integers in [0, 2**63) | got -1"),
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


INT64_MAX = 2**63 - 1


@pytest.mark.parametrize("temperature", [0.0, 0.8])  # greedy and sampled rows alike
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"top_k": 2**70}, "invalid top_k | expected an integer in [0, 2**63) (0 = off)"),
        ({"top_k": 2**63}, "invalid top_k"),
        ({"min_new_tokens": 2**70}, "invalid min_new_tokens | expected an integer in [0, 2**63)"),
        ({"stop_token_ids": (3, 2**70)}, "invalid stop token id | expected integers in [0, 2**63)"),
        ({"seed": 2**63}, "invalid seed"),
    ],
)
def test_integers_past_int64_are_refused_greedy_or_sampled(temperature: float, kwargs: dict, message: str) -> None:
    with pytest.raises(GenerationError) as info:
        SamplingParams(temperature=temperature, **kwargs)
    assert str(info.value).startswith(message)


def test_the_largest_accepted_integers_fit_the_sampling_rows() -> None:
    """What SamplingParams accepts, row_arrays turns into the sampler's int64 inputs without a loss."""
    for temperature in (0.0, 0.8):
        p = SamplingParams(temperature=temperature, top_k=INT64_MAX, min_new_tokens=INT64_MAX, seed=INT64_MAX,
                           stop_token_ids=(5,))
        rows = row_arrays(p, [1, 2], [5], vocab=16, steps=3)
        assert rows["top_k"][0] == INT64_MAX and rows["min_new_tokens"][0] == INT64_MAX


FLT_TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32, ~1.18e-38


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        # nonzero values that float32 would round to 0 or to a subnormal
        ({"temperature": 1e-46}, "invalid temperature | expected a finite number >= 0 (0 = greedy) "
                                 "that float32 holds: 0 or in [1.2e-38, 3.4e+38]"),
        ({"temperature": 1e-40}, "invalid temperature"),
        ({"temperature": 1e308}, "invalid temperature"),
        ({"temperature": 2**2000}, "invalid temperature"),  # past float64 too
        ({"frequency_penalty": -(2**2000)}, "invalid frequency_penalty"),
        ({"top_p": 1e-46}, "invalid top_p"
                           " | expected a number in (0, 1] (1 = off) that float32 holds: at least 1.2e-38"),
        ({"top_p": 1e-39}, "invalid top_p"),
        ({"min_p": 1e-46}, "invalid min_p"
                           " | expected a number in [0, 1] (0 = off) that float32 holds: 0 or at least 1.2e-38"),
        ({"presence_penalty": 1e-46}, "invalid presence_penalty | expected a number in [-2, 2] (0 = off) "
                                      "that float32 holds: 0 or a magnitude of at least 1.2e-38"),
        ({"presence_penalty": -1e-300}, "invalid presence_penalty"),
        ({"frequency_penalty": -1e-46}, "invalid frequency_penalty"),
        # the penalty divides and multiplies logits in float32: bounded where that stays finite
        ({"repetition_penalty": 1e-46}, "invalid repetition_penalty | expected a number in [1e-30, 1e+30] (1 = off;"),
        ({"repetition_penalty": 1e-300}, "invalid repetition_penalty"),
        ({"repetition_penalty": 1e-31}, "invalid repetition_penalty"),
        ({"repetition_penalty": 1e308}, "invalid repetition_penalty"),
        ({"repetition_penalty": 1e31}, "invalid repetition_penalty"),
    ],
)
def test_values_float32_cannot_hold_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(GenerationError) as info:
        SamplingParams(**kwargs)
    assert str(info.value).startswith(message), str(info.value)


def test_values_float32_holds_are_kept() -> None:
    """The bounds themselves are accepted, and each survives float32 as a nonzero finite number."""
    for kwargs in ({"temperature": FLT_TINY}, {"temperature": 3e38}, {"top_p": FLT_TINY}, {"min_p": FLT_TINY},
                   {"presence_penalty": -FLT_TINY}, {"frequency_penalty": FLT_TINY},
                   {"repetition_penalty": 1e-30}, {"repetition_penalty": 1e30}):
        p = SamplingParams(**kwargs)
        (name, value), = kwargs.items()
        held = row_arrays(p, [1], [], vocab=8, steps=1)[name][0]
        assert held != 0 and np.isfinite(held) and abs(held) >= FLT_TINY


def test_row_arrays_draw_only_the_uniforms_a_request_reads() -> None:
    """``draws`` uniforms are the first of the row's stream (the same values a full-width draw
    starts with); the rest of the row stays zero and ``last_step`` points at the last drawn."""
    params = SamplingParams(temperature=0.8, seed=11)
    full = row_arrays(params, [1, 2], [0], 50, 64)
    some = row_arrays(params, [1, 2], [0], 50, 64, draws=5)
    assert some["uniforms"].shape == full["uniforms"].shape == (1, 64)
    np.testing.assert_array_equal(some["uniforms"][0, :5], full["uniforms"][0, :5])
    assert not some["uniforms"][0, 5:].any()
    assert int(full["last_step"][0]) == 63 and int(some["last_step"][0]) == 4
    none = row_arrays(params, [], [], 50, 64, draws=0)  # a greedy row reads no uniform
    assert int(none["last_step"][0]) == 0 and not none["uniforms"].any()
    assert int(row_arrays(params, [], [], 50, 64, draws=500)["last_step"][0]) == 63  # at most the row


def test_row_arrays_share_the_wide_rows_a_request_leaves_neutral() -> None:
    """A wide row (vocabulary or steps) a request does not change is one shared, read-only array
    (what the backends skip comparing and copying); a row it changes is its own copy, and the
    shared rows keep their neutral values whatever another request wrote."""
    greedy = row_arrays(SamplingParams(), [1, 2], [0], 50, 64, draws=0)
    penalized = row_arrays(SamplingParams(repetition_penalty=1.3, min_new_tokens=2, temperature=0.5, seed=1),
                           [1, 2], [0], 50, 64, draws=4)
    for name in ("seen", "stop_mask", "uniforms", "counts"):
        assert is_neutral(greedy[name]) and greedy[name] is neutral_row(name, 50, 64)
        assert not greedy[name].flags.writeable
    assert is_neutral(penalized["counts"])
    for name in ("seen", "stop_mask", "uniforms"):
        assert not is_neutral(penalized[name]) and penalized[name].flags.writeable
    assert penalized["seen"][0, [1, 2]].all() and penalized["stop_mask"][0, 0] and penalized["uniforms"][0, :4].all()
    assert not neutral_row("seen", 50, 64).any() and not neutral_row("stop_mask", 50, 64).any()
    assert not is_neutral(np.zeros([1, 50], bool))  # equal values are not the shared row
    with pytest.raises(ValueError):
        greedy["seen"][0, 3] = True
