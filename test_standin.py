"""Tests of standin.py: the rendered, captioned digits, the stand-in's pretraining and its shipped,
content-addressed checkpoint."""
import re

import pytest
import torch
import torch.nn.functional as F

import checkpoints
import clip_model as cm
import data
import standin
import train


def test_standin_pretraining_learns(pretrained_tiny):
    path, history, model = pretrained_tiny
    assert sum(history[-10:]) / 10 < history[0] - 0.3  # the contrastive loss goes down
    # zero-shot on held-out rendered digits (a seed the training stream never used): well above 10%
    x, y, _ = standin.render_digits(500, seed=12345)
    mean, std = torch.tensor(cm.CLIP_MEAN).view(3, 1, 1), torch.tensor(cm.CLIP_STD).view(3, 1, 1)
    with torch.no_grad():
        W = cm.text_classifier(model, cm.class_prompts(data.DIGIT_NAMES, [data.DIGITS_TEMPLATE]), "cpu")
        acc = (F.normalize(model.encode_image((x - mean) / std), dim=-1) @ W.t()).argmax(1).eq(y).float().mean()
    assert acc > 0.2, acc


def test_clip_loss_counts_same_digit_captions_as_matches():
    g = torch.Generator().manual_seed(0)
    v, t = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    labels = torch.tensor([0, 0, 1, 2, 1])
    logits = 10.0 * F.normalize(v, dim=-1) @ F.normalize(t, dim=-1).t()

    def soft_ce(rows):  # each row's target: uniform over the columns with the same digit
        total = 0.0
        for i in range(5):
            matches = [j for j in range(5) if labels[j] == labels[i]]
            total += -sum(rows[i].log_softmax(0)[j] for j in matches) / len(matches)
        return total / 5

    assert torch.isclose(standin.clip_loss(v, t, 10.0, labels), (soft_ce(logits) + soft_ce(logits.t())) / 2)


def test_the_shipped_standin_is_content_addressed(tmp_path, monkeypatch):
    """--clip demo loads the shipped file, whose sha256 is checked (a changed byte is refused in
    one line); rebuild() stores matrices in fp16 and the rest in fp32, and the same tensors give
    the same bytes, so the sha256 says whether a rebuild made the shipped stand-in."""
    model, _ = standin.load("--clip", "demo", None, "cpu")
    assert model.cfg == cm.CONFIGS["demo"] and all(p.dtype == torch.float32 for p in model.parameters())
    stored = checkpoints.read_safetensors(standin.SHIPPED)
    assert all(torch.equal(model.state_dict()[k], v.float()) for k, v in stored.items())
    assert stored["token_embedding.weight"].dtype == torch.float16 and stored["logit_scale"].dtype == torch.float32
    assert standin.backbone_id("--clip", "demo") == f"demo (sha256:{standin.SHIPPED_SHA256[:16]})"
    changed = tmp_path / "standin.safetensors"
    blob = bytearray(standin.SHIPPED.read_bytes())
    blob[-1] ^= 1
    changed.write_bytes(bytes(blob))
    monkeypatch.setattr(standin, "SHIPPED", changed)
    with pytest.raises(train.RunError, match="not the stand-in the demo tables were measured with") as e:
        standin.check_backbone("--clip", "demo")
    assert "\n" not in str(e.value)
    monkeypatch.setattr(standin, "pretrain", lambda model, **kw: [0.0])  # the tiny model as initialised
    s = dict(config="tiny-vit", steps=1, batch=4)
    (p1, sha1), (p2, sha2) = (standin.rebuild(tmp_path / f"{i}.safetensors", s) for i in (1, 2))
    assert sha1 == sha2 == checkpoints.sha256_of(p1) and p1.read_bytes() == p2.read_bytes()
    built = checkpoints.read_safetensors(p1)
    assert built["visual.proj"].dtype == torch.float16 and built["ln_final.weight"].dtype == torch.float32
    model, _ = checkpoints.load(str(p1), act="quick_gelu")
    assert model.cfg == cm.CONFIGS["tiny-vit"]


