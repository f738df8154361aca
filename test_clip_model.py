"""Tests of clip_model.py: building from a state dict, tokenizer, the prompt/VPT hooks, preprocessing, the
zero-shot head, and equivalence with open-clip-torch (skipped where it is not installed)."""
import gzip

import pytest
import torch
import torch.nn.functional as F

import clip_model as cm
from conftest import TEXTS, inputs, randomized



# --------------------------------------------------------------------------- CLIP: loading

@pytest.mark.parametrize("name", ["tiny-vit", "tiny-rn"])
def test_state_dict_round_trip_is_strict_and_exact(name):
    m = randomized(name)
    sd = m.state_dict()
    m2 = cm.build_model({k: v.clone() for k, v in sd.items()}, act="quick_gelu")
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
        cm.build_model(bad, act="quick_gelu")
    bad = {k: v for k, v in sd.items() if k != "ln_final.bias"}
    with pytest.raises(cm.CLIPError, match="missing"):
        cm.build_model(bad, act="quick_gelu")
    with pytest.raises(cm.CLIPError, match="not a CLIP state dict"):
        cm.build_model({"foo": torch.zeros(1)}, act="quick_gelu")


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


# the class names differ in length, the last one by far (15 tokens, the others 1-3)
SHARED_NAMES = ["cat", "red sports car", "x", "a very long class name that takes many more tokens than all of the others"]


def shared_and_plain(m, ctx, names=SHARED_NAMES):
    """The P*C prompts 'SOT ctx_p name_c . EOT' (ctx [P, M, W]) encoded both ways, each [P, C, D]:
    encode_text_shared(prefix, suffix ids), and encode_text of the full prompts' embeddings."""
    (P, M, _), C = ctx.shape, len(names)
    tokens = cm.tokenize([" ".join(["X"] * M) + f" {n}." for n in names], m.context_length)  # [C, L]
    emb = m.token_embedding(tokens).detach()  # [C, L, W]
    full = emb.repeat(P, 1, 1)  # [P*C, L, W]: context p's prompts are rows p*C .. p*C + C-1
    full = torch.cat([full[:, :1], ctx.repeat_interleave(C, dim=0), full[:, 1 + M:]], dim=1)
    plain = m.encode_text(tokens.repeat(P, 1), embeddings=full).view(P, C, -1)
    prefix = torch.cat([emb[:1, :1].expand(P, -1, -1), ctx], dim=1)  # [P, 1+M, W]: SOT, context
    return m.encode_text_shared(prefix, tokens[:, 1 + M:]), plain


@pytest.mark.parametrize("P,heads", [(1, 1), (3, 1), (3, 4)])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_prefix_text_encoding_equals_plain(P, heads, checkpointing, monkeypatch):
    """Shared-prefix encoding = encode_text of the P*C full prompts, features and gradients (to the
    contexts, the positional embedding and a block's weights), with and without checkpointing."""
    m = randomized("tiny-vit", context_length=77, transformer_heads=heads)
    m.transformer.grad_checkpointing = checkpointing
    calls, checkpoint = [], torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    lengths = [len(cm.tokenizer().encode(n)) for n in SHARED_NAMES]
    assert max(lengths) >= 5 * sorted(lengths)[-2]
    ctx = (0.5 * torch.randn(P, 4, m.cfg.transformer_width, generator=torch.Generator().manual_seed(2))).requires_grad_()
    shared, plain = shared_and_plain(m, ctx)
    assert len(calls) == (2 * m.transformer.layers if checkpointing else 0)  # every block of both paths
    assert shared.shape == (P, len(SHARED_NAMES), m.cfg.embed_dim)
    assert (shared - plain).abs().max() < 1e-5
    w = torch.randn(shared.shape, generator=torch.Generator().manual_seed(3))
    wrt = [ctx, m.positional_embedding, m.transformer.resblocks[0].attn.in_proj_weight]
    for a, b in zip(torch.autograd.grad((shared * w).sum(), wrt), torch.autograd.grad((plain * w).sum(), wrt)):
        assert b.abs().max() > 0 and (a - b).abs().max() < 1e-5 * b.abs().max()


