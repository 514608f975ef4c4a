"""CUDA graphs for the engine's decode step.

Why: one decode step is hundreds of small kernels (every layer's norms, projections, RoPE,
attention, KV writes). On a GPU, eager PyTorch spends more time launching them from Python
than the GPU spends running them, so batch-1 decode is launch-bound far below the memory-bandwidth
limit. A captured graph replays all of them with one launch.

Design decisions:
* **One graph per decode shape** `(lo, hi, span)`: the engine decodes the contiguous slot window
  [lo, hi) against keys [0, span) (span rounded up to the engine's `span_bucket`, so a stream
  makes a new shape only every `span_bucket` tokens). A graph bakes in the window's cache
  addresses, so the key includes `lo`, not just the batch size. At most `max_graphs` are kept;
  past that, new shapes run eagerly (still correct).
* **Static inputs**: tokens, positions and the key mask are copied into the graph's own input
  tensors before each replay; the logits are cloned out (the next replay overwrites them).
* **Capture** runs the forward twice on a side stream first (the usual warm-up: lazy init,
  workspace allocations), then records it. Those runs write the step's K/V at the step's
  positions — exactly what the replay writes again, so they change nothing.
* All graphs share one memory pool: they never run concurrently (the engine holds its step
  lock), so their intermediates can share memory.
* **Failure is not fatal**: if a capture raises (an op that syncs with the host, an unsupported
  kernel), graphs are switched off for this engine with a warning (`disabled_reason`) and the
  eager forward is used from then on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

DecodeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, int], torch.Tensor]


class GraphedDecode:
    """Callable with the signature of `DecodeRunner.forward` that replays CUDA graphs."""

    def __init__(self, fn: DecodeFn, device: torch.device, max_graphs: int = 64) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        self.fn, self.device, self.max_graphs = fn, device, max_graphs
        self.graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, list]] = {}
        self.pool = None
        self.disabled_reason: str | None = None
        self.captures = self.replays = self.eager = 0

    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, lo: int, hi: int
    ) -> torch.Tensor:
        key = (lo, hi, int(mask.shape[-1]))
        entry = self.graphs.get(key)
        if entry is None:
            if self.disabled_reason is not None or len(self.graphs) >= self.max_graphs:
                self.eager += 1
                return self.fn(tokens, positions, mask, lo, hi)
            try:
                entry = self._capture(key, tokens, positions, mask)
            except Exception as e:  # noqa: BLE001 - any capture failure means: run eagerly
                self.disabled_reason = f"{type(e).__name__}: {e}"
                log.warning("CUDA graph capture failed, decoding eagerly: %s", self.disabled_reason)
                torch.cuda.synchronize(self.device)
                self.eager += 1
                return self.fn(tokens, positions, mask, lo, hi)
        graph, st = entry
        st[0].copy_(tokens)
        st[1].copy_(positions)
        st[2].copy_(mask)
        graph.replay()
        self.replays += 1
        return st[3].clone()

    def _capture(self, key, tokens, positions, mask):
        lo, hi, _ = key
        st = [tokens.clone(), positions.clone(), mask.clone()]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.fn(st[0], st[1], st[2], lo, hi)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.fn(st[0], st[1], st[2], lo, hi)
        st.append(out)
        self.graphs[key] = (graph, st)
        self.captures += 1
        return graph, st

    def stats(self) -> dict[str, int | str | None]:
        return {
            "graphs": len(self.graphs),
            "captures": self.captures,
            "replays": self.replays,
            "eager": self.eager,
            "disabled_reason": self.disabled_reason,
        }
