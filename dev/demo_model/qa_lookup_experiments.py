"""Why does the shipped demo model describe scenes exactly but miss attribute questions?

Three sub-commands, all on the CPU, all deterministic from their seeds:

* ``cache``: render shapes scenes (``fastvlm.train.shapes``, same rng order as ``make_example``)
  and store the frozen vision tower's features (N, tokens, C) as float16, with each scene's
  caption and typed questions::

      python dev/demo_model/qa_lookup_experiments.py cache --seed 3 --start 0 --end 20000 --out a.pt

* ``probe``: a small readout trained on those frozen features, *not* the model's decoder:
  bag-of-words question embedding → two cross-attention hops over the image tokens (+ learned
  positions) → MLP over the answer vocabulary. It measures whether the features support looking
  a shape up by its attributes ("What color is the cross?")::

      python dev/demo_model/qa_lookup_experiments.py probe --train a.pt b.pt --eval eval.pt

* ``decoder``: trains the model's own projector + Qwen2 decoder on the cached features (vision
  tower frozen, so a step costs only the decoder) and reports teacher-forced exact accuracy per
  question type on held-out scenes. Teacher-forced exactness of answer + ``<|im_end|>`` equals
  greedy exact match, so step 0 reproduces ``fastvlm eval`` of the same scenes.
  ``--psent`` turns that fraction of colour/shape/size/count-of-X questions into a sentence
  form ("... Answer with a sentence." → "the cross is red."), where the looked-up attribute
  comes right after the shape's name; ``--text-scene`` drops the image and gives the scene as
  text ("Scene: <caption>" before the question), to test look-up in text alone::

      python dev/demo_model/qa_lookup_experiments.py decoder --train a.pt b.pt --eval eval.pt \\
          --steps 1000 --lr 1e-3 --pcap 0.15 --psent 0.5

  ``--guide W`` adds, for one-question rows that name a shape ("What color is the small
  cross?", "How many red shapes are there?"), an attention loss (weight W) on two decoder layers
  (``--guide-layers``, default 0 and 1) at the position that predicts the answer: head 0 of the
  first should attend to the question's attribute words, heads ``--guide-heads`` (default 0) of
  the second to the image tokens whose 64-px cells the named shape's box touches (scenes are
  rebuilt from ``--train-seed``).
  Without it the decoder never learns this two-hop look-up on a CPU budget; with it, it does.
  The shipped model's question answering was trained this way (commands in the model's README).

Results are in ``fastvlm/assets/fastvlm-tiny/README.md``.
"""

from __future__ import annotations

import argparse
import math
import random
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fastvlm
from fastvlm.model.qwen2 import rope_cos_sin, rotate_half
from fastvlm.train.data import Record, collate, encode_record
from fastvlm.train.checkpoint import save_model
from fastvlm.train.loop import lm_loss
from fastvlm.train.shapes import (
    COLORS,
    DESCRIBE_PROMPT,
    DESCRIBE_PROMPTS,
    KINDS,
    PLURALS,
    SIZES,
    caption,
    draw_scene,
    image_rng,
    sample_scene,
    typed_questions,
)

ASSET = "fastvlm/assets/fastvlm-tiny"


def load_caches(paths: list[str]) -> tuple[torch.Tensor, list[dict]]:
    data = [torch.load(p) for p in paths]
    return torch.cat([d["feats"] for d in data]), [m for d in data for m in d["meta"]]


