"""Build a random FastVLM at the FULL 0.5B shape with transformers and save it + a golden file.

Why: the committed fixtures (``tests/fixtures``, see ``scripts/make_fixtures.py``) use a tiny
model.  This script checks parity at the real scale (FastViTHD at 1024x1024 -> 256 tokens of
width 3072, Qwen2-0.5B decoder with the converted 152000-row vocabulary) without downloading any
weights: it builds ``FastVlmForConditionalGeneration`` with the real FastVLM-0.5B dimensions and
random (seeded, BN-statistics / layer-scale randomised, scale-calibrated) weights, saves it in
the transformers format (safetensors, about 2.5 GB fp32 -- never commit it), and writes
``golden_05b.safetensors`` next to it:

* ``input_ids`` (1, 280): the real FastVLM-0.5B HF prompt for "What are these?" with 256 x
  ``<image>`` (151646), taken from ``tests/fixtures/chat_goldens.json`` (random ids if missing),
* ``pixel_values`` (1, 3, 1024, 1024): ``tests/fixtures/photo.png`` through the HF CLIP processor
  (PIL backend, shortest edge 1024 + centre crop, mean 0 / std 1),
* ``vision_features`` (1, 256, 3072), ``image_features`` (1, 256, 896),
* ``logits_last8`` (1, 8, 152000): logits of the last 8 prompt positions (fp32, eval),
* ``greedy_tokens`` (1, 8): ``generate(do_sample=False, 8 new tokens)``, new tokens only
  (checked against a plain-argmax loop).

Usage (run in the parity virtualenv; about 7 GB of RAM at peak)::

    .venv-parity/bin/python scripts/parity_05b.py $WORK/fastvlm05b \\
        [--apple-dir $WORK/fastvlm05b_apple]

``--apple-dir`` also writes the same weights in Apple's ``llava_qwen2`` format (keys from the
inverse conversion table in ``fixture_model.py``), with an Apple-style config.json; like the real
Apple file its embedding / lm_head keep only the first 151936 rows (so Apple-side logits equal
``logits[..., :151936]`` of the HF model).
"""

from __future__ import annotations

import os

os.environ.setdefault(
    "TIMM_FUSED_ATTN", "0"
)  # plain attention in the timm tower (see make_fixtures.py)

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixture_common as fc  # noqa: E402
import fixture_model as fm  # noqa: E402

SEED = 5_000_000
IMAGE_SIZE = 1024
CALIB_SIZE = 256  # calibration of the vision scales runs at 256x256 (16x cheaper, same convs)
NUM_LAST = 8
NUM_GREEDY = 8
IMAGE_TOKEN_ID = 151646
VOCAB = 152000  # 151936 + 1 padded to a multiple of 64, as in the converted FastVLM-0.5B
APPLE_VOCAB = 151936  # rows in the original Apple checkpoint


def build_config():
    from transformers import FastVlmConfig, Qwen2Config, TimmWrapperConfig

    vision_config = TimmWrapperConfig(
        architecture="fastvit_mci3",
        model_args={"inference_mode": True},
        hidden_size=3072,
        do_pooling=True,
        global_pool="avg",
        initializer_range=0.02,
    )
    vision_config.label2id = {}
    vision_config.id2label = {}
    # Qwen/Qwen2-0.5B (base) config, as used by the HF converter, with the resized vocabulary.
    text_config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=131072,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        use_sliding_window=False,
        sliding_window=131072,
        max_window_layers=24,
        bos_token_id=151643,
        eos_token_id=151643,
    )
    return FastVlmConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=256,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=True,
    )


def load_pixels(size: int) -> torch.Tensor:
    photo_path = fc.DEFAULT_OUT / "photo.png"
    if photo_path.exists():
        photo = Image.open(photo_path).convert("RGB")
    else:
        import skimage.data

        photo = (
            Image.fromarray(skimage.data.chelsea()).convert("RGB").resize((300, 200), Image.LANCZOS)
        )
    ip = fc.clip_pil_processor(size)
    return torch.from_numpy(
        np.asarray(ip(images=photo, return_tensors="np")["pixel_values"])
    ).float()


