"""``verify`` end to end on tiny:llama (fast), a deliberately broken copy of it, bad inputs, the
reports, and SmolLM2-135M fp32 (slow)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lmforge.cli import main
from parity.compare import Outcome
from parity.policy import POLICIES, Verdict, summarize
from parity.prompts import smoke_prompts_path
from parity.verify import BatchMismatch, _with_batch_reason, batch_parity, verify_artifact
from tests.parity._broken import perturb_weight

SMOKE = str(smoke_prompts_path())
PERTURBED_SCOPE = "layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def broken(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A copy of the tiny artifact with layer 1's MLP down-projection weight scaled by 1.5."""
    out = tmp_path_factory.mktemp("broken") / "tiny-broken"
    node = perturb_weight(tiny_llama, out, scope=PERTURBED_SCOPE, scale=1.5)
    return out, node


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------------------------
# The fp32 artifact passes


def test_verify_passes_on_the_fp32_tiny_artifact(tiny_llama: Path) -> None:
    result = verify_artifact(tiny_llama, SMOKE, max_new_tokens=16, progress=False)
    assert result.passed, result.verdict.reasons
    assert result.precision == "fp32"
    assert [c.classification for c in result.comparisons] == [Outcome.EXACT] * 6
    assert all(c.compared_steps >= 1 and c.max_logit_diff is not None and c.max_logit_diff < 1e-3
               for c in result.comparisons)
    assert result.batch_mismatches == ()
    # both runs were fed the same ids: the reference's tokens follow the artifact's own encoding
    assert set(result.references) == set(result.input_ids) == {c.prompt_id for c in result.comparisons}


