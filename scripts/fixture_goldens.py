"""The model goldens: tiny HF / Apple checkpoints and the reference tensors (pixels, features,
logits, greedy tokens, per-stage vision activations) in `tiny_golden.safetensors`."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from fixture_common import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    FASTVLM_HF_CHAT_TEMPLATE,
    FUSED_ATTN_NOTE,
    HEAD_PROJ_DIM,
    IMAGE_SIZE,
    IMAGE_TOKEN_ID,
    NUM_GREEDY,
    NUM_IMAGE_TOKENS,
    PROCESSOR_CONFIG_JSON,
    SEED,
    TEXT_ID_RANGE,
    VISION_HIDDEN,
    clip_pil_processor,
    expand2square,
    make_photo,
    preprocessor_config_json,
    write_json,
)
from fixture_model import (
    APPLE_VISION_PREFIX,
    apple_config,
    apple_key_to_hf_forward_rules,
    build_tiny_config,
    calibrate_vision_,
    hf_key_to_apple,
    randomize_,
)
from PIL import Image


# ----------------------------------------------------------------------------------------------
# Main pieces
# ----------------------------------------------------------------------------------------------
def manual_greedy(model, input_ids, pixel_values, n):
    """Plain argmax decoding, full recompute each step (no cache, no logits processors)."""
    ids = input_ids.clone()
    out, margins = [], []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=ids, pixel_values=pixel_values).logits[0, -1]
            top2 = torch.topk(logits, 2).values
            margins.append(float(top2[0] - top2[1]))
            nxt = int(torch.argmax(logits))
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out, margins


def vision_debug(model, pixel_values) -> dict:
    tm = model.model.vision_tower.timm_model
    d = {}
    with torch.no_grad():
        x = tm.stem(pixel_values)
        for i, stage in enumerate(tm.stages):
            x = stage(x)
            d[f"debug_vision_stage{i}"] = x
        d["debug_vision_final_conv_flat"] = tm.final_conv(x).flatten(2).permute(0, 2, 1)
    return d


def make_model_fixtures(out: Path, meta: dict) -> dict:
    from safetensors.torch import load_file, save_file
    from transformers import FastVlmForConditionalGeneration

    # ---------------- inputs
    photo = make_photo(out / "photo.png")
    ip = clip_pil_processor(IMAGE_SIZE)
    pv_crop = torch.from_numpy(
        np.asarray(ip(images=photo, return_tensors="np")["pixel_values"])
    ).float()
    padded = expand2square(photo, tuple(int(x * 255) for x in [0.0, 0.0, 0.0]))
    pv_pad = torch.from_numpy(
        np.asarray(ip(images=padded, return_tensors="np")["pixel_values"])
    ).float()
    assert pv_crop.shape == pv_pad.shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)

    # ---------------- model
    torch.manual_seed(SEED)
    config = build_tiny_config()
    model = FastVlmForConditionalGeneration(config).eval()
    rules = randomize_(model, SEED)
    factors = calibrate_vision_(model, pv_crop)
    report = {"randomised_tensors": len(rules), "calibrated_modules": len(factors)}

    # ---------------- tiny_hf
    hf_dir = out / "tiny_hf"
    if hf_dir.exists():
        shutil.rmtree(hf_dir)
    model.save_pretrained(hf_dir, safe_serialization=True)
    write_json(hf_dir / "preprocessor_config.json", preprocessor_config_json(IMAGE_SIZE))
    write_json(hf_dir / "processor_config.json", PROCESSOR_CONFIG_JSON)
    (hf_dir / "chat_template.jinja").write_text(FASTVLM_HF_CHAT_TEMPLATE, encoding="utf-8")
    hf_sd = load_file(str(hf_dir / "model.safetensors"))
    report["hf_keys"] = len(hf_sd)
    report["hf_has_lm_head"] = "lm_head.weight" in hf_sd

    # reload and compare every tensor (save/load round trip, tying on load)
    reloaded = FastVlmForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).eval()
    for k, v in model.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k]), k
    assert reloaded.lm_head.weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()

    # ---------------- tiny_apple
    apple_dir = out / "tiny_apple"
    if apple_dir.exists():
        shutil.rmtree(apple_dir)
    apple_dir.mkdir(parents=True)
    full_sd = model.state_dict()
    apple_sd = {}
    for k in hf_sd:
        ak = hf_key_to_apple(k)
        assert ak not in apple_sd, ak
        apple_sd[ak] = hf_sd[k].clone().contiguous()
    gen = torch.Generator().manual_seed(SEED + 1)
    apple_sd[APPLE_VISION_PREFIX + "head.proj"] = (
        torch.randn(VISION_HIDDEN, HEAD_PROJ_DIM, generator=gen) * 0.05
    )
    apple_sd["lm_head.weight"] = (
        full_sd["model.language_model.embed_tokens.weight"].clone().contiguous()
    )
    apple_sd = dict(sorted(apple_sd.items()))
    save_file(apple_sd, str(apple_dir / "model.safetensors"), metadata={"format": "pt"})
    write_json(apple_dir / "config.json", apple_config(config))

    # Forward rule check: Apple keys -> HF keys must reproduce exactly the HF key set + tensors.
    fwd = {}
    for ak, v in apple_sd.items():
        hk = apple_key_to_hf_forward_rules(ak)
        if hk is None:
            continue
        assert hk not in fwd, hk
        fwd[hk] = v
    expected = set(full_sd)  # includes the tied lm_head.weight
    assert set(fwd) == expected, (sorted(set(fwd) ^ expected))[:20]
    for k in expected:
        assert torch.equal(fwd[k], full_sd[k]), k
    strict = FastVlmForConditionalGeneration(config)
    strict.load_state_dict(fwd, strict=True)
    report["forward_rule_check"] = (
        f"{len(apple_sd)} Apple keys -> {len(fwd)} HF keys (head.proj dropped), equal to the model "
        f"state_dict key set ({len(expected)}, incl. tied lm_head.weight), all tensors identical, "
        "strict load OK"
    )
    report["apple_keys"] = len(apple_sd)

    # Sanity: Apple path == PIL bicubic resize of the padded square, /255 (reference section 8).
    manual = (
        np.asarray(padded.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC), dtype=np.float32) / 255.0
    )
    report["pad_vs_manual_pil_max_abs"] = float(
        np.abs(manual.transpose(2, 0, 1) - pv_pad[0].numpy()).max()
    )
    # Also: HF processor loaded from the written preprocessor_config.json gives the same pixels.
    from transformers import CLIPImageProcessorPil

    ip2 = CLIPImageProcessorPil.from_pretrained(hf_dir)
    pv_crop2 = torch.from_numpy(
        np.asarray(ip2(images=photo, return_tensors="np")["pixel_values"])
    ).float()
    assert torch.equal(pv_crop, pv_crop2)

    g = torch.Generator().manual_seed(SEED + 2)
    pre = torch.randint(0, TEXT_ID_RANGE, (6,), generator=g)
    post = torch.randint(0, TEXT_ID_RANGE, (8,), generator=g)
    input_ids = (
        torch.cat([pre, torch.full((NUM_IMAGE_TOKENS,), IMAGE_TOKEN_ID), post]).unsqueeze(0).long()
    )
    input_ids_text = torch.cat([pre, post]).unsqueeze(0).long()

    with torch.no_grad():
        img_out = model.get_image_features(pixel_values=pv_crop, return_dict=True)
        vision_features = img_out.last_hidden_state.flatten(2).permute(0, 2, 1).contiguous()
        image_features = img_out.pooler_output.contiguous()
        img_out_pad = model.get_image_features(pixel_values=pv_pad, return_dict=True)
        vision_features_pad = img_out_pad.last_hidden_state.flatten(2).permute(0, 2, 1).contiguous()
        image_features_pad = img_out_pad.pooler_output.contiguous()
        out_crop = model(input_ids=input_ids, pixel_values=pv_crop)
        logits = out_crop.logits
        logits_pad = model(input_ids=input_ids, pixel_values=pv_pad).logits
        logits_text = model(input_ids=input_ids_text).logits
        # the reloaded model reproduces the logits exactly
        assert torch.equal(reloaded(input_ids=input_ids, pixel_values=pv_crop).logits, logits)
        # image_hidden_states returned by the model == projected features
        assert torch.equal(out_crop.image_hidden_states, image_features)
        # spliced embeddings, for debugging
        emb = model.get_input_embeddings()(input_ids)
        mask = (input_ids == IMAGE_TOKEN_ID).unsqueeze(-1)
        inputs_embeds = emb.masked_scatter(mask, image_features)

    dbg = vision_debug(model, pv_crop)
    assert torch.equal(dbg.pop("debug_vision_final_conv_flat"), vision_features)

    gen_out = model.generate(
        input_ids,
        pixel_values=pv_crop,
        do_sample=False,
        max_new_tokens=NUM_GREEDY,
        min_new_tokens=NUM_GREEDY,
    )
    greedy = gen_out[:, input_ids.shape[1] :]
    assert greedy.shape == (1, NUM_GREEDY)
    manual_tokens, margins = manual_greedy(model, input_ids, pv_crop, NUM_GREEDY)
    assert greedy[0].tolist() == manual_tokens, (greedy[0].tolist(), manual_tokens)
    for special in (IMAGE_TOKEN_ID, EOS_TOKEN_ID, BOS_TOKEN_ID):
        assert special not in manual_tokens, special
    report["greedy_min_top1_top2_margin"] = min(margins)
    report["greedy_distinct_tokens"] = len(set(manual_tokens))
    assert min(margins) > 1e-2, min(margins)  # robust to ~1e-5 implementation differences
    assert len(set(manual_tokens)) >= 8, manual_tokens  # not a degenerate repetition

    # Fused vs plain attention in the vision tower (diagnostic only).
    import timm.layers.config as timm_cfg

    attn_mods = [m for m in model.modules() if hasattr(m, "fused_attn")]
    for m in attn_mods:
        m.fused_attn = True
    with torch.no_grad():
        logits_fused = model(input_ids=input_ids, pixel_values=pv_crop).logits
    for m in attn_mods:
        m.fused_attn = False
    fused_diff = float((logits_fused - logits).abs().max())
    report["fused_attn_max_abs_diff_logits"] = fused_diff
    report["timm_fused_attn_env"] = os.environ.get("TIMM_FUSED_ATTN")
    report["timm_use_fused_attn"] = bool(timm_cfg.use_fused_attn())

    stats = {
        "vision_features_std": float(vision_features.std()),
        "image_features_std": float(image_features.std()),
        "logits_std": float(logits.std()),
        "logits_pad_std": float(logits_pad.std()),
        "logits_text_std": float(logits_text.std()),
        "logits_crop_vs_pad_max_abs_diff": float((logits - logits_pad).abs().max()),
        "pixel_crop_vs_pad_mean_abs_diff": float((pv_crop - pv_pad).abs().mean()),
    }
    for k, v in dbg.items():
        stats[k + "_std"] = float(v.std())
    for name in (
        "vision_features_std",
        "image_features_std",
        "logits_std",
        "logits_pad_std",
        "logits_text_std",
    ):
        assert 0.1 < stats[name] < 10.0, (name, stats[name])
    for t in [vision_features, image_features, logits, logits_pad, logits_text, *dbg.values()]:
        assert torch.isfinite(t).all()
    report["stats"] = stats

    # Pixel values are k/255 with k in 0..255: stored losslessly as uint8 to keep the fixtures
    # small.  float32 pixels == u8.to(torch.float32) / 255 exactly (NOT u8 * float32(1/255),
    # which differs in the last bit for some k).
    u8 = {}
    for name, pv in (("pixel_values_crop", pv_crop), ("pixel_values_pad", pv_pad)):
        q = torch.round(pv * 255).to(torch.uint8)
        assert torch.equal(q.to(torch.float32) / 255, pv), name
        u8[name + "_u8"] = q
    tensors = {
        **u8,
        "input_ids": input_ids,
        "input_ids_text": input_ids_text,
        "vision_features": vision_features,
        "image_features": image_features,
        "vision_features_pad": vision_features_pad,
        "image_features_pad": image_features_pad,
        "inputs_embeds": inputs_embeds,
        "logits": logits,
        "logits_pad": logits_pad,
        "logits_text": logits_text,
        "greedy_tokens": greedy.long(),
        **dbg,
    }
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    golden_meta = {
        **{f"version_{k}": v for k, v in meta["versions"].items()},
        "seed": str(SEED),
        "attention": FUSED_ATTN_NOTE,
        "fused_attn_max_abs_diff_logits": f"{fused_diff:.3e}",
        "image_token_id": str(IMAGE_TOKEN_ID),
        "eos_token_id": str(EOS_TOKEN_ID),
        "greedy": f"plain argmax, {NUM_GREEDY} new tokens, min top1-top2 margin {min(margins):.4f}",
        "pixel_values_crop_u8": "CLIPImageProcessorPil shortest_edge 192 + center crop 192, "
        "mean 0 std 1, bicubic; float32 pixels = u8.to(float32) / 255 (bit-exact)",
        "pixel_values_pad_u8": "Apple expand2square (black, floor offsets) + same processor; "
        "float32 = u8 / 255",
        "logits": "model(input_ids, pixel_values=pixel_values_crop), fp32, eval",
        "logits_pad": "model(input_ids, pixel_values=pixel_values_pad)",
        "logits_text": "model(input_ids_text) (no image)",
        "greedy_tokens": "generate(input_ids, pixel_values_crop, do_sample=False, 32 new tokens), "
        "new tokens only",
    }
    # One metadata key only: safetensors serialises the metadata map in hash order, so several
    # keys would make the file bytes non-deterministic.  Read it with
    # json.loads(safe_open(path, "pt").metadata()["fixture_info"]).
    save_file(
        tensors,
        str(out / "tiny_golden.safetensors"),
        metadata={"fixture_info": json.dumps(golden_meta, sort_keys=True)},
    )
    return report