def test_shared_prefix_text_encoding_fills_the_context_and_refuses_more():
    m = randomized("tiny-vit")  # context 16: SOT + 4 contexts + 9 name tokens + "." + EOT fill it
    ctx = torch.randn(2, 4, m.cfg.transformer_width, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        shared, plain = shared_and_plain(m, ctx, ["a b c d e f g h i", "cat"])
        assert (shared - plain).abs().max() < 1e-5
        suffix = cm.tokenize(["X X X X a b c d e f g h i."], m.context_length)[:, 5:]
        with pytest.raises(cm.CLIPError, match="longer than the context of 16"):
            m.encode_text_shared(torch.zeros(1, 6, m.cfg.transformer_width), suffix)  # one prefix token more


def test_shared_prefix_text_encoding_under_bf16_autocast():
    m = randomized("tiny-vit", context_length=77, transformer_heads=4)
    ctx = torch.randn(3, 4, m.cfg.transformer_width, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, plain = shared_and_plain(m, ctx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            shared, _ = shared_and_plain(m, ctx)
    assert shared.dtype == torch.bfloat16
    assert F.cosine_similarity(shared.float(), plain, dim=-1).min() > 0.99


def test_preprocess_transform():
    from PIL import Image
    img = Image.new("L", (50, 40), color=255)
    out = cm.preprocess(32)(img)
    assert out.shape == (3, 32, 32)
    assert torch.allclose(out[:, 0, 0], (1 - torch.tensor(cm.CLIP_MEAN)) / torch.tensor(cm.CLIP_STD), atol=1e-5)


def test_the_test_transform_lays_transparency_over_white_and_refuses_unscaled_wide_images():
    """A PIL image a user passes: transparent pixels become white (convert("RGB") would show the
    red they hide), half-transparent ones half way, a transparency key too; 16-bit and float images
    are refused in one line, as they need imagefiles.load_image's scaling."""
    from PIL import Image
    rgba = Image.new("RGBA", (2, 1), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 255, 128))
    assert [cm.rgb(rgba).getpixel((x, 0)) for x in (0, 1)] == [(255, 255, 255), (127, 127, 255)]  # round((255 * 127) / 255) = 127
    keyed = Image.new("RGB", (1, 1), (9, 9, 9))
    keyed.info["transparency"] = (9, 9, 9)
    assert cm.rgb(keyed).getpixel((0, 0)) == (255, 255, 255)
    plain = Image.new("RGB", (1, 1), (9, 9, 9))
    assert cm.rgb(plain) is plain and torch.equal(cm.rgb(torch.zeros(3, 1, 1)), torch.zeros(3, 1, 1))
    for mode in ("I;16", "I", "F"):
        with pytest.raises(cm.CLIPError, match="imagefiles.load_image") as e:
            cm.preprocess(32)(Image.new(mode, (4, 4)))
        assert "\n" not in str(e.value)


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


def test_text_classifier_averages_normalised_prompt_embeddings():
    """A class's weight is the mean of its prompts' *normalised* embeddings, renormalised; the
    reference is built from encode_text by hand, not from the function under test."""
    clip = randomized("tiny-vit")
    prompts = [["a cat.", "a very very small grey cat sitting on a mat."], ["dog"], ["a red fox", "fox", "the fox."]]
    W = cm.text_classifier(clip, prompts, "cpu")
    with torch.no_grad():
        ref, unnormalised = [], []
        for texts in prompts:
            e = clip.encode_text(cm.tokenize(texts, clip.context_length))  # [n, D], norms differ per prompt
            ref.append(F.normalize(F.normalize(e, dim=-1).mean(0), dim=0))
            unnormalised.append(F.normalize(e.mean(0), dim=0))
    ref, unnormalised = torch.stack(ref), torch.stack(unnormalised)
    assert (W - ref).abs().max() < 1e-5
    assert (unnormalised - ref).abs().max() > 1e-3  # the test tells the two apart


def test_state_dict_with_a_wrong_shape_is_one_line():
    sd = randomized("tiny-vit").state_dict()
    sd["transformer.resblocks.0.mlp.c_fc.weight"] = torch.zeros(3, 64)
    with pytest.raises(cm.CLIPError, match=r"transformer.resblocks.0.mlp.c_fc.weight has shape \(3, 64\).* needs "
                                           r"\(256, 64\)") as e:
        cm.build_model(sd, act="quick_gelu")
    assert "\n" not in str(e.value)
