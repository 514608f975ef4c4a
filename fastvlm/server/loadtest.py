"""Client-side load test for an OpenAI-compatible chat server (`fastvlm serve` or any other).

Sends `--requests` streaming chat completions with an image, `--concurrency` at a time, and
reports what a user of the server sees: request throughput, output tokens/s, time to first
token and end-to-end latency percentiles, inter-token latency, and errors by kind. Output: a
human-readable table, then ONE JSON object as the last stdout line (`--json FILE` writes it too).

Design decisions:
* Streaming requests with `stream_options.include_usage`, so TTFT is measured at the first
  content delta and token counts come from the server's own usage numbers, not from guessing.
* Plain threads + httpx (one client per worker): the server is the thing under test; a
  Python client at this concurrency is far from being the bottleneck, and threads keep the
  code obvious. The image is sent as a data URL, so the server never fetches anything.

Run: `python -m fastvlm.server.loadtest --url http://127.0.0.1:8080 --concurrency 8
--requests 64 --image examples/cat.jpg` (the lead wires it as `fastvlm bench serve`).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import mimetypes
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(slots=True)
class Result:
    ok: bool
    status: int = 0
    error: str = ""
    ttft_s: float = 0.0
    latency_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)  # gaps between content deltas


def image_data_url(path: str | None, size: int = 256) -> str:
    if path:
        p = Path(path)
        mime = mimetypes.guess_type(p.name)[0] or "image/png"
        return f"data:{mime};base64," + base64.b64encode(p.read_bytes()).decode()
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (240, 240, 240))
    d = ImageDraw.Draw(img)
    d.ellipse((size // 8, size // 8, size // 2, size // 2), fill=(220, 40, 40))
    d.rectangle((size // 2, size // 2, size - size // 8, size - size // 8), fill=(40, 40, 220))
    b = io.BytesIO()
    img.save(b, "PNG")
    return "data:image/png;base64," + base64.b64encode(b.getvalue()).decode()


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def one_request(client, url: str, payload: dict, headers: dict) -> Result:
    t0 = time.perf_counter()
    res = Result(ok=False)
    last = None
    try:
        with client.stream("POST", url, json=payload, headers=headers) as r:
            res.status = r.status_code
            if r.status_code != 200:
                body = r.read().decode(errors="replace")
                try:
                    res.error = json.loads(body)["error"].get("code") or f"http_{r.status_code}"
                except (ValueError, KeyError, TypeError, AttributeError):
                    res.error = f"http_{r.status_code}"
                return res
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                msg = json.loads(data)
                if "error" in msg:
                    res.error = msg["error"].get("code") or "stream_error"
                    return res
                if msg.get("usage"):
                    res.prompt_tokens = msg["usage"]["prompt_tokens"]
                    res.completion_tokens = msg["usage"]["completion_tokens"]
                for c in msg.get("choices", []):
                    if c.get("delta", {}).get("content"):
                        now = time.perf_counter()
                        if last is None:
                            res.ttft_s = now - t0
                        else:
                            res.itl_s.append(now - last)
                        last = now
        res.latency_s = time.perf_counter() - t0
        res.ok = True
    except Exception as e:  # network errors are results too
        res.error = type(e).__name__
    return res


def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    base = args.url.rstrip("/")
    url = base + "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = args.model
    if model is None:
        r = httpx.get(base + "/v1/models", headers=headers, timeout=args.timeout)
        r.raise_for_status()
        model = r.json()["data"][0]["id"]
    payload = {
        "model": model,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_data_url(args.image)}},
                    {"type": "text", "text": args.prompt},
                ],
            }
        ],
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.ignore_eos:
        payload["ignore_eos"] = True

    results: list[Result] = []
    lock = threading.Lock()
    counter = iter(range(args.requests))

    def worker() -> None:
        with httpx.Client(timeout=args.timeout) as client:
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                res = one_request(client, url, payload, headers)
                with lock:
                    results.append(res)

    for _ in range(args.warmup):
        with httpx.Client(timeout=args.timeout) as client:
            one_request(client, url, {**payload, "max_tokens": 4}, headers)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0

    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error or "unknown"] = errors.get(r.error or "unknown", 0) + 1
    ttft = [r.ttft_s for r in ok if r.completion_tokens]
    lat = [r.latency_s for r in ok]
    itl = [x for r in ok for x in r.itl_s]
    out_tokens = sum(r.completion_tokens for r in ok)

    def pct(xs: list[float]) -> dict[str, float]:
        return {
            "mean": round(statistics.fmean(xs), 4) if xs else 0.0,
            "p50": round(percentile(xs, 0.50), 4),
            "p90": round(percentile(xs, 0.90), 4),
            "p99": round(percentile(xs, 0.99), 4),
            "max": round(max(xs), 4) if xs else 0.0,
        }

    return {
        "url": base,
        "model": model,
        "concurrency": args.concurrency,
        "requests": args.requests,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": errors,
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(ok) / wall, 3) if wall else 0.0,
        "output_tokens": out_tokens,
        "output_tok_per_s": round(out_tokens / wall, 2) if wall else 0.0,
        "prompt_tokens_per_request": ok[0].prompt_tokens if ok else 0,
        "ttft_s": pct(ttft),
        "latency_s": pct(lat),
        "itl_s": pct(itl),
    }


def print_table(s: dict[str, Any]) -> None:
    print(f"fastvlm load test: {s['url']} model={s['model']}")
    print(
        f"  concurrency {s['concurrency']}, requests {s['requests']}: "
        f"{s['completed']} ok, {s['failed']} failed {s['errors'] or ''}"
    )
    print(
        f"  wall {s['wall_s']:.2f} s | {s['requests_per_s']:.2f} req/s | "
        f"{s['output_tok_per_s']:.1f} output tok/s | "
        f"{s['prompt_tokens_per_request']} prompt tokens/request"
    )
    print(f"  {'':<16}{'mean':>9}{'p50':>9}{'p90':>9}{'p99':>9}{'max':>9}")
    for name, key in (("TTFT (s)", "ttft_s"), ("latency (s)", "latency_s"), ("ITL (s)", "itl_s")):
        row = s[key]
        print(
            f"  {name:<16}"
            + "".join(f"{row[k]:>9.4f}" for k in ("mean", "p50", "p90", "p99", "max"))
        )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastvlm bench serve",
        description="Load-test an OpenAI-compatible chat server with image requests.",
    )
    p.add_argument("--url", default="http://127.0.0.1:8080", help="server base URL")
    p.add_argument("--concurrency", "-c", type=int, default=8, help="requests in flight")
    p.add_argument("--requests", "-n", type=int, default=32, help="total requests")
    p.add_argument("--image", default=None, help="image file (default: a generated 256 px PNG)")
    p.add_argument("--prompt", default="Describe this image.")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument(
        "--ignore-eos", action="store_true", help="fixed output length (server must support it)"
    )
    p.add_argument("--model", default=None, help="model id (default: the first of /v1/models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--timeout", type=float, default=300.0, help="per-request timeout (s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed requests before the run")
    p.add_argument("--json", default=None, help="also write the JSON summary to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.concurrency < 1 or args.requests < 1:
        print("error: --concurrency and --requests must be ≥ 1", file=sys.stderr)
        return 2
    try:
        summary = run(args)
    except ImportError:
        print("error: the load test needs httpx: pip install 'fastvlm[server]'", file=sys.stderr)
        return 1
    except Exception as e:  # the server is unreachable or not OpenAI-shaped
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print_table(summary)
    line = json.dumps(summary)
    if args.json:
        Path(args.json).write_text(line + "\n")
    print(line)
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
