"""Sampling parameters and their per-row arrays.

:class:`SamplingParams` is one request's (one row's) configuration, validated on construction.
:func:`row_arrays` turns one request into the per-row inputs of the sampling nodes
(:mod:`runtime.sampler_graph`): the engine writes them into its slot once, at admission.
:class:`Sampler` runs the standalone sampler graph on logits already at hand (tests, tools).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnxruntime as ort

from runtime.errors import GenerationError, InvalidRequestError
from runtime.sampler_graph import ALL_ROWS, BOUNDED_CANDIDATES, HOST_INPUTS, ROW_INPUTS, build_sampler_model

__all__ = ["SamplingParams", "GREEDY", "INT64_MAX", "FLOAT32_TINY", "REPETITION_PENALTY_RANGE", "PARTED_ABOVE",
           "GENERATION_DEFAULTS", "Plan", "TOP_K_CANDIDATES", "checked_row", "generation_defaults", "host_values",
           "is_neutral", "neutral_row", "row_arrays", "stack_rows", "Sampler"]

log = logging.getLogger(__name__)


INT64_MAX = int(np.iinfo(np.int64).max)
"""The largest integer the sampler's int64 inputs hold (``top_k``, ``min_new_tokens``, ids, seeds)."""
FLOAT32_TINY = float(np.finfo(np.float32).tiny)
"""The smallest normal float32 (~1.18e-38): a nonzero value below it rounds to 0 or to a subnormal."""
FLOAT32_MAX = float(np.finfo(np.float32).max)
REPETITION_PENALTY_RANGE = (1e-30, 1e30)
"""The sampler divides positive logits by the repetition penalty and multiplies negative ones by it,
in float32: within these bounds that stays finite for any logit of magnitude up to 3.4e8 (far
beyond real logits; fp16 logits end at 65,504), so the penalty means what it says. Beyond them a
logit overflows to ±inf and the row's probabilities become NaN."""


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _float32_holds(value: float) -> bool:
    """True when float32 keeps ``value``'s meaning: 0, or a finite magnitude in float32's normal
    range (rounding to the nearest float32 is fine; becoming 0, a subnormal or inf is not)."""
    return value == 0 or FLOAT32_TINY <= abs(value) <= FLOAT32_MAX


def _check_real(name: str, value: object, low: float, high: float, expected: str) -> None:
    """``value`` a real number in ``[low, high]`` that float32 holds (see :func:`_float32_holds`)."""
    try:
        number = float(value) if _is_real(value) else math.nan  # type: ignore[arg-type]
    except OverflowError:  # an int past float64
        number = math.inf if value > 0 else -math.inf  # type: ignore[operator]
    if math.isnan(number) or not low <= number <= high or not _float32_holds(number):
        raise InvalidRequestError(f"invalid {name}", expected=expected, got=repr(value)[:80])


