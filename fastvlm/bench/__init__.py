"""`fastvlm bench`: where the time goes, against the hardware limit and against transformers.

Job: for a model (`--model`, default the embedded demo model) or a real-size shape with random
weights (`--shape 0.5b`, no download), report preprocessing, vision encoder, projector, prefill,
TTFT, decode tok/s, aggregate tok/s with N concurrent streams, vision images/s at batch 1 and N,
peak memory and model-bandwidth utilisation (MBU); `--quant fp32,int8,int4` measures each weight
precision in the same run; `--compare transformers` runs transformers' FastVLM on the same
weights and inputs in the same process and prints ratios. Output: a human-readable table, then
ONE JSON object as the last stdout line (`--json FILE` also writes it). `fastvlm bench serve
--url ...` is the client-side load test of a running server (fastvlm/server/loadtest.py).

Design decisions:
* Measure the limit, don't assume it. The bench times a large `torch.sum` over a buffer bigger
  than the caches (best of several) to get this machine's read bandwidth, and computes the bytes a
  decode step must read (every decoder/lm_head weight — quantized sizes for int8/int4 — one
  embedding row and the KV cache). roofline tok/s = bandwidth ÷ bytes per token; MBU = measured
  decode tok/s ÷ roofline. On a shared machine the bandwidth itself moves, so each run's
  roofline uses the best of the probes taken right before and right after its own timed request
  (`bandwidth_gb_s` in the run; the start-of-bench reading is in `info` and
  `mbu_at_start_bandwidth`), and each configuration is timed `--repeats` times (default 3): the
  run with the median decode speed is reported, all of them are in the JSON
  (`decode_tok_s_runs`, `ttft_s_runs`, `mbu_runs`).
* Everything our side goes through the public engine (`Engine.submit` → stats), the same path as
  `FastVLM.describe`; every step is synchronised (`Stats` timing reads tokens on the host).
* transformers is measured as a user would run it: `generate()` with the default dynamic cache
  and with `cache_implementation="static"`; TTFT = `generate(max_new_tokens=1)`, decode =
  (T(1 + n) − T(1)) / n over the same prompt. Its weights are ours, saved in the transformers
  format (so both run identical math; parity is tested in tests/test_parity.py).

Layout: `cli.py` (flags, `main`), `workload.py` (shapes with random weights, prompt, images),
`measure.py` (timers, memory, bandwidth, bytes per decode step), `torch_engine.py` (our engine,
vision batches, greedy agreement), `ort.py` (ONNX Runtime), `hf.py` (transformers in a child
process), `report.py` (table, ratios).
"""

from .cli import main

__all__ = ["main"]
