"""``lmforge bench``: lmforge and its peers on one model, same prompts and lengths, in alternation.

Modules (each small, one concept):

* :mod:`.runner` — the one interface every runtime implements (:class:`Runner`: ``prepare()`` then
  ``run(prompt_ids, new_tokens) -> Timing``) and lmforge's own runner.
* :mod:`.peers` — Hugging Face eager, static cache + ``torch.compile``, onnxruntime-genai (with and
  without CUDA graphs) and optimum-onnx (in a subprocess, from a second site).
* :mod:`.source` — the artifact's source model, loaded once and shared by the peers.
* :mod:`.memory` / :mod:`.bandwidth` — peak memory sampling, the device's measured copy
  bandwidth and bytes read per decode step.
* :mod:`.harness` — warm-up, alternating rounds, medians, the table and the JSON report.
* :mod:`.plot` — grouped bars of tokens/s per runtime and batch size.

Nothing heavy is imported here: the optimum worker runs as a file in another interpreter, and
the command line imports only what a run needs.
"""

from __future__ import annotations

__all__: list[str] = []
