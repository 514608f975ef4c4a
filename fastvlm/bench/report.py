"""The human-readable table and the ratios (ours vs fp32, vs ONNX Runtime, vs transformers)."""

from __future__ import annotations

from typing import Any


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def ratios(runs: list[dict], refs: list[dict]) -> dict[str, float]:
    out: dict[str, float] = {}
    fp = next((r for r in runs if r["name"].split()[-1] in ("fp32", "bf16", "fp16")), None)
    for r in runs:
        if fp is not None and r is not fp and "@" not in r["name"]:
            if not r["name"].startswith("onnxruntime"):
                base = fp["name"].split()[-1]
                out[f"{r['name']} decode / {base} decode"] = r["decode_tok_s"] / fp["decode_tok_s"]
        for k in [k for k in r if k.startswith("aggregate_tok_s@")]:
            out[f"{r['name']} {k} / 1 stream"] = r[k] / r["decode_tok_s"]
    for r in runs:
        if r["name"].startswith("onnxruntime "):
            q = r["name"].split()[1]
            mine = next((x for x in runs if x["name"] in (f"fastvlm {q}",)), None)
            if mine is not None:
                out[f"fastvlm {q} decode / onnxruntime {q} decode"] = (
                    mine["decode_tok_s"] / r["decode_tok_s"]
                )
                out[f"fastvlm {q} ttft / onnxruntime {q} ttft"] = mine["ttft_s"] / r["ttft_s"]
    for ref in refs:
        t = ref["name"]
        for r in runs:
            if r["name"].startswith("onnxruntime"):
                continue
            out[f"{r['name']} ttft / {t} default ttft"] = r["ttft_s"] / ref["ttft_s"]
            best = max(ref["decode_tok_s"], ref["decode_static_tok_s"])
            out[f"{r['name']} decode / {t} best decode"] = r["decode_tok_s"] / best
            out[f"{r['name']} vision / {t} vision (time)"] = (
                r["vision_s"] + r["projector_s"]
            ) / ref["vision_s"]
    return out


def report(info: dict, runs: list[dict], refs: list[dict]) -> None:
    print(
        f"fastvlm bench — {info['source']}, {info['image_size']} px ({info['image_tokens']} "
        f"image tokens), {info['device']}, {info['threads']} threads, torch {info['torch']}"
    )
    print(f"measured read bandwidth: {info['bandwidth_gb_s']:.1f} GB/s")
    keys: list[str] = []
    for r in runs + refs:
        keys += [k for k in r if k != "name" and k not in keys and not isinstance(r[k], list)]
    cols = [r["name"] for r in runs + refs]
    w = max(len(k) for k in keys) + 2
    print("".ljust(w) + "".join(c.rjust(22) for c in cols))
    for k in keys:
        vals = [r.get(k, "") for r in runs + refs]
        print(k.ljust(w) + "".join(_fmt(v).rjust(22) for v in vals))
    rs = ratios(runs, refs)
    if rs:
        print("ratios:")
        for k, v in rs.items():
            print(f"  {k}: {v:.2f}")
