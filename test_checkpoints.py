"""Tests of checkpoints.py: the checkpoint forms (OpenAI releases and files, open_clip names and
files, Hugging Face CLIPModel folders, safetensors), each against an independent reference where
one is installed (open-clip-torch, transformers, safetensors; skipped where absent); download and
cache; the activation never guessed."""
import hashlib
import http.server
import json
import threading

import pytest
import torch

import checkpoints
import clip_model as cm
from conftest import hub_file, inputs, randomized, tiny_hf, tiny_open_clip


# --------------------------------------------------------------------------- OpenAI-layout files

def test_fp16_checkpoint_loads_to_fp32_parameters(tmp_path):
    m = randomized("tiny-vit")
    sd = {k: (v.half() if v.dtype == torch.float32 and v.ndim == 2 else v) for k, v in m.state_dict().items()}
    torch.save(sd, tmp_path / "half.pt")
    model, preprocess = checkpoints.load(str(tmp_path / "half.pt"), act="quick_gelu")
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
    a, _ = checkpoints.load(str(tmp_path / "tiny.pt"), act="quick_gelu")
    b, _ = checkpoints.load(str(tmp_path / "tiny_sd.pt"), act="quick_gelu")
    with torch.no_grad():
        assert torch.equal(a.encode_image(x), b.encode_image(x))
        assert torch.equal(a.encode_text(t), b.encode_text(t))


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(cm.CLIPError, match="unknown model"):
        checkpoints.load("ViT-H/99")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(cm.CLIPError, match="neither a TorchScript archive nor a state dict"):
        checkpoints.load(str(tmp_path / "junk.pt"), act="quick_gelu")
    # a cached file under a known name with the wrong hash is refused, not used
    (tmp_path / "RN50.pt").write_bytes(b"corrupt")
    with pytest.raises(cm.CLIPError, match="does not have the sha256"):
        checkpoints.load("RN50", cache_dir=tmp_path)


# --------------------------------------------------------------------------- CLIP: download

def test_download_file_url_checks_hash(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 1000)
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    dest = tmp_path / "cache" / "model.pt"
    assert checkpoints.download(src.as_uri(), dest, sha, progress=False) == dest
    assert dest.read_bytes() == src.read_bytes()
    dest2 = tmp_path / "cache" / "other.pt"
    with pytest.raises(cm.CLIPError, match="expected"):
        checkpoints.download(src.as_uri(), dest2, "0" * 64, progress=False)
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
        checkpoints.download(f"http://127.0.0.1:{server.server_port}/model.pt", dest,
                    hashlib.sha256(payload).hexdigest(), progress=False)
    finally:
        server.shutdown()
    assert RangeHandler.requests == ["bytes=300000-"]
    assert dest.read_bytes() == payload


def test_no_network_says_where_to_put_the_file(tmp_path):
    with pytest.raises(cm.CLIPError, match="Put the file at .*RN50.pt"):
        checkpoints.download("http://127.0.0.1:1/RN50.pt", tmp_path / "RN50.pt", "0" * 64, retries=1, progress=False)