def _check_int(name: str, value: object, expected: str) -> None:
    """``value`` an integer the sampler's int64 inputs hold, and not negative."""
    if not _is_int(value) or not 0 <= value <= INT64_MAX:  # type: ignore[operator]
        raise InvalidRequestError(f"invalid {name}", expected=expected, got=repr(value)[:80])


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens.

    ``temperature == 0`` is greedy (exact argmax; ``top_k == 1`` is greedy too); ``top_k == 0``
    and ``top_p == 1`` switch those filters off; ``repetition_penalty`` follows transformers
    (a logit of a token already in the prompt or output is divided by it when positive,
    multiplied when not). ``seed`` makes sampling reproducible (``None``: fresh entropy): the row
    draws the same uniforms whatever shares its batch, so its tokens repeat exactly where its
    logits do (always on the CPU; on CUDA at batch 1, while fp16 kernels over several rows can
    round a logit differently from run to run, up to 3e-3 on the SmolLM2 shape, which moves a
    draw that falls where two tokens' cumulative probabilities meet).
    EOS and ``stop_token_ids`` cannot be sampled before ``min_new_tokens`` tokens. ``stop``
    strings end the request; the text is cut just before the first one (a lone string is
    accepted and wrapped in a tuple).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        # Every value is checked against what the sampler holds, greedy or not: a value that
        # float32 or int64 cannot hold faithfully is refused here, never rounded into another
        # meaning (a nonzero value that would underflow to 0, an overflow to inf, an integer
        # past int64).
        _check_real("temperature", self.temperature, 0.0, math.inf,
                    "a finite number >= 0 (0 = greedy) that float32 holds: 0 or in [1.2e-38, 3.4e+38]")
        _check_real("top_p", self.top_p, FLOAT32_TINY, 1.0,
                    "a number in (0, 1] (1 = off) that float32 holds: at least 1.2e-38")
        _check_real("min_p", self.min_p, 0.0, 1.0,
                    "a number in [0, 1] (0 = off) that float32 holds: 0 or at least 1.2e-38")
        for name in ("presence_penalty", "frequency_penalty"):
            _check_real(name, getattr(self, name), -2.0, 2.0,
                        "a number in [-2, 2] (0 = off) that float32 holds: 0 or a magnitude of at least 1.2e-38")
        low, high = REPETITION_PENALTY_RANGE
        _check_real("repetition_penalty", self.repetition_penalty, low, high,
                    f"a number in [{low:g}, {high:g}] (1 = off; float32 divides and multiplies logits by it, "
                    "and beyond these bounds a logit overflows)")
        _check_int("top_k", self.top_k, "an integer in [0, 2**63) (0 = off)")
        if self.seed is not None:
            _check_int("seed", self.seed, "None or an integer in [0, 2**63)")
        _check_int("min_new_tokens", self.min_new_tokens, "an integer in [0, 2**63)")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InvalidRequestError("invalid stop string", expected="non-empty strings", got=repr(s))
        for i in self.stop_token_ids:
            _check_int("stop token id", i, "integers in [0, 2**63)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def needs_candidates(self) -> bool:
        """True when the row reads sorted candidates (top-k or top-p); greedy, temperature and
        min-p rows need no sort."""
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0)

    @property
    def needs_penalties(self) -> bool:
        """True when the row's logits are penalized (repetition, presence or frequency)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


GREEDY = SamplingParams()


GENERATION_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
"""The sampling fields an artifact's ``generation_config.json`` may set defaults for (vLLM's
``--generation-config auto`` reads the same ones, and ``max_new_tokens``)."""


def generation_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """The defaults an artifact's generation config sets: those of :data:`GENERATION_DEFAULTS`
    present in it, each checked as :class:`SamplingParams` checks it, and ``max_new_tokens`` (an
    integer >= 1) when present. A value that fails its check is left out, with a warning: a
    default the server cannot honour must not refuse every request that omits the field."""
    out: dict[str, Any] = {}
    for name in GENERATION_DEFAULTS:
        if config.get(name) is None:
            continue
        try:
            SamplingParams(**{name: config[name]})
        except InvalidRequestError as exc:
            log.warning("generation_config.json: %s is not used as a default (%s)", name, exc)
            continue
        out[name] = config[name]
    limit = config.get("max_new_tokens")
    if limit is not None:
        if _is_int(limit) and 1 <= limit <= INT64_MAX:
            out["max_new_tokens"] = int(limit)
        else:
            log.warning("generation_config.json: max_new_tokens %r is not used (expected an integer >= 1)", limit)
    return out


Plan = tuple[int, int, int, int, int]  # host_values: (candidates, sampled, penalized, filtered, parted rows)

TOP_K_CANDIDATES = (64, 256)  # the smaller sorts a step takes when every sorted row sets top-k
PARTED_ABOVE = TOP_K_CANDIDATES[-1]  # more candidates than this are selected in parts of the row (CUDA steps)


def host_values(params: Sequence[SamplingParams], candidates: int) -> Plan:
    """The sampling nodes' host inputs for a run over rows with these parameters:
    ``(candidates, sampled_rows, penalized_rows, filtered_rows, parted_rows)``, in the order of
    :data:`runtime.sampler_graph.STEP_HOST_INPUTS` (the concat sampler reads the first three).

    A run where every row is greedy skips the draw (``sampled_rows = 0``), one where no row is
    penalized skips the penalties (``penalized_rows = 0``), one where no sampled row reads top-k,
    top-p or min-p skips their threshold (``filtered_rows = 0``: temperature-only sampling is a
    scale, an exp and the draw), and one where no row reads top-k / top-p sorts a single
    candidate: an all-greedy step pays for an ``ArgMax`` and little else.

    ``candidates`` is the bound for rows with top-p alone (their nucleus is exact when it lies
    within that many tokens). When every row that reads candidates sets ``top_k``, the step sorts
    only the first of :data:`TOP_K_CANDIDATES` that holds the largest ``top_k`` (64 for the usual
    top-k 40 or 50): exact, since top-p then renormalizes over the top-k survivors. onnxruntime's
    CUDA ``TopK`` has a fast path up to K = 256 and runs a radix select with one thread block a
    row beyond it, so more than :data:`PARTED_ABOVE` candidates are selected in parts of the row
    (``parted_rows``; :func:`runtime.sampler_graph.candidate_segments`, the same values): faster
    there, slower for 64 or 256 (docs/benchmarks.md, "GPU: what sampling costs").
    """
    sampled = [p for p in params if not p.greedy]
    sorting = [p for p in sampled if p.needs_candidates]
    k = 1
    if sorting:
        k = candidates
        if all(p.top_k > 0 for p in sorting):
            top = max(p.top_k for p in sorting)
            k = min(next((b for b in TOP_K_CANDIDATES if top <= b), candidates), candidates)
    filtered = any(p.needs_candidates or p.min_p > 0 for p in sampled)
    return (k, ALL_ROWS if sampled else 0, ALL_ROWS if any(p.needs_penalties for p in params) else 0,
            ALL_ROWS if filtered else 0, ALL_ROWS if filtered and k > PARTED_ABOVE else 0)


_NEUTRAL: dict[tuple[str, int, int], np.ndarray] = {}  # never evicted: few (vocab, steps) per process
_NEUTRAL_IDS: set[int] = set()


def neutral_row(name: str, vocab: int, steps: int) -> np.ndarray:
    """Row ``name`` of :data:`ROW_INPUTS` (vocabulary- or steps-wide) at its neutral value, shared and
    read-only: most requests change none of their wide rows, so :func:`row_arrays` hands out this
    one array instead of filling a new one (a 128K vocabulary makes each ~0.1-0.5 MB), and the
    backends recognise it by identity (:func:`is_neutral`) to skip comparing and copying it."""
    key = (name, int(vocab), int(steps))
    array = _NEUTRAL.get(key)
    if array is None:
        row = next(r for r in ROW_INPUTS if r.name == name)
        array = np.full([1, *(int(d) for d in row.dims(vocab, steps))], row.neutral, dtype=np.dtype(row.dtype))
        array.setflags(write=False)
        array = _NEUTRAL.setdefault(key, array)
        _NEUTRAL_IDS.add(id(array))
    return array


def is_neutral(array: object) -> bool:
    """Whether ``array`` is one of :func:`neutral_row`'s shared rows (then its values are the
    row's neutral ones: zeros for every wide row)."""
    return id(array) in _NEUTRAL_IDS  # (ids are stable: the shared rows are never freed)


