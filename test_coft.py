"""Tests: CPU, tiny models built from synthetic state dicts with the real key layout.
Run: python -m pytest -q test_coft.py"""
import copy
import functools
import gzip
import hashlib
import http.server
import json
import os
import pickle
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import clip_model as cm
import coft
import data
import train

torch.set_num_threads(2)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit deprecation notices


def randomized(name, seed=0, **overrides):
    """A tiny CLIP whose biases, zero-initialised gains and BatchNorm statistics are random too,
    so that a key loaded into the wrong place cannot go unnoticed."""
    m = cm.tiny_clip(name, seed=seed, **overrides)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "bias" in n or n.endswith("bn3.weight"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for n, b in m.named_buffers():
            if "running_mean" in n:
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif "running_var" in n:
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return m.eval()


TEXTS = ["a photo of a cat.", "hello world", "x", "a b c d e f g h i j"]


def inputs(model, n=3):
    R = model.visual.resolution
    return torch.randn(n, 3, R, R, generator=torch.Generator().manual_seed(1)), cm.tokenize(TEXTS, model.context_length)


# --------------------------------------------------------------------------- CLIP: loading

@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_state_dict_round_trip_is_strict_and_exact(name):
    m = randomized(name)
    sd = m.state_dict()
    m2 = cm.build_model({k: v.clone() for k, v in sd.items()})
    assert m2.cfg == m.cfg  # every size recovered from shapes alone
    assert set(m2.state_dict()) == set(sd)  # every key used, none missing
    x, t = inputs(m)
    with torch.no_grad():
        assert torch.equal(m.encode_image(x), m2.encode_image(x))
        assert torch.equal(m.encode_text(t), m2.encode_text(t))


def test_shape_inference_of_real_sizes_without_building():
    """Config inference on the shapes of ViT-B/16 and RN50 (meta tensors: no memory)."""
    for name in ("ViT-B/16", "RN50"):
        with torch.device("meta"):
            sd = cm.CLIP(cm.CONFIGS[name]).state_dict()
        assert cm.config_from_state_dict(sd) == cm.CONFIGS[name]


def test_unexpected_or_missing_key_is_an_error():
    sd = randomized("tiny-vit").state_dict()
    bad = dict(sd, **{"visual.extra": torch.zeros(1)})
    with pytest.raises(cm.CLIPError, match="unexpected"):
        cm.build_model(bad)
    bad = {k: v for k, v in sd.items() if k != "ln_final.bias"}
    with pytest.raises(cm.CLIPError, match="missing"):
        cm.build_model(bad)
    with pytest.raises(cm.CLIPError, match="not a CLIP state dict"):
        cm.build_model({"foo": torch.zeros(1)})


def test_fp16_checkpoint_loads_to_fp32_parameters(tmp_path):
    m = randomized("tiny-vit")
    sd = {k: (v.half() if v.dtype == torch.float32 and v.ndim == 2 else v) for k, v in m.state_dict().items()}
    torch.save(sd, tmp_path / "half.pt")
    model, preprocess = cm.load(str(tmp_path / "half.pt"))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.equal(model.visual.proj, sd["visual.proj"].float())


def test_torchscript_archive_loads_like_its_state_dict(tmp_path):
    m = randomized("tiny-vit")
    x, t = inputs(m)

    class Archive(torch.nn.Module):
        """The CLIP's modules and tensors at the top level, plus the three JIT leftovers
        (input_resolution, context_length, vocab_size) that OpenAI's archives carry."""
        def __init__(self):
            super().__init__()
            for k, child in m.named_children():
                setattr(self, k, child)
            for k, p in m.named_parameters(recurse=False):
                self.register_parameter(k, p)
            for k, v in (("input_resolution", 32), ("context_length", 16), ("vocab_size", 49408)):
                self.register_buffer(k, torch.tensor(v))

        def forward(self, images):
            return self.visual(images)

    traced = torch.jit.trace(Archive(), (x,))
    assert set(traced.state_dict()) == set(m.state_dict()) | {"input_resolution", "context_length", "vocab_size"}
    traced.save(str(tmp_path / "tiny.pt"))
    torch.save(m.state_dict(), tmp_path / "tiny_sd.pt")
    a, _ = cm.load(str(tmp_path / "tiny.pt"))
    b, _ = cm.load(str(tmp_path / "tiny_sd.pt"))
    with torch.no_grad():
        assert torch.equal(a.encode_image(x), b.encode_image(x))
        assert torch.equal(a.encode_text(t), b.encode_text(t))


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(cm.CLIPError, match="unknown model"):
        cm.load("ViT-H/99")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(cm.CLIPError, match="neither a TorchScript archive nor a state dict"):
        cm.load(str(tmp_path / "junk.pt"))
    # a cached file under a known name with the wrong hash is refused, not used
    (tmp_path / "RN50.pt").write_bytes(b"corrupt")
    with pytest.raises(cm.CLIPError, match="does not have the sha256"):
        cm.load("RN50", cache_dir=tmp_path)


# --------------------------------------------------------------------------- CLIP: download

def test_download_file_url_checks_hash(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 1000)
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    dest = tmp_path / "cache" / "model.pt"
    assert cm.download(src.as_uri(), dest, sha, progress=False) == dest
    assert dest.read_bytes() == src.read_bytes()
    dest2 = tmp_path / "cache" / "other.pt"
    with pytest.raises(cm.CLIPError, match="expected"):
        cm.download(src.as_uri(), dest2, "0" * 64, progress=False)
    assert not dest2.exists() and not dest2.with_name("other.pt.part").exists()  # no corrupt file left


class RangeHandler(http.server.BaseHTTPRequestHandler):
    """Serves one payload and honours `Range: bytes=N-` (python's http.server does not)."""
    payload, requests = b"", []

    def do_GET(self):
        rng = self.headers.get("Range")
        RangeHandler.requests.append(rng)
        start = int(rng.split("=")[1].rstrip("-")) if rng else 0
        body = self.payload[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_download_resumes_a_partial_file(tmp_path):
    payload = bytes(range(256)) * 4000
    RangeHandler.payload, RangeHandler.requests = payload, []
    server = http.server.HTTPServer(("127.0.0.1", 0), RangeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dest = tmp_path / "model.pt"
        dest.with_name("model.pt.part").write_bytes(payload[:300000])  # an interrupted earlier download
        cm.download(f"http://127.0.0.1:{server.server_port}/model.pt", dest,
                    hashlib.sha256(payload).hexdigest(), progress=False)
    finally:
        server.shutdown()
    assert RangeHandler.requests == ["bytes=300000-"]
    assert dest.read_bytes() == payload


def test_no_network_says_where_to_put_the_file(tmp_path):
    with pytest.raises(cm.CLIPError, match="Put the file at .*RN50.pt"):
        cm.download("http://127.0.0.1:1/RN50.pt", tmp_path / "RN50.pt", "0" * 64, retries=1, progress=False)


# --------------------------------------------------------------------------- tokenizer

def test_tokenizer_known_answers():
    t = cm.tokenize("a photo of a cat.")
    assert t.shape == (1, 77)
    assert t[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 269, 49407]
    assert t[0, 8:].eq(0).all()
    tok = cm.tokenizer()
    assert len(tok.encoder) == 49408 and tok.sot == 49406 and tok.eot == 49407
    with gzip.open(cm.ASSETS / "bpe_simple_vocab_16e6.txt.gz", "rb") as f:
        assert len(f.read()) > 1_000_000


def test_tokenizer_cleans_text():
    tok = cm.tokenizer()
    # HTML entities (even double-escaped), mojibake, case and whitespace are normalised
    assert tok.encode("A &amp;amp;  Photo\n\tOF a CAT.") == tok.encode("a & photo of a cat.")
    assert tok.encode("cafÃ©") == tok.encode("café")
    assert tok.decode(cm.tokenize("Hello,   World!")[0].tolist()) == "hello , world !"
    # digits are split one by one; unicode letters stay words
    assert len(tok.encode("2024")) == 4
    assert tok.decode(tok.encode("ünïcödé 日本")) == "ünïcödé 日本"


def test_tokenizer_truncation():
    long = " ".join(["cat"] * 100)
    with pytest.raises(cm.CLIPError, match="longer than the context"):
        cm.tokenize(long)
    t = cm.tokenize(long, truncate=True)
    assert t[0, -1].item() == 49407 and t[0, 0].item() == 49406 and t[0, 1:-1].eq(2368).all()


# --------------------------------------------------------------------------- hooks

def full_length_text_features(model, tokens, embeddings=None):
    """The text tower the long way: all context positions, explicit causal mask."""
    x = model.token_embedding(tokens) if embeddings is None else embeddings
    x = x + model.positional_embedding
    L = x.shape[1]
    mask = torch.full((L, L), float("-inf")).triu(1)
    for blk in model.transformer.resblocks:
        h = blk.ln_1(x)
        q, k, v = F.linear(h, blk.attn.in_proj_weight, blk.attn.in_proj_bias).chunk(3, -1)
        H = blk.attn.heads
        q, k, v = (z.view(z.shape[0], L, H, -1).transpose(1, 2) for z in (q, k, v))
        a = ((q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5 + mask).softmax(-1) @ v
        x = x + blk.attn.out_proj(a.transpose(1, 2).reshape(x.shape))
        x = x + blk.mlp(blk.ln_2(x))
    x = model.ln_final(x)
    return x[torch.arange(len(tokens)), tokens.argmax(-1)] @ model.text_projection


def test_eot_truncated_text_tower_equals_full_length():
    m = randomized("tiny-vit", context_length=77)
    t = cm.tokenize(TEXTS)
    with torch.no_grad():
        ours = m.encode_text(t)
        ref = full_length_text_features(m, t)
        assert (ours - ref).abs().max() < 1e-5
        # embeddings in place of ids (the prompt-learning hook) give the same features
        emb = m.token_embedding(t)
        assert (m.encode_text(t, embeddings=emb) - ours).abs().max() < 1e-6
        # a changed embedding *after* the EOT changes nothing (causality), one before it does
        emb2 = emb.clone()
        emb2[:, 20:] += 1.0
        assert torch.equal(m.encode_text(t, embeddings=emb2), m.encode_text(t, embeddings=emb))
        emb2[:, 1] += 1.0
        assert not torch.allclose(m.encode_text(t, embeddings=emb2), ours)


def test_prompt_embeddings_receive_gradients():
    m = randomized("tiny-vit")
    t = cm.tokenize(["x x x x cat.", "x x x x dog."], m.context_length)
    ctx = torch.zeros(4, m.cfg.transformer_width, requires_grad=True)
    emb = m.token_embedding(t).detach()
    emb = torch.cat([emb[:, :1], ctx.expand(2, -1, -1), emb[:, 5:]], dim=1)
    m.encode_text(t, embeddings=emb).sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0


def test_zero_vpt_tokens_equal_plain_vit_and_prompts_act():
    m = randomized("tiny-vit", vision_layers=3)
    x, _ = inputs(m)
    W = m.visual.conv1.out_channels
    with torch.no_grad():
        plain = m.encode_image(x)
        for depth in (1, 3):
            assert torch.equal(m.encode_image(x, vpt=torch.zeros(depth, 0, W)), plain)
        shallow = torch.randn(1, 5, W)
        deep = torch.cat([shallow, torch.randn(2, 5, W)])
        out_s, out_d = m.encode_image(x, vpt=shallow), m.encode_image(x, vpt=deep)
        assert not torch.allclose(out_s, plain) and not torch.allclose(out_s, out_d)
        # shallow prompts are exactly extra tokens after CLS: recompute them by hand
        v = m.visual
        h = v.conv1(x).flatten(2).transpose(1, 2)
        h = torch.cat([v.class_embedding.expand(len(x), 1, -1), h], 1) + v.positional_embedding
        h = v.ln_pre(h)
        h = torch.cat([h[:, :1], shallow.expand(len(x), -1, -1), h[:, 1:]], 1)
        h = v.transformer(h)
        assert (v.ln_post(h[:, 0]) @ v.proj - out_s).abs().max() < 1e-5
        # deep prompts by hand: before block i < D, block i-1's prompt outputs are *replaced* by set i
        h = v.conv1(x).flatten(2).transpose(1, 2)
        h = v.ln_pre(torch.cat([v.class_embedding.expand(len(x), 1, -1), h], 1) + v.positional_embedding)
        for i, block in enumerate(v.transformer.resblocks):
            patches = h[:, 1:] if i == 0 else h[:, 1 + 5:]
            h = block(torch.cat([h[:, :1], deep[i].expand(len(x), -1, -1), patches], 1))
        assert (v.ln_post(h[:, 0]) @ v.proj - out_d).abs().max() < 1e-5
    # deep prompts: every layer's set receives a gradient
    deep.requires_grad_(True)
    m.encode_image(x, vpt=deep).sum().backward()
    assert (deep.grad.flatten(1).abs().sum(1) > 0).all()


def test_resnet_refuses_vpt():
    m = randomized("tiny-rn")
    x, _ = inputs(m)
    assert torch.equal(m.encode_image(x, vpt=torch.zeros(1, 0, 8)), m.encode_image(x))
    with pytest.raises(cm.CLIPError):
        m.encode_image(x, vpt=torch.zeros(1, 2, 8))


def test_preprocess_transform():
    from PIL import Image
    img = Image.new("L", (50, 40), color=255)
    out = cm.transform(32)(img)
    assert out.shape == (3, 32, 32)
    assert torch.allclose(out[:, 0, 0], (1 - torch.tensor(cm.CLIP_MEAN)) / torch.tensor(cm.CLIP_STD), atol=1e-5)


def test_bench_runs_on_a_tiny_model(capsys):
    cm.bench(names=("tiny-vit", "tiny-rn"), batch=2, prompts=4, steps=1, device="cpu")
    out = capsys.readouterr().out
    assert out.count("images/s") == 2 and "prompts/s" in out


# --------------------------------------------------------------------------- reference

@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_matches_open_clip_reference(name):
    """Same weights, same inputs: open-clip-torch's independent CLIP gives the same features."""
    open_clip = pytest.importorskip("open_clip")
    m = randomized(name, seed=3)
    sd = m.state_dict()
    ref = open_clip.model.build_model_from_openai_state_dict({k: v.clone() for k, v in sd.items()},
                                                             cast_dtype=torch.float32).float().eval()
    ref.load_state_dict(sd)  # undo any rounding the builder did
    x, t = inputs(m)
    with torch.no_grad():
        for ours, theirs in ((m.encode_image(x), ref.encode_image(x)), (m.encode_text(t), ref.encode_text(t))):
            assert ours.abs().mean() > 0.05  # unit-scale features, not all zeros
            assert (ours - theirs).abs().max() < 1e-4


# --------------------------------------------------------------------------- CoFT: building blocks

def test_topk_per_class_ties_and_short_classes():
    probs = torch.tensor([
        [0.9, 0.1, 0.0],   # 0 -> class 0
        [0.6, 0.4, 0.0],   # 1 -> class 0
        [0.6, 0.3, 0.1],   # 2 -> class 0, ties with 1 on confidence
        [0.2, 0.8, 0.0],   # 3 -> class 1
        [0.7, 0.2, 0.1],   # 4 -> class 0
    ])
    idx, y = coft.topk_per_class(probs, K=3)
    # class 0: 0 (0.9), 4 (0.7), then the tie 1/2 at 0.6 goes to the lower index; class 1 has 1 < K;
    # class 2 has no candidate at all
    assert idx.tolist() == [0, 4, 1, 3] and y.tolist() == [0, 0, 0, 1]


def random_scores(B=6, C=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, C, generator=g) * 2 - 1, torch.rand(B, C, generator=g) * 2 - 1, \
        torch.randint(0, C, (B,), generator=g)


def test_losses_match_direct_recomputation():
    s_pos, s_neg, y = random_scores()
    tau = 0.1  # direct exp() below stays finite; the implementation is stable at any tau
    yc = coft.complement_labels(y, 5, torch.Generator().manual_seed(1))
    assert (yc != y).all() and (yc >= 0).all() and (yc < 5).all()
    # L1: -log softmax of the true class, written out
    l1 = torch.stack([-(s_pos[i, y[i]] / tau - torch.logsumexp(s_pos[i] / tau, 0)) for i in range(6)]).mean()
    assert torch.allclose(coft.loss_l1(s_pos, y, tau), l1, atol=1e-5)
    # p_clean from its definition, then L2 = -[log p_y + log(1 - p_y')]
    e_pos, e_neg = torch.exp(s_pos.double() / tau), torch.exp(s_neg.double() / tau)
    p = e_pos / (e_pos + e_neg)
    assert torch.allclose(coft.p_clean(s_pos, s_neg, tau).double(), p, atol=1e-6)
    l2 = -(torch.log(p[torch.arange(6), y]) + torch.log(1 - p[torch.arange(6), yc])).mean()
    assert torch.allclose(coft.loss_l2(s_pos, s_neg, y, yc, tau).double(), l2, rtol=1e-5)
    # at CLIP's temperature the direct formula overflows in float32; ours stays finite
    assert torch.isfinite(coft.loss_l2(s_pos, s_neg, y, yc, 0.01))


def test_complement_labels_are_uniform_over_other_classes():
    y = torch.zeros(20000, dtype=torch.long)
    yc = coft.complement_labels(y, 5, torch.Generator().manual_seed(0))
    counts = torch.bincount(yc, minlength=5)
    assert counts[0] == 0 and (counts[1:] - 5000).abs().max() < 300


def test_l2_sign_lowers_complement_p_clean():
    """One gradient step on L2 must raise p_clean of the label and lower that of the complement."""
    s_pos, s_neg, y = random_scores(B=1, C=4, seed=3)
    s_pos = (s_pos * 0.01).requires_grad_(True)
    s_neg = (s_neg * 0.01).requires_grad_(True)
    yc = (y + 1) % 4
    tau = 0.01
    before = coft.p_clean(s_pos, s_neg, tau).detach()
    coft.loss_l2(s_pos, s_neg, y, yc, tau).backward()
    with torch.no_grad():
        after = coft.p_clean(s_pos - 1e-3 * s_pos.grad, s_neg - 1e-3 * s_neg.grad, tau)
    assert after[0, y] > before[0, y] and after[0, yc] < before[0, yc]


def test_collaborative_filter_is_exactly_peer_margin():
    s_pos_b, s_neg_b, y_a = random_scores(B=50, C=7, seed=4)
    mask = coft.collaborative_filter(y_a, s_pos_b, s_neg_b)
    expected = [bool(s_pos_b[i, y_a[i]] > s_neg_b[i, y_a[i]]) for i in range(50)]
    assert mask.tolist() == expected and 0 < sum(expected) < 50


def tiny_backbone(name="tiny-vit", seed=0):
    return randomized(name, seed=seed).requires_grad_(False)


CLASSES = ["zero", "one", "two"]


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_phase1_trains_only_prompts_and_vpt(name):
    clip = tiny_backbone(name)
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    torch.manual_seed(0)
    model = coft.DualPromptModel(clip, CLASSES, M=4, vpt_tokens=3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {"prompts.ctx_pos", "prompts.ctx_neg"} | (
        {"vpt.prompts"} if name == "tiny-vit" else {"adapter.down.weight", "adapter.down.bias",
                                                     "adapter.up.weight", "adapter.up.bias"})
    assert trainable == expected  # the frozen CLIP is not part of the model's parameters
    assert all(not k.startswith(("visual", "transformer")) for k in model.state_dict())
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):  # two steps: the adapter's zero-initialised `up` blocks `down`'s first gradient
        opt.zero_grad()
        loss, terms = coft.phase1_loss(model, x, y, tau=0.01)
        loss.backward()
        opt.step()
    assert all(not torch.equal(start[n], p) for n, p in model.named_parameters()), "every Phase-I part moves"
    assert all(torch.equal(before[k], v) for k, v in clip.state_dict().items()), "the backbone must stay frozen"


def test_l2_reaches_everything_unless_detached_as_in_deft():
    """Gradients of L1 + L2 vs L1 alone. Default: L2 moves the positive context and the visual
    prompts too (the negative prompt regularises the visual modules). --detach-neg (DeFT: p_clean
    from a detached s+ and from image features detached for s-): L2 trains only the negative
    context, so the positive context and the VPT get exactly L1's gradient. The loss value is the
    same either way."""
    clip = tiny_backbone()
    model = coft.DualPromptModel(clip, CLASSES, M=4, vpt_tokens=3)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,))

    def grads(lam, detach):
        model.zero_grad()
        loss, _ = coft.phase1_loss(model, x, y, 0.01, lam, detach, torch.Generator().manual_seed(0))
        loss.backward()
        g = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
        return loss.detach(), g

    _, l1 = grads(0.0, False)
    assert l1["prompts.ctx_neg"].abs().sum() == 0  # L1 never sees the negative prompts
    loss_both, both = grads(1.0, False)
    loss_det, det = grads(1.0, True)
    assert torch.equal(loss_both, loss_det)
    for name in ("prompts.ctx_pos", "vpt.prompts"):
        assert not torch.allclose(both[name], l1[name], rtol=1e-3, atol=1e-6), name  # L2 reaches them by default
        assert torch.allclose(det[name], l1[name], rtol=1e-5, atol=1e-8), name  # DeFT: L1's gradient alone
    assert det["prompts.ctx_neg"].abs().sum() > 0 and torch.allclose(det["prompts.ctx_neg"], both["prompts.ctx_neg"])


def test_prompt_learner_matches_hand_built_prompts():
    """The learner's 2C prompts equal encoding 'X X X X name.' with X's embedding swapped out."""
    clip = tiny_backbone()
    pl = coft.PromptLearner(clip, CLASSES, M=4)
    with torch.no_grad():
        t_pos, t_neg = pl(clip)
        tokens = cm.tokenize([f"X X X X {c}." for c in CLASSES], clip.context_length)
        emb = clip.token_embedding(tokens)
        emb[:, 1:5] = pl.ctx_neg
        ref = F.normalize(clip.encode_text(tokens, embeddings=emb), dim=-1)
    assert (t_neg - ref).abs().max() < 1e-5 and not torch.allclose(t_pos, t_neg)
    pl2 = coft.PromptLearner(clip, CLASSES, ctx_init="a photo of a")
    assert pl2.M == 4 and torch.equal(pl2.ctx_pos, pl2.ctx_neg)


def test_text_classifier_averages_normalised_prompt_embeddings():
    """A class's weight is the mean of its prompts' *normalised* embeddings, renormalised; the
    reference is built from encode_text by hand, not from the function under test."""
    clip = randomized("tiny-vit")
    prompts = [["a cat.", "a very very small grey cat sitting on a mat."], ["dog"], ["a red fox", "fox", "the fox."]]
    W = coft.text_classifier(clip, prompts, "cpu")
    with torch.no_grad():
        ref, unnormalised = [], []
        for texts in prompts:
            e = clip.encode_text(cm.tokenize(texts, clip.context_length))  # [n, D], norms differ per prompt
            ref.append(F.normalize(F.normalize(e, dim=-1).mean(0), dim=0))
            unnormalised.append(F.normalize(e.mean(0), dim=0))
    ref, unnormalised = torch.stack(ref), torch.stack(unnormalised)
    assert (W - ref).abs().max() < 1e-5
    assert (unnormalised - ref).abs().max() > 1e-3  # the test tells the two apart


def test_similarity_logits_are_fp32_under_bf16_autocast():
    """Under (CPU) bf16 autocast the towers run in bf16, but every normalised-feature product is
    fp32: zero-shot logits, s+ / s- and the Phase-I loss, the Phase-II head, InfoNCE. Each is
    compared with float64 arithmetic on the same features (a bf16 logit near 30 is off by ~0.1)."""
    clip = tiny_backbone()
    tau = 0.01
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    W = F.normalize(torch.randn(3, clip.cfg.embed_dim, generator=torch.Generator().manual_seed(1)), dim=-1)
    bf16 = dict(device_type="cpu", dtype=torch.bfloat16)

    def close(a, b):
        return a.dtype == torch.float32 and (a.double() - b).abs().max().item() < 1e-4

    with torch.no_grad(), torch.autocast(**bf16):
        zs = coft.zero_shot_logits(clip, W, x, tau)
        f = clip.encode_image(x)
    assert f.dtype == torch.bfloat16  # the tower itself does run in bf16 here
    assert close(zs, F.normalize(f.double(), dim=-1) @ W.double().t() / tau)

    model = coft.DualPromptModel(clip, CLASSES, M=4, vpt_tokens=2)
    y = torch.tensor([0, 1, 2, 0] * 4)
    with torch.autocast(**bf16):
        v, t_pos, t_neg = model(x)
        loss, _ = coft.phase1_loss(model, x, y, tau, generator=torch.Generator().manual_seed(3))
    v, t_pos, t_neg = v.double(), t_pos.double(), t_neg.double()
    s_pos, s_neg = v @ t_pos.t(), v @ t_neg.t()
    yc = coft.complement_labels(y, 3, torch.Generator().manual_seed(3))
    ref = F.cross_entropy(s_pos / tau, y) + coft.loss_l2(s_pos, s_neg, y, yc, tau)
    assert close(loss, ref)

    ft = coft.FineTuned(clip.visual, 3, W, 1 / tau)
    mc = coft.MomentumContrast(ft, size=8)
    mc.enqueue(F.normalize(torch.randn(8, clip.cfg.embed_dim), dim=-1), torch.arange(8) + 100)
    with torch.no_grad(), torch.autocast(**bf16):
        logits, feats = ft(x), ft.features(x)
        nce = mc.info_nce(feats[:8], feats[8:], torch.arange(8))
    assert close(logits, feats.double() @ ft.head.weight.double().t() + ft.head.bias.double())
    q, k = feats[:8].double(), feats[8:].double()
    direct = torch.cat([(q * k).sum(1, keepdim=True), q @ mc.queue.double().t()], 1) / mc.tau
    assert close(nce, F.cross_entropy(direct, torch.zeros(8, dtype=torch.long)))


def test_head_init_reproduces_prompt_classifier():
    clip = tiny_backbone()
    text = F.normalize(torch.randn(3, clip.cfg.embed_dim), dim=-1)
    ft = coft.FineTuned(clip.visual, 3, text, clip.logit_scale.exp().item())
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        ref = clip.logit_scale.exp() * F.normalize(clip.encode_image(x), dim=-1) @ text.t()
        assert (ft(x) - ref).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_phase2_changes_the_encoder_not_the_frozen_backbone(name):
    clip = tiny_backbone(name)
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    ft = coft.FineTuned(clip.visual, 3, None).train()
    enc0 = {k: v.clone() for k, v in ft.visual.state_dict().items()}
    opt = torch.optim.SGD(ft.parameters(), lr=0.1)
    F.cross_entropy(ft(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    assert all(p.grad is not None for p in ft.visual.parameters() if p.requires_grad)
    changed = [k for k, v in ft.visual.state_dict().items() if not torch.equal(enc0[k], v)]
    assert len(changed) > len(enc0) // 2  # the encoder itself is fine-tuned, not just the head
    assert all(torch.equal(before[k], v) for k, v in clip.state_dict().items())
    # Phase II never touches the text tower: it has no text parameters at all
    assert not any(k.startswith(("transformer.", "token_embedding", "ln_final")) for k in ft.state_dict())


def test_cosine_with_warmup():
    lrs = [train.cosine_with_warmup(s, 100, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 0.01


@pytest.mark.parametrize("clip_grad", [1.0, 0.0])
def test_fit_reports_pre_clip_norms_and_takes_the_clipped_step(clip_grad):
    """loss = w . g_t makes step t's gradient exactly g_t (norms 5, 0.5, 10). Plain SGD, lr 1,
    cosine over 3 steps (multipliers 1, 0.75, 0.25): the parameter path is known by hand."""
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.zeros(2))
    g = [torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.4]), torch.tensor([6.0, 8.0])]
    norms = train.fit(model, lambda mdl, b, gen: ((mdl.w * b[0][0]).sum(), {}), lambda e: [(x[None],) for x in g],
                     1, 1.0, torch.device("cpu"), 0, weight_decay=0.0, momentum=0.0, warmup_epochs=0,
                     clip_grad=clip_grad, log_every=0)
    assert norms == pytest.approx([5.0, 0.5, 10.0])
    clipped = [x * min(1.0, clip_grad / x.norm()) if clip_grad else x for x in g]
    expected = -(clipped[0] + 0.75 * clipped[1] + 0.25 * clipped[2])
    assert torch.allclose(model.w.detach(), expected, atol=1e-6)
    summary = train.grad_norm_summary(norms, clip_grad)
    assert summary["median_norm"] == pytest.approx(5.0) and summary["max_norm"] == pytest.approx(10.0)
    assert summary["clipped_fraction"] == pytest.approx(2 / 3 if clip_grad else 0.0) and summary["steps"] == 3


def test_contrastive_epoch_is_one_pass_over_all_unlabelled_images():
    """CoFT+ Phase II: every unlabelled image enters L_Cont exactly once per epoch; the clean
    loader cycles alongside, each cycle drawn afresh, so L_FFT gets at least one full clean pass."""
    class Items(torch.utils.data.Dataset):
        def __init__(self, n, two_views):
            self.n, self.two = n, two_views

        def __len__(self):
            return self.n

        def __getitem__(self, i):
            x = torch.full((1,), float(i))
            return ((x, x) if self.two else x), 0, i

    unlabelled = torch.utils.data.DataLoader(Items(10, True), batch_size=4, shuffle=True,
                                             generator=torch.Generator().manual_seed(0))
    cycles = []

    def make_clean(cycle):
        cycles.append(cycle)
        return torch.utils.data.DataLoader(Items(5, False), batch_size=2, shuffle=True, drop_last=True,
                                           generator=torch.Generator().manual_seed(cycle))

    batches = list(coft.WithUnlabelled(make_clean, unlabelled))
    assert len(batches) == len(coft.WithUnlabelled(make_clean, unlabelled)) == 3  # ceil(10 / 4): no image dropped
    seen_u = torch.cat([b[5] for b in batches])
    assert sorted(seen_u.tolist()) == list(range(10))
    assert all(torch.equal(b[3][:, 0].long(), b[5]) for b in batches)  # views travel with their indices
    assert cycles == [0, 1]  # 2 clean batches per cycle (5 images, drop_last): the second cycle starts at step 3
    first_cycle = torch.cat([b[2] for b in batches[:2]]).tolist()
    assert len(set(first_cycle)) == 4  # a full pass of the clean loader, without repeats


# --------------------------------------------------------------------------- CoFT: end to end (tiny)

@pytest.fixture(scope="session")
def pretrained_tiny(tmp_path_factory):
    """tiny-vit pretrained on rendered digits for a few seconds (the stand-in recipe, tiny settings):
    a backbone whose pseudo-labels mean something, shared by the end-to-end tests."""
    torch.manual_seed(0)
    model = cm.tiny_clip("tiny-vit", seed=0)
    history = cm.pretrain(model, steps=150, batch=64, lr=7e-4, weight_decay=0.0, warmup=20, seed=0, log_every=0)
    path = tmp_path_factory.mktemp("standin") / "tiny-pretrained.pt"
    torch.save(model.state_dict(), path)
    return path, history, model.eval()


def test_standin_pretraining_learns(pretrained_tiny):
    path, history, model = pretrained_tiny
    assert sum(history[-10:]) / 10 < history[0] - 0.3  # the contrastive loss goes down
    # zero-shot on held-out rendered digits (a seed the training stream never used): well above 10%
    x, y, _ = data.render_digits(500, seed=12345)
    mean, std = torch.tensor(cm.CLIP_MEAN).view(3, 1, 1), torch.tensor(cm.CLIP_STD).view(3, 1, 1)
    with torch.no_grad():
        W = coft.text_classifier(model, coft.class_prompts(data.DIGIT_CLASSNAMES, [data.DIGITS_TEMPLATE]), "cpu")
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

    assert torch.isclose(cm.clip_loss(v, t, 10.0, labels), (soft_ce(logits) + soft_ce(logits.t())) / 2)


def test_standin_is_cached_by_settings(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cm, "pretrain", lambda model, **kw: calls.append(kw) or [0.0])
    s = dict(config="tiny-vit", steps=3, batch=4)
    p1 = cm.standin(cache_dir=tmp_path, settings=s)
    p2 = cm.standin(cache_dir=tmp_path, settings=s)
    assert p1 == p2 and len(calls) == 1 and p1.exists()  # the second call loads the cache
    cm.standin(cache_dir=tmp_path, settings=s, rebuild=True)
    assert len(calls) == 2
    p3 = cm.standin(cache_dir=tmp_path, settings=dict(s, steps=4))
    assert p3 != p1 and len(calls) == 3  # other settings, other file
    model, _ = cm.load(str(p1))
    assert model.cfg == cm.CONFIGS["tiny-vit"]


def run_args(tmp_path, *extra, name="tiny-vit", out="run", ckpt=None):
    """The CLI arguments of a small, fast run on the digits (a random tiny backbone by default)."""
    if ckpt is None:
        ckpt = tmp_path / f"{name}.pt"
        if not ckpt.exists():
            torch.save(randomized(name).state_dict(), ckpt)
    args = ["--dataset", "digits", "--clip", str(ckpt), "--out", str(tmp_path / out), "--M", "4", "--K", "4",
            "--vpt-tokens", "2", "--p1-epochs", "2", "--fft-epochs", "2", "--batch", "64", "--fft-lr", "1e-3",
            "--log-every", "0", "--fft-aug", "weak", "--clip-grad", "1"]
    return args + list(extra)


def run_coft(tmp_path, *extra, name="tiny-vit", out="run", ckpt=None):
    return coft.main(run_args(tmp_path, *extra, name=name, out=out, ckpt=ckpt))


def stage_state(run_dir, tag):
    """The model state dict of a finished stage (stages/<tag>.pt also holds its record)."""
    return torch.load(Path(run_dir) / "stages" / f"{tag}.pt", weights_only=True)["model"]


def numbers(metrics):
    """Every metric but the timings."""
    return {k: v for k, v in metrics.items() if k != "time_s"}


def test_end_to_end_writes_every_metric(tmp_path, pretrained_tiny):
    m = run_coft(tmp_path, ckpt=pretrained_tiny[0])
    for key in ("zero_shot_acc", "phase1_model1_acc", "phase1_model2_acc", "branch1_acc", "branch2_acc",
                "ensemble_acc", "phase1_agreement"):
        assert 0 <= m[key] <= 100, key
    assert m["seed_set"]["size"] <= 10 * 4
    for a in (1, 2):
        c = m[f"clean_set_{a}"]
        assert 0 <= c["size"] <= 899 and c["kept_fraction"] == pytest.approx(100 * c["size"] / 899)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(m))
    # every trained stage reports its pre-clip gradient norms: 2 epochs x steps per epoch
    p1_steps = 2 * -(-m["seed_set"]["size"] // 64)
    assert {k: v["steps"] for k, v in m["grad_norms"].items()} == {
        "phase1_round1_model1": p1_steps, "phase1_round1_model2": p1_steps,
        "branch1": 2 * (m["clean_set_1"]["size"] // 64), "branch2": 2 * (m["clean_set_2"]["size"] // 64)}
    assert all(0 <= v["clipped_fraction"] <= 1 and v["median_norm"] > 0 for v in m["grad_norms"].values())
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"]["K"] == 4
    # --eval-only reloads the saved models and reproduces every number without training
    assert m["zero_shot_acc"] > 15 and m["seed_set"]["size"] > 10  # a backbone that means something
    again = run_coft(tmp_path, "--eval-only", ckpt=pretrained_tiny[0])
    assert numbers(again) == numbers(m)


def test_resume_after_interruption_gives_the_same_result(tmp_path, monkeypatch, pretrained_tiny):
    ckpt = pretrained_tiny[0]
    full = run_coft(tmp_path, out="full", ckpt=ckpt)
    real_save, calls = train.atomic_save, []

    def dying_save(obj, path):
        calls.append(Path(path).name)
        real_save(obj, path)
        if Path(path).name == "branch1.ckpt":  # killed (Ctrl-C) right after branch 1's first epoch checkpoint
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "atomic_save", dying_save)
    with pytest.raises(SystemExit) as e:
        run_coft(tmp_path, out="killed", ckpt=ckpt)
    monkeypatch.setattr(train, "atomic_save", real_save)
    assert e.value.code == 130 and not (tmp_path / "killed" / "stages" / "branch1.pt").exists()
    resumed = run_coft(tmp_path, "--resume", out="killed", ckpt=ckpt)
    assert numbers(resumed) == numbers(full)


def test_phase_flag_runs_phases_separately(tmp_path, pretrained_tiny):
    ckpt = pretrained_tiny[0]
    full = run_coft(tmp_path, out="full", ckpt=ckpt)
    p1 = run_coft(tmp_path, "--phase", "1", out="split", ckpt=ckpt)
    assert "branch1_acc" not in p1 and p1["phase1_model1_acc"] == full["phase1_model1_acc"]
    p2 = run_coft(tmp_path, "--phase", "2", out="split", ckpt=ckpt)
    assert numbers(p2) == numbers(full)


# ---- an audit: every number and set of a finished run recomputed by hand from its saved files

@functools.lru_cache(maxsize=1)
def digit_tensors():
    """The digits task's train and test images under the test transform, and their labels."""
    task = data.digits_task()
    tf = data.make_transform("test", 32, task)
    stack = lambda items: torch.stack([tf(img) for img, _ in items])  # noqa: E731
    labels = lambda items: torch.tensor([y for _, y in items])  # noqa: E731
    return task, stack(task.train), labels(task.train), stack(task.test), labels(task.test)


def topk_by_hand(probs, K):
    """Per class, the K images labelled with it that have the highest probability, ties to the lower index."""
    conf, y = probs.max(1)
    idx = [i for k in range(probs.shape[1])
           for i in sorted((i for i in range(len(y)) if y[i] == k), key=lambda i: (-conf[i].item(), i))[:K]]
    return sorted(zip(idx, y[idx].tolist()))


def pairs(idx, y):
    return sorted(zip(idx.tolist(), y.tolist()))


def same_argmax(logits, predicted):
    """predicted == logits.argmax(1), except where the top two are within float noise (batching)."""
    top2 = logits.topk(2, dim=1).values
    differ = logits.argmax(1) != predicted
    return not (differ & (top2[:, 0] - top2[:, 1] > 1e-4)).any()


def acc(pred, y):
    return 100.0 * (pred == y).float().mean().item()


@pytest.fixture(scope="session")
def audited_run(tmp_path_factory, pretrained_tiny):
    """One CoFT run with two Phase-I rounds on the pretrained tiny backbone, plus the head every
    Phase-II branch started from."""
    tmp = tmp_path_factory.mktemp("audit")
    heads, real_fit = [], coft.fit

    def recording_fit(model, *a, **kw):
        if isinstance(model, coft.FineTuned):
            heads.append(model.head.weight.detach().clone())
        return real_fit(model, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(coft, "fit", recording_fit)
        m = run_coft(tmp, "--rounds", "2", ckpt=pretrained_tiny[0])
    return tmp / "run", m, heads, cm.load(str(pretrained_tiny[0]))[0]


def phase1_scores_by_hand(run_dir, clip, r, m, X):
    model = coft.DualPromptModel(clip, data.DIGIT_CLASSNAMES, 4, None, 2, True)
    model.load_state_dict(stage_state(run_dir, f"phase1_round{r}_model{m}"))
    with torch.no_grad():
        t_pos, t_neg = model.prompts(clip)
        v = model.image_features(X)
    return v @ t_pos.t(), v @ t_neg.t(), t_pos


def test_audit_zero_shot_and_seed_set(audited_run):
    """S*: per class the top-K of the zero-shot softmax at CLIP's own temperature (Eq. 1)."""
    run_dir, m, _, clip = audited_run
    task, X_train, y_train, X_test, y_test = digit_tensors()
    pl, preds = torch.load(run_dir / "pseudo_labels.pt"), torch.load(run_dir / "predictions.pt")
    with torch.no_grad():
        T = F.normalize(clip.encode_text(cm.tokenize([task.templates[0].format(c) for c in task.classnames],
                                                     clip.context_length)), dim=-1)
        cos_train = F.normalize(clip.encode_image(X_train), dim=-1) @ T.t()
        cos_test = F.normalize(clip.encode_image(X_test), dim=-1) @ T.t()
    scale = clip.logit_scale.exp().item()
    expected = topk_by_hand((scale * cos_train).softmax(1), 4)
    assert expected != topk_by_hand(cos_train.softmax(1), 4)  # another temperature ranks differently
    for r1_set in pl["seed_sets"][0]:  # round 1: both models train on S*
        assert pairs(*r1_set) == expected
    assert same_argmax(cos_test, preds["zero_shot"]) and m["zero_shot_acc"] == pytest.approx(acc(preds["zero_shot"], y_test))
    assert m["seed_set"]["precision"] == pytest.approx(100 * sum(y_train[i] == y for i, y in expected).item() / len(expected))


def test_audit_rounds_filter_heads_and_ensemble(audited_run):
    """Round 2 of each model trains on the top-K of *its own* round-1 model; model a's labels are
    kept where *model b* has s+ > s- (Sec. 3.2.1); branch a's head starts from *model a's*
    positive prompts; the ensemble is the mean of the branches' softmax."""
    run_dir, m, heads, clip = audited_run
    _, X_train, y_train, X_test, y_test = digit_tensors()
    pl, preds = torch.load(run_dir / "pseudo_labels.pt"), torch.load(run_dir / "predictions.pt")
    scale = clip.logit_scale.exp().item()
    r1 = [phase1_scores_by_hand(run_dir, clip, 1, mm, X_train) for mm in (1, 2)]
    own_topk = [topk_by_hand((scale * s[0]).softmax(1), 4) for s in r1]
    assert own_topk[0] != own_topk[1]
    assert [pairs(*st) for st in pl["seed_sets"][1]] == own_topk
    # the filter, both directions, with the last round's models
    r2 = [phase1_scores_by_hand(run_dir, clip, 2, mm, X_train) for mm in (1, 2)]
    i = torch.arange(len(y_train))
    for a, b in ((0, 1), (1, 0)):
        y_a = r2[a][0].argmax(1)
        peer = (r2[b][0][i, y_a] > r2[b][1][i, y_a]).nonzero().squeeze(1)
        own = (r2[a][0][i, y_a] > r2[a][1][i, y_a]).nonzero().squeeze(1)
        assert not torch.equal(peer, own)  # validating with one's own scores would give another set
        assert torch.equal(pl["clean"][a], peer) and torch.equal(pl["clean_labels"][a], y_a[peer])
        assert torch.equal(pl["generated"][a], y_a)
        assert m[f"clean_set_{a + 1}"]["size"] == len(peer)
    # heads: logit_scale * the branch's own model's t+
    assert len(heads) == 2
    for a in (0, 1):
        assert torch.allclose(heads[a], scale * r2[a][2], atol=1e-5)
        assert not torch.allclose(heads[a], scale * r2[1 - a][2], atol=1e-2)
    # Phase-I accuracies, branches and the ensemble from the saved weights
    for mm in (1, 2):
        s_test = phase1_scores_by_hand(run_dir, clip, 2, mm, X_test)[0]
        assert same_argmax(s_test, preds[f"round2_model{mm}"])
        assert m[f"phase1_model{mm}_acc"] == pytest.approx(acc(s_test.argmax(1), y_test))
    probs = []
    for a in (1, 2):
        ft = coft.FineTuned(clip.visual, 10)
        ft.load_state_dict(stage_state(run_dir, f"branch{a}"))
        with torch.no_grad():
            logits = ft.eval()(X_test)
        assert same_argmax(logits, preds[f"branch{a}"]) and m[f"branch{a}_acc"] == pytest.approx(acc(preds[f"branch{a}"], y_test))
        probs.append(logits.softmax(1))
    ensemble = (probs[0] + probs[1]) / 2
    assert same_argmax(ensemble, preds["ensemble"])
    assert (preds["ensemble"] != preds["branch1"]).any() and (preds["ensemble"] != preds["branch2"]).any()
    assert m["ensemble_acc"] == pytest.approx(acc(preds["ensemble"], y_test))


def test_branches_draw_their_own_batches_and_augmentations(tmp_path, pretrained_tiny, monkeypatch):
    """With equal clean sets (every label kept), the two branches still see different orders and
    different augmentations of the same image."""
    monkeypatch.setattr(coft, "collaborative_filter", lambda y_a, s_pos, s_neg: torch.ones(len(y_a), dtype=torch.bool))
    first, real_fit = [], coft.fit

    def recording_fit(model, step_fn, *a, **kw):
        if not isinstance(model, coft.FineTuned):
            return real_fit(model, step_fn, *a, **kw)
        seen = []
        first.append(seen)

        def step(mdl, b, g):
            seen.append((b[0].clone(), b[2].clone()))
            return step_fn(mdl, b, g)
        return real_fit(model, step, *a, **kw)

    monkeypatch.setattr(coft, "fit", recording_fit)
    run_coft(tmp_path, "--p1-epochs", "1", "--fft-epochs", "1", "--fft-aug", "strong", ckpt=pretrained_tiny[0])
    pl = torch.load(tmp_path / "run" / "pseudo_labels.pt")
    assert torch.equal(pl["clean"][0], pl["clean"][1]) and len(first) == 2
    (x1, i1), (x2, i2) = first[0][0], first[1][0]
    assert not torch.equal(i1, i2)
    common = set(i1.tolist()) & set(i2.tolist())
    assert common and all(not torch.equal(x1[i1 == j][0], x2[i2 == j][0]) for j in common)


def test_topk_baseline_and_resnet_backbone(tmp_path):
    m = run_coft(tmp_path, "--method", "topk", name="tiny-rn")
    assert "phase1_model1_acc" not in m
    # the baseline's number is its saved model's accuracy on the test images, fine-tuned on S*
    clip = cm.load(str(tmp_path / "tiny-rn.pt"))[0]
    ft = coft.FineTuned(clip.visual, 10)
    ft.load_state_dict(stage_state(tmp_path / "run", "topk"))
    _, _, _, X_test, y_test = digit_tensors()
    with torch.no_grad():
        logits = ft.eval()(X_test)
    preds = torch.load(tmp_path / "run" / "predictions.pt")
    assert same_argmax(logits, preds["topk"]) and m["topk_acc"] == pytest.approx(acc(preds["topk"], y_test))
    assert m["grad_norms"]["topk"]["steps"] == 2  # 2 epochs of one batch (S* has <= 40 images)
    m = run_coft(tmp_path, "--branches", "1", name="tiny-rn", out="rn")
    preds = torch.load(tmp_path / "rn" / "predictions.pt")
    assert "branch2_acc" not in m and torch.equal(preds["ensemble"], preds["branch1"])
    assert m["ensemble_acc"] == m["branch1_acc"]


def test_labelled_shots_join_the_seed_set_and_both_clean_sets(tmp_path, pretrained_tiny, monkeypatch, capsys):
    """--labelled-shots N: N true-labelled images per class, drawn with the seed, are in every
    round's seed set and in both clean sets with their true labels; --method shots trains on them alone."""
    m = run_coft(tmp_path, "--labelled-shots", "2", "--rounds", "2", "--phase", "1", ckpt=pretrained_tiny[0])
    _, _, y_train, _, _ = digit_tensors()
    pl = torch.load(tmp_path / "run" / "pseudo_labels.pt")
    L = pl["labelled"]
    assert len(set(L.tolist())) == 20 and torch.bincount(y_train[L], minlength=10).tolist() == [2] * 10
    assert m["labelled_shots"] == {"per_class": 2, "size": 20}
    truth = set(zip(L.tolist(), y_train[L].tolist()))
    for sets in pl["seed_sets"]:
        for idx, y in sets:
            assert truth <= set(pairs(idx, y)) and len(set(idx.tolist())) == len(idx)  # no image twice
    for idx, y in zip(pl["clean"], pl["clean_labels"]):
        assert truth <= set(pairs(idx, y))
    assert not torch.equal(L, coft.labelled_shots(y_train, 2, coft.seed_of(1, "labelled shots")))  # seed-dependent
    # --method shots: fine-tuned on exactly these images and labels
    trained_on, real_fit = [], coft.fit

    def recording_fit(model, step_fn, make_loader, *a, **kw):
        ds = make_loader(0).dataset.dataset  # the ImageDataset inside train.SeededSamples
        trained_on.append((ds.items, ds.labels))
        return real_fit(model, step_fn, make_loader, *a, **kw)

    monkeypatch.setattr(coft, "fit", recording_fit)
    m = run_coft(tmp_path, "--labelled-shots", "2", "--method", "shots", ckpt=pretrained_tiny[0], out="shots")
    task = data.digits_task()
    (items, labels), = trained_on
    assert labels == y_train[L].tolist() and "shots_acc" in m
    assert len(items) == len(L) and all(torch.equal(a[0], task.train[i][0]) for a, i in zip(items, L.tolist()))
    assert "--labelled-shots" in cli_error(capsys, "--method", "shots", "--out", str(tmp_path / "x"))


def test_fft_init_phase1_and_distillation_backbone(tmp_path, pretrained_tiny):
    rn = tmp_path / "rn.pt"
    torch.save(randomized("tiny-rn").state_dict(), rn)
    # Phase I on the ViT, Phase II on a ResNet: the branch's encoder is the other backbone
    m = run_coft(tmp_path, "--fft-backbone", str(rn), "--branches", "1", ckpt=pretrained_tiny[0], out="distil")
    keys = stage_state(tmp_path / "distil", "branch1")
    assert any(k.startswith("visual.layer1.") for k in keys) and "vpt" not in keys and 0 <= m["ensemble_acc"] <= 100
    # --fft-init phase1 carries the Phase-I VPT into the fine-tuned encoder, where it keeps training
    run_coft(tmp_path, "--fft-init", "phase1", "--branches", "1", ckpt=pretrained_tiny[0], out="p1init")
    p1 = stage_state(tmp_path / "p1init", "phase1_round1_model1")["vpt.prompts"]
    ft = stage_state(tmp_path / "p1init", "branch1")["vpt"]
    assert ft.shape == p1.shape and not torch.equal(ft, p1)


def test_fft_init_phase1_needs_a_backbone_its_vpt_fits(tmp_path, capsys):
    """--fft-init phase1 with an --fft-backbone the Phase-I VPT cannot enter: one line, before any training."""
    for name, cfg in (("vit", {}), ("narrow", dict(vision_width=32)), ("shallow", dict(vision_layers=1))):
        torch.save(randomized("tiny-vit", **cfg).state_dict(), tmp_path / f"{name}.pt")
    torch.save(randomized("tiny-rn").state_dict(), tmp_path / "rn.pt")
    for other, what in (("narrow", "width 32"), ("rn", "is a ResNet"), ("shallow", "1 blocks")):
        out = tmp_path / f"run-{other}"
        err = cli_error(capsys, "--clip", str(tmp_path / "vit.pt"), "--fft-backbone", str(tmp_path / f"{other}.pt"),
                        "--fft-init", "phase1", "--M", "4", "--vpt-tokens", "2", "--out", str(out))
        assert "--fft-init pretrained" in err and what in err, err
        assert not list(out.rglob("*.pt"))  # refused before any work


def test_digit_transforms_never_flip():
    task = data.digits_task()
    assert task.flip is False
    for kind in ("weak", "strong"):
        names = [type(t).__name__ for t in data.make_transform(kind, 32, task).transforms]
        assert "RandomHorizontalFlip" not in names
    assert "RandomHorizontalFlip" in [type(t).__name__ for t in data.make_transform(
        "strong", 32, data.Task("x", ["a"], ["{}"], [], [], flip=True)).transforms]


def cli_error(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        coft.main(list(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert "--data-root is required" in cli_error(capsys, "--dataset", "dtd", "--out", str(tmp_path / "a"))
    assert "unknown dataset" in cli_error(capsys, "--dataset", "mnist", "--out", str(tmp_path / "b"))
    # a split file that names missing images
    root = tmp_path / "DATA"
    write_image(str(root / "dtd" / "images" / "banded" / "a.jpg"))
    split = {"train": [["banded/a.jpg", 0, "banded"], ["banded/gone.jpg", 0, "banded"]],
             "val": [], "test": [["banded/a.jpg", 0, "banded"]]}
    (root / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    err = cli_error(capsys, "--dataset", "dtd", "--data-root", str(root), "--out", str(tmp_path / "c"))
    assert "do not exist" in err and "gone.jpg" in err
    # a checkpoint path that does not exist
    assert "is neither a released model" in cli_error(capsys, "--clip", str(tmp_path / "nope.pt"),
                                                       "--out", str(tmp_path / "d"))
    # --eval-only / --phase 2 without the saved state they need
    torch.save(randomized("tiny-vit").state_dict(), tmp_path / "tiny.pt")
    small = ["--clip", str(tmp_path / "tiny.pt"), "--M", "4", "--K", "2", "--vpt-tokens", "2"]
    assert "holds no run for --eval-only" in cli_error(capsys, *small, "--eval-only", "--out", str(tmp_path / "e"))
    assert "holds no run for --phase 2" in cli_error(capsys, *small, "--phase", "2", "--out", str(tmp_path / "f"))
    # ... or a run that lacks one of them
    run_coft(tmp_path, *SHORT, out="g")
    (tmp_path / "g" / "stages" / "phase1_round1_model2.pt").unlink()
    assert "phase1_round1_model2.pt not found: --phase 2 needs Phase I" in cli_error(
        capsys, *run_args(tmp_path, *SHORT[:-1], "2", out="g"))
    assert "--eval-only needs a finished run" in cli_error(capsys, *run_args(tmp_path, *SHORT, "--eval-only", out="g"))


def folder_state(out):
    """Every file under a run folder with its bytes: to show a refused run changed nothing."""
    return {p.relative_to(out): p.read_bytes() for p in sorted(Path(out).rglob("*")) if p.is_file()}


SHORT = ("--p1-epochs", "1", "--fft-epochs", "1", "--phase", "1")


def test_a_folder_holding_a_run_is_only_continued_with_its_own_config(tmp_path, capsys):
    run_coft(tmp_path, *SHORT)
    out = tmp_path / "run"
    before = folder_state(out)
    assert {str(p) for p in before} >= {"config.json", "metrics.json", "stages/phase1_round1_model1.pt"}
    # without --resume: refused, whatever the flags
    assert "holds a run already" in cli_error(capsys, *run_args(tmp_path, *SHORT))
    # --resume with other settings (the issue's example): one line naming every difference
    err = cli_error(capsys, *run_args(tmp_path, *SHORT, "--K", "2", "--p1-lr", "0.05", "--detach-neg", "--resume"))
    assert "other settings" in err and "K: 4 -> 2" in err and "p1_lr: 0.03 -> 0.05" in err and "detach_neg" in err
    # --resume with another --M, --eval-only on another dataset, --phase 2 with another Phase-II lr
    assert "M: 4 -> 6" in cli_error(capsys, *run_args(tmp_path, *SHORT, "--M", "6", "--resume"))
    make_imagefolder(tmp_path / "IF")
    err = cli_error(capsys, *run_args(tmp_path, *SHORT, "--eval-only", "--dataset", "imagefolder",
                                      "--data-root", str(tmp_path / "IF")))
    assert "dataset: 'digits' -> 'imagefolder'" in err
    assert "fft_lr" in cli_error(capsys, *run_args(tmp_path, "--p1-epochs", "1", "--fft-epochs", "1", "--phase", "2",
                                                   "--fft-lr", "0.05"))
    # bad input on --resume / --restart fails before anything is written or deleted
    assert "data-root" in cli_error(capsys, *run_args(tmp_path, *SHORT, "--dataset", "dtd", "--data-root",
                                                      str(tmp_path / "typo"), "--restart"))
    assert folder_state(out) == before  # nothing above wrote, deleted or overwrote a file
    # the same flags continue it: every finished stage is reused, every number the same
    again = run_coft(tmp_path, *SHORT, "--resume", "--workers", "1", "--log-every", "5")
    assert numbers(again) == numbers(json.loads(before[Path("metrics.json")]))
    # --restart discards the run and makes it under the new flags
    m = run_coft(tmp_path, *SHORT, "--K", "2", "--restart")
    saved = torch.load(out / "stages" / "phase1_round1_model1.pt", weights_only=True)
    assert m["seed_set"]["size"] <= 20 and saved["record"]["K"] == 2
    assert json.loads((out / "config.json").read_text())["config"]["K"] == 2


def test_a_stage_file_or_checkpoint_is_used_only_under_its_own_record(tmp_path, capsys):
    """Stage files that reach a folder by another way than its own run (copied, or left by an
    older version) are checked against the settings they record, not trusted."""
    run_coft(tmp_path, *SHORT, out="a")
    run_coft(tmp_path, *SHORT, "--p1-lr", "0.05", out="b")
    a, b = tmp_path / "a" / "stages", tmp_path / "b" / "stages"
    (a / "phase1_round1_model2.pt").write_bytes((b / "phase1_round1_model2.pt").read_bytes())
    err = cli_error(capsys, *run_args(tmp_path, *SHORT, "--resume", out="a"))
    assert "phase1_round1_model2.pt was made with other settings (p1_lr: 0.05 -> 0.03)" in err
    # an epoch checkpoint likewise (as if killed mid-stage)
    (a / "phase1_round1_model2.pt").unlink()
    state = torch.load(b / "phase1_round1_model2.pt", weights_only=True)
    coft.atomic_save({"epoch": 0, "record": state["record"], "model": state["model"]}, a / "phase1_round1_model2.ckpt")
    assert "phase1_round1_model2.ckpt was made with other settings" in cli_error(
        capsys, *run_args(tmp_path, *SHORT, "--resume", out="a"))
    # a truncated stage file or checkpoint, on --resume and on --eval-only: one line naming the file
    (a / "phase1_round1_model2.ckpt").write_bytes(b"PK\x03\x04 truncated")
    err = cli_error(capsys, *run_args(tmp_path, *SHORT, "--resume", out="a"))
    assert "cannot read" in err and "phase1_round1_model2.ckpt" in err
    data_ = (a / "phase1_round1_model1.pt").read_bytes()
    (a / "phase1_round1_model1.pt").write_bytes(data_[:len(data_) // 2])
    for flag in ("--resume", "--eval-only"):
        err = cli_error(capsys, *run_args(tmp_path, *SHORT, flag, out="a"))
        assert "cannot read" in err and "phase1_round1_model1.pt" in err


def test_stage_records_cover_the_settings_each_stage_depends_on():
    """A Phase-I model's record has S*'s and Phase I's settings and none of Phase II's; a branch's
    has all three: so a changed Phase-I flag invalidates the branches too."""
    args = coft.parser().parse_args([])
    config = {k: v for k, v in vars(args).items() if k not in coft.HOW}
    config.update(data="d", clip="c", fft_backbone=None, zero_shot_prompts="z", rounds=1)
    p1, br = coft.stage_record(config, "phase1_round2_model1"), coft.stage_record(config, "branch1")
    assert {"K", "seed", "data", "clip", "zero_shot_prompts", "p1_lr", "lam", "M", "batch"} <= set(p1)
    assert not {"fft_lr", "gamma", "queue", "workers", "device"} & set(p1)
    assert set(p1) - {"stage"} < set(br) and {"fft_lr", "gamma", "queue", "rounds"} <= set(br)
    assert not set(coft.HOW) & set(br)
    # every flag is either a setting some stage depends on, or declared as not changing numbers
    # (HOW), or one whose effect only metrics.json shows (method, eval split, ...)
    reported_only = {"eval_split", "branches", "plus", "template_ensemble", "fft_lr", "head_init"}
    flags = set(vars(args)) - {k for k in vars(args) if k.startswith("bench")}
    assert flags <= set(coft.HOW) | set(br) | set(coft.stage_record(config, "topk")) | reported_only


def test_results_do_not_depend_on_the_worker_count(tmp_path, pretrained_tiny):
    """The same seed with 0 and 2 DataLoader workers: identical metrics and identical weights of
    every stage (augmentations are seeded per sample, not per worker)."""
    runs = [run_coft(tmp_path, "--workers", w, "--fft-aug", "strong", out=f"w{w}", ckpt=pretrained_tiny[0])
            for w in ("0", "2")]
    assert numbers(runs[0]) == numbers(runs[1])
    for tag in ("phase1_round1_model1", "branch2"):
        s0, s2 = stage_state(tmp_path / "w0", tag), stage_state(tmp_path / "w2", tag)
        assert all(torch.equal(s0[k], s2[k]) for k in s0), tag


def test_loader_draws_each_sample_from_its_own_stream():
    """A transform that draws one random number: the values depend on (seed, index) only, are
    the same with 0 and 2 workers and in any batch order, and leave the caller's RNG untouched."""
    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 12

        def __getitem__(self, i):
            return torch.rand(()), i

    def draws(workers, shuffle=False, seed=7):
        return {int(i): float(x) for x, i in (pair for batch in train.loader(Noise(), 5, seed, shuffle, workers)
                                              for pair in zip(*batch))}

    torch.manual_seed(0)
    state = torch.get_rng_state()
    d0 = draws(0)
    assert torch.equal(torch.get_rng_state(), state)  # the main process's stream is not consumed
    assert d0 == draws(2) == draws(0, shuffle=True) and len(set(d0.values())) == 12
    assert d0 != draws(0, seed=8)
    # the guard this replaces: plain DataLoader workers draw from per-worker seeds
    plain = torch.utils.data.DataLoader(Noise(), 5, num_workers=2)
    assert [float(x) for b in plain for x in b[0]] != [d0[i] for i in range(12)]


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    model = torch.nn.Linear(2, 1)
    batches = [(torch.ones(1, 2),)] * 3

    def step(mdl, b, gen):  # finite during epoch 1, NaN at the 2nd step of epoch 2
        loss = mdl(b[0]).sum()
        return (loss * float("nan") if step.calls == 5 else loss), {}
    step.calls = 0

    def counted(mdl, b, gen):
        step.calls += 1
        return step(mdl, b, gen)

    ckpt = tmp_path / "s.ckpt"
    with pytest.raises(train.RunError, match=r"stage x: non-finite loss nan .* at step 5 of 6 \(epoch 2\).*"
                                             r"last good checkpoint is .*s.ckpt \(epoch 1\)"):
        train.fit(model, counted, lambda e: batches, 2, 0.1, torch.device("cpu"), 0, ckpt=ckpt, tag="stage x",
                  log_every=0)
    saved = torch.load(ckpt, weights_only=False)
    assert saved["epoch"] == 0 and torch.isfinite(saved["model"]["weight"]).all()
    assert torch.isfinite(model.weight).all()  # the NaN never reached the weights


def test_a_nan_loss_ends_the_cli_with_one_line(tmp_path, capsys, monkeypatch):
    real = coft.phase1_loss
    monkeypatch.setattr(coft, "phase1_loss", lambda *a, **kw: (lambda l, t: (l * float("nan"), t))(*real(*a, **kw)))
    err = cli_error(capsys, *run_args(tmp_path, *SHORT))
    assert "phase I round 1 model 1: non-finite loss nan" in err and "step 1 of" in err
    assert not (tmp_path / "run" / "metrics.json").exists()


BAD_FLAGS = [("--clip-grad", "-1"), ("--K", "-1"), ("--K", "0"), ("--p1-epochs", "0"), ("--fft-epochs", "0"),
             ("--rounds", "0"), ("--rounds", "-1"), ("--tau-c", "0"), ("--batch", "0"), ("--batch", "-3"),
             ("--eval-batch", "0"), ("--p1-lr", "-0.1"), ("--fft-lr", "0"), ("--weight-decay", "-1"),
             ("--momentum", "-0.5"), ("--momentum", "1"), ("--workers", "-1"), ("--queue", "0"), ("--M", "-2"),
             ("--mu", "1.5"), ("--lam", "nan"), ("--K", "two")]


@pytest.mark.parametrize("flag,value", BAD_FLAGS)
def test_bad_numbers_are_refused_before_any_work(tmp_path, capsys, flag, value):
    err = cli_error(capsys, "--out", str(tmp_path / "r"), flag, value)
    assert f"argument {flag}:" in err and value in err
    assert not (tmp_path / "r").exists()


def test_more_one_line_errors(tmp_path, capsys):
    # --out naming a file
    (tmp_path / "file").write_text("x")
    assert "is a file" in cli_error(capsys, *run_args(tmp_path, out="file"))
    # an unknown --fft-backbone / --clip: refused before the data or any model is loaded
    assert "--fft-backbone 'ViT-Q/3'" in cli_error(capsys, *run_args(tmp_path, "--fft-backbone", "ViT-Q/3"))
    assert not (tmp_path / "run").exists()
    # a prompt longer than the context (tiny-vit: 16 tokens): names the flag that shortens it
    err = cli_error(capsys, *run_args(tmp_path, "--M", "14", out="long"))
    assert "use a smaller --M" in err and "longer than the backbone's context of 16" in err
    # --restart with --eval-only; --eval-only in an empty folder
    assert "--restart discards" in cli_error(capsys, *run_args(tmp_path, "--restart", "--eval-only"))
    assert "holds no run" in cli_error(capsys, *run_args(tmp_path, "--eval-only", out="empty"))
    # a dataset with one class, and two classes that read the same in a prompt
    make_imagefolder(tmp_path / "one", classes=("cat",))
    assert "classification needs at least two" in cli_error(
        capsys, *run_args(tmp_path, "--dataset", "imagefolder", "--data-root", str(tmp_path / "one")))
    make_imagefolder(tmp_path / "same", classes=("red_fox", "Red fox"))
    assert "read the same in a prompt ('red fox')" in cli_error(
        capsys, *run_args(tmp_path, "--dataset", "imagefolder", "--data-root", str(tmp_path / "same")))


def test_image_over_pillows_size_limit_is_one_line(tmp_path, monkeypatch):
    write_image(str(tmp_path / "big.png"), size=(40, 30))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1200 pixels > 2 x 100: Pillow refuses to open it
    assert "over Pillow's size limit" in data_error(data.load_image, str(tmp_path / "big.png"))


def test_state_dict_with_a_wrong_shape_is_one_line():
    sd = randomized("tiny-vit").state_dict()
    sd["transformer.resblocks.0.mlp.c_fc.weight"] = torch.zeros(3, 64)
    with pytest.raises(cm.CLIPError, match=r"transformer.resblocks.0.mlp.c_fc.weight has shape \(3, 64\).* needs "
                                           r"\(256, 64\)") as e:
        cm.build_model(sd)
    assert "\n" not in str(e.value)


def test_table_on_a_damaged_metrics_file_is_one_line(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.json").write_text('{"method": "coft", "zero_')
    assert "a/metrics.json is damaged" in cli_error(capsys, "--table", str(tmp_path / "a"))
    (tmp_path / "a" / "metrics.json").write_text('{"method": "coft"}')  # partial: no numbers
    assert "KeyError" in cli_error(capsys, "--table", str(tmp_path / "a"))


def test_ctrl_c_is_one_line_saying_where_the_checkpoint_is(tmp_path, capsys, monkeypatch):
    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(coft, "fit", interrupted)
    with pytest.raises(SystemExit) as e:
        coft.main(run_args(tmp_path, *SHORT))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 130 and "\n" not in err and "--resume continues" in err and str(tmp_path / "run") in err


def run_sh(*argv, env=None):
    import subprocess
    return subprocess.run(["bash", str(Path(__file__).parent / "run.sh"), *argv], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_run_sh_refuses_unknown_arguments_and_lists_missing_datasets_up_front(tmp_path):
    r = run_sh("demo", "--bogus")
    assert r.returncode == 2 and "--bogus" in r.stderr and "pretraining" not in r.stdout
    make_dtd(tmp_path / "DATA")
    r = run_sh("paper", str(tmp_path / "DATA"), env={"OUT": str(tmp_path / "runs")})
    assert r.returncode == 2 and not (tmp_path / "runs").exists()
    missing = r.stderr.split("missing")[1]
    assert "caltech101" in missing and "ucf101" in missing and "dtd" not in missing


# --------------------------------------------------------------------------- CoFT+

def tiny_finetuned(seed=0):
    clip = tiny_backbone(seed=seed)
    return coft.FineTuned(clip.visual, 3, F.normalize(torch.randn(3, clip.cfg.embed_dim), dim=-1))


def test_queue_wraps_around_and_overwrites_the_oldest():
    mc = coft.MomentumContrast(tiny_finetuned(), size=5)
    keys = torch.arange(1, 8).float()[:, None].expand(7, mc.queue.shape[1])  # key i is all i's
    ids = torch.arange(1, 8) * 100  # key i belongs to image 100 i
    mc.enqueue(keys[:3], ids[:3])
    assert mc.count == 3 and mc.ptr == 3 and mc.queue[:3, 0].tolist() == [1, 2, 3]
    mc.enqueue(keys[3:7], ids[3:7])  # 4 more: two fill the end, two overwrite the oldest (1 and 2)
    assert mc.count == 5 and mc.ptr == 2 and mc.queue[:, 0].tolist() == [6, 7, 3, 4, 5]
    assert mc.queue_idx.tolist() == [600, 700, 300, 400, 500]  # each key keeps its image index
    big = torch.arange(10, 22)
    mc.enqueue(big.float()[:, None].expand(12, mc.queue.shape[1]), big)  # larger than the queue
    assert sorted(mc.queue[:, 0].tolist()) == [17, 18, 19, 20, 21]
    assert (mc.queue[:, 0].long() == mc.queue_idx).all()


def test_ema_update_is_exact():
    mc = coft.MomentumContrast(tiny_finetuned(), size=4, mu=0.9)
    with torch.no_grad():
        for p in mc.model.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in mc.key_model.parameters()]
    mc.momentum_update()
    for p_m, p_m0, p in zip(mc.key_model.parameters(), before, mc.model.parameters()):
        assert torch.allclose(p_m, 0.9 * p_m0 + 0.1 * p, atol=1e-6)
    assert not any(p.requires_grad for p in mc.key_model.parameters())


def direct_info_nce(q, k, negatives, tau):
    """Eq. 9 written out per query: -log(e^{q.k/tau} / (e^{q.k/tau} + sum over its negatives))."""
    return torch.stack([-torch.log(torch.exp(q[i] @ k[i] / tau) / (torch.exp(q[i] @ k[i] / tau) + sum(
        (torch.exp(q[i] @ n / tau) for n in negatives[i]), torch.tensor(0.0)))) for i in range(len(q))]).mean()


def test_info_nce_matches_direct_recomputation_and_keys_carry_no_gradient():
    mc = coft.MomentumContrast(tiny_finetuned(), size=6, tau=0.07)
    g = torch.Generator().manual_seed(0)
    mc.enqueue(F.normalize(torch.randn(4, mc.queue.shape[1], generator=g), dim=-1), torch.tensor([10, 11, 12, 13]))
    q = F.normalize(torch.randn(3, mc.queue.shape[1], generator=g), dim=-1)
    k = F.normalize(torch.randn(3, mc.queue.shape[1], generator=g), dim=-1)
    queue = mc.queue[:4]
    direct = direct_info_nce(q, k, [queue] * 3, 0.07)  # images 0-2: none of them is in the queue
    assert torch.allclose(mc.info_nce(q, k, torch.tensor([0, 1, 2])), direct, atol=1e-5)
    # the full forward: gradients reach the online model only; the keys enter the queue detached
    x = torch.randn(2, 3, 32, 32)
    loss = mc(x, x.flip(-1), torch.tensor([20, 21]))
    loss.backward()
    assert all(p.grad is None for p in mc.key_model.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in mc.model.visual.parameters())
    assert not mc.queue.requires_grad and mc.count == 6 and mc.queue_idx[4:6].tolist() == [20, 21]


def test_queue_excludes_the_querys_own_image():
    """A query never meets an older key of its own image among its negatives (CoFT+ queue)."""
    mc = coft.MomentumContrast(tiny_finetuned(), size=8, tau=0.07)
    g = torch.Generator().manual_seed(1)
    D = mc.queue.shape[1]
    stale = F.normalize(torch.randn(5, D, generator=g), dim=-1)
    mc.enqueue(stale, torch.tensor([7, 3, 7, 9, 4]))  # image 7 has two stale keys, image 3 one
    q = F.normalize(torch.randn(3, D, generator=g), dim=-1)
    k = F.normalize(torch.randn(3, D, generator=g), dim=-1)
    idx = torch.tensor([7, 3, 5])
    negatives = [stale[[1, 3, 4]], stale[[0, 2, 3, 4]], stale]  # image 5 has no key in the queue
    assert torch.allclose(mc.info_nce(q, k, idx), direct_info_nce(q, k, negatives, 0.07), atol=1e-5)
    assert not torch.allclose(mc.info_nce(q, k, idx), direct_info_nce(q, k, [stale] * 3, 0.07), atol=1e-3)
    # a query whose every queued key is its own has only its positive: the loss is exactly 0
    solo = coft.MomentumContrast(tiny_finetuned(), size=4)
    solo.enqueue(stale[:2], torch.tensor([1, 1]))
    assert solo.info_nce(q[:1], k[:1], torch.tensor([1])).item() == 0.0


def test_keys_enter_the_queue_after_the_loss():
    """The loss of a batch is computed against the queue as it was before the batch: with an
    empty queue it has no negatives at all (loss exactly 0), then the batch's keys are queued."""
    mc = coft.MomentumContrast(tiny_finetuned(), size=8)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    loss = mc(x, x.flip(-1), torch.tensor([0, 1, 2]))
    assert loss.item() == 0.0 and mc.count == 3 and mc.queue_idx[:3].tolist() == [0, 1, 2]
    before = mc.queue[:3].clone()
    x2 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        q = mc.model.features(x2)
        key_model = coft.copy.deepcopy(mc.key_model)
        for p_m, p in zip(key_model.parameters(), mc.model.parameters()):
            p_m.mul_(mc.mu).add_(p, alpha=1 - mc.mu)
        k = key_model.features(x2.flip(-1))
    loss2 = mc(x2, x2.flip(-1), torch.tensor([3, 4]))
    assert torch.allclose(loss2, direct_info_nce(q, k, [before] * 2, mc.tau), atol=1e-5)
    assert torch.allclose(mc.queue[3:5], k, atol=1e-6)


class ChatHandler(http.server.BaseHTTPRequestHandler):
    """A stand-in OpenAI-compatible endpoint: answers POST /v1/chat/completions with `reply`."""
    reply, seen = None, []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ChatHandler.seen.append((self.path, body, self.headers.get("Authorization")))
        content = ChatHandler.reply(body) if callable(ChatHandler.reply) else ChatHandler.reply
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def chat_server():
    server = http.server.HTTPServer(("127.0.0.1", 0), ChatHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ChatHandler.seen = []
    yield f"http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def test_llm_prompt_file_good_reply(chat_server, tmp_path):
    def good(body):  # every class asked for gets two prompts (inside a code fence, as LLMs do)
        names = json.loads(body["messages"][0]["content"].split("Classes: ")[1])
        return "```json\n" + json.dumps({n: [f"a photo of a {n}.", f"a {n} in the wild."] for n in names}) + "\n```"
    ChatHandler.reply = good
    path = coft.write_llm_prompts(tmp_path / "p.json", ["cat", "dog", "sea lion"], chat_server, "m", "KEY", n=2)
    table = json.loads(path.read_text())
    assert table["sea lion"] == ["a photo of a sea lion.", "a sea lion in the wild."]
    assert ChatHandler.seen[0][0] == "/v1/chat/completions" and ChatHandler.seen[0][2] == "Bearer KEY"
    assert coft.read_llm_prompts(path, ["dog", "cat"])[0] == ["a photo of a dog.", "a dog in the wild."]


@pytest.mark.parametrize("reply, message", [
    ("Sure! Here are some prompts: cat, dog", "malformed reply"),
    (json.dumps({"cat": ["a cat."]}), "no prompts for 1 class"),
    (json.dumps({"cat": ["a cat."], "dog": []}), "non-empty list"),
])
def test_llm_prompt_file_bad_replies_write_nothing(chat_server, tmp_path, reply, message):
    ChatHandler.reply = reply
    with pytest.raises(data.DataError, match=message) as e:
        coft.write_llm_prompts(tmp_path / "p.json", ["cat", "dog"], chat_server, "m")
    assert "\n" not in str(e.value) and not (tmp_path / "p.json").exists()


def test_llm_prompt_file_refused_connection(tmp_path, monkeypatch):
    monkeypatch.setattr(coft.time, "sleep", lambda s: None)  # no back-off waits in the test
    with pytest.raises(data.DataError, match="cannot get a reply .* after 3 tries"):
        coft.write_llm_prompts(tmp_path / "p.json", ["cat"], "http://127.0.0.1:1/v1", "m")
    assert not (tmp_path / "p.json").exists()


def test_llm_prompts_drive_the_zero_shot_pass(tmp_path, pretrained_tiny):
    prompts = {c: [f"a photo of the number {c}.", f"the digit {c}"] for c in data.DIGIT_CLASSNAMES}
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    m = run_coft(tmp_path, "--llm-prompts", str(tmp_path / "p.json"), "--phase", "1", ckpt=pretrained_tiny[0])
    clip, _ = cm.load(str(pretrained_tiny[0]))
    with torch.no_grad():  # each class: the mean of its prompts' normalised embeddings, by hand
        W = torch.stack([F.normalize(F.normalize(clip.encode_text(cm.tokenize(prompts[c], clip.context_length)),
                                                 dim=-1).mean(0), dim=0) for c in data.DIGIT_CLASSNAMES])
    task = data.digits_task()
    x = torch.stack([data.make_transform("test", 32, task)(img) for img, _ in task.test])
    y = torch.tensor([label for _, label in task.test])
    with torch.no_grad():
        acc = 100.0 * (F.normalize(clip.encode_image(x), dim=-1) @ W.t()).argmax(1).eq(y).float().mean().item()
    assert m["zero_shot_acc"] == pytest.approx(acc) and m["parts"]["zero_shot_prompts"] == "llm"
    (tmp_path / "bad.json").write_text(json.dumps({"zero": ["x"]}))
    with pytest.raises(SystemExit):
        run_coft(tmp_path, "--llm-prompts", str(tmp_path / "bad.json"), ckpt=pretrained_tiny[0], out="bad")


def test_rounds_restart_from_pretrained_weights(tmp_path, pretrained_tiny, monkeypatch):
    """Every round's models start from a fresh initialisation (not the previous round's prompts),
    over a backbone that is still the pre-trained one, and train on their own new seed set."""
    starts, real_fit = [], coft.fit

    def recording_fit(model, *a, **kw):
        if isinstance(model, coft.DualPromptModel):
            starts.append(({k: v.clone() for k, v in model.state_dict().items()},
                           {k: v.clone() for k, v in model.clip.state_dict().items()}))
        out = real_fit(model, *a, **kw)
        if isinstance(model, coft.DualPromptModel):
            starts[-1] += ({k: v.clone() for k, v in model.state_dict().items()},)
        return out

    monkeypatch.setattr(coft, "fit", recording_fit)
    m = run_coft(tmp_path, "--rounds", "2", "--phase", "1", ckpt=pretrained_tiny[0])
    assert len(starts) == 4 and len(m["rounds"]) == 2  # 2 rounds x 2 models
    pretrained = cm.load(str(pretrained_tiny[0]))[0].state_dict()
    for start, backbone, _ in starts:
        assert all(torch.equal(pretrained[k], v) for k, v in backbone.items())
    r1m1_end, r2m1_start = starts[0][2], starts[2][0]
    for k in r2m1_start:
        assert not torch.equal(r2m1_start[k], r1m1_end[k])  # no carry-over of trained prompts / VPT
    # round 2's start is a fresh draw: re-creating the model under round 2's seed gives it exactly
    clip = cm.load(str(pretrained_tiny[0]))[0]  # (building a model draws random numbers: before seeding)
    torch.manual_seed(coft.seed_of(0, "init", 2, 1))
    fresh = coft.DualPromptModel(clip, data.DIGIT_CLASSNAMES, 4, None, 2, True)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in r2m1_start.items())
    assert m["rounds"][1]["model1_seed_set"]["size"] > 0


def test_plus_end_to_end_and_resume_restores_queue_and_momentum_encoder(tmp_path, monkeypatch, pretrained_tiny):
    ckpt = pretrained_tiny[0]
    plus = ("--plus", "--rounds", "2", "--queue", "100")
    queries, real_nce = [], coft.MomentumContrast.info_nce

    def recording_nce(self, q, k, idx):
        queries.append(idx.clone())
        return real_nce(self, q, k, idx)

    real_save, saved = train.atomic_save, {}

    def recording_save(obj, path):  # the last epoch checkpoint of branch 1 (deleted once the stage is saved)
        if Path(path).name == "branch1.ckpt":
            saved["ckpt"] = copy.deepcopy(obj)
        real_save(obj, path)

    monkeypatch.setattr(coft.MomentumContrast, "info_nce", recording_nce)
    monkeypatch.setattr(train, "atomic_save", recording_save)
    full = run_coft(tmp_path, *plus, out="full", ckpt=ckpt)
    monkeypatch.setattr(coft.MomentumContrast, "info_nce", real_nce)
    monkeypatch.setattr(train, "atomic_save", real_save)
    assert full["method"] == "coft+" and full["parts"] == {"rounds": 2, "contrast": True,
                                                           "zero_shot_prompts": "ensemble"}
    # each epoch of each branch is one pass over all 899 unlabelled images: ceil(899 / 64) = 15 steps
    assert len(queries) == 2 * 2 * 15
    for start in range(0, len(queries), 15):
        assert sorted(torch.cat(queries[start:start + 15]).tolist()) == list(range(899))
    state = saved["ckpt"]["model"]
    assert not (tmp_path / "full" / "stages" / "branch1.ckpt").exists()  # superseded by stages/branch1.pt
    assert state["count"] == 100 and any(k.startswith("key_model.visual.") for k in state)
    assert state["queue_idx"].min() >= 0 and len(set(state["queue_idx"].tolist())) == 100
    real_save = train.atomic_save

    def dying_save(obj, path):
        real_save(obj, path)
        if Path(path).name == "branch1.ckpt":
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "atomic_save", dying_save)
    with pytest.raises(SystemExit):
        run_coft(tmp_path, *plus, out="killed", ckpt=ckpt)
    monkeypatch.setattr(train, "atomic_save", real_save)
    resumed = run_coft(tmp_path, *plus, "--resume", out="killed", ckpt=ckpt)
    assert numbers(resumed) == numbers(full)


def test_bench_prints_every_stage(capsys):
    coft.main(["--bench", "--bench-models", "tiny-vit,tiny-rn", "--bench-batch", "2", "--bench-classes", "3",
               "--bench-images", "4", "--bench-steps", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    for stage in ("(a) image tower", "(b) Phase-I step, C=3", "text tower fwd+bwd up to EOT", "at full length",
                  "losses", "optimizer", "(c) Phase-II step, batch 4 + momentum", "(d) generation pass"):
        assert out.count(stage) == 2, stage  # once per model
    assert "images/s" in out and "prompts/s" in out and "MiB (RSS)" in out


def test_bench_reference_side_by_side(capsys):
    pytest.importorskip("open_clip")
    coft.main(["--bench", "--bench-ref", "--bench-models", "tiny-vit", "--bench-batch", "2", "--bench-classes", "3",
               "--bench-steps", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "open_clip" in out
    diff = float(re.search(r"max feature difference ([0-9.e+-]+)", out).group(1))
    assert diff < 1e-4  # both sides encode the same prompts to the same features


def test_vit_flops_known_value():
    # ViT-B/16 at 224px: ~35.1 GFLOPs forward (../shared/spec/clip-and-data.md) without the projection
    assert coft.vit_flops(cm.CONFIGS["ViT-B/16"]) / 1e9 == pytest.approx(35.1, rel=0.02)


def test_table_groups_seeds(tmp_path, capsys):
    base = {"method": "coft", "zero_shot_acc": 50.0, "seed_set": {"size": 10, "precision": 90.0},
            "clean_set_1": {"kept_fraction": 80.0, "precision": 70.0},
            "clean_set_2": {"kept_fraction": 90.0, "precision": 72.0}, "phase1_agreement": 95.0,
            "phase1_model1_acc": 60.0, "phase1_model2_acc": 62.0, "branch1_acc": 64.0, "branch2_acc": 66.0,
            "time_s": {"total": 10.0}}
    for s, acc in ((0, 70.0), (1, 74.0)):
        (tmp_path / f"coft-s{s}").mkdir()
        (tmp_path / f"coft-s{s}" / "metrics.json").write_text(json.dumps(dict(base, ensemble_acc=acc)))
    coft.main(["--table", str(tmp_path / "coft-s0"), str(tmp_path / "coft-s1"), str(tmp_path / "missing")])
    out = capsys.readouterr().out
    assert "missing: no metrics.json" in out
    mean_row = [line for line in out.splitlines() if line.startswith("coft ")][0].split()
    # n, zero-shot, S* prec, kept %, clean prec, agree %, phase I, branches, final acc (mean±sd of 70, 74)
    assert mean_row[1] == "2" and mean_row[4] == "85.0±0.0" and mean_row[5] == "71.0±0.0"
    assert mean_row[9] == "72.0±2.8"


@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_image_names_the_file(tmp_path, capsys, workers):
    root = tmp_path / "DATA"
    for c in ("banded", "dotted"):
        write_image(str(root / "train" / c / "a.png"))
        write_image(str(root / "test" / c / "a.png"))
    (root / "train" / "dotted" / "broken.png").write_bytes(b"not a png")
    torch.save(randomized("tiny-vit").state_dict(), tmp_path / "tiny.pt")
    err = cli_error(capsys, "--dataset", "imagefolder", "--data-root", str(root), "--clip", str(tmp_path / "tiny.pt"),
                    "--M", "4", "--out", str(tmp_path / "run"), "--workers", str(workers))
    assert "cannot read image" in err and "broken.png" in err


# --------------------------------------------------------------------------- data: the offline digits

def _names_in(caption):
    """Digits a caption names, by word or by numeral (whole words only)."""
    found = set()
    for c, word in enumerate(data.DIGIT_NAMES):
        if re.search(rf"\b({word}|{c})\b", caption, flags=re.IGNORECASE):
            found.add(c)
    return found


def test_render_is_deterministic_per_seed():
    a = data.render_digits(64, seed=0)
    b = data.render_digits(64, seed=0)
    c = data.render_digits(64, seed=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    assert not torch.equal(a[0], c[0])
    assert a[2] != c[2]


def test_rendered_batches_are_deterministic_per_seed():
    run = lambda seed: list(data.rendered_batches(16, 3, seed))
    a, b, c = run(0), run(0), run(1)
    assert len(a) == 3
    for (xa, ya, ca), (xb, yb, cb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and ca == cb
    assert not torch.equal(a[0][0], a[1][0])  # the stream moves on from batch to batch
    assert not torch.equal(a[0][0], c[0][0])


def test_rendered_images_labels_and_levels():
    x, y, caps = data.render_digits(500, seed=0)
    assert x.shape == (500, 3, 32, 32) and x.dtype == torch.float32
    assert y.shape == (500,) and y.dtype == torch.int64 and len(caps) == 500
    assert x.min() >= 0 and x.max() <= 1
    assert torch.equal(x * 16, (x * 16).round())  # only the 17 levels k/16
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])
    assert set(y.tolist()) == set(range(10))
    ink = x[:, 0].mean((1, 2))
    assert (ink > 0.1).all()  # no blank images
    assert 0.25 < ink.mean() < 0.36  # about the UCI ink density (0.31)
    assert data.render_digits(4, seed=0, size=64)[0].shape == (4, 3, 64, 64)


def test_every_caption_names_its_digit_and_only_it():
    _, y, caps = data.render_digits(500, seed=0)
    for c, cap in zip(y.tolist(), caps):
        assert _names_in(cap) == {c}, cap
    assert len(set(caps)) > 50  # varied
    words = sum(any(w in cap for w in data.DIGIT_NAMES) for cap in caps)
    assert 150 < words < 350  # both words and numerals are used


def test_zero_shot_prompts_match_the_captions():
    assert len(data.CAPTION_TEMPLATES) >= 12
    assert data.DIGITS_TEMPLATE.replace("{}", "{d}") in data.CAPTION_TEMPLATES
    for c, name in enumerate(data.DIGIT_CLASSNAMES):
        assert _names_in(data.DIGITS_TEMPLATE.format(name)) == {c}


def test_uci_digits_load():
    x, y = data.load_uci_digits()
    assert x.shape == (1797, 8, 8) and x.dtype == torch.uint8
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert x.min() == 0 and x.max() == 16
    counts = torch.bincount(y, minlength=10)
    assert len(counts) == 10 and ((counts >= 170) & (counts <= 190)).all()


def test_missing_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "ASSETS", tmp_path)
    with pytest.raises(data.DataError, match="missing"):
        data.load_uci_digits()


def test_digits_to_images_is_nearest_upsampling():
    x, _ = data.load_uci_digits()
    im = data.digits_to_images(x[:10])
    assert im.shape == (10, 3, 32, 32) and im.dtype == torch.float32
    assert torch.equal(im[:, 0, ::4, ::4], x[:10].float() / 16)
    assert torch.equal(im[:, 0, 3::4, 3::4], x[:10].float() / 16)


def test_split_is_disjoint_complete_stratified_and_deterministic():
    _, y = data.load_uci_digits()
    s = data.digits_split(seed=0)
    parts = [s["train"], s["dev"], s["test"]]
    allidx = torch.cat(parts)
    assert len(allidx) == 1797 and torch.equal(allidx.sort().values, torch.arange(1797))
    for p in parts:
        assert set(y[p].tolist()) == set(range(10))
    assert 850 < len(s["train"]) < 950 and 160 < len(s["dev"]) < 200 and 680 < len(s["test"]) < 760
    again, other = data.digits_split(seed=0), data.digits_split(seed=1)
    assert all(torch.equal(s[k], again[k]) for k in s)
    assert not torch.equal(s["test"], other["test"])


# --------------------------------------------------------------------------- data: datasets on disk

def write_image(path, color=(200, 30, 30), size=(8, 6)):
    """A tiny real image file (format from the extension), creating its folders."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)


def data_error(fn, *args):
    """Calls fn(*args), expects a DataError, checks its message is one line, returns the message."""
    with pytest.raises(data.DataError) as e:
        fn(*args)
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


# -----------------------------------------------------------------------------
# CoOp layout

DTD_CLASSES = ["banded", "blotchy", "cross_hatched"]  # label order; "_" must become " "


def make_dtd(root, per_split=dict(train=2, val=1, test=1)):
    """
    A fake DATA/dtd in the CoOp layout: images/<class>/<class>_<i>.jpg and split_zhou_DescribableTextures.json.
    The split file lists classes in an order other than by label, so the loader must sort by label.
    """
    entries, i = {s: [] for s in per_split}, 0
    for label in [2, 0, 1]:
        c = DTD_CLASSES[label]
        for split, n in per_split.items():
            for _ in range(n):
                rel = f"{c}/{c}_{i:04d}.jpg"
                write_image(os.path.join(root, "dtd", "images", rel), color=(10 * label, 0, 0))
                entries[split].append([rel, label, c])
                i += 1
    split_path = os.path.join(root, "dtd", "split_zhou_DescribableTextures.json")
    with open(split_path, "w") as f:
        json.dump(entries, f)
    return split_path


def test_coop_dtd_loads(tmp_path):
    make_dtd(tmp_path)
    task = data.load_task("dtd", tmp_path)
    assert task.name == "dtd"
    assert task.classnames == ["banded", "blotchy", "cross hatched"]
    assert task.templates[0] == "{} texture."
    assert len(set(task.templates)) == len(task.templates) and all("{}" in t for t in task.templates)
    assert (len(task.train), len(task.dev), len(task.test)) == (6, 3, 3)
    assert task.flip is True
    for items in (task.train, task.dev, task.test):
        for path, label in items:
            assert isinstance(path, str) and os.path.isabs(path) and os.path.isfile(path)
            assert path.startswith(str(tmp_path / "dtd" / "images"))
            # the image's folder is its class: the labels went with the right files
            assert os.path.basename(os.path.dirname(path)) == DTD_CLASSES[label]
    # train, dev and test are disjoint
    paths = [p for items in (task.train, task.dev, task.test) for p, _ in items]
    assert len(set(paths)) == len(paths)


def test_coop_templates_and_table():
    """Every CoOp dataset has its hand-written template first and no duplicates."""
    assert data.COOP_DATASETS["oxford_pets"][3] == "a photo of a {}, a type of pet."
    assert data.COOP_DATASETS["eurosat"][3] == "a centered satellite photo of {}."
    for name in data.COOP_NAMES + ["imagefolder", "cifar10"]:
        # the layout help is one line and names the data root placeholder
        assert "\n" not in data._layout(name) and "DATA" in data._layout(name)
        # the real root replaces the placeholder only, not the "DATA" of "DATASETS.md"
        assert "DATA" not in data._layout(name, "/r").replace("DATASETS.md", "")
    t = data._templates("a photo of a {}.")
    assert t[0] == "a photo of a {}." and t.count("a photo of a {}.") == 1


def test_coop_stanford_cars_images_in_folder_itself(tmp_path):
    """stanford_cars has no image subfolder: paths are relative to DATA/stanford_cars."""
    base = tmp_path / "stanford_cars"
    for name in ("cars_train/00001.jpg", "cars_train/00002.jpg", "cars_test/00001.jpg"):
        write_image(str(base / name))
    split = {"train": [["cars_train/00001.jpg", 0, "2012 Tesla Model S"],
                       ["cars_train/00002.jpg", 1, "2000 AM General Hummer SUV"]], "val": [],
             "test": [["cars_test/00001.jpg", 0, "2012 Tesla Model S"]]}
    (base / "split_zhou_StanfordCars.json").write_text(json.dumps(split))
    task = data.load_task("stanford_cars", tmp_path)
    assert task.classnames == ["2012 Tesla Model S", "2000 AM General Hummer SUV"] and task.dev == []
    assert task.train == [(str(base / "cars_train" / "00001.jpg"), 0), (str(base / "cars_train" / "00002.jpg"), 1)]


def test_fgvc_aircraft_loads(tmp_path):
    base = tmp_path / "fgvc_aircraft"
    variants = ["707-320", "Cessna 172", "F/A-18"]  # names with spaces and slashes
    (base / "images").mkdir(parents=True)
    (base / "variants.txt").write_text("\n".join(variants) + "\n")
    ids = dict(train=["1000001", "1000002", "1000003"], val=["1000004"], test=["1000005", "1000006"])
    labels = dict(train=[1, 0, 2], val=[2], test=[0, 1])
    for split in ids:
        lines = [f"{i} {variants[y]}" for i, y in zip(ids[split], labels[split])]
        (base / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")
        for i in ids[split]:
            write_image(str(base / "images" / f"{i}.jpg"))
    task = data.load_task("fgvc_aircraft", tmp_path)
    assert task.classnames == variants
    assert task.templates[0] == "a photo of a {}, a type of aircraft."
    assert task.train == [(str(base / "images" / f"{i}.jpg"), y) for i, y in zip(ids["train"], labels["train"])]
    assert [y for _, y in task.dev] == [2] and [y for _, y in task.test] == [0, 1]

    # a variant not in variants.txt names the file and line
    (base / "images_variant_test.txt").write_text("1000005 Boeing 999\n")
    msg = data_error(data.load_task, "fgvc_aircraft", tmp_path)
    assert "images_variant_test.txt:1" in msg and "Boeing 999" in msg


def test_imagenet_loads(tmp_path):
    base = tmp_path / "imagenet"
    wnids = ["n01440764", "n01443537"]
    (base / "images").mkdir(parents=True)
    (base / "classnames.txt").write_text("n01440764 tench\nn01443537 goldfish_fish\n")
    for split, n in (("train", 3), ("val", 2)):
        for w in wnids:
            for i in range(n):
                write_image(str(base / "images" / split / w / f"{w}_{i}.JPEG"))
    task = data.load_task("imagenet", tmp_path)
    assert task.classnames == ["tench", "goldfish fish"]
    assert task.templates[0] == "a photo of a {}."
    assert (len(task.train), len(task.dev), len(task.test)) == (6, 0, 4)
    assert [y for _, y in task.train] == [0, 0, 0, 1, 1, 1]
    assert all(p.endswith(".JPEG") and f"/{wnids[y]}/" in p for p, y in task.train + task.test)

    # a class folder that classnames.txt does not know about
    (base / "images" / "val" / "n99999999").mkdir()
    msg = data_error(data.load_task, "imagenet", tmp_path)
    assert "n99999999" in msg and "images/val" in msg


# -----------------------------------------------------------------------------
# ImageFolder

def make_imagefolder(root, splits=("train", "test"), classes=("cat", "dog_big")):
    for split in splits:
        for c in classes:
            for i, ext in enumerate([".png", ".JPG"]):  # extensions are case-insensitive
                write_image(os.path.join(root, split, c, f"{i}{ext}"))
            # files that are not images are skipped
            with open(os.path.join(root, split, c, "notes.txt"), "w") as f:
                f.write("not an image")


def test_imagefolder_loads(tmp_path):
    make_imagefolder(tmp_path, splits=("train", "test", "val"))
    task = data.load_task("imagefolder", tmp_path)
    assert task.classnames == ["cat", "dog big"]
    assert task.templates[0] == "a photo of a {}."
    assert (len(task.train), len(task.dev), len(task.test)) == (4, 4, 4)
    assert all(os.path.isabs(p) and os.path.isfile(p) for p, _ in task.train + task.dev + task.test)
    assert [os.path.basename(os.path.dirname(p)) for p, _ in task.train] == ["cat", "cat", "dog_big", "dog_big"]


def test_imagefolder_without_val(tmp_path):
    make_imagefolder(tmp_path)
    assert data.load_task("imagefolder", tmp_path).dev == []


def test_imagefolder_errors(tmp_path):
    make_imagefolder(tmp_path / "a", splits=("train",), classes=("cat", "dog"))
    make_imagefolder(tmp_path / "a", splits=("test",), classes=("cat", "cow"))
    msg = data_error(data.load_task, "imagefolder", tmp_path / "a")
    assert "dog" in msg and "cow" in msg and "same class folders" in msg

    make_imagefolder(tmp_path / "b", splits=("train", "test"))
    os.makedirs(tmp_path / "b" / "train" / "empty")
    os.makedirs(tmp_path / "b" / "test" / "empty")
    msg = data_error(data.load_task, "imagefolder", tmp_path / "b")
    assert "empty" in msg and "no images" in msg

    make_imagefolder(tmp_path / "c", splits=("train",))
    msg = data_error(data.load_task, "imagefolder", tmp_path / "c")
    assert str(tmp_path / "c" / "test") in msg


# -----------------------------------------------------------------------------
# clear, one-line errors

def test_error_missing_root():
    msg = data_error(data.load_task, "dtd", None)
    assert "--data-root is required for dtd" in msg and "split_zhou_DescribableTextures.json" in msg
    msg = data_error(data.load_task, "imagefolder", "")
    assert "--data-root is required for imagefolder" in msg


def test_error_root_not_a_directory(tmp_path):
    msg = data_error(data.load_task, "dtd", tmp_path / "nope")
    assert "nope" in msg and "not a directory" in msg


def test_error_missing_split_file(tmp_path):
    make_dtd(tmp_path)
    os.remove(tmp_path / "dtd" / "split_zhou_DescribableTextures.json")
    msg = data_error(data.load_task, "dtd", tmp_path)
    assert str(tmp_path / "dtd" / "split_zhou_DescribableTextures.json") in msg
    assert str(tmp_path / "dtd" / "images") in msg and "CoOp layout" in msg
    # a missing dataset folder names the folder it looked for
    msg = data_error(data.load_task, "oxford_pets", tmp_path)
    assert str(tmp_path / "oxford_pets" / "images") in msg and "split_zhou_OxfordPets.json" in msg


def test_error_root_is_the_dataset_folder(tmp_path):
    """Pointing --data-root at DATA/dtd instead of DATA gets a hint."""
    make_dtd(tmp_path)
    msg = data_error(data.load_task, "dtd", tmp_path / "dtd")
    assert "should be the folder that contains dtd/" in msg


@pytest.mark.parametrize("content, expect", [
    ("{not json", "not valid JSON"),
    ('{"train": [], "test": []}', "keys 'train', 'val', 'test'"),
    ('[1, 2]', "keys 'train', 'val', 'test'"),
    ('{"train": [["a.jpg", 0]], "val": [], "test": []}', "item 0 of 'train'"),
    ('{"train": [["a.jpg", "0", "x"]], "val": [], "test": []}', "item 0 of 'train'"),
    ('{"train": [["a.jpg", true, "x"]], "val": [], "test": []}', "item 0 of 'train'"),
    ('{"train": {"a": 1}, "val": [], "test": []}', "'train' must be a list"),
    ('{"train": [["a.jpg", 0, "x"], ["b.jpg", 0, "y"]], "val": [], "test": [["c.jpg", 0, "x"]]}', "named both"),
    ('{"train": [["a.jpg", 1, "x"]], "val": [], "test": [["c.jpg", 1, "x"]]}', "no item with label(s) [0]"),
    ('{"train": [], "val": [], "test": [["c.jpg", 0, "x"]]}', "empty 'train' or 'test'"),
])
def test_error_malformed_split_file(tmp_path, content, expect):
    make_dtd(tmp_path)
    split_path = tmp_path / "dtd" / "split_zhou_DescribableTextures.json"
    split_path.write_text(content)
    msg = data_error(data.load_task, "dtd", tmp_path)
    assert str(split_path) in msg and expect in msg


def test_error_split_names_missing_images(tmp_path):
    make_dtd(tmp_path)
    gone = ["banded/banded_0006.jpg", "blotchy/blotchy_0008.jpg"]
    for rel in gone:
        os.remove(tmp_path / "dtd" / "images" / rel)
    os.rename(tmp_path / "dtd" / "images" / "cross_hatched", tmp_path / "dtd" / "images" / "moved")  # 4 more
    msg = data_error(data.load_task, "dtd", tmp_path)
    assert "split_zhou_DescribableTextures.json lists 6 of 12 images that do not exist" in msg
    assert "cross_hatched/cross_hatched_0000.jpg" in msg  # the first few, relative to the image dir


def test_missing_files_is_exact(tmp_path):
    """The directory-listing shortcut agrees with os.path.isfile, folders and '..' included."""
    write_image(str(tmp_path / "a" / "x.png"))
    os.makedirs(tmp_path / "a" / "sub")
    paths = [str(tmp_path / "a" / "x.png"), str(tmp_path / "a" / "y.png"), str(tmp_path / "a" / "sub"),
             str(tmp_path / "a" / "sub" / ".." / "x.png"), str(tmp_path / "nodir" / "x.png")]
    assert data.missing_files(paths) == [p for p in paths if not os.path.isfile(p)]
    assert data.missing_files(paths) == paths[1:3] + paths[4:]


def test_error_unknown_dataset():
    msg = data_error(data.load_task, "mnist", None)
    assert "unknown dataset 'mnist'" in msg
    for name in ("digits", "dtd", "imagenet", "fgvc_aircraft", "imagefolder", "cifar10", "cifar100n"):
        assert name in msg


# -----------------------------------------------------------------------------
# CIFAR: a tiny fake in torchvision's on-disk format
#
# torchvision verifies the md5 of every batch file (CIFAR10._check_integrity, and
# _load_meta for batches.meta) against the real files' md5s, held in the class
# attributes train_list, test_list and meta. The fake files cannot match those, so
# the test computes the fake files' own md5s and swaps them into the class attributes
# with monkeypatch (undone after the test). torchvision's own integrity code still
# runs, so a corrupted fake is still caught (test_cifar_corrupted).

def make_fake_cifar(root, cls, n_train=(3, 2, 2, 1, 2), n_test=4, seed=0):
    """
    Writes root/<cls.base_folder>/ with pickled batches like the real ones
    ({"data": uint8 [N, 3072] in CHW order, "labels" or "fine_labels": [N]}) plus the meta file.
    Returns {name: md5} of the written files.
    """
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, cls.base_folder)
    os.makedirs(folder, exist_ok=True)
    label_key = "fine_labels" if cls is torchvision.datasets.CIFAR100 else "labels"
    classes = ["airplane", "pickup_truck", "cat"]  # "_" must become " "
    sizes = dict(zip([f for f, _ in cls.train_list], n_train)) if len(cls.train_list) > 1 else \
        {cls.train_list[0][0]: sum(n_train)}
    sizes[cls.test_list[0][0]] = n_test
    md5 = {}
    for fname, n in sizes.items():
        batch = {"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 label_key: [int(y) for y in rng.integers(0, len(classes), size=n)]}
        with open(os.path.join(folder, fname), "wb") as f:
            pickle.dump(batch, f)
    with open(os.path.join(folder, cls.meta["filename"]), "wb") as f:
        pickle.dump({cls.meta["key"]: classes}, f)
    for fname in os.listdir(folder):
        with open(os.path.join(folder, fname), "rb") as f:
            md5[fname] = hashlib.md5(f.read()).hexdigest()
    return md5


def trust_fake_cifar(monkeypatch, cls, md5):
    """Makes torchvision's md5 checks of `cls` expect the fake files' md5s."""
    monkeypatch.setattr(cls, "train_list", [[f, md5[f]] for f, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[f, md5[f]] for f, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", dict(cls.meta, md5=md5[cls.meta["filename"]]))


@pytest.fixture
def no_download(monkeypatch):
    """Any attempt to download fails the test: loaders must never fetch data by themselves."""
    def refuse(*args, **kwargs):
        raise AssertionError("a loader tried to download")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", refuse)


def test_cifar10_fake_loads(tmp_path, monkeypatch, no_download):
    cls = torchvision.datasets.CIFAR10
    trust_fake_cifar(monkeypatch, cls, make_fake_cifar(tmp_path, cls))
    task = data.load_task("cifar10", tmp_path)
    assert task.classnames == ["airplane", "pickup truck", "cat"]
    assert task.templates[0] == "a photo of a {}."
    assert (len(task.train), len(task.dev), len(task.test)) == (10, 0, 4)
    x, y = task.train[0]
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32) and isinstance(y, int)
    # the pixels are the file's, in CHW order: image 0 of data_batch_1 reshaped to [3, 32, 32]
    with open(tmp_path / cls.base_folder / "data_batch_1", "rb") as f:
        batch = pickle.load(f)
    assert torch.equal(x, torch.from_numpy(batch["data"][0].reshape(3, 32, 32)))
    assert y == batch["labels"][0]


def test_cifar100n_is_cifar100(tmp_path, monkeypatch, no_download):
    cls = torchvision.datasets.CIFAR100
    trust_fake_cifar(monkeypatch, cls, make_fake_cifar(tmp_path, cls))
    a, b = data.load_task("cifar100", tmp_path), data.load_task("cifar100n", tmp_path)
    assert b.name == "cifar100n" and a.classnames == b.classnames
    assert len(b.train) == 10 and len(b.test) == 4
    assert all(torch.equal(x1, x2) and y1 == y2 for (x1, y1), (x2, y2) in zip(a.test, b.test))


def test_cifar_missing(tmp_path, no_download):
    msg = data_error(data.load_task, "cifar10", tmp_path)
    assert str(tmp_path / "cifar-10-batches-py") in msg and "download=True" in msg
    msg = data_error(data.load_task, "cifar100n", None)
    assert "--data-root is required for cifar100n" in msg and "cifar-100-python" in msg


def test_cifar_corrupted(tmp_path, no_download):
    """Without the md5 swap, torchvision rejects the fake: reported as corrupted, not as a traceback."""
    make_fake_cifar(tmp_path, torchvision.datasets.CIFAR10)
    msg = data_error(data.load_task, "cifar10", tmp_path)
    assert "corrupted" in msg and "download=True" in msg
