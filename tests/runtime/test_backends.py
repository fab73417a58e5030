"""The two KV backends on CPU: the slots backend (``shared-buffer`` artifacts: fixed rows updated
in place by GroupQueryAttention, the sampling inside the step model, ids read back per block)
gives the concat backend's greedy tokens and logits, for any arrival pattern, block length and
prefill chunking; and each backend's own invariants."""

from __future__ import annotations

import mmap
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from runtime import Engine, EngineOptions, SamplingParams
from runtime.errors import GenerationError, InvalidRequestError
from runtime.kv_concat import ConcatBackend
from runtime.kv_slots import SlotsBackend, padded_length, prefill_groups
from runtime.options import CUDA_PREFILL_TOKENS
from runtime.sampler_graph import ALL_ROWS
from runtime.sampling import host_values


@pytest.fixture(scope="module")
def pair(artifact_cache: Callable[[str], Path], shared_path: Path):  # type: ignore[no-untyped-def]
    concat, slots = Engine.load(artifact_cache("tiny:llama")), Engine.load(shared_path)
    yield concat, slots
    concat.close()
    slots.close()


def _prompts(n: int = 4, seed: int = 7) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 300, int(k)).tolist() for k in rng.integers(2, 14, n)]


def test_loads_the_backend_the_manifest_names(pair) -> None:  # type: ignore[no-untyped-def]
    concat, slots = pair
    assert isinstance(concat.backend, ConcatBackend) and isinstance(slots.backend, SlotsBackend)
    assert concat.stats().backend == "concat" and slots.stats().backend == "slots"


@pytest.mark.parametrize("n", [1, 3, 9])
def test_greedy_tokens_match_concat(pair, n: int) -> None:  # type: ignore[no-untyped-def]
    concat, slots = pair
    prompts = _prompts(n, seed=n)
    want = [concat.generate_ids([p], 12)[0] for p in prompts]  # each alone
    assert concat.generate_ids(prompts, 12) == want  # together, regrouped on the device
    assert slots.generate_ids(prompts, 12) == want


def test_rows_finishing_at_different_steps_match(pair) -> None:  # type: ignore[no-untyped-def]
    """Each row stops on a token it produces at its own step: rows leave, others keep going."""
    concat, slots = pair
    prompts = _prompts(5, seed=11)
    full = concat.generate_ids(prompts, 16)
    params = [SamplingParams(stop_token_ids=(ids[k],)) for ids, k in zip(full, (1, 4, 7, 10, 15))]
    want = [ids[: ids.index(p.stop_token_ids[0]) + 1] for ids, p in zip(full, params)]
    for engine in pair:
        assert engine.generate_ids(prompts, 16, params) == want


def test_logits_match_concat(pair) -> None:  # type: ignore[no-untyped-def]
    concat, slots = pair
    prompts = _prompts(3, seed=3)
    a = concat.generate_results(prompts, 6, return_logits=True)
    b = slots.generate_results(prompts, 6, return_logits=True)
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        assert x.step_logits is not None and y.step_logits is not None
        assert x.step_logits.shape == (len(x.token_ids), concat.vocab)
        np.testing.assert_allclose(x.step_logits, y.step_logits, atol=1e-4)


def test_sampled_rows_match_across_backends_and_batches(pair) -> None:  # type: ignore[no-untyped-def]
    """The same seeded sampling step in both backends: per-row uniforms, per-row parameters."""
    concat, slots = pair
    prompts = _prompts(4, seed=5)
    params = [
        SamplingParams(temperature=0.9, seed=1),
        SamplingParams(),
        SamplingParams(temperature=1.3, top_k=20, seed=2),
        SamplingParams(temperature=0.8, top_p=0.7, min_p=0.05, presence_penalty=0.5, seed=3),
    ]
    alone = [concat.generate_ids([p], 10, s)[0] for p, s in zip(prompts, params)]
    assert concat.generate_ids(prompts, 10, params) == alone
    assert slots.generate_ids(prompts, 10, params) == alone


def test_skipping_the_threshold_changes_no_draw(pair) -> None:  # type: ignore[no-untyped-def]
    """Temperature-only rows draw the same tokens whether their step skips the top-k / top-p /
    min-p threshold (``filtered_rows`` = 0: no row of the run filters) or runs it on every row
    (a top-p or min-p row shares the batch); and the same as the concat sampler, which has no
    such switch."""
    concat, slots = pair
    prompts = _prompts(3, seed=41)
    temp = SamplingParams(temperature=0.9, seed=7)
    assert host_values([temp], 1024)[3] == 0
    alone = [slots.generate_ids([p], 10, temp)[0] for p in prompts]
    assert alone == [concat.generate_ids([p], 10, temp)[0] for p in prompts]
    others = (SamplingParams(temperature=1.0, top_p=0.5, seed=8), SamplingParams(temperature=1.0, min_p=0.2, seed=9))
    for other in others:
        assert host_values([temp, other], 1024)[3] == ALL_ROWS
        assert slots.generate_ids(prompts + [prompts[0]], 10, [temp] * 3 + [other])[:3] == alone