def row_arrays(params: SamplingParams, prompt: Sequence[int], stop_ids: Sequence[int], vocab: int,
               steps: int, draws: int | None = None) -> dict[str, np.ndarray]:
    """One row's sampling inputs, each with a leading axis of 1 (see :mod:`runtime.sampler_graph`).

    ``prompt`` seeds the ``seen`` mask (the repetition penalty counts prompt tokens, as
    transformers does; presence/frequency penalties count generated tokens only, as OpenAI
    does); ``stop_ids`` are the ids masked before ``min_new_tokens``; the uniforms are drawn
    from the row's own ``numpy.random.default_rng(seed)`` stream, so a row's samples do not
    depend on which rows share its batch. ``steps`` is the width of the uniforms' row; only its
    first ``draws`` (default: all) are drawn, the rest stay zero and are never read
    (``last_step`` is ``draws − 1``, and the samplers read column ``min(step, last_step)``): a
    request of ``n`` new tokens needs ``n``, and drawing the stream's first ``n`` gives the same
    values as drawing ``steps`` and keeping ``n``. ``draws=0`` (a greedy row, which reads no
    uniform) draws none. A wide row this request leaves neutral is :func:`neutral_row`'s shared,
    read-only array.
    """
    rows = {row.name: neutral_row(row.name, vocab, steps) if row.width else
            np.full([1], getattr(params, row.param) if row.param else row.neutral, dtype=np.dtype(row.dtype))
            for row in ROW_INPUTS}
    if params.repetition_penalty != 1.0:
        rows["seen"] = rows["seen"].copy()
        rows["seen"][0, np.asarray(prompt, dtype=np.int64)] = True
    if params.min_new_tokens > 0 and len(stop_ids):
        rows["stop_mask"] = rows["stop_mask"].copy()
        rows["stop_mask"][0, np.asarray(list(stop_ids), dtype=np.int64)] = True
    drawn = steps if draws is None else max(0, min(int(draws), steps))
    if drawn:
        rows["uniforms"] = np.zeros([1, steps], np.float32)
        rows["uniforms"][0, :drawn] = np.random.default_rng(params.seed).random(drawn, dtype=np.float32)
    rows["last_step"][0] = max(drawn - 1, 0)
    return rows


