"""MiniLM on CUDA: lmforge fp16 (runtime.Encoder) against PyTorch fp16 on the same GPU, plus parity.

    export PYTHONPATH=/tmp/gpu-site:$PWD
    python3 bench/encoder_gpu.py ARTIFACT_FP16 --ref REF.npy [--batch 128] [--seq 128] [--rounds 20] [--out DIR]

* parity: the committed sentence + retrieval sets encoded on CUDA, cosine to ``REF.npy`` (PyTorch
  fp32 embeddings computed on the CPU machine, ``parity.encoder_reference``), judged by the fp16
  policy of :mod:`parity.encoder_verify` (cosine and top-1 passage agreement);
* speed: ``batch`` rows of ``seq`` fixed ids; lmforge = ``Encoder.encode_ids`` (pooling and
  normalization included, outputs copied to the host); PyTorch = transformers ``BertModel`` of the
  same shape in fp16 (random weights: the same arithmetic as the real ones; sdpa attention), the
  same pooling, after ``torch.cuda.synchronize``. Rounds alternate; medians reported.

The GPU machine has no MiniLM weights and no optimum (which ``lmforge convert`` uses), so the
artifact is built on the CPU machine and carried, and the PyTorch peer is built from the config.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    import torch
    from transformers import BertConfig, BertModel

    from lmforge.benchmark.tune import fixed_ids
    from parity.encoder_reference import torch_pool
    from parity.encoder_verify import (
        ENCODER_POLICIES,
        compare_embeddings,
        judge,
        load_pairs,
        load_sentences,
        retrieval_check,
    )
    from runtime.encoder import Encoder

    parser = argparse.ArgumentParser()
    parser.add_argument("artifact")
    parser.add_argument("--ref", required=True)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", default=None)
    parser.add_argument("--device", default="cuda", help="cpu for a dry run on a machine without a GPU")
    args = parser.parse_args()

    enc = Encoder.load(args.artifact, device=args.device)
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    report: dict[str, object] = {"gpu": torch.cuda.get_device_name(0) if cuda else "none (dry run)",
                                 "onnxruntime": ort.__version__,
                                 "torch": torch.__version__, "providers": enc._session.get_providers()}

    # parity
    sentences, pairs = load_sentences(), load_pairs()
    texts = [t for _, t in sentences] + [q for _, q, _ in pairs] + [p for _, _, p in pairs]
    ref = np.load(args.ref)
    got = enc.encode(texts, batch_size=16)
    ids = [i for i, _ in sentences] + [f"q:{i}" for i, _, _ in pairs] + [f"p:{i}" for i, _, _ in pairs]
    lengths = [len(e.ids) for e in enc.tokenizer.encode_batch(texts)]
    results = compare_embeddings(ids, lengths, ref, got)
    n, m = len(sentences), len(pairs)
    queries = retrieval_check([i for i, _, _ in pairs], ref[n:n + m], ref[n + m:], got[n:n + m], got[n + m:])
    reasons = judge(ENCODER_POLICIES[enc.artifact.precision], results, queries)
    cos = [r.cosine for r in results]
    report["parity"] = {"precision": enc.artifact.precision, "min_cosine": min(cos), "mean_cosine": float(np.mean(cos)),
                        "top1_agreement": sum(q.agrees for q in queries) / len(queries), "reasons": reasons,
                        "passed": not reasons}

    # speed
    batch_ids = fixed_ids(int(enc.artifact.architecture["vocab"]), enc.tokenizer.encode("").ids, args.batch,
                          args.seq, 0)
    rows = batch_ids.tolist()
    a = enc.artifact.architecture
    config = BertConfig(vocab_size=int(a["vocab"]), hidden_size=int(a["hidden"]), num_hidden_layers=int(a["layers"]),
                        num_attention_heads=int(a["heads"]), intermediate_size=4 * int(a["hidden"]),
                        max_position_embeddings=int(a.get("max_positions") or 512))
    torch.manual_seed(0)
    model = BertModel(config, add_pooling_layer=False).eval().half().to(args.device)
    t_ids = torch.from_numpy(batch_ids).to(args.device)
    t_mask = torch.ones_like(t_ids)

    def run_torch() -> np.ndarray:
        with torch.inference_mode():
            hidden = model(input_ids=t_ids, attention_mask=t_mask).last_hidden_state
            out = torch.nn.functional.normalize(torch_pool(hidden, t_mask, "mean").float(), p=2, dim=1)
            return out.cpu().numpy()

    def run_lmforge() -> np.ndarray:
        return enc.encode_ids(rows, batch_size=args.batch)

    runners = {"lmforge fp16 (ORT CUDA)": run_lmforge, "pytorch fp16 (eager, sdpa)": run_torch}
    times: dict[str, list[float]] = {k: [] for k in runners}
    for r in range(args.rounds + 2):
        for name, fn in runners.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if r >= 2:
                times[name].append(time.perf_counter() - t0)
    speed = {k: {"median_ms": 1000 * float(np.median(v)), "seq_per_s": args.batch / float(np.median(v))}
             for k, v in times.items()}
    report["speed"] = {"batch": args.batch, "seq": args.seq, "rounds": args.rounds, "runners": speed}
    print(json.dumps(report, indent=2))
    base = speed["pytorch fp16 (eager, sdpa)"]["seq_per_s"]
    print("\n| runner | batch × seq | median ms | seq/s | vs PyTorch fp16 |\n|---|---|---:|---:|---:|")
    for k, v in speed.items():
        print(f"| {k} | {args.batch} × {args.seq} | {v['median_ms']:.2f} | {v['seq_per_s']:.0f} | "
              f"{v['seq_per_s'] / base:.2f}× |")
    if args.out:
        Path(args.out, "encoder_gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