def test_a_file_that_does_not_name_its_activation_is_refused_until_it_is_given(tmp_path):
    """The tensors of a QuickGELU and a GELU CLIP have the same keys: a file that says nothing is
    refused in one line, and with act= it runs that activation (the two differ)."""
    torch.save(randomized("tiny-vit").state_dict(), tmp_path / "w.pt")
    with pytest.raises(cm.CLIPError, match="give --clip-act quick_gelu or gelu") as e:
        checkpoints.load(str(tmp_path / "w.pt"))
    assert "\n" not in str(e.value)
    quick, _ = checkpoints.load(str(tmp_path / "w.pt"), act="quick_gelu")
    gelu, _ = checkpoints.load(str(tmp_path / "w.pt"), act="gelu")
    assert isinstance(gelu.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    assert isinstance(gelu.visual.transformer.resblocks[0].mlp.gelu, torch.nn.GELU)
    x, t = inputs(quick)
    with torch.no_grad():
        assert (quick.encode_text(t) - gelu.encode_text(t)).abs().max() > 1e-3
    assert "gelu" in checkpoints.describe(str(tmp_path / "w.pt"), "gelu").identity()


def test_an_openai_release_is_known_by_name_or_by_its_files_sha256(tmp_path, monkeypatch):
    torch.save(randomized("tiny-vit").state_dict(), tmp_path / "w.pt")
    monkeypatch.setitem(checkpoints.RELEASE_OF_SHA, checkpoints.sha256_of(tmp_path / "w.pt"), "ViT-B/16")
    b = checkpoints.describe(str(tmp_path / "w.pt"))
    assert b.act == "quick_gelu" and b.layout == "openai"
    for name in ("ViT-B/16", str(tmp_path / "w.pt")):
        with pytest.raises(cm.CLIPError, match="trained with quick_gelu, not gelu: drop the activation"):
            checkpoints.describe(name, "gelu")


# --------------------------------------------------------------------------- open_clip

def test_open_clip_table_matches_open_clips_pretrained_configs():
    """Every row of our table against open_clip's own: the activation the weights were trained
    with, where they are published, mean/std, resize, and the architecture's resolution and
    heads; and every tag open_clip has for these architectures is in the table."""
    open_clip = pytest.importorskip("open_clip")
    from open_clip import pretrained
    theirs = {}
    for arch, tag in open_clip.list_pretrained():
        base = arch.removesuffix("-quickgelu")
        if base in checkpoints.OPEN_CLIP_ARCHS and not arch.endswith("-worldwide"):
            theirs.setdefault(f"{base}/{tag}", (arch, tag))
    assert set(theirs) == set(checkpoints.OPEN_CLIP)
    for key, (act, repo, url_file) in checkpoints.OPEN_CLIP.items():
        arch, tag = theirs[key]
        cfg = pretrained.get_pretrained_cfg(arch, tag)
        assert act == ("quick_gelu" if cfg.get("quick_gelu") or arch.endswith("-quickgelu") else "gelu"), key
        assert repo == cfg.get("hf_hub", "").rstrip("/") and url_file == cfg.get("url", "").split("/")[-1], key
        assert checkpoints.open_clip_settings(*key.split("/"))[0] == act
        known = checkpoints.open_clip_settings(*key.split("/"))[1]
        assert (known.get("image_mean", cm.CLIP_MEAN), known.get("image_std", cm.CLIP_STD)) == \
            (tuple(cfg["mean"]), tuple(cfg["std"])), key
        assert known.get("resize_mode", "shortest") == cfg.get("resize_mode", "shortest"), key
        assert cfg.get("interpolation", "bicubic") == "bicubic", key
    for arch, (resolution, heads) in checkpoints.OPEN_CLIP_ARCHS.items():
        model = open_clip.get_model_config(arch)
        vision, text = model["vision_cfg"], model["text_cfg"]
        assert vision["image_size"] == resolution and vision.get("mlp_ratio", 4.0) == 4.0, arch
        if vision.get("patch_size"):  # a ViT: its heads
            assert (heads or vision["width"] // 64) == vision["width"] // vision.get("head_width", 64), arch
        assert text["width"] // text["heads"] == 64 and text["vocab_size"] == 49408, arch
        assert text["context_length"] == 77 and set(text) <= {"context_length", "vocab_size", "width", "heads",
                                                               "layers"}, arch


def assert_same_features(ours, theirs_image, theirs_text, act_differs=None):
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    t = cm.tokenize(["a photo of a cat.", "x", "a b c d e"], 16)
    with torch.no_grad():
        for a, b in ((ours.encode_image(x), theirs_image(x)), (ours.encode_text(t), theirs_text(t))):
            assert a.abs().mean() > 0.01 and (a - b).abs().max() <= 1e-5 * b.abs().max()
        if act_differs is not None:  # the same weights under the other activation: clearly other features
            assert (act_differs.encode_text(t) - theirs_text(t)).abs().max() > 1e-3 * theirs_text(t).abs().max()


@pytest.mark.parametrize("form", ["gelu-vit", "quickgelu-vit", "resnet"])
def test_open_clip_weights_by_name_or_file_equal_open_clips_features(tmp_path, monkeypatch, form):
    """Tiny weights made and saved as open_clip's releases are (safetensors in the hub cache, or
    a torch.save'd file), read by name or by file: our features equal open_clip's to 1e-5
    relative; the same weights under the other activation do not."""
    open_clip = pytest.importorskip("open_clip")
    safetensors = pytest.importorskip("safetensors.torch")
    resnet, quick = form == "resnet", form != "gelu-vit"
    arch = "RN-T" if resnet else "ViT-T-8"
    monkeypatch.setitem(checkpoints.OPEN_CLIP_ARCHS, arch, (32, None if resnet else 4))
    monkeypatch.setitem(checkpoints.OPEN_CLIP, f"{arch}/tiny", ("quick_gelu" if quick else "gelu", "org/tiny", ""))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    theirs = tiny_open_clip(open_clip, resnet, quick)
    sd = {k: v.contiguous() for k, v in theirs.state_dict().items()}
    safetensors.save_file(sd, hub_file(tmp_path, "org/tiny", "open_clip_model.safetensors"))
    torch.save(sd, tmp_path / "open_clip_pytorch_model.bin")
    other = "gelu" if quick else "quick_gelu"
    for name in (f"open_clip:{arch}/tiny", f"open_clip:{arch}/tiny={tmp_path / 'open_clip_pytorch_model.bin'}",
                 f"open_clip:{arch}{'-quickgelu' if quick else ''}={tmp_path / 'open_clip_pytorch_model.bin'}"):
        ours, preprocess = checkpoints.load(name)
        assert ours.cfg.act == ("quick_gelu" if quick else "gelu")
        wrong = cm.build_model(sd, act=other, **({} if resnet else {"vision_heads": 4}))
        assert_same_features(ours, theirs.encode_image, theirs.encode_text, wrong)


def test_open_clip_vit_b_16_laion_as_released_loads_with_gelu(tmp_path, monkeypatch):
    """Full size, the real table row: open_clip's ViT-B-16 (GELU), random weights saved where
    huggingface_hub caches laion2b_s34b_b88k; our features equal open_clip's. With the row's
    activation broken (quick_gelu), this fails."""
    open_clip = pytest.importorskip("open_clip")
    safetensors = pytest.importorskip("safetensors.torch")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    torch.manual_seed(0)
    theirs = open_clip.create_model("ViT-B-16").eval()
    safetensors.save_file({k: v.contiguous() for k, v in theirs.state_dict().items()},
                          hub_file(tmp_path, "laion/CLIP-ViT-B-16-laion2B-s34B-b88K", "open_clip_model.safetensors"))
    ours, _ = checkpoints.load("open_clip:ViT-B-16/laion2b_s34b_b88k")
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    t = cm.tokenize(["a photo of a cat.", "x"])
    with torch.no_grad():
        for a, b in ((ours.encode_image(x), theirs.encode_image(x)), (ours.encode_text(t), theirs.encode_text(t))):
            assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_open_clip_names_are_checked_before_anything_is_read(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("CLIP_CACHE", str(tmp_path / "clip"))
    for name, message in (
            ("open_clip:ViT-B-16/laion2b_s34b_b88k", "not in the cache: expected "
             f"{tmp_path}/hub/models--laion--CLIP-ViT-B-16-laion2B-s34B-b88K/snapshots/<rev>/open_clip_model"),
            ("open_clip:ViT-B-16/laion400m_e32", f"or {tmp_path}/clip/vit_b_16-laion400m_e32-55e67d44.pt"),
            ("open_clip:ViT-B-16-quickgelu/laion2b_s34b_b88k", "was trained with GELU: ViT-B-16-quickgelu would run "
                                                               "it with QuickGELU"),
            ("open_clip:ViT-B-16/nope", "unknown tag; ViT-B-16's are openai, laion400m_e31"),
            ("open_clip:ViT-g-14/laion2b_s12b_b42k", "not one this CLIP builds"),
            ("open_clip:ViT-B-16", "give a tag"), ("open_clip:ViT-B-16=/no/such", "no file /no/such")):
        with pytest.raises(cm.CLIPError, match=None) as e:
            checkpoints.describe(name)
        assert message in str(e.value) and "\n" not in str(e.value), (name, str(e.value))
    with pytest.raises(cm.CLIPError, match="open_clip's ViT-B-16/dfn2b, trained with quick_gelu, not gelu"):
        hub_file(tmp_path, "apple/DFN2B-CLIP-ViT-B-16", "open_clip_model.safetensors").write_bytes(b"")
        checkpoints.describe("open_clip:ViT-B-16/dfn2b", "gelu")


# --------------------------------------------------------------------------- Hugging Face

@pytest.mark.parametrize("act,safe", [("gelu", True), ("quick_gelu", False)])
def test_hugging_face_clipmodel_folder_equals_transformers_features(tmp_path, monkeypatch, act, safe):
    """A CLIPModel saved by transformers (model.safetensors or pytorch_model.bin, config.json,
    preprocessor_config.json), read from its folder and as hf:ORG/NAME from the hub cache: our
    features equal transformers' to 1e-5 relative, with its activation, heads and mean/std."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    theirs = tiny_hf(transformers, act)
    folder = hub_file(tmp_path, "org/tiny-clip", "x").parent
    theirs.save_pretrained(folder)
    if not safe:  # as older releases on the hub (e.g. openai/clip-vit-base-patch16) ship it
        (folder / "model.safetensors").unlink()
        torch.save(theirs.state_dict(), folder / "pytorch_model.bin")
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                    image_mean=[0.5] * 3, image_std=[0.25] * 3).save_pretrained(folder)
    assert (folder / ("model.safetensors" if safe else "pytorch_model.bin")).is_file()

    def image(x):
        return theirs.visual_projection(theirs.vision_model(pixel_values=x).pooler_output)

    def text(t):
        return theirs.text_projection(theirs.text_model(input_ids=t, attention_mask=(t > 0).long()).pooler_output)
    for name in (str(folder), "hf:org/tiny-clip"):
        ours, preprocess = checkpoints.load(name)
        assert ours.cfg.act == act and ours.cfg.vision_heads == 2 and ours.cfg.transformer_heads == 2
        assert torch.equal(ours.logit_scale, theirs.logit_scale)
        wrong = cm.build_model(ours.state_dict(), act="quick_gelu" if act == "gelu" else "gelu", vision_heads=2,
                               transformer_heads=2)
        assert_same_features(ours, image, text, wrong)
        white = preprocess(torch.full((3, 32, 32), 255, dtype=torch.uint8))  # mean 0.5, std 0.25: (1 - 0.5) / 0.25
        assert torch.allclose(white, torch.full_like(white, 2.0))
    assert "hf:org/tiny-clip sha256:" in checkpoints.describe("hf:org/tiny-clip").identity()
    with pytest.raises(cm.CLIPError, match="whose config.json says"):
        checkpoints.describe(str(folder), "gelu" if act == "quick_gelu" else "quick_gelu")


def test_a_checkpoint_no_layout_fits_is_one_line_naming_its_first_key(tmp_path):
    torch.save({"encoder.weight": torch.zeros(3, 4)}, tmp_path / "x.pt")
    with pytest.raises(cm.CLIPError, match=r"key encoder.weight \(3, 4\) fits no CLIP layout"):
        checkpoints.load(str(tmp_path / "x.pt"), act="gelu")
    sd = {"text_model.encoder.layers.0.adapter.weight": torch.zeros(2, 2)}
    with pytest.raises(cm.CLIPError, match=r"Hugging Face key text_model.encoder.layers.0.adapter.weight \(2, 2\)"):
        checkpoints.openai_layout_of_hf(sd)
    (tmp_path / "f").mkdir()
    with pytest.raises(cm.CLIPError, match="a folder without config.json"):
        checkpoints.describe(str(tmp_path / "f"))


# --------------------------------------------------------------------------- safetensors

def test_safetensors_reader_known_bytes_and_the_reference_library(tmp_path):
    """A file written byte by byte from the format's definition, then one written by the
    safetensors library (where installed) in every dtype we read."""
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "I64", "shape": [1, 1], "data_offsets": [8, 16]}, "__metadata__": {"format": "pt"}}
    raw = json.dumps(header).encode()
    body = torch.tensor([1.5, -2.0]).numpy().tobytes() + torch.tensor([7]).numpy().tobytes()
    (tmp_path / "hand.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + body)
    got = checkpoints.read_safetensors(tmp_path / "hand.safetensors")
    assert torch.equal(got["a"], torch.tensor([1.5, -2.0])) and torch.equal(got["b"], torch.tensor([[7]]))
    safetensors = pytest.importorskip("safetensors.torch")
    g = torch.Generator().manual_seed(0)
    tensors = {f"t.{d}": torch.randn(3, 5, generator=g).to(d) for d in (torch.float32, torch.float16, torch.bfloat16,
                                                                       torch.float64)}
    tensors.update(ints=torch.arange(-4, 8).view(3, 4), flags=torch.tensor([True, False]), scalar=torch.tensor(2.5),
                   empty=torch.zeros(0, 3))
    safetensors.save_file(tensors, tmp_path / "lib.safetensors")
    got = checkpoints.read_safetensors(tmp_path / "lib.safetensors")
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "lib.safetensors").read_bytes()[:20])
    with pytest.raises(cm.CLIPError, match="not a readable .safetensors file"):
        checkpoints.read_safetensors(tmp_path / "cut.safetensors")