@pytest.mark.parametrize("read_every", [1, 3, 32])
def test_read_every_does_not_change_tokens(pair, shared_path: Path, read_every: int) -> None:  # type: ignore[no-untyped-def]
    """Ids come back once per block; rows stopping inside a block ignore the rest of it."""
    concat, _ = pair
    prompts = _prompts(4, seed=9)
    full = concat.generate_ids(prompts, 20)
    params = [SamplingParams(stop_token_ids=(ids[k],)) for ids, k in zip(full, (2, 5, 13, 19))]
    want = concat.generate_ids(prompts, 20, params)
    with Engine.load(shared_path, read_every=read_every) as engine:
        assert engine.generate_ids(prompts, 20, params) == want
        assert engine.generate_ids(prompts, 20) == full
    with pytest.raises(GenerationError, match="read_every"):
        Engine.load(shared_path, read_every=0)
    with pytest.raises(GenerationError, match="read_every=33 exceeds the step model's id history of 32"):
        Engine.load(shared_path, read_every=33)


def test_chunked_prefill_equals_one_run(pair, shared_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A prompt longer than ``prefill_chunk`` runs in chunks (batch 1 with past) into its slot."""
    _, slots = pair
    prompts = _prompts(3, seed=4) + [list(range(10, 47))]
    want = slots.generate_results(prompts, 8, return_logits=True)
    artifact = slots.artifact
    engine = Engine(artifact, options=EngineOptions(prefill_chunk=5))
    try:
        got = engine.generate_results(prompts, 8, return_logits=True)
    finally:
        engine.close()
    for a, b in zip(want, got):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.step_logits, b.step_logits, atol=1e-4)  # type: ignore[arg-type]


def test_new_requests_prefill_together_right_padded(pair, shared_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Requests admitted together prefill in one run, right-padded to the longest prompt; each
    row samples at its own last token, so tokens, logits and seeded samples are each request's
    alone — also padded to CUDA's length buckets (forced here on the CPU), and also when the
    token budget splits them into several runs or a long prompt runs alone in chunks."""
    concat, _ = pair
    prompts = _prompts(6, seed=31) + [list(range(10, 47))]
    assert len({len(p) for p in prompts}) >= 5
    params = [SamplingParams(temperature=0.9, top_p=0.8, seed=i) if i % 2 else SamplingParams() for i in range(7)]
    alone = [concat.generate_results([p], 8, s, return_logits=True)[0] for p, s in zip(prompts, params)]

    def check(engine: Engine, runs: int) -> None:
        backend: SlotsBackend = engine.backend  # type: ignore[assignment]
        before = backend.prefill_runs
        got = engine.generate_results(prompts, 8, params, return_logits=True)
        assert backend.prefill_runs - before == runs
        for a, b in zip(alone, got):
            assert a.token_ids == b.token_ids
            np.testing.assert_allclose(a.step_logits, b.step_logits, atol=1e-4)  # type: ignore[arg-type]

    with Engine.load(shared_path, max_batch=8) as engine:
        check(engine, 1)
        capacity = engine.backend.capacity
        engine.backend.padded = lambda n: min(padded_length(n), capacity)  # type: ignore[method-assign]
        check(engine, 1)
    with Engine.load(shared_path, max_batch=8, prefill_chunk=24) as engine:
        check(engine, 4)  # lengths 2, 7, 8 | 8, 10 | 12 (each run ≤ 24 tokens) | 37 alone, in chunks


@pytest.mark.parametrize("kind", ["concat", "slots"])
def test_admission_can_take_a_prompt_token_budget_per_step_boundary(artifact_cache, shared_path: Path,  # type: ignore[no-untyped-def]
                                                                  kind: str) -> None:
    """On the CPU by default (and with ``prefill_tokens=0`` anywhere) every waiting request a free
    slot takes is admitted at one boundary; with ``prefill_tokens`` they are admitted that many
    prompt tokens at a time, with a decode step of the running ones between two admissions (they
    wait for one budget, not for every prefill); a prompt longer than the budget is admitted
    alone. Tokens are each request's alone."""
    path = artifact_cache("tiny:llama") if kind == "concat" else shared_path
    prompts = [list(range(5, 5 + n)) for n in (6, 7, 6, 20, 5, 6)]
    with Engine.load(path, max_batch=8) as engine:
        want = [engine.generate_ids([p], 6)[0] for p in prompts]

    def admissions(budget: int | None) -> list[tuple[list[int], int]]:
        calls: list[tuple[list[int], int]] = []
        with Engine.load(path, max_batch=8, prefill_tokens=budget) as engine:
            prefill = engine.backend.prefill_many

            def spy(admitted, *args):  # type: ignore[no-untyped-def]
                calls.append((sorted(len(p) for _, p, _ in admitted), engine.steps))
                prefill(admitted, *args)

            engine.backend.prefill_many = spy  # type: ignore[method-assign]
            assert engine.generate_ids(prompts, 6) == want
        return calls

    assert admissions(None) == [([5, 6, 6, 6, 7, 20], 0)]
    assert admissions(0) == [([5, 6, 6, 6, 7, 20], 0)]
    calls = admissions(14)
    assert [lengths for lengths, _ in calls] == [[6, 7], [6], [20], [5, 6]]
    steps = [step for _, step in calls]
    assert steps == sorted(steps) and len(set(steps)) == len(steps), steps  # a decode step between admissions


def test_each_prefill_run_starts_its_requests_before_the_next_run(shared_path: Path) -> None:
    """An admission that takes several prefill runs hands each run's requests their first token
    as soon as that run ends (they need not wait for the admission's last prompt); when a later
    run fails, only its requests fail — the earlier ones finish with their own tokens — and the
    engine keeps serving."""
    prompts = [list(range(5, 5 + n)) for n in (6, 7, 9, 10)]
    with Engine.load(shared_path, max_batch=8) as engine:
        want = [engine.generate_ids([p], 6)[0] for p in prompts]
    with Engine.load(shared_path, max_batch=8, prefill_chunk=16) as engine:
        backend: SlotsBackend = engine.backend  # type: ignore[assignment]
        run = backend._prefill_group
        seen: list[tuple[list[int], list[int]]] = []  # (this run's lengths, first tokens already out)

        def spy(group, *args):  # type: ignore[no-untyped-def]
            seen.append(([len(p) for _, p, _ in group], sorted(len(live.request.prompt_ids)
                                                               for live in engine._live.values() if live.new_ids)))
            return run(group, *args)

        backend._prefill_group = spy  # type: ignore[method-assign]
        assert engine.generate_ids(prompts, 6) == want
        assert seen == [([6, 7], []), ([9], [6, 7]), ([10], [6, 7, 9])]

        def fail_long(group, *args):  # type: ignore[no-untyped-def]
            if any(len(p) >= 9 for _, p, _ in group):
                raise GenerationError("planted prefill failure")
            return run(group, *args)

        backend._prefill_group = fail_long  # type: ignore[method-assign]
        requests = engine._submit_all(prompts, 6, None, False)  # one admission, as generate_* queues them
        outcomes: list[object] = []
        for request in requests:
            try:
                outcomes.append(list(request.result().token_ids))
            except GenerationError as exc:
                outcomes.append(str(exc))
        assert outcomes[:2] == want[:2]  # their run came first and went through
        assert all("planted prefill failure" in str(o) for o in outcomes[2:])
        backend._prefill_group = run  # type: ignore[method-assign]
        assert engine.generate_ids(prompts, 6) == want  # the loop kept serving; every slot is free again
        assert backend.free_slots == 8


def test_prefill_groups() -> None:
    """Consecutive slots group within the token budget; CUDA splits groups into powers of two."""
    same = lambda n: n  # noqa: E731
    assert prefill_groups([(0, 5), (1, 7), (2, 9), (4, 3), (5, 40), (6, 2)], 32, same) == [[0, 1, 2], [4], [5], [6]]
    assert prefill_groups([(2, 4), (0, 4), (1, 4)], 8, same) == [[0, 1], [2]]
    assert prefill_groups([(i, 100) for i in range(13)], 1024, padded_length, powers_of_two=True) == [
        list(range(8)), list(range(8, 12)), [12]]
    assert [padded_length(n) for n in (1, 16, 17, 33, 65, 97, 129, 193, 300, 513, 1025)] == [
        16, 16, 32, 64, 96, 128, 192, 256, 384, 768, 1536]


def test_min_new_tokens_boundary_in_the_step_model(pair) -> None:  # type: ignore[no-untyped-def]
    """A stop id the row would pick at step k is masked while fewer than ``min_new_tokens = k``
    tokens exist, and allowed at step k — checked on the slots step model itself (the fused
    graph), against what the row picks without the rule."""
    concat, slots = pair
    checked = 0
    for seed in range(30):
        prompt = _prompts(1, seed=100 + seed)[0]
        free = concat.generate_ids([prompt], 12)[0]
        for k in range(1, 10):
            stop = free[k]
            if stop in free[:k]:
                continue  # the stop id appears earlier too; the boundary is not at step k
            held = slots.generate_results([prompt], 12, SamplingParams(stop_token_ids=(stop,), min_new_tokens=k))[0]
            assert held.token_ids == tuple(free[:k + 1])  # allowed at step k: stops there
            early = slots.generate_results(
                [prompt], 12, SamplingParams(stop_token_ids=(stop,), min_new_tokens=k + 1)
            )[0]
            assert early.token_ids[:k] == tuple(free[:k]) and early.token_ids[k] != stop  # masked at step k
            checked += 1
            break
        if checked >= 3:
            break
    assert checked >= 3, "no prompt gave a new token to stop on"


def test_slots_are_reused_and_rows_beyond_the_pool_wait(shared_path: Path) -> None:
    """More requests than rows: they queue and take the rows others free; results are the
    ones each request gets alone."""
    with Engine.load(shared_path, max_batch=2) as engine:
        prompts = _prompts(7, seed=13)
        alone = [engine.generate_ids([p], 9)[0] for p in prompts]
        assert engine.generate_ids(prompts, 9) == alone
        assert engine.backend.free_slots == 2


def test_the_slots_backend_runs_one_session_and_writes_rows_without_another(shared_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The decoder's is the only onnxruntime session a slots engine opens, and a new request's
    sampling constants land in its own row only: on CUDA, a second session writing rows into the
    decoder's buffers slowed every replay of the captured step by 14 % (issue #11)."""
    import onnxruntime as ort

    opened: list[object] = []
    real = ort.InferenceSession

    class Counting(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            opened.append(args[0] if isinstance(args[0], str) else "bytes")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", Counting)
    with Engine.load(shared_path, max_batch=3) as engine:
        greedy, hot = SamplingParams(), SamplingParams(temperature=0.7, top_k=5, seed=3, min_new_tokens=2)
        engine.generate_results([[5, 6, 7], [8, 9]], 4, [greedy, hot])
        read = lambda: {name.removeprefix("lmforge_step."): value.numpy()  # noqa: E731
                        for name, value in engine.backend.consts.items()}
        consts = read()
        hot_row = int(np.argmax(consts["temperature"]))  # slots go in prompt-length order
        rows = [hot_row, 1 - hot_row, 2]
        assert consts["temperature"][rows].tolist() == pytest.approx([0.7, 0.0, 0.0])
        assert consts["top_k"][rows].tolist() == [5, 0, 0]
        assert consts["min_new_tokens"][rows].tolist() == [2, 0, 0]
        assert [bool(consts["stop_mask"][r].any()) for r in rows] == [True, False, False]
        assert consts["last_position"][rows].tolist() == [engine.max_context - 1] * 2 + [0]  # row 2 never used
        # the next request in the sampled one's row gets its own constants, none of the old ones
        engine.generate_results([[4] * 5, [5] * 6, [6] * 7], 2, [greedy] * 3)
        consts = read()
        assert consts["temperature"].tolist() == [0.0] * 3 and consts["top_k"].tolist() == [0] * 3
        assert not consts["stop_mask"].any() and consts["min_new_tokens"].tolist() == [0] * 3
    assert len(opened) == 1, opened


def _mapping_of(address: int) -> dict[str, str]:
    """The ``/proc/self/smaps`` entry of the mapping that holds ``address`` (``start``: where it begins)."""
    entry: dict[str, str] = {}
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start <= address < end
            if inside:
                entry = {"start": str(start)}
        elif inside:
            key, _, value = line.partition(":")
            entry[key] = value.strip()
    return entry


def _resident_pages(address: int, nbytes: int) -> int:
    """How many base pages of ``[address, address + nbytes)`` are in memory or swapped out,
    read from ``/proc/self/pagemap`` (bit 63: present, bit 62: swapped)."""
    page = mmap.PAGESIZE
    first, last = address // page, (address + nbytes - 1) // page
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(first * 8)
        entries = pagemap.read((last - first + 1) * 8)
    flags = (int.from_bytes(entries[i : i + 8], "little") for i in range(0, len(entries), 8))
    return sum(1 for entry in flags if entry >> 62)


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads Linux's /proc/self/smaps")
def test_the_cpu_kv_pool_takes_memory_as_positions_are_written(shared_path: Path) -> None:
    """The pool is in base pages: a request costs the pages its positions fill, not a 2 MiB
    transparent huge page per head and layer (numpy's allocator asks for those from 4 MiB up,
    which made each prefilled row cost about two thirds of its whole-context KV)."""
    with Engine.load(shared_path, max_batch=4) as engine:
        engine.generate_ids([[5, 6, 7, 8, 9]], 4)
        buffers = engine.backend.kv
        assert all(value.numpy().shape[0] == 4 for value in buffers.values())
        mappings = {m["start"]: m for m in (_mapping_of(value.data_ptr()) for value in buffers.values())}
        for mapping in mappings.values():  # (the kernel may merge neighbouring buffers into one)
            assert "nh" in mapping["VmFlags"].split(), mapping["VmFlags"]  # MADV_NOHUGEPAGE
        # counted over the buffers' own pages: a mapping the kernel merged with a neighbour
        # (an earlier engine's pool, with the same flags) would count that neighbour's pages too
        resident = sum(_resident_pages(value.data_ptr(), value.numpy().nbytes) for value in buffers.values())
        # 9 positions of one row: one 4 KiB page a head in each buffer (and pages were read: > 0)
        assert 0 < resident <= engine.io.kv_heads * len(buffers), resident


def test_fp32_shared_buffer_refused_on_cuda_before_loading(shared_path: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(shared_path, copy)
    with pytest.raises(GenerationError, match="cuda_graph=True needs device='cuda'"):
        Engine.load(copy, cuda_graph=True)


def test_threads_share_the_slots(shared_path: Path) -> None:
    with Engine.load(shared_path, max_batch=4) as engine:
        prompts = _prompts(12, seed=17)
        alone = [engine.generate_ids([p], 10)[0] for p in prompts]
        got: dict[int, list[int]] = {}

        def run(i: int) -> None:
            got[i] = engine.generate_ids([prompts[i]], 10)[0]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [got[i] for i in range(len(prompts))] == alone


def test_an_interrupted_block_returns_the_steps_it_ran(pair) -> None:  # type: ignore[no-untyped-def]
    """``decode(..., interrupt=...)`` ends the block after the step where ``interrupt`` says so;
    the ids it returns are the first ones of the uninterrupted block."""
    _, slots = pair
    backend: SlotsBackend = slots.backend
    prompt = _prompts(1, seed=21)[0]
    with slots._cv:  # the loop is idle between requests; these runs hold its backend briefly
        plan = slots._plan([])
        slot = backend.allocate()
        try:
            firsts: dict[int, tuple[int, object]] = {}
            backend.prefill_many([(slot, prompt, _rows(slots, prompt))], False, plan, firsts.update)
            (first, _), = firsts.values()
            calls = []
            ids, _ = backend.decode_block(slot + 1, 8, {slot: 1}, False, plan,
                                          interrupt=lambda: calls.append(1) or len(calls) == 3)
        finally:
            backend.release(slot)
    assert len(calls) == 3 and len(ids[slot]) == 3
    assert [first, *ids[slot]] == slots.generate_ids([prompt], 4)[0]


def _rows(engine: Engine, prompt: list[int]) -> dict[str, np.ndarray]:
    from runtime.sampling import GREEDY, row_arrays

    return row_arrays(GREEDY, prompt, sorted(engine.eos_token_ids), engine.vocab, engine.max_context)


def test_a_request_arriving_inside_a_block_is_admitted_after_one_step(shared_path: Path) -> None:
    """A arrives alone and decodes in blocks of 32; B is submitted from inside A's second block
    (deterministically: from the loop's own between-steps check). A's block ends at once, B's
    first token comes before A's next block (by the loop's event stamps, not by which reader
    thread woke first), and both get the tokens they get alone."""
    engine = Engine.load(shared_path, read_every=32)
    try:
        a_prompt, b_prompt = _prompts(2, seed=33)
        a_alone = engine.generate_ids([a_prompt], 80)[0]
        b_alone = engine.generate_ids([b_prompt], 6)[0]
        real = engine._admissible
        calls = {"n": 0}
        late: list = []

        def admissible() -> bool:
            calls["n"] += 1
            if calls["n"] == 31 + 2:  # block 1 asks after 31 of its 32 steps; then A's second block, step 2
                late.append(engine.submit(b_prompt, 6))
            return real()

        engine._admissible = admissible  # type: ignore[method-assign]
        a = engine.submit(a_prompt, 80)
        a_events = [(len(event.token_ids), event.time) for event in a]
        b_events = [(len(event.token_ids), event.time) for event in late[0]]  # B ended first: all queued
        assert a.result().token_ids == tuple(a_alone)
        assert late[0].result().token_ids == tuple(b_alone)
        sizes = [n for n, _ in a_events]
        assert sizes[:3] == [1, 32, 2], sizes  # the prefill's token; a full block; the block B cut after 2 steps
        # the loop stamps events as it makes them: A's cut block, B's prefill, then A's next block
        assert a_events[2][1] <= b_events[0][1] <= a_events[3][1], (a_events, b_events[0])
    finally:
        engine.close()


@pytest.fixture(scope="module", params=[False, True], ids=["eager-prefill", "graph-prefill-path"])
def ahead(shared_path: Path, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """A slots engine that launches each block's first step ahead (the CUDA default) on the CPU;
    and the same with CUDA's one-row prefill path (fixed buffers; an idle engine's prefills into
    the first state set, whatever set a step launched ahead left current), without the graphs."""
    with Engine.load(shared_path, max_batch=6, read_every=4) as engine:
        engine.launch_ahead = True
        engine.backend.graph_prefill = request.param
        yield engine


def test_launching_ahead_changes_no_token(pair, ahead) -> None:  # type: ignore[no-untyped-def]
    """With the next block's first step launched before the host reads the last one: the same
    greedy and seeded tokens as the concat backend, rows stopping inside a block (on a stop id,
    on their length) with their step ahead ignored, and logits asked for by a request admitted
    after a step was launched ahead."""
    concat, _ = pair
    prompts = _prompts(6, seed=61)
    full = concat.generate_ids(prompts, 14)
    params = [SamplingParams(stop_token_ids=(ids[k],)) for ids, k in zip(full, (0, 2, 3, 4, 7, 13))]
    want = [ids[: ids.index(p.stop_token_ids[0]) + 1] for ids, p in zip(full, params)]
    before = ahead.backend.replays
    assert ahead.generate_ids(prompts, 14, params) == want
    assert ahead.generate_ids(prompts, 14) == full
    assert [ahead.generate_ids([p], n)[0] for p, n in zip(prompts, (1, 2, 4, 5, 9, 14))] == [
        ids[:n] for ids, n in zip(full, (1, 2, 4, 5, 9, 14))]
    sampled = [SamplingParams(temperature=0.9, seed=i, top_k=(0, 20)[i % 2]) for i in range(6)]
    alone = [concat.generate_ids([p], 11, s)[0] for p, s in zip(prompts, sampled)]
    assert ahead.generate_ids(prompts, 11, sampled) == alone
    assert ahead.backend.replays > before
    logits = concat.generate_results(prompts[:2], 5, return_logits=True)
    got = ahead.generate_results(prompts[:2], 5, return_logits=True)
    for x, y in zip(logits, got):
        assert x.token_ids == y.token_ids and y.step_logits is not None and x.step_logits is not None
        np.testing.assert_allclose(x.step_logits, y.step_logits, atol=1e-4)


def test_launching_ahead_with_threads_arriving_and_leaving(pair, ahead) -> None:  # type: ignore[no-untyped-def]
    """Requests arriving while others decode (slots freed by a stop and taken by a newcomer
    between a step launched ahead and its block), some cancelled: every finished one has its
    tokens alone, and the engine serves on."""
    concat, _ = pair
    prompts = _prompts(18, seed=67)
    lengths = [3 + (i * 5) % 13 for i in range(18)]
    want = [concat.generate_ids([p], n)[0] for p, n in zip(prompts, lengths)]
    got: dict[int, list[int]] = {}

    def run(i: int) -> None:
        if i % 7 == 3:  # cancelled after its first event
            request = ahead.submit(prompts[i], 30)
            next(iter(request))
            request.cancel()
            return
        got[i] = ahead.generate_ids([prompts[i]], lengths[i])[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(18)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {i: got[i] for i in sorted(got)} == {i: want[i] for i in range(18) if i % 7 != 3}
    assert ahead.generate_ids(prompts[:2], 6) == [w[:6] for w in concat.generate_ids(prompts[:2], 6)]


def test_a_slot_freed_after_a_step_ahead_serves_its_next_request(pair, ahead) -> None:  # type: ignore[no-untyped-def]
    """Twelve requests on six slots, each stopping on a stop id inside a block: the step launched
    ahead ran for rows whose request then stopped, and the waiting requests that take those slots
    get none of its tokens. A long request reads its ids correctly across many blocks, and the
    step ahead is a block's first step, not an extra one."""
    concat, _ = pair
    prompts = _prompts(12, seed=71)
    full = concat.generate_ids(prompts, 12)
    params = [SamplingParams(stop_token_ids=(ids[k],)) for ids, k in zip(full, (1, 2, 5, 6, 9, 10) * 2)]
    want = [ids[: ids.index(p.stop_token_ids[0]) + 1] for ids, p in zip(full, params)]
    assert ahead.generate_ids(prompts, 12, params) == want
    long = concat.generate_ids(prompts[:1], 80)
    before = ahead.backend.replays
    # a wrong count of the step ahead makes the loop read behind the device; fail, do not hang
    assert list(ahead.submit(prompts[0], 80).result(timeout=120).token_ids) == long[0]
    assert ahead.backend.replays - before == 79  # one step a token after the first, none wasted
    graphs = ahead.backend.graph_prefills
    for n in (80, 79, 80, 79):  # each request leaves the other state set current; the next, idle, prefills into set 0
        assert list(ahead.submit(prompts[0], n).result(timeout=120).token_ids) == long[0][:n]
    # (the 80-token request above was the prompt's first sighting: all four take the fixed-buffer path)
    assert ahead.backend.graph_prefills - graphs == (4 if ahead.backend.graph_prefill else 0)


def test_a_request_that_exactly_fills_the_context_runs(pair) -> None:  # type: ignore[no-untyped-def]
    """prompt + max_new_tokens == the context is accepted and runs to its last token on both
    backends, with the same tokens (the slots backend's last positions are its buffers' last
    rows); one token more is refused before it takes a slot."""
    tokens = []
    for engine in pair:
        ctx = engine.max_context
        prompt = _prompts(1, seed=5)[0] * ctx
        prompt = prompt[:ctx - 12]
        result = engine.submit(prompt, 12, SamplingParams(min_new_tokens=12)).result(timeout=60)
        assert result.new_tokens == 12 and result.prompt_tokens + result.new_tokens == ctx
        tokens.append(result.token_ids)
        with pytest.raises(GenerationError, match="prompt \\+ max_new_tokens exceeds the context"):
            engine.submit(prompt, 13)
        with pytest.raises(GenerationError, match="exceeds the context"):
            engine.submit(prompt + [5], 12)
    assert tokens[0] == tokens[1]


def test_write_rows_copies_only_the_rows_named() -> None:
    """``Device.write_rows`` copies the named rows (runs of consecutive ones together) into the
    tensor in place and leaves the others as they were."""
    from runtime.device import Device

    device = Device("cpu")
    for dtype in (np.float32, np.bool_, np.int64):
        value = device.put(np.zeros([6, 5], dtype))
        host = (np.arange(30).reshape(6, 5) % 3).astype(dtype) + np.ones([6, 5], dtype)
        device.write_rows(value, host, [4, 1, 2])
        got = value.numpy()
        np.testing.assert_array_equal(got[[1, 2, 4]], host[[1, 2, 4]])
        assert not got[[0, 3, 5]].any()


def test_the_device_constants_follow_every_admission(shared_path: Path) -> None:
    """After admissions that change some rows' sampling constants (penalties, a stop mask, drawn
    uniforms) and then put greedy requests in the same slots, every constant on the device equals
    the backend's host copy: only changed rows are copied, and a row going back to the shared
    neutral values is copied too."""
    with Engine.load(shared_path, max_batch=3) as engine:
        backend = engine.backend
        assert isinstance(backend, SlotsBackend)
        prompts = _prompts(3, seed=5)
        mixes = [[SamplingParams(repetition_penalty=1.2, min_new_tokens=3, temperature=0.8, seed=s) for s in range(3)],
                 [SamplingParams()] * 3,
                 [SamplingParams(temperature=0.7, top_p=0.9, seed=9), SamplingParams(),
                  SamplingParams(min_new_tokens=2)]]
        for params in mixes:
            engine.generate_ids(prompts, 4, params)
            for name, value in backend.consts.items():
                np.testing.assert_array_equal(value.numpy(), backend._consts_host[name], err_msg=name)
            assert any(backend._consts_host[name].any() for name in backend.consts)  # a check that can fail


def test_the_prefill_budget_defaults_to_one_on_cuda_and_none_on_the_cpu() -> None:
    """``EngineOptions.prefill_tokens``: None is the device's default (a budget on CUDA, none on the
    CPU), 0 is no budget anywhere, N is N; anything else is refused in one line."""
    assert EngineOptions().prefill_budget("cuda") == CUDA_PREFILL_TOKENS > 0
    assert EngineOptions().prefill_budget("cpu") is None
    assert EngineOptions(prefill_tokens=0).prefill_budget("cuda") is None
    assert EngineOptions(prefill_tokens=np.int64(512)).prefill_budget("cpu") == 512
    for bad in (-1, True, 1.5, "8"):
        with pytest.raises(InvalidRequestError, match="invalid prefill_tokens"):
            EngineOptions(prefill_tokens=bad).prefill_budget("cpu")  # type: ignore[arg-type]


def test_one_row_prefills_through_fixed_buffers_match(pair, shared_path: Path,  # type: ignore[no-untyped-def]
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The captured-prefill path (on CUDA a graph per slot, length bucket, state set and plan)
    run on the CPU without a graph: the same fixed bindings and buffer writes, so the prompt
    written into them, its padding cleared and its last position must give the eager tokens.
    A request with a repetition penalty (its prompt mask is a start state) or asking logits
    stays eager, and so do several rows prefilling together."""
    import runtime.kv_slots as kv_slots

    monkeypatch.setattr(kv_slots, "PREFILL_GRAPHS", 1000)  # every key gets one here (the bound: next test)
    concat, _ = pair
    prompts = _prompts(6, seed=23)
    params = [SamplingParams(), SamplingParams(temperature=0.9, top_p=0.8, seed=4),
              SamplingParams(repetition_penalty=1.3), SamplingParams(temperature=1.1, top_k=9, seed=5)]
    with Engine.load(shared_path, max_batch=4) as engine:
        backend = engine.backend
        assert not backend.graph_prefill  # no CUDA graphs on the CPU
        assert not backend.captures_prefill(1, 16)
        want = [[engine.generate_ids([p], 9, s)[0] for p in prompts] for s in params]
        assert backend.graph_prefills == 0
        backend.graph_prefill = True
        width = kv_slots.GRAPH_WIDTH
        assert backend.captures_prefill(1, width) and not backend.captures_prefill(1, width + 1)
        assert not backend.captures_prefill(2, 16)  # several rows: one eager run
        for _ in range(3):  # a key seen first (eager), then its graph's runs (on CUDA: uncaptured, then replayed)
            got = [[engine.generate_ids([p], 9, s)[0] for p in prompts] for s in params]
            assert got == want
        # every request through the fixed buffers from its key's second sighting, but the penalized ones
        assert backend.graph_prefills >= 2 * len(prompts) * (len(params) - 1)
        # an idle engine prefills into the first state set: one key per (slot, length, plan)
        assert {key[2] for key in backend._prefill_graphs} == {0} and {key[0] for key in backend._prefill_graphs} == {0}
        assert len(backend._prefill_graphs) == len({len(p) for p in prompts}) * (len(params) - 1)
        before = backend.graph_prefills
        assert [engine.generate_ids([p], 9, params[2])[0] for p in prompts] == want[2]
        assert backend.graph_prefills == before  # the penalized request: eager
        result = engine.generate_results([prompts[0]], 4, return_logits=True)[0]
        assert list(result.token_ids) == want[0][0][:4] and backend.graph_prefills == before
        assert engine.generate_ids(prompts, 9) == want[0]  # several rows at once: one eager run
        assert backend.graph_prefills == before
    want_concat = [concat.generate_ids([p], 9)[0] for p in prompts]
    assert want[0] == want_concat


def test_prefill_graphs_are_bounded(shared_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import runtime.kv_slots as kv_slots

    monkeypatch.setattr(kv_slots, "PREFILL_GRAPHS", 2)
    prompts = _prompts(5, seed=31)
    with Engine.load(shared_path, max_batch=2) as engine:
        want = [engine.generate_ids([p], 5)[0] for p in prompts]
        engine.backend.graph_prefill = True
        for _ in range(3):
            assert [engine.generate_ids([p], 5)[0] for p in prompts] == want
        assert len(engine.backend._prefill_graphs) == 2


def test_a_failing_prefill_graph_turns_the_path_off(shared_path: Path) -> None:
    """A prefill graph's run that fails (on CUDA: a capture onnxruntime cannot make) costs its
    request nothing: it prefills eagerly, with the eager tokens, and later requests never try a
    graph again."""
    from runtime.errors import GenerationError

    prompts = _prompts(3, seed=37)
    with Engine.load(shared_path, max_batch=2) as engine:
        want = [engine.generate_ids([p], 6)[0] for p in prompts]
        backend = engine.backend
        backend.graph_prefill = True
        run = backend.device.run
        graph_runs: list[object] = []

        def failing(session: object, binding: object, options: object = None) -> None:
            if any(options is step.run for step in backend._prefill_graphs.values()):
                graph_runs.append(options)
                raise GenerationError("onnxruntime failed", got="a capture it cannot make")
            run(session, binding, options)

        backend.device.run = failing  # type: ignore[method-assign]
        for _ in range(2):
            assert [engine.generate_ids([p], 6)[0] for p in prompts] == want
        assert len(graph_runs) == 1 and not backend.graph_prefill and backend.graph_prefills == 0