# --------------------------------------------------------------------------- data: the offline digits

def _names_in(caption):
    """Digits a caption names, by word or by numeral (whole words only)."""
    found = set()
    for c, word in enumerate(data.DIGIT_NAMES):
        if re.search(rf"\b({word}|{c})\b", caption, flags=re.IGNORECASE):
            found.add(c)
    return found


def test_render_is_deterministic_per_seed():
    a = standin.render_digits(64, seed=0)
    b = standin.render_digits(64, seed=0)
    c = standin.render_digits(64, seed=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    assert not torch.equal(a[0], c[0])
    assert a[2] != c[2]


def test_rendered_batches_are_deterministic_per_seed():
    run = lambda seed: list(standin.RenderedBatches(16, 3, seed))
    a, b, c = run(0), run(0), run(1)
    assert len(a) == 3
    for (xa, ya, ca), (xb, yb, cb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and ca == cb
    assert not torch.equal(a[0][0], a[1][0])  # the stream moves on from batch to batch
    assert not torch.equal(a[0][0], c[0][0])


def test_rendered_images_labels_and_levels():
    x, y, caps = standin.render_digits(500, seed=0)
    assert x.shape == (500, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (500,) and y.dtype == torch.int64 and len(caps) == 500
    assert x.min() >= 0 and x.max() <= 1
    assert torch.equal(x * 16, (x * 16).round())  # only the 17 levels k/16
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    assert set(y.tolist()) == set(range(10))
    ink = x[:, 0].mean((1, 2))
    assert (ink > 0.1).all()  # no blank images
    assert 0.25 < ink.mean() < 0.36  # about the UCI ink density (0.31)
    assert standin.render_digits(4, seed=0, size=64)[0].shape == (4, 3, 64, 64)


def test_every_caption_names_its_digit_and_only_it():
    _, y, caps = standin.render_digits(500, seed=0)
    for c, cap in zip(y.tolist(), caps):
        assert _names_in(cap) == {c}, cap
    assert len(set(caps)) > 50  # varied
    words = sum(any(w in cap for w in data.DIGIT_NAMES) for cap in caps)
    assert 150 < words < 350  # both words and numerals are used


def test_zero_shot_prompts_match_the_captions():
    assert len(standin.CAPTION_TEMPLATES) >= 12
    assert data.DIGITS_TEMPLATE.replace("{}", "{d}") in standin.CAPTION_TEMPLATES
    for c, name in enumerate(data.DIGIT_NAMES):
        assert _names_in(data.DIGITS_TEMPLATE.format(name)) == {c}


def test_pretraining_through_the_shared_loop_equals_a_plain_loop():
    """standin.pretrain runs on train.fit; this plain loop (AdamW as CLIP, warm-up capped by a
    cosine, the temperature clamped after every step) is the recipe written out by hand. The two
    must give the same weights bit for bit: the stand-in, and every demo number, depend on it."""
    import math
    settings = dict(steps=6, batch=8, lr=1e-3, weight_decay=0.1, warmup=2, seed=0)
    ours = cm.tiny_clip("tiny-vit", seed=0)
    standin.pretrain(ours, log_every=0, **settings)
    ref = cm.tiny_clip("tiny-vit", seed=0)
    decay = [p for n, p in ref.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in ref.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0}],
                            lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / 2, 0.5 * (1 + math.cos(math.pi * s / 6))))
    mean, std = torch.tensor(cm.CLIP_MEAN).view(3, 1, 1), torch.tensor(cm.CLIP_STD).view(3, 1, 1)
    ref.train()
    for images, labels, captions in standin.RenderedBatches(8, 6, 0, ref.visual.resolution):
        loss = standin.clip_loss(ref.encode_image((images - mean) / std),
                                 ref.encode_text(cm.tokenize(captions, ref.context_length, truncate=True)),
                                 ref.logit_scale.exp(), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            ref.logit_scale.clamp_(0, math.log(100))
    a, b = ours.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
