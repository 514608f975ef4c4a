"""Server metrics in the Prometheus text exposition format, without a client library.

Counters, two gauges and two histograms are all the server needs; writing the text format by
hand (a dozen lines) avoids a dependency and a global registry. Updates come from the event
loop only, so no locking.
"""

from __future__ import annotations

from collections import Counter

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.sum += v
        self.count += 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [
            f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts, strict=True)
        ]
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out += [f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]
        return out


class Metrics:
    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()  # by HTTP status code
        self.prompt_tokens = 0
        self.image_tokens = 0
        self.generation_tokens = 0
        self.cancelled = 0  # the client went away (or the server stopped) mid-generation
        self.failed = 0  # generation raised: an error, not a cancellation
        self.running = 0  # admitted requests producing tokens
        self.waiting = 0  # admitted requests that have not produced a token yet
        self.ttft = Histogram()
        self.latency = Histogram()

    def render(self) -> str:
        p = "fastvlm_"
        lines = [
            f"# HELP {p}requests_total Chat completion requests by HTTP status.",
            f"# TYPE {p}requests_total counter",
        ]
        for status, n in sorted(self.requests.items()):
            lines.append(f'{p}requests_total{{status="{status}"}} {n}')
        for name, value, help_ in (
            ("prompt_tokens_total", self.prompt_tokens, "Prompt tokens processed (with image)."),
            ("image_tokens_total", self.image_tokens, "Image placeholder tokens processed."),
            ("generation_tokens_total", self.generation_tokens, "Tokens generated."),
            ("requests_cancelled_total", self.cancelled, "Generations cancelled (disconnects)."),
            ("generation_errors_total", self.failed, "Generations that failed with an error."),
        ):
            lines += [f"# HELP {p}{name} {help_}", f"# TYPE {p}{name} counter"]
            lines.append(f"{p}{name} {value}")
        for name, value, help_ in (
            ("requests_running", self.running, "Requests generating tokens now."),
            ("queue_depth", self.waiting, "Admitted requests waiting for their first token."),
        ):
            lines += [f"# HELP {p}{name} {help_}", f"# TYPE {p}{name} gauge", f"{p}{name} {value}"]
        for name, h, help_ in (
            ("time_to_first_token_seconds", self.ttft, "Time from request to first token."),
            ("request_latency_seconds", self.latency, "Time from request to last token."),
        ):
            lines += [f"# HELP {p}{name} {help_}", f"# TYPE {p}{name} histogram"]
            lines += h.lines(p + name)
        return "\n".join(lines) + "\n"
