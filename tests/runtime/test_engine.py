"""``runtime.Engine`` on tiny random-weight artifacts (tiny:llama, tiny:gpt2), CPU."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from runtime import ArtifactError, Engine, FinishReason, GenerationError, SamplingParams, step_graph
from tests.runtime.test_imports import run_blocked

PROMPTS = ["hello world", "a", "The quick brown fox jumps over", "zz top 123", "ünïcödé ✓"]


def reference_greedy(path: Path, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Plain onnxruntime + numpy argmax, no IO binding, one prompt: what Engine must reproduce."""
    manifest = json.loads((path / "manifest.json").read_text())
    session = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = {t["name"]: t for t in manifest["io"]["inputs"]}
    kv, layers = manifest["kv"], manifest["architecture"]["layers"]
    pairs = [
        (kv[f"past_{k}"].format(i=i), kv[f"present_{k}"].format(i=i)) for i in range(layers) for k in ("key", "value")
    ]
    past = {
        p: np.zeros([1 if d == "batch" else d if isinstance(d, int) else 0 for d in inputs[p]["shape"]], np.float32)
        for p, _ in pairs
    }
    ids, total, out = np.array([prompt], np.int64), len(prompt), []
    positions = np.arange(total, dtype=np.int64)[None]
    names = [o.name for o in session.get_outputs()]
    for _ in range(max_new_tokens):
        feeds = {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64), **past}
        if "position_ids" in inputs:
            feeds["position_ids"] = positions
        result = dict(zip(names, session.run(None, feeds)))
        token = int(np.argmax(result["logits"][0, -1]))
        out.append(token)
        if token in manifest["generation"]["eos_token_ids"]:
            break
        past = {p: result[q] for p, q in pairs}
        ids, positions, total = np.array([[token]], np.int64), np.array([[total]], np.int64), total + 1
    return out


@pytest.fixture(scope="module")
def llama(tiny_llama: Path) -> Engine:
    return Engine.load(tiny_llama)


def test_greedy_equals_plain_onnxruntime_argmax_loop(tiny_artifact: Path) -> None:
    engine = Engine.load(tiny_artifact)
    prompts = [engine.encode(p) for p in PROMPTS]
    for prompt in prompts:
        assert engine.generate_ids([prompt], max_new_tokens=24) == [reference_greedy(tiny_artifact, prompt, 24)]


def test_left_padded_batch_equals_one_by_one(tiny_artifact: Path) -> None:
    engine = Engine.load(tiny_artifact)
    prompts = [engine.encode(p) for p in PROMPTS]
    assert len({len(p) for p in prompts}) > 2
    alone = [engine.generate_ids([p], max_new_tokens=24)[0] for p in prompts]
    assert engine.generate_ids(prompts, max_new_tokens=24) == alone


def test_rows_leave_the_batch_when_they_stop(llama: Engine) -> None:
    prompts = [llama.encode(p) for p in PROMPTS]
    full = llama.generate_ids(prompts, max_new_tokens=20)
    # each row stops at its own token: the 3rd, 8th, … token it would generate
    params = [SamplingParams(stop_token_ids=(ids[k],)) for ids, k in zip(full, (2, 7, 12, 4, 19))]
    results = llama.generate_results(prompts, max_new_tokens=20, sampling=params)
    for prompt, ids, res, p in zip(prompts, full, results, params):
        cut = ids.index(p.stop_token_ids[0]) + 1
        assert list(res.token_ids) == ids[:cut]
        assert res.new_tokens == cut and res.prompt_tokens == len(prompt)
    assert {r.finish_reason for r in results} == {FinishReason.STOP_TOKEN}


