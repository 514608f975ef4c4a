"""Running the LiteRT-LM export: a greedy loop over the .tflite graphs in ai-edge-litert's
interpreter, the bundle through the LiteRT-LM Python API, and PyTorch's reference greedy tokens.

The interpreter loop mirrors what LiteRT-LM does (prefill all prompt tokens but the last in
fixed-length chunks, then decode from the last one), so a token mismatch points at the graphs,
not at the loop; the LiteRT-LM run checks the bundle end to end (tokenizer, template, vision).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from .litertlm_model import CAUSAL_MASK_VALUE


def torch_greedy(
    model, input_ids: list[int], pixel_values, max_new: int, eos: set[int]
) -> list[int]:
    """Reference: full-recompute greedy decoding with the PyTorch model (fp32, no cache)."""
    ids = list(input_ids)
    out: list[int] = []
    with torch.inference_mode():
        embeds = None if pixel_values is None else model.embed_images(pixel_values.float())
        for _ in range(max_new):
            logits = model(torch.tensor([ids]), image_embeds=embeds, last_only=True)
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            if nxt in eos:
                break
            ids.append(nxt)
    return out


class InterpreterVLM:
    """decoder.tflite + embedder.tflite + vision_encoder.tflite in ai-edge-litert, batch 1."""

    def __init__(
        self, decoder: Path, embedder: Path, vision: Path | None, threads: int = 2
    ) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.dec = Interpreter(model_path=str(decoder), num_threads=threads)
        self.emb = Interpreter(model_path=str(embedder), num_threads=threads)
        self.vis = (
            None if vision is None else Interpreter(model_path=str(vision), num_threads=threads)
        )
        sigs = self.dec.get_signature_list()
        self.prefill_lens = sorted(int(k.split("_")[1]) for k in sigs if k.startswith("prefill_"))
        self.decode = self.dec.get_signature_runner("decode")
        details = self.decode.get_input_details()
        self.kv_shapes = {k: d["shape"] for k, d in details.items() if k.startswith("kv_cache")}
        self.kv_len = int(details["mask"]["shape"][-1])

    def embed_tokens(self, ids: list[int]) -> np.ndarray:
        run = self.emb.get_signature_runner("decode_embedder")
        rows = [run(token_ids=np.array([[i]], np.int32))["embeddings"][0, 0] for i in ids]
        return np.stack(rows).astype(np.float32)

    def embed_image(self, images_nhwc: np.ndarray) -> np.ndarray:
        if self.vis is None:
            raise ConfigError("this export has no vision encoder")
        run = self.vis.get_signature_runner()
        return run(images=images_nhwc.astype(np.float32))["features"][0]

    def _mask(self, positions: np.ndarray) -> np.ndarray:
        cols = np.arange(self.kv_len)[None, :]
        m = np.where(cols <= positions[:, None], 0.0, CAUSAL_MASK_VALUE).astype(np.float32)
        return m[None, None]

    def generate(
        self, embeds: np.ndarray, last_token: int, max_new: int, eos: set[int]
    ) -> list[int]:
        """`embeds` (T-1, D): the prompt rows before the last token; greedy from `last_token`."""
        n = embeds.shape[0]
        if n + 1 + max_new > self.kv_len:
            raise ConfigError(
                f"prompt ({n + 1} tokens) + {max_new} new tokens exceed the exported context "
                f"({self.kv_len}); export with a larger --max-len"
            )
        kv = {k: np.zeros(s, np.float32) for k, s in self.kv_shapes.items()}
        pos = 0
        while pos < n:
            left = n - pos
            t = next((p for p in self.prefill_lens if p >= left), self.prefill_lens[-1])
            take = min(t, left)
            chunk = np.zeros((1, t, embeds.shape[1]), np.float32)
            chunk[0, :take] = embeds[pos : pos + take]
            positions = np.arange(pos, pos + t, dtype=np.int32)
            # pad rows write cache slots past the prompt; decode rewrites each slot before use
            kv = self.dec.get_signature_runner(f"prefill_{t}")(
                embeddings=chunk, input_pos=positions, mask=self._mask(positions), **kv
            )
            pos += take
        out: list[int] = []
        cur = last_token
        for _ in range(max_new):
            positions = np.array([pos], np.int32)
            e = self.embed_tokens([cur])[None]
            res = self.decode(embeddings=e, input_pos=positions, mask=self._mask(positions), **kv)
            logits = res.pop("logits")
            kv = res
            cur = int(logits[0, -1].argmax())
            out.append(cur)
            pos += 1
            if cur in eos:
                break
        return out

    def greedy(self, input_ids: list[int], image_token_id: int, images_nhwc, max_new: int, eos):
        """Token ids with image placeholder runs (as our Processor makes them) → greedy ids."""
        ids = list(input_ids)
        rows = self.embed_tokens(ids[:-1]) if len(ids) > 1 else np.zeros((0, 1), np.float32)
        slots = [i for i, t in enumerate(ids[:-1]) if t == image_token_id]
        if slots:
            feats = np.concatenate([self.embed_image(im[None]) for im in images_nhwc])
            if feats.shape[0] != len(slots):
                raise ConfigError(
                    f"{len(slots)} image placeholder tokens but the encoder gave "
                    f"{feats.shape[0]} rows"
                )
            rows[slots] = feats
        return self.generate(rows, ids[-1], max_new, set(eos))


def litertlm_greedy(bundle: Path, prompt: str, image: Path | None, max_new: int, max_len: int):
    """Greedy text from the bundle via the LiteRT-LM Python API (Conversation, CPU backend)."""
    import litert_lm

    eng = litert_lm.Engine(
        str(bundle),
        backend=litert_lm.Backend.CPU(),
        vision_backend=None if image is None else litert_lm.Backend.CPU(),
        max_num_tokens=max_len,
        # the CPU text executor defaults to fp16 activations; parity is checked in fp32
        activation_data_type=litert_lm.ActivationDataType.FLOAT32,
    )
    try:
        greedy = litert_lm.SamplerConfig(top_k=1, temperature=0.0)
        if image is None:
            s = eng.create_session(
                apply_prompt_template=False, sampler_config=greedy, max_output_tokens=max_new
            )
            with s:
                s.run_prefill([prompt])
                return s.run_decode().texts[0]
        conv = eng.create_conversation(sampler_config=greedy, max_output_tokens=max_new)
        msg = litert_lm.Message.user(
            litert_lm.Contents.of(litert_lm.Content.ImageFile(str(image)), prompt)
        )
        with conv:
            content = conv.send_message(msg).to_json().get("content", [])
        if isinstance(content, str):
            return content
        return "".join(c.get("text", "") for c in content if c.get("type") == "text")
    finally:
        eng.close()