def checked_row(arrays: Mapping[str, np.ndarray],
                layout: Mapping[str, tuple[str, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    """One request's row arrays (:func:`row_arrays`) checked against what a backend's sampler
    reads: ``layout`` maps each input to its dtype name and the shape of one row. Each array is
    cast to its dtype with a leading axis of 1; an input that is missing, of another shape, or a
    float that is not finite (a value float32 could not hold) raises :class:`GenerationError`
    for this request alone, before anything of it is written to the device."""
    out = {}
    for name, (dtype, shape) in layout.items():
        value = arrays.get(name)
        if isinstance(value, np.ndarray) and value.dtype == dtype and value.shape == (1, *shape) and (
                value.dtype.kind != "f" or is_neutral(value)
                or (math.isfinite(value.item()) if value.size == 1 else bool(np.isfinite(value).all()))):
            out[name] = value  # already of the sampler's dtype and finite (row_arrays' arrays are)
            continue
        if value is None or tuple(np.shape(value)) != (1, *shape):
            raise GenerationError(f"the sampling input {name!r} does not fit the sampler",
                                  expected=f"shape {[1, *shape]}", got=repr(None if value is None else np.shape(value)))
        with np.errstate(over="ignore", invalid="ignore"):
            cast = np.asarray(value).astype(dtype, copy=False)
        if cast.dtype.kind == "f" and not np.isfinite(cast).all():
            raise GenerationError(f"the sampling input {name!r} is not finite in {dtype}",
                                  got=repr(np.asarray(value).reshape(-1)[:4].tolist()))
        if cast.dtype.kind in "iu" and not np.array_equal(cast, value):
            raise GenerationError(f"the sampling input {name!r} does not fit {dtype}",
                                  got=repr(np.asarray(value).reshape(-1)[:4].tolist()))
        out[name] = cast
    return out


def stack_rows(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Rows of :func:`row_arrays` stacked into batch arrays."""
    return {name: np.concatenate([r[name] for r in rows], axis=0) for name in rows[0]}


class Sampler:
    """The sampler graph as a standalone session (CPU or CUDA), for logits already at hand."""

    def __init__(self, logits_dtype: str = "float32", providers: Sequence[str] = ("CPUExecutionProvider",),
                 candidates: int = BOUNDED_CANDIDATES, segments: int = 1):
        self.logits_dtype = logits_dtype
        self.segments = segments  # the candidates' selection in parts (runtime.sampler_graph._largest)
        self.providers = list(providers)
        self.candidates = candidates
        self._sessions: dict[int, ort.InferenceSession] = {}

    def session(self, vocab: int) -> ort.InferenceSession:
        """The sampler session for ``vocab`` (built once, cached)."""
        if vocab not in self._sessions:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            model = build_sampler_model(self.logits_dtype, vocab, segments=self.segments)
            self._sessions[vocab] = ort.InferenceSession(model, sess_options=options, providers=self.providers)
        return self._sessions[vocab]

    def sample(
        self,
        logits: np.ndarray,
        params: Sequence[SamplingParams],
        step: int = 0,
        seen: np.ndarray | None = None,
        stop_ids: Sequence[Sequence[int]] | None = None,
        steps: int | None = None,
        counts: np.ndarray | None = None,
    ) -> np.ndarray:
        """Next token ids ``[batch]`` for ``logits [batch, vocab]`` (or ``[batch, seq, vocab]``).

        ``step`` picks the uniform from each row's seeded stream (so calling with step 0, 1, …
        reproduces an engine run); ``seen`` is the ``[batch, vocab]`` repetition-penalty mask and
        ``counts`` the generated-token counts of the presence/frequency penalties.
        """
        if logits.ndim == 2:
            logits = logits[:, None, :]
        batch, _, vocab = logits.shape
        if len(params) != batch:
            raise InvalidRequestError("sampler: one SamplingParams per row", expected=str(batch), got=str(len(params)))
        steps = steps or step + 1
        stops = stop_ids or [[] for _ in params]
        feeds = stack_rows([row_arrays(p, [], s, vocab, steps) for p, s in zip(params, stops)])
        if seen is not None:
            feeds["seen"] = np.asarray(seen, dtype=np.bool_)
        if counts is not None:
            feeds["counts"] = np.asarray(counts, dtype=np.float32)
        feeds["step"] = np.full(batch, step, dtype=np.int64)
        feeds["logits"] = np.asarray(logits, dtype=self.logits_dtype)
        feeds["attention_mask"] = np.ones((batch, 1), dtype=np.int64)
        values = host_values(params, min(self.candidates, vocab))
        feeds.update({name: np.array([v], dtype=np.int64) for name, v in zip(HOST_INPUTS, values[:len(HOST_INPUTS)])})
        (ids,) = self.session(vocab).run(["next_ids"], feeds)
        return ids.reshape(-1)