def test_per_row_sampling_in_one_batch(llama: Engine) -> None:
    prompts = [llama.encode(p) for p in PROMPTS[:3]]
    params = [
        SamplingParams(),
        SamplingParams(temperature=1.0, seed=7),
        SamplingParams(temperature=0.7, top_p=0.8, seed=8),
    ]
    batched = llama.generate_ids(prompts, max_new_tokens=16, sampling=params)
    alone = [llama.generate_ids([p], max_new_tokens=16, sampling=s)[0] for p, s in zip(prompts, params)]
    assert batched == alone
    again = llama.generate_ids(prompts, max_new_tokens=16, sampling=params)
    assert again == batched  # seeded: reproducible
    other = llama.generate_ids(prompts[1:2], max_new_tokens=16, sampling=SamplingParams(temperature=1.0, seed=9))
    assert other[0] != batched[1]


def test_min_new_tokens_and_repetition_penalty(llama: Engine) -> None:
    prompt = llama.encode("hello world")
    first = llama.generate_ids([prompt], max_new_tokens=8)[0]
    held = llama.generate_results([prompt], 8, SamplingParams(stop_token_ids=(first[0],), min_new_tokens=1))[0]
    assert held.token_ids[0] != first[0]  # the stop id could not be sampled at step 0
    repeated = llama.generate_ids([prompt], 30)[0]
    penalised = llama.generate_ids([prompt], 30, SamplingParams(repetition_penalty=5.0))[0]
    assert len(set(penalised)) > len(set(repeated))


def test_streaming_equals_generate(llama: Engine) -> None:
    for params in (SamplingParams(), SamplingParams(temperature=1.2, seed=3)):
        for prompt in PROMPTS:
            pieces = list(llama.stream(prompt, max_new_tokens=40, sampling=params))
            assert "".join(pieces) == llama.generate(prompt, max_new_tokens=40, sampling=params)[0]
            assert all(pieces)


def test_stop_strings_cut_exactly(llama: Engine) -> None:
    params = SamplingParams(temperature=1.0, seed=11)
    text = llama.generate("hello", max_new_tokens=60, sampling=params)[0]
    candidates = [(i, text[i : i + 2]) for i in range(3, len(text) - 2)
                  if "\ufffd" not in text[i : i + 2] and text.find(text[i : i + 2]) == i]
    assert candidates, f"no usable stop string in {text!r}"
    at, stop = candidates[0]
    res = llama.generate_results("hello", 60, SamplingParams(temperature=1.0, seed=11, stop=(stop,)))[0]
    assert res.text == text[:at]
    assert res.finish_reason is FinishReason.STOP_STRING
    assert "".join(llama.stream("hello", 60, SamplingParams(temperature=1.0, seed=11, stop=(stop,)))) == text[:at]


def test_chat_uses_the_artifact_template(llama: Engine) -> None:
    messages = [{"role": "user", "content": "hi"}]
    prompt = llama.apply_chat_template(messages)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert llama.chat(messages, max_new_tokens=10) == llama.generate_results([llama.chat_ids(messages)], 10)[0].text
    assert llama.chat_ids(messages)[0] == llama.encode("<|im_start|>", add_special_tokens=False)[0]


def test_eight_threads_equal_sequential(llama: Engine) -> None:
    jobs = [(PROMPTS[i % 5], SamplingParams(temperature=0.9, seed=i) if i % 2 else SamplingParams()) for i in range(16)]
    sequential = [llama.generate(p, 24, s)[0] for p, s in jobs]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(lambda job: llama.generate(job[0], 24, job[1])[0], jobs))
    assert threaded == sequential


def test_result_counts_and_timings(llama: Engine) -> None:
    (res,) = llama.generate_results("hello world", 12)
    assert res.prompt_tokens == len(llama.encode("hello world"))
    assert res.new_tokens == len(res.token_ids) <= 12
    assert 0 < res.ttft_s <= res.total_s
    assert res.decode_tokens_per_s > 0 or res.new_tokens == 1


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def test_2000_steps_do_not_grow_memory(llama: Engine) -> None:
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=1)
    prompt = llama.encode("memory")

    def steps_400() -> int:
        return sum(r.new_tokens for r in llama.generate_results([prompt, prompt], 400, [params, SamplingParams()]))

    steps_400()  # warm-up: arenas reach their working size
    before = _rss_kib()
    steps = sum(steps_400() for _ in range(5))
    grown = _rss_kib() - before
    assert steps >= 2000
    assert grown < 4 * 1024, f"RSS grew {grown} KiB over {steps} steps"


