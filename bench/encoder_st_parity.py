"""``runtime.Encoder`` against the real sentence-transformers library, on folders with its files.

sentence-transformers is not a dependency of lmforge (nor installed in ``.venv``); the lent GPU
machine's image has it (6.0.1), so the check runs in two steps:

1. here, ``build OUT``: tiny random models (``tiny:bert``, ``tiny:xlm-roberta``, ``tiny:mpnet``,
   ``tiny:modernbert``, ``tiny:bert-reranker``) saved as Hugging Face folders with
   sentence-transformers files — mean + Normalize, CLS, max, lasttoken with prompts and a default
   prompt, mean with ``include_prompt: false``; a CrossEncoder folder — each converted with
   ``lmforge convert`` next to it;
2. there (no torch needed by lmforge's side), ``check OUT``: ``SentenceTransformer(folder).encode``
   against ``Encoder.load(artifact).encode`` with the same prompt arguments, and
   ``CrossEncoder(folder).predict`` against ``Encoder.score``; prints the worst per-element
   difference per case and exits 1 past ``1e-4``.

::

    PYTHONPATH=. .venv/bin/python bench/encoder_st_parity.py build .st-parity
    # on the device machine (carry .st-parity):  PYTHONPATH=. python3 bench/encoder_st_parity.py check .st-parity
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TEXTS = ["what is the capital of france", "Paris is the capital and largest city of France.", "x",
         "a longer passage about rivers, bridges and the boats that go under them every day, twice",
         "naïve café — 東京 ✓"]
PROMPTS = {"query": "query: ", "passage": "passage: "}
# name → (tiny source, pooling, normalize, prompts, default prompt, include_prompt)
CASES = {
    "bert-mean-normalize": ("bert", "mean", True, None, None, True),
    "bert-cls": ("bert", "cls", False, None, None, True),
    "xlm-roberta-max": ("xlm-roberta", "max", False, None, None, True),
    "mpnet-lasttoken-prompts": ("mpnet", "lasttoken", True, PROMPTS, "query", True),
    "modernbert-mean-no-prompt-in-pool": ("modernbert", "mean", False, PROMPTS, None, False),
}
CALLS = [{}, {"prompt_name": "passage"}, {"prompt": ""}, {"prompt": "Represent this: "}]
_MODES = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens",
          "lasttoken": "pooling_mode_lasttoken"}


def _write_st(folder: Path, pooling: str, normalize: bool, prompts: dict[str, str] | None, default: str | None,
              include_prompt: bool, dim: int) -> None:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir(exist_ok=True)
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    config = {mode: mode == _MODES[pooling] for mode in _MODES.values()}
    config.update(word_embedding_dimension=dim, include_prompt=include_prompt)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(config))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    st = {"prompts": prompts or {}, "default_prompt_name": default, "similarity_fn_name": "cosine"}
    (folder / "config_sentence_transformers.json").write_text(json.dumps(st))


def build(out: Path) -> None:
    from exporters.convert import convert
    from exporters.sources import load_source

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name, (family, pooling, normalize, prompts, default, include_prompt) in CASES.items():
        loaded = load_source(f"tiny:{family}")
        folder = out / name / "model"
        loaded.model.save_pretrained(folder)
        loaded.tokenizer.save_pretrained(folder)
        _write_st(folder, pooling, normalize, prompts, default, include_prompt, int(loaded.config.hidden_size))
        convert(str(folder), out / name / "artifact", progress=False)
        print(f"built {name}", flush=True)
    loaded = load_source("tiny:bert-reranker")
    folder = out / "bert-reranker" / "model"
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    # A cross-encoder's tokenizer has no chat template; the tiny one carries ChatML, and
    # sentence-transformers 6's CrossEncoder renders a (query, document) pair through a tokenizer's
    # chat template when it has one (instruction re-rankers), which is not what this checks.
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    convert(str(folder), out / "bert-reranker" / "artifact", progress=False)
    print("built bert-reranker", flush=True)


def check(out: Path) -> int:
    import numpy as np
    from sentence_transformers import CrossEncoder, SentenceTransformer

    from runtime.encoder import Encoder

    worst_all = 0.0
    print("| case | call | max abs diff | min cosine |")
    print("|---|---|---:|---:|")
    for name in CASES:
        st = SentenceTransformer(str(out / name / "model"), device="cpu")
        enc = Encoder.load(out / name / "artifact", threads=1)
        for call in CALLS:
            if "prompt_name" in call and not enc.prompts:
                continue
            want = st.encode(TEXTS, convert_to_numpy=True, batch_size=2, **call)
            got = enc.encode(TEXTS, batch_size=2, **call)
            diff = float(np.abs(got - want).max())
            cos = float(min((a @ b) / (np.linalg.norm(a) * np.linalg.norm(b)) for a, b in zip(got, want)))
            worst_all = max(worst_all, diff)
            print(f"| {name} | {json.dumps(call)} | {diff:.2e} | {cos:.7f} |", flush=True)
    ce = CrossEncoder(str(out / "bert-reranker" / "model"), device="cpu")
    rr = Encoder.load(out / "bert-reranker" / "artifact", threads=1)
    pairs = [(TEXTS[0], t) for t in TEXTS[1:]]
    want = np.asarray(ce.predict(pairs))
    got = rr.score(TEXTS[0], TEXTS[1:])
    diff = float(np.abs(got - want).max())
    worst_all = max(worst_all, diff)
    print(f"| bert-reranker | CrossEncoder.predict vs Encoder.score | {diff:.2e} | — |")
    import sentence_transformers
    import transformers

    print(f"sentence-transformers {sentence_transformers.__version__}, transformers {transformers.__version__}; "
          f"worst {worst_all:.2e}")
    return 0 if worst_all <= 1e-4 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("build", "check"))
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    if args.mode == "build":
        build(args.out)
        return 0
    return check(args.out)


if __name__ == "__main__":
    raise SystemExit(main())