def cmd_cache(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    vlm = fastvlm.load(a.model, device="cpu")
    size = vlm.model.config.vision.image_size
    feats, meta, imgs = [], [], []
    t0 = time.time()

    def flush() -> None:
        with torch.no_grad():
            feats.append(vlm.model.encode_images(vlm.processor.pixels(imgs)).half())
        imgs.clear()

    for i in range(a.start, a.end):
        rng = image_rng(a.seed, i)
        img, scene = draw_scene(rng, size)  # same rng order as shapes.make_example
        qas = typed_questions(scene, rng)
        meta.append({"i": i, "caption": caption(scene), "qas": [list(q) for q in qas]})
        imgs.append(img)
        if len(imgs) == 32:
            flush()
        if (i - a.start) % 1000 == 999:
            print(f"{i - a.start + 1} images, {time.time() - t0:.0f} s", flush=True)
    if imgs:
        flush()
    torch.save({"feats": torch.cat(feats), "meta": meta}, a.out)
    print(f"wrote {a.out} ({a.end - a.start} images, {time.time() - t0:.0f} s)")


def cmd_probe(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    feats, meta = load_caches(a.train)
    ev_feats, ev_meta = load_caches([a.eval])

    def rows(ms):
        return [
            (k, re.findall(r"\w+", q.lower()), ans, t)
            for k, m in enumerate(ms)
            for q, ans, t in m["qas"]
        ]

    train, held = rows(meta), rows(ev_meta)
    vocab = {w: i for i, w in enumerate(sorted({w for r in train + held for w in r[1]}))}
    answers = {w: i for i, w in enumerate(sorted({r[2] for r in train + held}))}

    def encode(rs, fe):
        words = torch.full((len(rs), max(len(r[1]) for r in rs)), len(vocab))
        for i, r in enumerate(rs):
            words[i, : len(r[1])] = torch.tensor([vocab[w] for w in r[1]])
        return fe[[r[0] for r in rs]].float(), words, torch.tensor([answers[r[2]] for r in rs])

    class Probe(nn.Module):
        def __init__(self, d: int = 128, heads: int = 4) -> None:
            super().__init__()
            self.emb = nn.Embedding(len(vocab) + 1, d, padding_idx=len(vocab))
            self.pos = nn.Parameter(torch.zeros(feats.shape[1], d))
            self.inp = nn.Linear(feats.shape[2], d)
            self.att1 = nn.MultiheadAttention(d, heads, batch_first=True)
            self.att2 = nn.MultiheadAttention(d, heads, batch_first=True)
            self.out = nn.Sequential(nn.Linear(2 * d, 256), nn.GELU(), nn.Linear(256, len(answers)))

        def forward(self, f, w):
            x = self.inp(f) + self.pos
            q = self.emb(w).sum(1, keepdim=True)
            h1, _ = self.att1(q, x, x)
            h2, _ = self.att2(q + h1, x, x)
            return self.out(torch.cat([q + h1 + h2, q], -1))[:, 0]

    probe = Probe()
    opt = torch.optim.Adam(probe.parameters(), a.lr)
    ef, ew, ea = encode(held, ev_feats)
    t0 = time.time()
    for step in range(1, a.steps + 1):
        f, w, y = encode(rng.sample(train, a.bs), feats)
        loss = F.cross_entropy(probe(f, w), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % a.eval_every == 0:
            with torch.no_grad():
                ok = (probe(ef, ew).argmax(-1) == ea).tolist()
            acc: dict[str, list[int]] = {}
            for r, o in zip(held, ok, strict=True):
                c = acc.setdefault(r[3], [0, 0])
                c[0] += o
                c[1] += 1
            res = {k: round(v[0] / v[1], 3) for k, v in sorted(acc.items())}
            print(f"step {step} loss {loss.item():.3f} {res} {time.time() - t0:.0f} s", flush=True)


SUFFIX = " Answer with a sentence."


def sentence(q: str, ans: str) -> tuple[str, str] | None:
    """The sentence form of a question, or None for questions without one."""
    for pat, fmt in (
        (r"What color is (.+)\?", "{} is {}."),
        (r"What shape is (.+)\?", "{} is a {}."),
        (r"Is (.+) large or small\?", "{} is {}."),
    ):
        if m := re.fullmatch(pat, q):
            return q + SUFFIX, fmt.format(m.group(1), ans)
    m = re.fullmatch(r"How many (.+) are there\?", q)
    if m and m.group(1) != "shapes":
        return q + SUFFIX, f"the number of {m.group(1)} is {ans}."
    return None


_REFERENT = (
    r"What color is the (.+)\?",
    r"What shape is the (.+)\?",
    r"Is the (.+) large or small\?",
    r"How many (.+) are there\?",
)
_SINGULAR = {v: k for k, v in PLURALS.items()}


def referent(q: str) -> list[str] | None:
    """The attribute words naming the shape(s) a question asks about ("the small red one" →
    ["small", "red"]), or None when it names none (totals, positions, relations)."""
    for pat in _REFERENT:
        if m := re.fullmatch(pat, q):
            words = [_SINGULAR.get(w, w) for w in m.group(1).split()]
            words = [w for w in words if w in KINDS or w in COLORS or w in SIZES]
            return words or None
    return None


def guide_targets(scene, q: str, ids: list[int], tok, grid: int, image_size: int, img_id: int):
    """Attention targets for the two look-up hops of a one-question row, or None.

    hop 1: the question's attribute words (the position that predicts the answer should read
    them); hop 2: the image tokens whose cells overlap a shape the question names.
    """
    words = referent(q)
    if not words:
        return None
    shapes = [s for s in scene.shapes if all(w in (s.kind, s.color, s.size) for w in words)]
    if not shapes:
        return None
    first = ids.index(img_id)
    cell = image_size / grid
    cells = set()
    for s in shapes:
        x0, y0, x1, y1 = s.bbox
        for r in range(int(y0 // cell), min(grid - 1, int(y1 // cell)) + 1):
            for c in range(int(x0 // cell), min(grid - 1, int(x1 // cell)) + 1):
                cells.add(first + r * grid + c)
    last_img = first + grid * grid
    words_pos = [
        i
        for i in range(last_img, len(ids))
        if _SINGULAR.get(t := tok.decode([ids[i]]).strip(), t) in words
    ]
    return (sorted(words_pos), sorted(cells)) if words_pos else None


def cmd_decoder(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    vlm = fastvlm.load(a.model, device="cpu")
    model, proc = vlm.model, vlm.processor
    if a.reinit_lm:  # fresh projector + decoder; init_weights() resets the tower too: restore it
        tower = {k: v.clone() for k, v in model.vision_tower.state_dict().items()}
        model.init_weights()
        model.vision_tower.load_state_dict(tower)
    model.vision_tower.requires_grad_(False)

    def encode(turns, scene=None):
        """Token ids + labels of a conversation about one scene, as `fastvlm train` encodes it."""
        msgs = []
        for i, (q, ans) in enumerate(turns):
            first = f"Scene: {scene}\n{q}" if scene else f"<image>\n{q}"
            msgs.append({"role": "user", "content": first if i == 0 else q})
            msgs.append({"role": "assistant", "content": ans})
        return encode_record(Record([], msgs), proc)  # image features come from the cache

    def batchify(rows):
        b = collate(rows)
        return b["input_ids"], b["labels"]

    feats, meta = load_caches(a.train)
    ev_feats, ev_meta = load_caches([a.eval])
    cfg = model.config
    grid = math.isqrt(feats.shape[1])
    if a.guide:
        for m in meta:
            m["scene"] = sample_scene(image_rng(a.train_seed, m["i"]), cfg.vision.image_size)

    def sample_row(j):
        m = meta[j]
        scene = m["caption"] if a.text_scene else None
        if not scene and rng.random() < a.pcap:
            return encode([(rng.choice(DESCRIBE_PROMPTS), m["caption"])])
        if a.guide and rng.random() < a.guide_frac:
            qas = m["qas"]
            if a.count_frac:
                counts = [qa for qa in qas if qa[2] == "count" and referent(qa[0])]
                if counts and rng.random() < a.count_frac:
                    qas = counts
            q, ans, _ = rng.choice(qas)
            row = encode([(q, ans)])
            tg = guide_targets(
                m["scene"],
                q,
                row["input_ids"].tolist(),
                proc.tokenizer,
                grid,
                cfg.vision.image_size,
                cfg.image_token_id,
            )
            if tg:
                row["guide"] = tg
            return row
        chosen = rng.sample(m["qas"], rng.randint(1, min(a.maxq, len(m["qas"]))))
        turns = []
        for q, ans, _ in chosen:
            s = sentence(q, ans) if rng.random() < a.psent else None
            turns.append(s or (q, ans))
        return encode(turns, scene)

    held = []
    for k, m in enumerate(ev_meta[: a.neval]):
        scene = m["caption"] if a.text_scene else None
        if not scene:
            held.append((k, "caption", encode([(DESCRIBE_PROMPT, m["caption"])])))
        for q, ans, t in m["qas"]:
            held.append((k, t, encode([(q, ans)], scene)))
            if a.psent and t in ("color", "shape") and (s := sentence(q, ans)):
                held.append((k, f"{t}-sentence", encode([s])))

    @torch.no_grad()
    def evaluate():
        model.eval()
        res: dict[str, list[int]] = {}
        for s in range(0, len(held), 128):
            chunk = held[s : s + 128]
            ids, lab = batchify([r[2] for r in chunk])
            emb = (
                None
                if a.text_scene
                else model.mm_projector(ev_feats[[r[0] for r in chunk]].float())
            )
            pred, tgt = model(ids, image_embeds=emb)[:, :-1].argmax(-1), lab[:, 1:]
            for r, o in zip(chunk, ((pred == tgt) | (tgt == -100)).all(1).tolist(), strict=True):
                c = res.setdefault(r[1], [0, 0])
                c[0] += o
                c[1] += 1
        model.train()
        return {k: round(v[0] / v[1], 3) for k, v in sorted(res.items())}

    captured: dict[int, torch.Tensor] = {}
    tc = cfg.text
    for layer in a.guide_layers if a.guide else ():
        model.language_model.layers[layer].input_layernorm.register_forward_hook(
            lambda mod, i, o, layer=layer: captured.__setitem__(layer, o)
        )

    def head_logprobs(layer, head, rows, qpos, cos, sin) -> torch.Tensor:
        """log attention of `head` of `layer` at positions `qpos` of `rows`: (R, T)."""
        x = captured[layer][rows]
        att = model.language_model.layers[layer].self_attn
        t, hd = x.shape[1], tc.head_dim
        kv = head // (tc.num_attention_heads // tc.num_key_value_heads)
        xq = x[torch.arange(len(rows)), qpos]
        q = att.q_proj(xq)[:, head * hd : (head + 1) * hd]
        k = att.k_proj(x)[..., kv * hd : (kv + 1) * hd]
        q = q * cos[qpos] + rotate_half(q) * sin[qpos]
        k = k * cos + rotate_half(k) * sin
        sc = (k @ q[:, :, None])[..., 0] / math.sqrt(hd)
        sc = sc.masked_fill(torch.arange(t)[None] > qpos[:, None], float("-inf"))
        return sc.log_softmax(-1)

    def guide_loss(rows_enc, lab) -> torch.Tensor:
        rows = [i for i, r in enumerate(rows_enc) if "guide" in r]
        if not rows:
            return torch.zeros(())
        qpos = torch.tensor([int((lab[i] != -100).nonzero()[0]) - 1 for i in rows])
        dtype = captured[a.guide_layers[0]].dtype
        cos, sin = rope_cos_sin(torch.arange(lab.shape[1])[None], tc.head_dim, tc.rope_theta, dtype)
        cos, sin = cos[0, 0], sin[0, 0]  # (T, head_dim), shared by every guided head
        total = torch.zeros(())
        for hop, layer in enumerate(a.guide_layers):
            for head in a.guide_heads if hop else (0,):
                lp = head_logprobs(layer, head, rows, qpos, cos, sin)
                for n, i in enumerate(rows):
                    total = total - lp[n, rows_enc[i]["guide"][hop]].logsumexp(0) / len(rows)
        return total

    print("step 0", evaluate(), flush=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01, betas=(0.9, 0.95))
    model.train()
    t0, avg, gavg = time.time(), 0.0, 0.0
    for step in range(a.steps):
        cos = 0.5 * (1 + math.cos(math.pi * step / a.steps))
        for g in opt.param_groups:
            g["lr"] = a.lr * min(1.0, (step + 1) / a.warmup) * (0.1 + 0.9 * cos)
        idx = [rng.randrange(len(meta)) for _ in range(a.bs)]
        rows_enc = [sample_row(j) for j in idx]
        ids, lab = batchify(rows_enc)  # collate ignores the "guide" key
        emb = None if a.text_scene else model.mm_projector(feats[idx].float())
        logits = model(ids, image_embeds=emb)
        loss = lm_loss(logits, lab) / (lab[:, 1:] != -100).sum()
        if a.guide:
            aux = guide_loss(rows_enc, lab)
            loss = loss + a.guide * aux
            gavg = 0.98 * gavg + 0.02 * aux.item() if step else aux.item()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        avg = 0.98 * avg + 0.02 * loss.item() if step else loss.item()
        if (step + 1) % 50 == 0:
            g = f" guide {gavg:.3f}" if a.guide else ""
            print(f"step {step + 1} loss {avg:.4f}{g} {time.time() - t0:.0f} s", flush=True)
        if (step + 1) % a.eval_every == 0 or step + 1 == a.steps:
            print("eval", step + 1, evaluate(), flush=True)
            if a.out:  # a loadable model folder (float32; the shipped asset stores float16)
                save_model(Path(a.out), model, None, Path(a.model))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cache")
    c.add_argument("--model", default=ASSET)
    c.add_argument("--seed", type=int, required=True, help="shapes data seed")
    c.add_argument("--start", type=int, default=0)
    c.add_argument("--end", type=int, required=True)
    c.add_argument("--out", required=True)
    for s in (sub.add_parser("probe"), sub.add_parser("decoder")):
        s.add_argument("--train", nargs="+", required=True, help="cache files")
        s.add_argument("--eval", required=True, help="cache file of held-out scenes")
        s.add_argument("--eval-every", type=int, default=250)
        s.add_argument("--seed", type=int, default=0)
    pr = sub.choices["probe"]
    pr.add_argument("--steps", type=int, default=500)
    pr.add_argument("--bs", type=int, default=256)
    pr.add_argument("--lr", type=float, default=2e-3)
    d = sub.choices["decoder"]
    d.add_argument("--model", default=ASSET)
    d.add_argument("--steps", type=int, default=1000)
    d.add_argument("--bs", type=int, default=64)
    d.add_argument("--lr", type=float, default=1e-3)
    d.add_argument("--warmup", type=int, default=50)
    d.add_argument("--pcap", type=float, default=0.25, help="fraction of caption-only rows")
    d.add_argument("--maxq", type=int, default=4, help="questions per question row, at most")
    d.add_argument("--psent", type=float, default=0.0, help="fraction of sentence answers")
    d.add_argument("--neval", type=int, default=300, help="held-out scenes evaluated")
    d.add_argument("--reinit-lm", action="store_true", help="fresh projector + decoder")
    d.add_argument("--out", help="save the model here at every evaluation")
    d.add_argument(
        "--guide",
        type=float,
        default=0.0,
        help="weight of the look-up guide: at the position that predicts the answer, head 0 of"
        " the first --guide-layers layer attends to the question's attribute words (hop 1), heads"
        " --guide-heads of the second to the image tokens of the named shape(s) (hop 2)",
    )
    d.add_argument("--guide-layers", type=int, nargs=2, default=[0, 1])
    d.add_argument("--guide-heads", type=int, nargs="+", default=[0], help="heads guided in hop 2")
    d.add_argument("--guide-frac", type=float, default=0.6, help="guided one-question rows")
    d.add_argument(
        "--count-frac",
        type=float,
        default=0.0,
        help='of the guided rows, the fraction asking "How many <kind / colour> ..."',
    )
    d.add_argument("--train-seed", type=int, default=3, help="data seed of the --train caches")
    d.add_argument(
        "--text-scene",
        action="store_true",
        help='no image: the scene is given as text ("Scene: <caption>" before the question)',
    )
    for s in sub.choices.values():
        s.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args()
    {"cache": cmd_cache, "probe": cmd_probe, "decoder": cmd_decoder}[a.cmd](a)


if __name__ == "__main__":
    main()