class _FailingOnce:
    """Wraps the decoder session; the first run raises like onnxruntime does on out-of-memory."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self._session, self.failed = session, False

    def io_binding(self):
        return self._session.io_binding()

    def run_with_iobinding(self, binding, options=None) -> None:
        if not self.failed:
            self.failed = True
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory")
        self._session.run_with_iobinding(binding, options)


def test_a_failed_request_leaves_the_engine_usable(tiny_llama: Path) -> None:
    engine = Engine.load(tiny_llama)
    expected = engine.generate("hello", 10)
    engine.backend.session = _FailingOnce(engine.backend.session)  # type: ignore[assignment]
    with pytest.raises(GenerationError) as info:
        engine.generate("hello", 10)
    assert str(info.value).startswith("generation failed inside onnxruntime | got [ONNXRuntimeError]")
    assert engine.generate("hello", 10) == expected


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda e: e.generate("", 5), "request 0: the prompt is empty | expected at least one token"),
        (lambda e: e.generate_ids([[1, 2], []], 5), "request 1: the prompt is empty"),
        (lambda e: e.generate([], 5), "no prompts | expected a prompt or a non-empty list of prompts"),
        (lambda e: e.generate("hi", 0), "invalid max_new_tokens | expected an integer > 0 | got 0"),
        (lambda e: e.generate("hi", -3), "invalid max_new_tokens | expected an integer > 0 | got -3"),
        (lambda e: e.generate("hi", True), "invalid max_new_tokens"),
        (
            lambda e: e.generate_ids([[1, 320]], 5),
            "request 0: token ids outside the vocabulary | expected integers in [0, 320) | got [320]",
        ),
        (
            lambda e: e.generate_ids([[-1, 4]], 5),
            "request 0: token ids outside the vocabulary | expected integers in [0, 320) | got [-1]",
        ),
        (
            lambda e: e.generate_ids([[5] * 500], 13),
            "request 0: prompt + max_new_tokens exceeds the context | expected at most 512 tokens in all "
            "| got a 500-token prompt + 13 new tokens = 513",
        ),
        (lambda e: e.generate(["a", "b"], 5, [SamplingParams()]), "one SamplingParams per prompt | expected 2 | got 1"),
        (
            lambda e: e.generate("a", 5, SamplingParams(stop_token_ids=(400,))),
            "request 0: stop_token_ids outside the vocabulary",
        ),
        (lambda e: e.generate_ids("abc", 5), "generate_ids takes lists of token ids"),
        (lambda e: e.generate("a", 5, {"temperature": 1.0}),
         "sampling must be a SamplingParams or one per prompt | got dict"),
        (lambda e: e.generate("a", 5, SamplingParams(temperature=1.0, top_k=5000)),
         "request 0: top_k above the engine's candidate bound | expected top_k <= 320"),
    ],
)
def test_bad_requests_fail_before_allocation(
    llama: Engine, call, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_alloc(*_args: object) -> None:
        raise AssertionError("allocated before validating")

    monkeypatch.setattr(llama.backend, "allocate", no_alloc)
    with pytest.raises(GenerationError) as info:
        call(llama)
    assert str(info.value).startswith(message)


def test_cuda_without_the_provider_names_the_package(tiny_llama: Path) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(GenerationError) as info:
        Engine.load(tiny_llama, device="cuda")
    msg = str(info.value)
    assert msg.startswith("device='cuda' needs onnxruntime's CUDAExecutionProvider, which is not available")
    assert f"onnxruntime {ort.__version__}" in msg and "pip install onnxruntime-gpu" in msg
    with pytest.raises(GenerationError, match="unknown device"):
        Engine.load(tiny_llama, device="tpu")


def test_rejected_artifacts(tiny_llama: Path, tmp_path: Path) -> None:
    altered = tmp_path / "altered"
    shutil.copytree(tiny_llama, altered)
    with open(altered / "model.onnx.data", "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\x01\x02\x03")
    with pytest.raises(ArtifactError, match="sha256 differs"):
        Engine.load(altered)
    shared = tmp_path / "shared"
    shutil.copytree(tiny_llama, shared)
    manifest = json.loads((shared / "manifest.json").read_text())
    manifest["kv_mode"] = "shared-buffer"
    (shared / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(GenerationError, match=f"carries no step model; this lmforge serves format {step_graph.FORMAT}"):
        Engine.load(shared)
    for old in (0, step_graph.FORMAT - 1):  # older formats sampled elsewhere: re-optimize
        manifest["step"] = {"format": old, "prefix": "lmforge_step.", "window": 32}
        (shared / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(GenerationError, match=f"carries step model .*'format': {old}"):
            Engine.load(shared)
    manifest["step"].update(format=step_graph.FORMAT, window="32")
    (shared / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(GenerationError, match="carries step model .*'window': '32'"):
        Engine.load(shared)
    manifest["step"]["window"] = 32
    (shared / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(GenerationError, match="io.inputs does not follow the shared-buffer contract"):
        Engine.load(shared)


def test_the_sampler_ships_in_the_artifact(tiny_llama: Path, tmp_path: Path) -> None:
    """``convert`` writes sampler.onnx (hashed like every file); the engine samples with it and
    refuses an artifact that lacks it, names another file, or carries an altered one."""
    manifest = json.loads((tiny_llama / "manifest.json").read_text())
    assert manifest["sampler"] == {"format": 1, "file": "sampler.onnx"}
    assert "sampler.onnx" in manifest["files"] and (tiny_llama / "sampler.onnx").is_file()
    for change, match in ((lambda m: m.pop("sampler"), "carries no sampler"),
                          (lambda m: m["sampler"].update(file="model.onnx.data.bak"), "carries sampler"),
                          (lambda m: m["sampler"].update(format=0), "carries sampler")):
        copy = tmp_path / f"c{len(list(tmp_path.iterdir()))}"
        shutil.copytree(tiny_llama, copy)
        edited = json.loads((copy / "manifest.json").read_text())
        change(edited)
        (copy / "manifest.json").write_text(json.dumps(edited))
        with pytest.raises(GenerationError, match=match):
            Engine.load(copy)
    altered = tmp_path / "altered-sampler"
    shutil.copytree(tiny_llama, altered)
    with open(altered / "sampler.onnx", "ab") as fh:
        fh.write(b"\x00")
    with pytest.raises(ArtifactError, match="sampler.onnx has been altered"):
        Engine.load(altered)


def test_warm_up_is_a_no_op_on_the_cpu(llama: Engine) -> None:
    before = llama.stats().steps
    assert llama.warm_up() == 0.0
    assert llama.stats().steps == before
    assert llama.generate_ids([[5, 6, 7]], 4) == llama.generate_ids([[5, 6, 7]], 4)


def test_engine_runs_with_torch_transformers_onnx_blocked(tiny_llama: Path, llama: Engine) -> None:
    proc = run_blocked(
        f"""
        from runtime import Engine
        print("OUT", Engine.load({str(tiny_llama)!r}).generate_ids([[5, 6, 7]], 8))
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert f"OUT {llama.generate_ids([[5, 6, 7]], 8)}" in proc.stdout