def load_input_ids() -> tuple[torch.Tensor, str]:
    path = fc.DEFAULT_OUT / "chat_goldens.json"
    if path.exists():
        for case in json.loads(path.read_text(encoding="utf-8")):
            if case["name"] == "single_turn_image_text" and case["format"] == "hf":
                return torch.tensor([case["input_ids"]], dtype=torch.long), case["prompt"]
    g = torch.Generator().manual_seed(SEED + 3)
    pre = torch.randint(0, 151643, (14,), generator=g)
    post = torch.randint(0, 151643, (10,), generator=g)
    ids = torch.cat([pre, torch.full((256,), IMAGE_TOKEN_ID), post]).unsqueeze(0)
    return ids, "random ids (chat_goldens.json not found)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--apple-dir", type=Path, default=None)
    ap.add_argument("--no-reload-check", action="store_true")
    args = ap.parse_args()

    from safetensors.torch import save_file
    from transformers import FastVlmForConditionalGeneration

    t_start = time.time()
    timings = {}

    def lap(name, t0):
        timings[name] = round(time.time() - t0, 1)
        print(f"[{timings[name]:7.1f}s] {name}", flush=True)

    torch.manual_seed(SEED)
    t0 = time.time()
    config = build_config()
    model = FastVlmForConditionalGeneration(config).eval()
    n_params = sum(p.numel() for p in model.parameters())
    lap("build model", t0)

    t0 = time.time()
    # Text embeddings N(0, 2/sqrt(896)) = 0.067; residual-branch outputs x4; q/k x2 (with
    # near-uniform attention the 24 random layers collapse every position onto one hidden state
    # and greedy decoding repeats one token); projected image features std = 2 x embedding std
    # at the calibration size (as in the tiny model: 1.0 vs 0.5).
    embed_std = 2.0 / config.text_config.hidden_size**0.5
    fm.randomize_(model, SEED, embed_std=embed_std, out_gain=4.0, qk_gain=2.0)
    factors = fm.calibrate_vision_(model, load_pixels(CALIB_SIZE), proj_target=2 * embed_std)
    lap(f"randomise + calibrate ({len(factors)} modules, one pass at {CALIB_SIZE}px)", t0)

    t0 = time.time()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out_dir, safe_serialization=True)
    fc.write_json(
        args.out_dir / "preprocessor_config.json", fc.preprocessor_config_json(IMAGE_SIZE)
    )
    fc.write_json(args.out_dir / "processor_config.json", fc.PROCESSOR_CONFIG_JSON)
    (args.out_dir / "chat_template.jinja").write_text(fc.FASTVLM_HF_CHAT_TEMPLATE, encoding="utf-8")
    lap("save_pretrained", t0)

    input_ids, prompt = load_input_ids()
    pixel_values = load_pixels(IMAGE_SIZE)
    assert int((input_ids == IMAGE_TOKEN_ID).sum()) == 256

    t0 = time.time()
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixel_values, return_dict=True)
        vision_features = img.last_hidden_state.flatten(2).permute(0, 2, 1).contiguous()
        image_features = img.pooler_output.contiguous()
    lap("vision tower + projector (1024px)", t0)

    t0 = time.time()
    with torch.no_grad():
        out = model(input_ids=input_ids, pixel_values=pixel_values, use_cache=True)
    logits_last = out.logits[:, -NUM_LAST:].contiguous()
    lap("full forward (prompt + image)", t0)

    # Plain argmax loop with the KV cache (no logits processors) ...
    t0 = time.time()
    manual, margins = [], []
    past = out.past_key_values
    nxt_logits = out.logits[0, -1]
    seq_len = input_ids.shape[1]
    with torch.no_grad():
        for step in range(NUM_GREEDY):
            top2 = torch.topk(nxt_logits, 2).values
            margins.append(float(top2[0] - top2[1]))
            tok = int(torch.argmax(nxt_logits))
            manual.append(tok)
            if step == NUM_GREEDY - 1:
                break
            o = model(
                input_ids=torch.tensor([[tok]]),
                past_key_values=past,
                use_cache=True,
                position_ids=torch.tensor([[seq_len]]),
            )
            seq_len += 1
            past = o.past_key_values
            nxt_logits = o.logits[0, -1]
    lap("manual greedy (cached)", t0)
    # ... must equal generate().
    t0 = time.time()
    gen = model.generate(
        input_ids,
        pixel_values=pixel_values,
        do_sample=False,
        max_new_tokens=NUM_GREEDY,
        min_new_tokens=NUM_GREEDY,
    )
    greedy = gen[:, input_ids.shape[1] :].contiguous()
    lap("generate", t0)
    assert greedy[0].tolist() == manual, (greedy[0].tolist(), manual)
    if min(margins) < 1e-2 or len(set(manual)) < 3:
        print(f"WARNING: weak greedy golden: margins {margins}, tokens {manual}", flush=True)

    stats = {
        "params": n_params,
        "vision_features_std": float(vision_features.std()),
        "image_features_std": float(image_features.std()),
        "logits_last8_std": float(logits_last.std()),
        "greedy_min_margin": min(margins),
        "greedy_distinct": len(set(manual)),
        "greedy_tokens": manual,
        "prompt": prompt,
    }
    for t in (vision_features, image_features, logits_last):
        assert torch.isfinite(t).all()

    tensors = {
        "input_ids": input_ids,
        "pixel_values": pixel_values,
        "vision_features": vision_features,
        "image_features": image_features,
        "logits_last8": logits_last,
        "greedy_tokens": greedy.long(),
    }
    meta = {f"version_{k}": v for k, v in fc.versions().items()}
    meta.update(
        {
            "seed": str(SEED),
            "attention": fc.FUSED_ATTN_NOTE,
            "logits_last8": "model(input_ids, pixel_values).logits[:, -8:], fp32, eval",
            "greedy_tokens": f"generate(do_sample=False, {NUM_GREEDY} new tokens), new tokens "
            f"only; min top1-top2 margin {min(margins):.4f}",
            "pixel_values": "photo.png, CLIPImageProcessorPil shortest_edge 1024 + center crop, "
            "mean 0 std 1",
        }
    )
    save_file(
        {k: v.detach().contiguous() for k, v in tensors.items()},
        str(args.out_dir / "golden_05b.safetensors"),
        metadata={"fixture_info": json.dumps(meta, sort_keys=True)},
    )

    if args.apple_dir is not None:
        t0 = time.time()
        from safetensors.torch import load_file

        args.apple_dir.mkdir(parents=True, exist_ok=True)
        hf_sd = load_file(str(args.out_dir / "model.safetensors"))
        apple_sd = {fm.hf_key_to_apple(k): v for k, v in hf_sd.items()}
        g = torch.Generator().manual_seed(SEED + 1)
        apple_sd[fm.APPLE_VISION_PREFIX + "head.proj"] = torch.randn(3072, 768, generator=g) * 0.02
        # The real Apple file has the original 151936 Qwen2 rows (HF grew it to 152000 for <image>).
        apple_sd["model.embed_tokens.weight"] = apple_sd["model.embed_tokens.weight"][
            :APPLE_VOCAB
        ].clone()
        apple_sd["lm_head.weight"] = apple_sd["model.embed_tokens.weight"].clone()
        fwd = {fm.apple_key_to_hf_forward_rules(k): v for k, v in apple_sd.items()}
        fwd.pop(None)
        assert set(fwd) == set(model.state_dict()), set(fwd) ^ set(model.state_dict())
        save_file(
            dict(sorted(apple_sd.items())),
            str(args.apple_dir / "model.safetensors"),
            metadata={"format": "pt"},
        )
        cfg = fm.apple_config(config)
        # as the released apple/FastVLM-0.5B config.json (Instruct-style eos / max positions)
        cfg.update(
            {"mm_vision_tower": "mobileclip_l_1024", "bos_token_id": 151643, "eos_token_id": 151645}
        )
        cfg.pop("vision_config")  # standard FastViTHD
        cfg["vocab_size"] = APPLE_VOCAB
        cfg["max_position_embeddings"] = 32768
        cfg["sliding_window"] = 32768
        fc.write_json(args.apple_dir / "config.json", cfg)
        del apple_sd, fwd, hf_sd
        lap("apple-format copy", t0)

    if not args.no_reload_check:
        t0 = time.time()
        del out, past
        reloaded = FastVlmForConditionalGeneration.from_pretrained(
            args.out_dir, dtype=torch.float32
        ).eval()
        ref_sd = model.state_dict()
        new_sd = reloaded.state_dict()
        assert set(ref_sd) == set(new_sd)
        for k, v in ref_sd.items():
            assert torch.equal(v, new_sd[k]), k
        del model, ref_sd
        with torch.no_grad():
            l2 = reloaded(input_ids=input_ids, pixel_values=pixel_values).logits[:, -NUM_LAST:]
        # Same weights; on CPU the reloaded model may take other kernels (memory layout), so the
        # logits agree to fp32 rounding only.
        stats["reload_logits_max_abs_diff"] = float((l2 - logits_last).abs().max())
        assert stats["reload_logits_max_abs_diff"] < 1e-3, stats["reload_logits_max_abs_diff"]
        lap("reload: all tensors identical + forward check", t0)

    stats["timings_s"] = timings
    stats["total_s"] = round(time.time() - t_start, 1)
    sizes = {p.name: p.stat().st_size for p in args.out_dir.iterdir() if p.is_file()}
    stats["files"] = sizes
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