def test_cli_exits_0_and_prints_the_table(tiny_llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-q", "verify", str(tiny_llama), "--prompts", SMOKE, "--max-new-tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert "parity fp32: PASSED" in out and "en-capital" in out and "6 exact" in out


def test_json_schema_and_markdown_report(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    json_path, report_dir = tmp_path / "out" / "verify.json", tmp_path / "report"
    code = main(["-q", "verify", str(tiny_llama), "--prompts", SMOKE, "--max-new-tokens", "8",
                 "--json", str(json_path), "--report", str(report_dir)])
    assert code == 0
    out = capsys.readouterr().out.splitlines()  # the command says where it wrote them, under -q too
    assert f"json written to {json_path}" in out and f"report written to {report_dir / 'report.md'}" in out
    doc = json.loads(json_path.read_text(encoding="utf-8"))
    assert doc["passed"] is True and doc["precision"] == "fp32"
    assert doc["policy"]["max_logit_diff"] == POLICIES["fp32"].max_logit_diff
    assert {k: doc["summary"][k] for k in ("prompts", "exact", "near_tie", "drift")} == {
        "prompts": 6, "exact": 6, "near_tie": 0, "drift": 0}
    assert len(doc["prompts"]) == 6
    for entry in doc["prompts"]:
        assert {"id", "exact", "first_divergence", "ref_margin", "max_logit_diff"} <= set(entry)
        assert entry["exact"] is True and entry["first_divergence"] is None
        assert 0 <= entry["max_logit_diff"] < 1e-3
    assert doc["batch_mismatches"] == [] and doc["max_new_tokens"] == 8
    report = (report_dir / "report.md").read_text(encoding="utf-8")
    assert report.startswith("# Parity report: fp32, PASSED") and "logit_diff.png" in report
    assert (report_dir / "logit_diff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_prompt_longer_than_the_context_is_skipped_and_counted(tiny_llama: Path, tmp_path: Path) -> None:
    long_text = " ".join(f"word{i}" for i in range(600))  # tiny:llama's max context is 512
    prompts = write_lines(tmp_path / "p.jsonl", [
        json.dumps({"id": "short", "prompt": "The capital of France is", "chat": False}),
        json.dumps({"id": "too-long", "prompt": long_text, "chat": False}),
    ])
    result = verify_artifact(tiny_llama, prompts, max_new_tokens=8, progress=False)
    by_id = {c.prompt_id: c for c in result.comparisons}
    assert by_id["too-long"].classification is Outcome.SKIPPED
    assert "max context 512" in (by_id["too-long"].skip_reason or "")
    assert result.verdict.summary.skipped == 1 and result.verdict.summary.exact == 1
    assert result.passed and any("skipped" in note for note in result.verdict.notes)


# --------------------------------------------------------------------------------------------
# A broken artifact fails, and --layerwise names the perturbed layer


def test_broken_artifact_fails_and_layerwise_names_the_perturbed_op(
    broken: tuple[Path, str], tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, node = broken
    json_path = tmp_path / "v.json"
    code = main(["-q", "verify", str(path), "--prompts", SMOKE, "--max-new-tokens", "16", "--layerwise",
                 "--layerwise-against", str(tiny_llama), "--json", str(json_path)])
    assert code == 1
    out = capsys.readouterr().out
    assert "parity fp32: FAILED" in out
    doc = json.loads(json_path.read_text(encoding="utf-8"))
    assert doc["passed"] is False and doc["reasons"]
    first = doc["layerwise"]["first"]
    assert first["node"] == node and first["op_type"] == "MatMul"
    assert PERTURBED_SCOPE in first["scope"]
    assert first["max_absdiff"] > first["atol"]
    assert f"{node} (MatMul) in model.model.{PERTURBED_SCOPE}" in out
    assert doc["layerwise"]["only_candidate"] == 0 and doc["layerwise"]["compared"] > 100


def test_layerwise_on_identical_graphs_names_nothing_and_prints_the_reduce_command(
    tiny_llama: Path, tmp_path: Path
) -> None:
    from parity.layerwise import GOLDEN_JSON, INPUTS_JSON, layerwise_compare

    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama, copy)
    finding = layerwise_compare(copy, tiny_llama, [1, 5, 6, 7, 8], work_dir=tmp_path / "lw",
                                policy=POLICIES["fp32"])
    assert finding.first is None and finding.exceeded == 0 and finding.logits_max_absdiff == 0.0
    assert finding.reduce_command is not None and finding.reduce_command.startswith("polygraphy debug reduce ")
    assert "--check polygraphy run polygraphy_debug.onnx --onnxrt" in finding.reduce_command
    assert (tmp_path / "lw" / INPUTS_JSON).is_file() and (tmp_path / "lw" / GOLDEN_JSON).is_file()
    assert "polygraphy debug reduce" in finding.describe()


# --------------------------------------------------------------------------------------------
# Batch parity


class _StubEngine:
    """Returns scripted tokens per prompt (keyed by its first id) to exercise batch parity."""

    eos_token_ids = frozenset({2})

    def __init__(self, batched: dict[int, list[int]]) -> None:
        self.batched = batched

    def generate_results(self, prompts: list[list[int]], max_new_tokens: int) -> list[object]:
        class R:
            def __init__(self, ids: list[int]) -> None:
                self.token_ids = tuple(ids)
        return [R(self.batched[p[0]]) for p in prompts]


def test_batch_parity_reports_rows_that_differ_from_single_runs() -> None:
    engine = _StubEngine({10: [5, 6, 2, 9], 11: [7, 8, 8], 12: [4, 4]})
    single = {"a": [5, 6, 2], "b": [7, 3, 8], "c": [4, 4]}  # a: same up to EOS; b differs at step 1
    mismatches = batch_parity(engine, ["a", "b", "c"], {"a": [10], "b": [11], "c": [12]}, single, 3,
                              batch_size=2, progress=False)
    assert mismatches == [BatchMismatch("b", 1, 3, 8)]
    passing = Verdict(passed=True, reasons=(), notes=(), summary=summarize([]))
    assert _with_batch_reason(passing, [], strict=True) is passing
    failed = _with_batch_reason(passing, mismatches, strict=False)
    assert not failed.passed and failed.reasons == (
        "batch parity: 1 prompt(s) give other tokens in a left-padded batch than alone (b at step 1 (3 alone, "
        "8 batched)); check padding, attention_mask and position_ids",)


def test_batch_mismatch_judged_against_the_reference() -> None:
    from types import SimpleNamespace

    import numpy as np

    from parity.verify import judge_batch_mismatch

    # reference at step 1: token 3 scores 10.0, token 8 scores 9.95, token 1 scores 4.0
    reference = SimpleNamespace(
        top_ids=np.array([[7, 1, 2], [3, 8, 1]]), top_values=np.array([[9.0, 1.0, 0.0], [10.0, 9.95, 4.0]])
    )
    agreed = SimpleNamespace(first_divergence=None)
    tie = judge_batch_mismatch(BatchMismatch("b", 1, 3, 8), reference, agreed, tie_threshold=0.1)
    assert tie.near_tie and abs(tie.ref_gap - 0.05) < 1e-9
    real = judge_batch_mismatch(BatchMismatch("b", 1, 3, 1), reference, agreed, tie_threshold=0.1)
    assert not real.near_tie and abs(real.ref_gap - 6.0) < 1e-9
    unknown = judge_batch_mismatch(BatchMismatch("b", 1, 3, 99), reference, agreed, tie_threshold=0.1)
    assert not unknown.near_tie and unknown.ref_gap == float("inf")
    # the run alone already left the reference at step 0: without its own logits, stays real
    left = SimpleNamespace(first_divergence=0)
    diverged = judge_batch_mismatch(BatchMismatch("b", 1, 3, 8), reference, left, 0.1)
    assert diverged.ref_gap is None and not diverged.near_tie
    # with them, the run alone's own margin at that step judges it (top-k rows of its logits)
    from parity.verify import top_k_rows

    own = top_k_rows(np.array([[0.0, 5.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                               [0.0, 1.0, 0.0, 7.0, 0.0, 0.0, 0.0, 0.0, 6.96]]), k=3)
    assert own[1] == ((3, 8, 1), (7.0, pytest.approx(6.96), 1.0))
    near = judge_batch_mismatch(BatchMismatch("b", 1, 3, 8), reference, left, 0.1, own)
    assert near.near_tie and near.judged_by == "candidate" and abs(near.ref_gap - 0.04) < 1e-6
    far = judge_batch_mismatch(BatchMismatch("b", 1, 3, 1), reference, left, 0.1, own)
    assert not far.near_tie and far.judged_by == "candidate" and abs(far.ref_gap - 6.0) < 1e-6

    passing = Verdict(passed=True, reasons=(), notes=(), summary=summarize([]))
    lenient = _with_batch_reason(passing, [tie], strict=False)
    assert lenient.passed and lenient.notes and "near-tie" in lenient.notes[0]
    assert not _with_batch_reason(passing, [tie], strict=True).passed  # fp32: batches must be exact
    assert not _with_batch_reason(passing, [tie, real], strict=False).passed


# --------------------------------------------------------------------------------------------
# Bad input: exit 2 with a one-line message


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (["this is not json"], "is not JSON Lines"),
        ([json.dumps({"id": "a", "prompt": "hi"})], "field 'chat' is missing"),
        ([""], "is empty"),
    ],
)
def test_bad_prompt_files_exit_2(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 lines: list[str], message: str) -> None:
    prompts = write_lines(tmp_path / "p.jsonl", lines)
    assert main(["-q", "verify", str(tiny_llama), "--prompts", prompts]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge verify: error: ") and message in err and len(err.strip().splitlines()) == 1


def test_missing_source_model_exits_2_and_names_reference(tiny_llama: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    copy = tmp_path / "moved"
    shutil.copytree(tiny_llama, copy, ignore=shutil.ignore_patterns("parity"))  # no cached references
    manifest_path = copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["source"] = dict(manifest["source"], kind="hf", ref=None, path=str(tmp_path / "gone"))
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    assert main(["-q", "verify", str(copy), "--prompts", SMOKE, "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err
    assert "cannot be loaded for the reference" in err and "--reference" in err


def test_a_reconverted_artifact_is_verified_from_the_shared_cache(tiny_llama: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """`make export` re-converts with --force, which drops ARTIFACT/parity/: the shared cache (under
    LMFORGE_CACHE_DIR) still has the references, so the source model is not even loaded; --no-cache
    computes them again (here: fails, since the source is gone)."""
    assert main(["-q", "verify", str(tiny_llama), "--prompts", SMOKE, "--max-new-tokens", "5"]) == 0
    copy = tmp_path / "reconverted"
    shutil.copytree(tiny_llama, copy, ignore=shutil.ignore_patterns("parity"))
    manifest_path = copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["source"] = dict(manifest["source"], kind="hf", ref=None, path=str(tmp_path / "gone"))
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    capsys.readouterr()
    assert main(["verify", str(copy), "--prompts", SMOKE, "--max-new-tokens", "5", "--batch-size", "0"]) == 0
    err = capsys.readouterr().err
    assert "reference: all 6 prompt(s) cached" in err and "Traceback" not in err
    assert (copy / "parity" / "reference.jsonl").is_file()  # and the artifact carries them from now on
    assert main(["-q", "verify", str(copy), "--prompts", SMOKE, "--max-new-tokens", "5", "--no-cache"]) == 2
    assert "cannot be loaded for the reference" in capsys.readouterr().err


def test_layerwise_without_an_fp32_artifact_to_compare_exits_2(broken: tuple[Path, str],
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-q", "verify", str(broken[0]), "--prompts", SMOKE, "--layerwise"]) == 2
    assert "--layerwise-against" in capsys.readouterr().err


def test_invalid_max_new_tokens_exits_2(tiny_llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-q", "verify", str(tiny_llama), "--max-new-tokens", "0"]) == 2
    assert "max-new-tokens" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Real weights


@pytest.mark.slow
def test_smollm2_fp32_passes_with_every_smoke_prompt_exact(smollm2: Path) -> None:
    result = verify_artifact(smollm2, SMOKE, max_new_tokens=32, progress=False)
    assert result.passed, result.verdict.reasons
    assert result.verdict.summary.exact == result.verdict.summary.prompts == 6
    assert result.batch_mismatches == ()
    assert max(c.max_logit_diff or 0.0 for c in result.comparisons) < POLICIES["fp32"].max_logit_diff


def test_layerwise_uses_the_input_artifact_the_optimizer_recorded(
    broken: tuple[Path, str], tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "optimized"
    shutil.copytree(broken[0], copy, ignore=shutil.ignore_patterns("parity"))
    manifest_path = copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest["optimize"] = {"from": {"path": str(tiny_llama)}}  # what `lmforge optimize` writes
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    verify_artifact(tiny_llama, SMOKE, max_new_tokens=16, progress=False)  # make sure the fp32 cache exists
    assert main(["-q", "verify", str(copy), "--prompts", SMOKE, "--max-new-tokens", "16", "--layerwise"]) == 1
    assert f"in model.model.{PERTURBED_SCOPE}" in capsys.readouterr().out
    # the reference cache was seeded from the recorded input artifact, not recomputed
    assert (copy / "parity" / "reference.jsonl").read_text() == (tiny_llama / "parity" / "reference.jsonl").read_text()


@pytest.mark.slow
def test_smollm2_int8_cpu_passes_the_int8_policy(smollm2: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """``lmforge verify`` passes the int8 CPU artifact (8-bit MatMulNBits, blocks of 16, int8
    activations per row and block) on the smoke prompts, batch parity included.

    Measured on the 2-core dev machine (AVX512-VNNI): 3 exact, 3 near-ties, no drift, no batch
    mismatch — exactly the 3 of 6 exact the policy asks for, so a kernel change that costs one
    prompt fails here; the old ``quantize_dynamic`` default gave 0 exact. See
    passes/precision.py for the recipe's measurements.
    """
    from passes.pipeline import optimize_artifact

    int8 = tmp_path / "smollm2-int8"
    optimize_artifact(smollm2, int8, device="cpu", precision="int8", progress=False)
    quantization = json.loads((int8 / "manifest.json").read_text())["quantization"]
    assert quantization["settings"]["bits"] == 8 and quantization["settings"]["accuracy_level"] == 4
    out = tmp_path / "int8.json"
    code = main(["verify", str(int8), "--prompts", str(smoke_prompts_path()), "--max-new-tokens", "32",
                 "--json", str(out)])
    doc = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert doc["precision"] == "int8" and doc["policy"]["precision"] == "int8"
    assert code == 0 and doc["passed"], printed
    summary = doc["summary"]
    assert summary["prompts"] == 6 and summary["drift"] == 0 and summary["exact"] >= 3
    assert "parity int8: PASSED" in printed


@pytest.mark.slow
def test_smollm2_int4_on_its_source_grid_passes(smollm2: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """SmolLM2's projections come from a Q4_1 GGUF: the CUDA int4 artifact keeps that grid
    exactly (passes/grid_int4.py) and verifies 6/6 exact on the smoke prompts — run here on the
    CPU provider, which executes the same fp16 graph (slowly: float zero points are off MLAS's
    fast path). Round-to-nearest int4 of the same weights drifted on 35 of 61 prompts (H100)."""
    from passes.pipeline import optimize_artifact

    int4 = tmp_path / "smollm2-int4-cuda"
    optimize_artifact(smollm2, int4, device="cuda", precision="int4", progress=False)
    settings = json.loads((int4 / "manifest.json").read_text())["quantization"]["settings"]
    assert settings["bits"] == 4 and settings["source_grid_nodes"] == 210  # every projection of 30 layers
    out = tmp_path / "int4.json"
    code = main(["verify", str(int4), "--prompts", str(smoke_prompts_path()), "--max-new-tokens", "32",
                 "--json", str(out)])
    doc = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert code == 0 and doc["passed"], printed
    assert doc["summary"]["drift"] == 0 and doc["summary"]["exact"] >= 5