def test_bloom_has_no_position_ids(tmp_path_factory: pytest.TempPathFactory) -> None:
    exporters = pytest.importorskip("exporters")
    path = Path(exporters.convert("tiny:bloom", tmp_path_factory.mktemp("bloom") / "bloom", progress=False))
    engine = Engine.load(path)
    assert engine.backend._positions is False
    prompts = [engine.encode(p) for p in PROMPTS[:3]]
    assert [engine.generate_ids([p], 16)[0] for p in prompts] == [reference_greedy(path, p, 16) for p in prompts]
    assert engine.generate_ids(prompts, 16) == [reference_greedy(path, p, 16) for p in prompts]


def test_cli_generate_streams_the_same_text(
    tiny_llama: Path, llama: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    from lmforge.cli import main

    params = SamplingParams(temperature=0.9, top_k=40, seed=5)
    expected = llama.generate("hello", 20, params)[0]
    argv = ["generate", str(tiny_llama), "hello", "--max-new-tokens", "20", "--temperature", "0.9", "--top-k", "40",
            "--seed", "5"]
    assert main(argv) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert main([*argv, "--no-stream"]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert main(["generate", str(tiny_llama), "hi", "--chat", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == llama.chat([{"role": "user", "content": "hi"}], 5) + "\n"
    assert main(["generate", str(tiny_llama), "hi", "--top-p", "0"]) == 2
    assert capsys.readouterr().err.startswith("lmforge generate: error: invalid top_p | expected a number in (0, 1]")


def test_cuda_provider_options_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """``LMFORGE_CUDA_PROVIDER_OPTIONS`` (for measurements) parses "key=value,…"; a malformed
    value is one clear error, not a silent default."""
    from runtime.device import cuda_options_from_env as _cuda_options_from_env

    monkeypatch.setenv("LMFORGE_CUDA_PROVIDER_OPTIONS", " sdpa_kernel=1, use_tf32 = 0 ,")
    assert _cuda_options_from_env() == {"sdpa_kernel": "1", "use_tf32": "0"}
    monkeypatch.setenv("LMFORGE_CUDA_PROVIDER_OPTIONS", "")
    assert _cuda_options_from_env() == {}
    monkeypatch.setenv("LMFORGE_CUDA_PROVIDER_OPTIONS", "sdpa_kernel")
    with pytest.raises(GenerationError, match="LMFORGE_CUDA_PROVIDER_OPTIONS is malformed"):
        _cuda_options_from_env()


def test_engine_options_are_one_object_with_load_shorthand(tiny_llama) -> None:  # type: ignore[no-untyped-def]
    """``Engine.load(path, max_batch=…)`` is ``EngineOptions`` with that field replaced; an unknown
    option is refused before anything loads, naming the fields."""
    import runtime
    from runtime import EngineOptions, InvalidRequestError

    with pytest.raises(InvalidRequestError, match="unknown engine option 'max_batches'"):
        Engine.load(tiny_llama, max_batches=4)
    with Engine.load(tiny_llama, options=EngineOptions(max_queue=7), max_batch=3) as engine:
        assert (engine.max_batch, engine.max_queue) == (3, 7)
        assert engine.options == EngineOptions(max_batch=3, max_queue=7)
    with pytest.raises(InvalidRequestError, match="options must be a runtime.EngineOptions"):
        Engine(runtime.load_artifact(tiny_llama), "cpu", {"max_batch": 3})  # type: ignore[arg-type]


def test_request_take_and_notify_deliver_every_token_once(tiny_llama) -> None:  # type: ignore[no-untyped-def]
    """A consumer that multiplexes requests (the server's engine core) reads with take() and is
    woken by notify(): it gets exactly the tokens a plain reader gets, and nothing is lost
    between a take and the next notify."""
    import queue

    with Engine.load(tiny_llama) as engine:
        expected = engine.generate_ids([[5, 6, 7, 8]], max_new_tokens=24)[0]
        ready: queue.SimpleQueue[int] = queue.SimpleQueue()
        requests = [engine.submit([5, 6, 7, 8], max_new_tokens=24) for _ in range(4)]
        got: dict[int, list[int]] = {i: [] for i in range(4)}
        done: set[int] = set()
        for i, request in enumerate(requests):
            if not request.notify(lambda i=i: ready.put(i)):
                ready.put(i)
        while len(done) < 4:
            i = ready.get(timeout=30)
            events, error = requests[i].take()
            assert error is None
            for event in events:
                got[i].extend(event.token_ids)
            if any(e.result is not None for e in events):
                done.add(i)
                assert not requests[i].notify(lambda: None)  # ended: nothing registered
            elif not requests[i].notify(lambda i=i: ready.put(i)):
                ready.put(i)
    assert all(ids == expected for ids in got.values())
