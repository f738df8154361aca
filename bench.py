"""
Benchmarks: where each method's time goes, on random weights of real size and synthetic inputs
(no checkpoint, no data), one CLI for every method. The speed figures in docs/efficiency.md come from it.

    python bench.py                                   towers + CoFT's stages on the default device
    python bench.py --sections towers --precision fp32,bf16    the same figures at two precisions,
                                                      then each figure's ratio
    python bench.py --sections ref                    our towers vs open-clip-torch's, side by side

Sections:
  towers  image tower forward+backward; text tower forward+backward up to the EOT vs at 77 tokens
  coft    (a) image tower fwd+bwd, (b) a Phase-I step (2C prompts, VPT-deep / adapter) broken down
          into text tower (the 2C whole prompts up to the EOT and at full length, and the shared-prefix
          path the step uses, with its speed-up over the former), image tower, losses and optimizer,
          (c) a Phase-II step with and without CoFT+'s momentum encoder and queue, (d) the generation
          pass over N images
  craft   one CMA-ES generation's fitness evaluations (popsize prompts x C classes on 16 x C
          pre-extracted image features): the official code's way (one candidate at a time, every
          prompt at 77 tokens) vs ours (all candidates in one batched call, shared prefix, up to the
          longest EOT), with the speed-up; then the parameters a deployer keeps and the peak memory
          of one training step on --batch images: CraFT's black-box side (a generation + the batch's
          logits), CraFT's user side (a refiner step) and white-box CoOp (a step)
  vecaf   one selection on random unit features (--pool N x 512, --centroids K): a centroid step on a
          mini-batch of --select-batch samples vs on the whole pool (the official CIFAR scripts),
          300 steps, the ensemble's matching of 3 selectors, and nearest-unique selection in chunked
          rounds vs the official way (a dense K x N similarity matrix, each row sorted, centroids
          choosing in index order; skipped where it would not fit), each with its peak memory
  labels  CoFT's label steps over an unlabelled pool (zero-shot labels and S*, both Phase-I models' labels
          and confidences, the collaborative filter both ways with its diagnosis and AUROCs) on synthetic
          features: --pool N images (default ImageNet's 1,281,167), 1000 classes, 512-d, the way coft.py
          computes them (a few numbers per image, blocks of rows) beside the full N x C score matrices of
          the way before (at --reference-pool images, where they fit), each in a fresh process: time and
          peak resident memory, and whether the two give the same picks and figures
  pool    knowing a folder of your own images by content (imagefiles.list_images, imagefiles.contents): --pool-files
          small generated PNGs in folders of 1,000; the listing, the first pass (every file read, hashed and
          checked), a repeat pass (the digest cache: only files whose size or times changed are read) and one
          after 1 % of the files changed, each in a fresh process (time, files read, peak resident memory),
          then the same scaled to ImageNet's 1,281,167 files
  ddp     the inputs of the torchrun scaling estimate (docs/torchrun.md): a plain Phase-II step
          (batch --batch, 1000 classes) and the all-reduce of its gradient between 2 local processes
          (gloo on CPUs, NCCL with 2 GPUs), then the estimated step for 2, 4 and 8 processes
  ref     needs open-clip-torch (a test-only dependency)
  decode  checking image files before training: per image, on generated JPEGs of ImageNet's typical size
          (500 x 375, about 110 KB), a header read (Image.open), a full decode, Pillow's draft-mode JPEG
          decode (1/8 scale), imagefiles.image_problem (the check every pool image gets) and the sha256 of the
          bytes; the full decode and image_problem in a pool of threads; each extrapolated to ImageNet's
          1.28 M images; then which problem files (truncated JPEG, PNG, GIF, WebP, TIFF, BMP, empty, text
          named .jpg, 16-bit, float outside [0, 1], ...) each check refuses
  page    opening CoFT's review page (page.py review) on a generated run of --page-pool images
          (default ImageNet's 1,281,167, 1000 classes) beside one of 300, each in a fresh process: the
          run's writing of review.pt, then the page's opening (the index, a labels file of 300
          answers, the state and the first screen), a screen deep in the largest view, and one answer,
          with peak resident memory and the ratio of the two openings
Each line: ms per step, images/s or prompts/s, peak memory (GPU allocator, or the process's RSS
on a CPU) and, on GPUs with a known dense bf16 peak, MFU.
"""
import argparse
import copy
import os
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import clip_model
import coft
import craft
import ddp
import runs
import train
import vecaf

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}  # dense
SECTIONS = ("towers", "coft", "craft", "vecaf", "labels", "pool", "decode", "page", "ddp", "ref")


def device_peak_tflops(device):
    """The GPU's dense bf16 peak (for MFU), looked up by name; None where unknown (and on CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def vit_flops(cfg, tokens_extra=0, layers=None):
    """Forward FLOPs of the ViT image tower for one image (2 per multiply-add): patch embedding,
    then per block QKV/out projections, attention and the 4x MLP."""
    n = (cfg.image_resolution // cfg.vision_patch_size) ** 2 + 1 + tokens_extra
    w, L = cfg.vision_width, layers or cfg.vision_layers
    patch = 2 * (n - 1) * 3 * cfg.vision_patch_size ** 2 * w
    block = 2 * n * w * (3 * w + w + 8 * w) + 2 * 2 * n * n * w
    return patch + L * block


def time_per_call(fn, steps, device):
    """(seconds per call of fn after one warm-up call, peak memory in MiB): the GPU allocator's
    peak over the timed calls on CUDA, the process's peak resident memory on CPU."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()  # warm-up (and compilation, with torch.compile)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    if cuda:
        mem = torch.cuda.max_memory_allocated(device) / 2 ** 20
    else:
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return (time.perf_counter() - t0) / steps, mem


def reporter(device, figures, precision):
    """report(what, seconds, memory, n, unit, flops) prints one line and keeps the time in
    figures[what][precision] for the comparison across precisions."""
    cuda, peak = device.type == "cuda", device_peak_tflops(device)

    def report(what, sec, mem=float("nan"), n=None, unit="images/s", flops=None):
        rate = f"{n / sec:9.1f} {unit}" if n else " " * 19
        mfu = f"  MFU {100 * flops / sec / (peak * 1e12):5.1f}%" if flops and peak else ""
        mem = "" if mem != mem else f"  peak {mem:8.0f} MiB" + (" (GPU)" if cuda else " (RSS)")
        print(f"  {what:62s} {1000 * sec:9.1f} ms  {rate}{mem}{mfu}", flush=True)
        figures.setdefault(what, {})[precision] = sec
    return report


def fwd_bwd(fn, *inputs, amp):
    """A step: fn(*inputs) under autocast, then backward of a scalar made from its output."""
    def step():
        with torch.autocast(**amp):
            out = fn(*inputs).float()
        out.pow(2).mean().backward()
    return step


# -----------------------------------------------------------------------------
# Sections


def towers(names, batch, prompts, steps, device, amp, report):
    """Image tower forward+backward; text tower forward+backward on short prompts up to the EOT,
    and the same prompts with the EOT moved to position 77 (the cost of the full context)."""
    texts = [f"a photo of a {w}." for w in ("cat", "dog", "airplane", "red car")] * (prompts // 4)
    for name in names:
        torch.manual_seed(0)
        model = clip_model.CLIP(clip_model.CONFIGS[name]).to(device).train()
        tok = clip_model.tokenize(texts, model.context_length).to(device)
        full = tok.clone()
        eot = clip_model.tokenizer().eot
        full[full == eot] = 0
        full[:, -1] = eot
        R = model.visual.resolution
        x = torch.randn(batch, 3, R, R, device=device)
        print(f"{name} towers: batch {batch}, {R}px, {len(texts)} prompts", flush=True)
        report(f"{name} image tower fwd+bwd", *time_per_call(fwd_bwd(model.encode_image, x, amp=amp), steps, device),
               batch)
        report(f"{name} text tower fwd+bwd up to EOT", time_per_call(fwd_bwd(model.encode_text, tok, amp=amp), steps,
                                                                      device)[0], n=len(texts), unit="prompts/s")
        report(f"{name} text tower fwd+bwd at 77 tokens", time_per_call(fwd_bwd(model.encode_text, full, amp=amp),
                                                                         steps, device)[0], n=len(texts),
               unit="prompts/s")
        del model


def coft_stages(names, batch, classes, images, steps, device, amp, report, grad_checkpointing=False):
    """CoFT's stages, per backbone: (a)-(d) of the module docstring."""
    def timed(fn, steps=steps):
        return time_per_call(fn, steps, device)

    for name in names:
        torch.manual_seed(0)
        cfg = clip_model.CONFIGS[name]
        clip = clip_model.CLIP(cfg).to(device).eval().requires_grad_(False)
        coft.set_grad_checkpointing(clip, grad_checkpointing)
        R, B = cfg.image_resolution, batch
        x = torch.randn(B, 3, R, R, device=device)
        img_flops = vit_flops(cfg) if cfg.is_vit else None
        M = 16 if clip.context_length >= 32 else 4  # the tiny test configurations have a short context
        print(f"{name} CoFT: batch {B}, {R}px", flush=True)

        # (a) image tower forward + backward (all weights trainable)
        tower = copy.deepcopy(clip.visual).train().requires_grad_(True)

        def image_step():
            with torch.autocast(**amp):
                loss = tower(x).float().pow(2).mean()
            loss.backward()
        sec, mem = timed(image_step)
        report(f"{name} (a) image tower fwd+bwd", sec, mem, B, flops=3 * B * img_flops if img_flops else None)
        del tower

        # (b) Phase-I step per class count: text side, image side, loss, optimizer
        for C in classes:
            names = [f"class number {i}" for i in range(C)]
            model = coft.DualPromptModel(clip, coft.tokenize_for(clip), names, M, None, 20, True).to(device)
            y = torch.randint(0, C, (B,), device=device)
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
            tokens, _ = model.prompts.prompt_embeddings()

            def text_step(full=False):
                with torch.autocast(**amp):
                    tok, emb = model.prompts.prompt_embeddings()
                    t = clip.encode_text(tok, embeddings=emb, full_length=full).float()
                t.pow(2).mean().backward()

            def shared_step():  # PromptLearner.forward: each context's prefix once (encode_text_shared)
                with torch.autocast(**amp):
                    t = torch.cat(model.prompts(clip)).float()
                t.pow(2).mean().backward()

            def img_step():
                with torch.autocast(**amp):
                    v = model.image_features(x).float()
                if v.requires_grad:
                    v.pow(2).mean().backward()

            def full_step():
                with torch.autocast(**amp):
                    y_c = coft.complement_labels(y, C, torch.randint(1, C, y.shape))  # redrawn every step
                    l1, l2 = coft.phase1_losses(model, x, y, y_c, 0.01)
                opt.zero_grad(set_to_none=True)
                (l1 + l2).backward()
                opt.step()

            t_text, _ = timed(text_step)
            t_text_full, _ = timed(lambda: text_step(True))
            t_shared, _ = timed(shared_step)
            t_img, _ = timed(img_step)
            s_pos = torch.randn(B, C, device=device, requires_grad=True)
            s_neg = torch.randn(B, C, device=device, requires_grad=True)
            y_comp = coft.complement_labels(y, C, torch.randint(1, C, y.shape))
            t_loss, _ = timed(lambda: (coft.loss_l1(s_pos, y, 0.01) + coft.loss_l2(s_pos, s_neg, y, y_comp, 0.01)).backward())
            t_opt, _ = timed(opt.step)
            t_step, mem = timed(full_step)
            L = int(tokens.argmax(-1).max()) + 1
            report(f"{name} (b) Phase-I step, C={C} (2C={2 * C} prompts, {L}/{clip.context_length} tokens)",
                   t_step, mem, B)
            report(f"{name}     text tower fwd+bwd up to EOT", t_text, float("nan"), 2 * C, "prompts/s")
            report(f"{name}     text tower fwd+bwd at full length (x{t_text_full / t_text:.1f} slower)", t_text_full,
                   float("nan"), 2 * C, "prompts/s")
            report(f"{name}     text tower fwd+bwd shared prefix (x{t_text / t_shared:.2f} speed-up)",
                   t_shared, float("nan"), 2 * C, "prompts/s")
            report(f"{name}     image tower with VPT / adapter fwd+bwd", t_img, float("nan"), B)
            report(f"{name}     losses fwd+bwd", t_loss, float("nan"))
            report(f"{name}     optimizer step", t_opt, float("nan"))
            del model, opt

        # (c) Phase-II full fine-tuning step, batch B and 2B, with and without momentum contrast
        for b in (B, 2 * B):
            xb = torch.randn(b, 3, R, R, device=device)
            yb = torch.randint(0, 10, (b,), device=device)
            for contrast in (False, True):
                ft = clip_model.ImageClassifier(clip.visual, 10).to(device).train()
                mc = coft.MomentumContrast(ft, 4096).to(device).train() if contrast else None
                opt = torch.optim.SGD(ft.parameters(), lr=1e-3, momentum=0.9)

                def ft_step():
                    with torch.autocast(**amp):
                        loss = F.cross_entropy(ft(xb), yb)
                        if mc is not None:
                            loss = loss + mc(xb, xb, torch.arange(b, device=device))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                sec, mem = timed(ft_step)
                # CE: fwd+bwd of b images; contrast: + fwd+bwd of b queries + fwd of b keys
                flops = (3 * b + (4 * b if contrast else 0)) * img_flops if img_flops else None
                report(f"{name} (c) Phase-II step, batch {b}" + (" + momentum encoder & queue" if contrast else ""),
                       sec, mem, b, flops=flops)
                del ft, mc, opt

        # (d) generation pass: two Phase-I models' image features over N images (inference mode)
        models = [coft.DualPromptModel(clip, coft.tokenize_for(clip), ["a", "b"], M, None, 20, True).to(device)
                  for _ in range(2)]
        n_batches = max(images // B, 1)

        def generation():
            with torch.inference_mode(), torch.autocast(**amp):
                for _ in range(n_batches):
                    for mdl in models:
                        mdl.image_features(x)
        sec, mem = timed(generation, 1)
        report(f"{name} (d) generation pass, 2 models x {n_batches * B} images", sec, mem, 2 * n_batches * B,
               flops=2 * n_batches * B * img_flops if img_flops else None)
        del clip, models
        if device.type == "cuda":
            torch.cuda.empty_cache()


def craft_generation(clip, C, device, amp, popsize=40, shots=16, seed=0):
    """(ours, official, box): one generation's fitness evaluations as two functions (official(k)
    evaluates the first k candidates one at a time at 77 tokens) and the black box they query."""
    g = torch.Generator().manual_seed(seed)
    classnames = [f"class number {i}" for i in range(C)]
    box = craft.BlackBox(clip, classnames, device, amp)
    N = shots * C
    box._images["view"] = torch.randn(N, clip.cfg.embed_dim, generator=g).to(device)  # pre-extracted (bench only)
    y = torch.randint(0, C, (N,), generator=g).to(device)
    p0 = box.word_embeddings("a photo of a").to(device)
    gen = craft.PromptGenerator(p0, 512, 0.2, seed)
    Z = torch.randn(popsize, 512, generator=g)
    refiner = craft.Refiner(C).to(device)

    def ours():
        box.forget()
        return craft.fitness(box.logits(gen(Z), "view"), y, refiner, 0.1)

    tokens = clip_model.tokenize([f"a photo of a {c}." for c in classnames], clip.context_length).to(device)
    emb = clip.token_embedding(tokens).detach()  # [C, 77, width]
    v = clip_model.unit(box._images["view"])

    @torch.no_grad()
    def official(k=popsize):
        f = []
        for z in Z[:k]:  # the official loop: one candidate (C prompts at full length) per call
            e = emb.clone()
            e[:, 1:1 + len(p0)] = gen(z[None])[0]
            with torch.autocast(**amp):
                t = clip_model.unit(clip.encode_text(tokens, embeddings=e, full_length=True))
            f.append(craft.fitness((100 * v @ t.T)[None], y, refiner, 0.1))
        return torch.cat(f)
    return ours, official, box


def allocation_peak(fn, device):
    """Peak memory (MiB) that fn allocates above what was allocated before it: the CUDA allocator's
    peak on a GPU; on a CPU, the maximum of the running sum of every allocation and free that the
    profiler records, in time order (an RSS reading would mostly show the allocator's caching)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    running = top = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        running += e.self_cpu_memory_usage  # allocations minus frees inside the op itself
        top = max(top, running)
    return top / 2 ** 20


def training_step(kind, clip, C, device, amp, batch):
    """One training step on `batch` images: CraFT's black-box side (a generation's fitness queries
    + the refiner epoch's logits of the batch), CraFT's user side (a refiner step on those logits:
    all the user computes), or white-box CoOp (gradients through the text tower)."""
    R = clip.visual.resolution
    classnames = [f"class number {i}" for i in range(C)]
    x, y = torch.randn(batch, 3, R, R, device=device), torch.randint(0, C, (batch,), device=device)
    if kind == "box":
        ours, _, box = craft_generation(clip, C, device, amp)
        ctx = box.word_embeddings("a photo of a")[None].to(device)

        def step():
            ours()
            box.logits(ctx, x)
        return step
    if kind == "user":
        refiner = craft.Refiner(C).to(device)
        opt = torch.optim.Adam(refiner.parameters(), 1e-3)
        l = 10 * torch.randn(batch, C, device=device)  # what the box returned

        def step():
            loss = craft.refinement_loss(l, y, refiner, 0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return step
    sos, suffix = (t.to(device) for t in craft.prompt_parts(clip, classnames))
    model = craft.CoOp(torch.randn(4, clip.cfg.transformer_width) * 0.02).to(device)
    opt = torch.optim.SGD(model.parameters(), 2e-3, momentum=0.9)

    def step():
        with torch.autocast(**amp):
            with torch.no_grad():
                v = clip_model.unit(clip.encode_image(x))
            t = craft.class_text_features(clip, sos, suffix, model.ctx[None])[0]
            loss = F.cross_entropy(100 * clip_model.similarity(v, t), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def craft_costs(names, batch, classes, steps, device, amp, report, official_candidates):
    """CraFT's costs per backbone and class count (module docstring, section craft)."""
    for name in names:
        torch.manual_seed(0)
        clip = clip_model.CLIP(clip_model.CONFIGS[name]).to(device).eval().requires_grad_(False)
        print(f"{name} CraFT: one generation = 40 candidates x C classes on 16 x C image features", flush=True)
        for C in classes:
            ours, official, _ = craft_generation(clip, C, device, amp)
            with torch.no_grad():
                diff = (ours() - official()).abs().max().item() if C <= 10 else float("nan")
            k = min(official_candidates, 40)
            t_ours, _ = time_per_call(ours, steps, device)
            t_off = time_per_call(lambda: official(k), steps, device)[0] * 40 / k  # a sequential loop: linear in k
            report(f"{name} C={C} generation, official loop (77 tokens; {k} of 40 timed)", t_off, n=40 * C,
                   unit="prompts/s")
            report(f"{name} C={C} generation, ours (x{t_off / t_ours:.1f} faster)", t_ours, n=40 * C, unit="prompts/s")
            if diff == diff:
                print(f"  fitness difference official vs ours: {diff:.1e}", flush=True)
            refiner = sum(p.numel() for p in craft.Refiner(C).parameters())
            ctx = 4 * clip.cfg.transformer_width
            mem_box, mem_user, mem_coop = (allocation_peak(training_step(kind, clip, C, device, amp, batch), device)
                                           for kind in ("box", "user", "coop"))
            print(f"  deployer keeps: CraFT p {ctx} + refiner {refiner} = {ctx + refiner} numbers (or z 512 + seed of A); "
                  f"CoOp p {ctx} + white-box access to the model's {sum(p.numel() for p in clip.parameters())}", flush=True)
            print(f"  peak memory of a training step on {batch} images above the loaded model: CraFT's black box (a "
                  f"generation + the batch's logits) {mem_box:.1f} MiB, CraFT's user (a refiner step) {mem_user:.2f} MiB; "
                  f"white-box CoOp {mem_coop:.1f} MiB (x{mem_coop / max(mem_user, 1e-9):.0f} the user's)", flush=True)


@torch.no_grad()
def official_nearest_unique(centroids, features, taken):
    """The official code's last step: the dense [K, N] similarities, every row sorted, then each
    centroid in index order takes its most similar sample not chosen before."""
    order = (centroids @ features.T).argsort(dim=1, descending=True).cpu()  # [K, N]
    chosen = set(taken.nonzero().squeeze(1).tolist())

    def first_free(row):  # read 64 at a time: a row's first entries are nearly always free
        for start in range(0, len(row), 64):
            for j in row[start:start + 64].tolist():
                if j not in chosen:
                    return j
    picks = []
    for row in order:
        picks.append(first_free(row))
        chosen.add(picks[-1])
    return torch.tensor(picks)


def vecaf_selection(N, K, D, select_batch, steps, device, report, dense_limit=4e9):
    """VeCAF's selection at pool size N and K centroids (module docstring, section vecaf)."""
    g = torch.Generator().manual_seed(0)
    f = clip_model.unit(torch.randn(N, D, generator=g)).to(device)  # [N, D]
    theta = f[torch.randperm(N, generator=g)[:K].to(device)].clone().requires_grad_(True)
    w = torch.rand(N, generator=g).to(device)
    opt = torch.optim.Adam([theta], lr=1e-3)
    idx = torch.randint(0, N, (min(select_batch, N),), generator=g).to(device)
    print(f"VeCAF selection: pool {N} x {D}, K = {K} centroids, mini-batches of {min(select_batch, N)}", flush=True)

    def step(rows):
        def run():
            loss = vecaf.selection_loss(f[rows], theta, w=w[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return run
    t_mini, _ = time_per_call(step(idx), steps, device)
    mem_mini = allocation_peak(step(idx), device)
    report(f"centroid step, mini-batch of {len(idx)} (ours)", t_mini, n=len(idx), unit="samples/s")
    if N * K * 4 * 3 <= dense_limit:  # the logits, their gradient and the exponentials, in fp32
        everything = torch.arange(N, device=device)
        t_full, _ = time_per_call(step(everything), max(1, steps // 2), device)
        mem_full = allocation_peak(step(everything), device)
        report("centroid step, whole pool (official)", t_full, n=N, unit="samples/s")
        print(f"  peak memory of a step: mini-batch {mem_mini:.0f} MiB, whole pool {mem_full:.0f} MiB", flush=True)
    else:
        print(f"  peak memory of a mini-batch step {mem_mini:.0f} MiB; whole-pool step skipped "
              f"({N * K * 12 / 2 ** 30:.0f} GiB of [N, K] matrices)", flush=True)
    report("one selector: 300 mini-batch steps (300 x the step above)", 300 * t_mini)
    centroids = clip_model.unit(theta.detach())
    E = torch.stack([centroids, centroids[torch.randperm(K, generator=g).to(device)],
                     clip_model.unit(centroids + 0.01 * torch.randn(K, D, generator=g).to(device))])  # [3, K, D]
    t_comb, _ = time_per_call(lambda: vecaf.combine(E), 1, device)
    report(f"ensemble: match and average 3 selectors ({'Hungarian' if K <= 256 else 'greedy'})", t_comb)
    taken = torch.zeros(N, dtype=torch.bool, device=device)
    taken[torch.randperm(N, generator=g)[:K].to(device)] = True  # an earlier loop's picks
    t_ours, _ = time_per_call(lambda: vecaf.nearest_unique(centroids, f, taken), 1, device)
    mem_ours = allocation_peak(lambda: vecaf.nearest_unique(centroids, f, taken), device)
    report("nearest-unique selection, chunked rounds (ours)", t_ours, n=K, unit="picks/s")
    if N * K * 12 <= dense_limit:  # similarities (4 bytes) and the sorted order (8 bytes)
        t_off, _ = time_per_call(lambda: official_nearest_unique(centroids, f, taken), 1, device)
        mem_off = allocation_peak(lambda: official_nearest_unique(centroids, f, taken), device)
        report(f"nearest-unique selection, dense sort in index order (official; x{t_off / t_ours:.1f} ours)", t_off,
               n=K, unit="picks/s")
        same = (vecaf.nearest_unique(centroids, f, taken).cpu() == official_nearest_unique(centroids, f, taken)).float()
        print(f"  peak memory: ours {mem_ours:.0f} MiB, official {mem_off:.0f} MiB; the same pick for "
              f"{100 * same.mean():.1f}% of the centroids", flush=True)
    else:
        print(f"  peak memory: ours {mem_ours:.0f} MiB; the official dense way skipped ({N * K * 12 / 2 ** 30:.0f} "
              f"GiB for its [K, N] similarities and order)", flush=True)


def reference(names, batch, classes, steps, device, amp):
    """Side by side in one process, same weights and inputs: our image tower vs open-clip-torch's
    (forward+backward), and our Phase-I text step (learnable contexts, up to the EOT) vs the same
    prompt embeddings encoded at full length by open-clip-torch's text tower. Needs the package
    open-clip-torch (a test-only dependency)."""
    try:
        import open_clip
    except ImportError:
        raise SystemExit("error: --sections ref needs open-clip-torch: pip install open-clip-torch") from None

    def timed(fn):
        return time_per_call(fn, steps, device)[0]

    for name in names:
        torch.manual_seed(0)
        ours = clip_model.CLIP(clip_model.CONFIGS[name]).to(device)
        sd = ours.state_dict()
        ref = open_clip.model.build_model_from_openai_state_dict({k: v.clone() for k, v in sd.items()},
                                                                 cast_dtype=torch.float32).float().to(device)
        ref.load_state_dict(sd)
        ours.train(), ref.train()  # the same mode on both sides (open_clip's builder returns eval mode)
        B, R = batch, ours.visual.resolution
        x = torch.randn(B, 3, R, R, device=device)
        t_ours, t_ref = timed(fwd_bwd(ours.encode_image, x, amp=amp)), timed(fwd_bwd(ref.encode_image, x, amp=amp))
        print(f"{name} image tower fwd+bwd, batch {B}: ours {B / t_ours:.2f} images/s, open_clip "
              f"{B / t_ref:.2f} images/s (ours x{t_ref / t_ours:.2f})", flush=True)
        ours.requires_grad_(False)
        ref.requires_grad_(False)
        M = 16 if ours.context_length >= 32 else 4
        for C in classes:
            names = [f"class number {i}" for i in range(C)]
            pl = coft.PromptLearner(ours, coft.tokenize_for(ours), names, M).to(device)

            def ours_text():
                tok, emb = pl.prompt_embeddings()
                return ours.encode_text(tok, embeddings=emb)

            def ref_text():  # open_clip's text tower on the same embeddings, all 77 positions
                tok, emb = pl.prompt_embeddings()
                h = ref.transformer(emb + ref.positional_embedding, attn_mask=ref.attn_mask)
                h = ref.ln_final(h)
                return h[torch.arange(len(tok), device=device), tok.argmax(-1)] @ ref.text_projection

            with torch.no_grad():
                diff = (ours_text() - ref_text()).abs().max().item()
            t_ours, t_ref = timed(fwd_bwd(ours_text, amp=amp)), timed(fwd_bwd(ref_text, amp=amp))
            print(f"{name} Phase-I text step, {2 * C} prompts with learnable contexts: ours (to EOT) "
                  f"{2 * C / t_ours:.1f} prompts/s, open_clip at full length {2 * C / t_ref:.1f} prompts/s "
                  f"(ours x{t_ref / t_ours:.2f}; max feature difference {diff:.1e})", flush=True)


def all_reduce_time(rank, world, nbytes, steps, folder, backend):
    """One of `world` local processes: seconds per all_reduce (sum) of an fp32 buffer of `nbytes`
    (DDP's gradient all-reduce, unbucketed), rank 0 writes it to folder/allreduce."""
    import torch.distributed as dist
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    grad = torch.ones(nbytes // 4, device=device)
    sec, _ = time_per_call(lambda: dist.all_reduce(grad), steps, device)
    if rank == 0:
        (Path(folder) / "allreduce").write_text(str(sec))
    ddp.end_processes()  # a barrier first: torch 2.3's gloo teardown can otherwise wait forever


def ddp_scaling(names, batch, steps, device, amp, report, classes=1000):
    """Inputs of the scaling estimate for torchrun (docs/torchrun.md): a plain Phase-II step's time t_1
    (one process), the gradient DDP all-reduces per step (every trainable parameter in fp32: G
    bytes), and the time of that all-reduce between 2 local processes (gloo on CPUs, NCCL where 2
    GPUs are visible), measured side by side. A ring all-reduce moves 2(N-1)/N x G per process,
    so N processes sharing the same global batch take about t_1 / N + 2(N-1)/N x G / B per step,
    B the link's bandwidth as measured (B = G / t_allreduce(2)). Optimistic in the compute term
    (a GPU is less efficient on a 1/N batch), pessimistic in the other (DDP overlaps much of the
    all-reduce with the backward)."""
    import tempfile
    backend = "nccl" if device.type == "cuda" and torch.cuda.device_count() >= 2 else "gloo"
    for name in names:
        clip = clip_model.CLIP(clip_model.CONFIGS[name])
        R = clip.visual.resolution
        ft = clip_model.ImageClassifier(clip.visual, classes).to(device).train()
        del clip
        opt = torch.optim.SGD(ft.parameters(), lr=1e-3, momentum=0.9)
        x, y = torch.randn(batch, 3, R, R, device=device), torch.randint(0, classes, (batch,), device=device)

        def step():
            with torch.autocast(**amp):
                loss = F.cross_entropy(ft(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        t1, mem = time_per_call(step, steps, device)
        G = sum(p.numel() for p in ft.parameters() if p.requires_grad) * 4
        del ft, opt
        report(f"{name} Phase-II step, batch {batch}, 1 process", t1, mem, batch)
        with tempfile.TemporaryDirectory() as folder:
            torch.multiprocessing.spawn(all_reduce_time, args=(2, G, steps, folder, backend), nprocs=2)
            t_ar = float((Path(folder) / "allreduce").read_text())
        report(f"{name} all-reduce of its gradient ({G / 2 ** 20:.0f} MiB fp32), 2 processes, {backend}", t_ar)
        bandwidth = G / t_ar  # bytes/s, from the 2-process ring (2(N-1)/N = 1)
        for n in (2, 4, 8):
            comm = 2 * (n - 1) / n * G / bandwidth
            est = t1 / n + comm
            print(f"  {name} estimate, {n} processes, global batch {batch} ({batch / n:g} each), "
                  f"{bandwidth / 2 ** 30:.2f} GiB/s: {1000 * est:.1f} ms per step = compute {1000 * t1 / n:.1f} + "
                  f"all-reduce {1000 * comm:.1f} (no overlap): x{t1 / est:.2f} of one process", flush=True)


# -----------------------------------------------------------------------------
# CLI


# ---- CoFT's label steps over the pool: a few numbers per image, or N x C matrices

LABEL_BLOCK = 65536  # rows of synthetic features drawn at once (each block from its own seed)


def synthetic_features(N, D, seed):
    """Unit features [N, D], drawn block by block from (seed, block) so any N gives the same rows."""
    v = torch.empty(N, D)
    for i in range(0, N, LABEL_BLOCK):
        rows = v[i:i + LABEL_BLOCK]
        rows.copy_(torch.randn(len(rows), D, generator=torch.Generator().manual_seed(seed * 100003 + i)))
        rows.div_(rows.norm(dim=1, keepdim=True))
    return v


def label_steps(N, C, D, full, tau=0.01, K=16):
    """CoFT's label steps on synthetic inputs (section labels): the zero-shot pass (its features made
    batch by batch and dropped, as the real pass's images), S*, each Phase-I model's labels, the
    filter both ways and its diagnosis. full=False: coft.py's functions; full=True: the N x C score
    matrices of the way before, written out. Returns what both must give alike."""
    g = torch.Generator().manual_seed(1)
    W, t_pos_a, t_neg_a, t_pos_b, t_neg_b = (clip_model.unit(torch.randn(C, D, generator=g)) for _ in range(5))
    y_true = torch.randint(0, C, (N,), generator=g)
    if full:
        zs = torch.cat([clip_model.similarity(synthetic_features(min(LABEL_BLOCK, N - i), D, 7 + i), W) / tau
                        for i in range(0, N, LABEL_BLOCK)])  # [N, C]
        conf, y_conf = zs.softmax(1).max(1)
        keep = []
        for k in range(C):  # S* as coft.py picked it before: per class, a stable sort of its images
            idx = (y_conf == k).nonzero().squeeze(1)
            keep.append(idx[torch.sort(-conf[idx], stable=True).indices[:K]])
        seed_set = torch.cat(keep)
    else:
        parts = [coft.confidence_and_label(clip_model.similarity(synthetic_features(min(LABEL_BLOCK, N - i), D, 7 + i),
                                                                  W) / tau) for i in range(0, N, LABEL_BLOCK)]
        conf, y_conf = torch.cat([c for c, _ in parts]), torch.cat([y for _, y in parts])
        seed_set = coft.topk_per_class(conf, y_conf, K)[0]
    v = [synthetic_features(N, D, 1), synthetic_features(N, D, 2)]  # the two Phase-I models' features
    t = [(t_pos_a, t_neg_a), (t_pos_b, t_neg_b)]
    out = {"seed set": seed_set}
    if full:
        s_pos = [clip_model.similarity(v[m], t[m][0]) for m in (0, 1)]  # [N, C] each
        s_neg = [clip_model.similarity(v[m], t[m][1]) for m in (0, 1)]
        y = [s.argmax(1) for s in s_pos]
        i = torch.arange(N)
    else:
        labels = [coft.labels_of(v[m], t[m][0], tau) for m in (0, 1)]
        y, conf_of = [lab[0] for lab in labels], [lab[1] for lab in labels]
    for a, b in ((0, 1), (1, 0)):
        if full:
            keep = s_pos[b][i, y[a]] > s_neg[b][i, y[a]]
            margin = s_pos[b][i, y[a]] - s_neg[b][i, y[a]]
            peer, own = (s_pos[b] / tau).softmax(1)[i, y[a]], (s_pos[a] / tau).softmax(1)[i, y[a]]
        else:
            (at_pos, peer), at_neg = coft.scores_at(v[b], t[b][0], y[a], tau), coft.scores_at(v[b], t[b][1], y[a])
            keep, margin = coft.collaborative_filter(at_pos, at_neg), at_pos - at_neg
            own = conf_of[a]  # the probability at a's own label: its top one
        out[f"clean set {a + 1}"] = keep
        out[f"diagnosis {a + 1}"] = coft.filter_diagnosis(y[a], keep, margin, peer, own, y_true)
    return out


def label_steps_in_a_process(N, C, D, full, queue):
    """label_steps in this (fresh) process -> the queue: (seconds, peak resident GiB, each result
    as a sha256 of its bytes or the figures themselves)."""
    import hashlib
    t0 = time.perf_counter()
    out = label_steps(N, C, D, full)
    seconds, peak = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    queue.put((seconds, peak, {k: hashlib.sha256(v.numpy().tobytes()).hexdigest() if torch.is_tensor(v) else v
                               for k, v in out.items()}))


def label_costs(N, reference_N, C=1000, D=512):
    """Section labels: each way in a fresh process (its peak resident memory is its own), at N and at
    reference_N; the full matrices only where they fit (7 of them, 4 bytes each, in 3/4 of RAM)."""
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(f"CoFT's label steps: {C} classes, {D}-d features; the two Phase-I models' features alone are "
          f"{2 * N * D * 4 / 2 ** 30:.1f} GiB at N = {N}", flush=True)
    results = {}
    for n, full in ((reference_N, True), (reference_N, False), (N, False), (N, True)):
        if full and 7 * n * C * 4 > 0.75 * ram:
            print(f"  N = {n:>9}, N x C matrices: skipped (7 of them are {7 * n * C * 4 / 2 ** 30:.0f} GiB)", flush=True)
            continue
        q = ctx.Queue()
        p = ctx.Process(target=label_steps_in_a_process, args=(n, C, D, full, q))
        p.start()
        seconds, peak, out = q.get()
        p.join()
        results[n, full] = out
        print(f"  N = {n:>9}, {'N x C matrices (before)' if full else 'blocks of rows (coft.py)':24s} {seconds:7.1f} s  "
              f"peak RSS {peak:6.2f} GiB", flush=True)
    for n in sorted({n for n, _ in results}):
        if (n, True) in results and (n, False) in results:
            a, b = results[n, True], results[n, False]
            same = a == b
            print(f"  N = {n}: the two ways give {'the same' if same else 'DIFFERENT'} seed set, clean sets, "
                  f"removed precisions and AUROCs", flush=True)


def pool_pass(folder, cache, queue):
    """One pass over a folder as a run makes it (section pool), in this (fresh) process: the listing,
    then every file's digest and check -> the queue: (files, listing s, pass s, files read, peak GiB,
    GiB before the pass: the libraries' own)."""
    import imagefiles
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    was, reads, read = os.environ.get("COFT_CACHE"), [], imagefiles._read_file
    os.environ["COFT_CACHE"], imagefiles._read_file = cache, lambda p: reads.append(1) or read(p)
    try:
        t0 = time.perf_counter()
        files = imagefiles.list_images(folder).files
        t1 = time.perf_counter()
        _, problems = imagefiles.contents(files)
        t2 = time.perf_counter()
    finally:
        imagefiles._read_file = read
        os.environ.pop("COFT_CACHE") if was is None else os.environ.update(COFT_CACHE=was)
    assert not problems, problems[:3]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    queue.put((len(files), t1 - t0, t2 - t1, len(reads), peak, before))


def pool_costs(N, imagenet=1281167, fresh=True):
    """Section pool: N generated PNGs (16 x 16 px, about 1 KB: what is measured is the per-file cost
    of listing, stat, cache and reading, not the disk's bandwidth), three passes, each in a fresh
    process (its peak memory its own; fresh=False: in this one, for the tests)."""
    import multiprocessing
    import shutil
    import tempfile
    import numpy as np
    from PIL import Image
    root = Path(tempfile.mkdtemp(prefix="bench-pool-"))
    folder, cache = root / "images", str(root / "cache")
    try:
        t0 = time.perf_counter()
        rng = np.random.default_rng(0)
        for i in range(N):
            path = folder / f"{i // 1000:04d}" / f"{i:07d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
        size = sum(p.stat().st_size for p in folder.rglob("*.png"))
        print(f"knowing a folder by content: {N} PNG files in {-(-N // 1000)} folders, {size / 2 ** 20:.0f} MiB, "
              f"written in {time.perf_counter() - t0:.0f} s; {os.cpu_count()} CPUs", flush=True)
        ctx = multiprocessing.get_context("spawn")

        def measure(what):
            import queue
            q = ctx.Queue() if fresh else queue.Queue()
            if fresh:
                p = ctx.Process(target=pool_pass, args=(str(folder), cache, q))
                p.start()
            else:
                pool_pass(str(folder), cache, q)
            files, listing, seconds, reads, peak, before = q.get()
            if fresh:
                p.join()
            print(f"  {what:34s} listing {listing:6.1f} s, pass {seconds:6.1f} s ({1e6 * seconds / files:6.1f} us a "
                  f"file), {reads:>7} files read, peak RSS {peak:5.2f} GiB ({before:.2f} before the listing)", flush=True)
            return listing, seconds
        first = measure("first pass (no cache)")
        repeat = measure("repeat pass")
        changed = range(0, N, 100)
        for i in changed:
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                folder / f"{i // 1000:04d}" / f"{i:07d}.png")
        measure(f"after {len(changed)} files changed")
        scale = imagenet / N
        print(f"  at ImageNet's {imagenet} files (x{scale:.1f}): listing about {first[0] * scale:.0f} s; a repeat pass "
              f"about {repeat[1] * scale:.0f} s; a first pass about {first[1] * scale:.0f} s plus, per file, the "
              f"reading and hashing of its bytes (ImageNet's average is 110 KB: 140 GB in all) and its check "
              f"(section decode)", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
# ---- opening CoFT's review page: what a pool of 1.28 M images costs beside one of 300

def generated_review(root, N, C=1000, answered=300):
    """A run folder under `root` as CoFT leaves it for the review page: config.json and review.pt of N
    pool images with random labels, filter decisions and margins (page.write_review, timed), and a
    labels file answering `answered` of them. Returns (the folder, the labels file, seconds to write)."""
    import csv
    import page
    g = torch.Generator().manual_seed(0)
    keys = [f"n{i % C:08d}/n{i % C:08d}_{i}.JPEG" for i in range(N)]
    labels, kept = torch.randint(0, C, (2, N), generator=g), torch.rand(2, N, generator=g) < 0.7
    margin, digests = torch.randn(2, N, generator=g), torch.randint(0, 256, (N, 16), generator=g, dtype=torch.uint8)
    out = Path(root) / f"run{N}"
    out.mkdir(parents=True)
    (out / "config.json").write_text('{"config": {}, "how": {"images": "%s"}}' % (Path(root) / "images"))
    t0 = time.perf_counter()
    page.write_review(out, keys, [f"class {c}" for c in range(C)], labels, kept, margin, digests)
    seconds = time.perf_counter() - t0
    with open(out / "checked.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "class")] + [(keys[i], f"class {i % C}")
                                                      for i in torch.randperm(N, generator=g)[:answered].tolist()])
    return out, out / "checked.csv", seconds


def high_water_gib():
    """This process's peak resident memory in GiB: Linux's VmHWM, which starts anew in a spawned process
    (ru_maxrss can carry the parent's peak over), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2 ** 20
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def review_open(out, labels, queue):
    """page.py review on the run folder `out` in this (fresh) process, without the server: the index,
    the session (its labels file read, each row found in the pool), the state and the first screen
    as JSON -> the queue: (seconds to open, seconds of a screen deep in the largest view, seconds of
    an answer, images answered, peak GiB, GiB before opening: the libraries' own)."""
    import json
    import page
    before = high_water_gib()
    t0 = time.perf_counter()
    review = page.Review(out)
    session = page.Session(review, review.classnames, labels)
    first = min(session.items.views)
    json.dumps(session.state()), json.dumps(session.page_of(0, 50, first))
    t1, found = time.perf_counter(), len(session.labels)
    largest = max(session.items.views, key=session.items.views.get)
    screen = session.page_of(session.items.views[largest] // 2, 50, largest)
    t2 = time.perf_counter()
    session.give(screen[0]["index"], screen[0]["suggestion"])
    t3 = time.perf_counter()
    queue.put((t1 - t0, t2 - t1, t3 - t2, found, high_water_gib(), before))


def page_costs(N, reference_N=300, fresh=True):
    """Section page: a generated run of reference_N and of N pool images, each opened in a fresh
    process (fresh=False: in this one, for the tests)."""
    import multiprocessing
    import queue
    import shutil
    import tempfile
    root = Path(tempfile.mkdtemp(prefix="bench-page-"))
    ctx = multiprocessing.get_context("spawn")
    opened = {}
    try:
        print(f"CoFT's review page (page.py review): 1000 classes (4000 views), a labels file of {reference_N} answers",
              flush=True)
        for n in (reference_N, N):
            out, labels, written = generated_review(root, n, answered=reference_N)  # the same file size at both
            q = ctx.Queue() if fresh else queue.Queue()
            if fresh:
                p = ctx.Process(target=review_open, args=(str(out), str(labels), q))
                p.start()
            else:
                review_open(str(out), str(labels), q)
            opened[n], deep, answer, answered, peak, before = q.get()
            if fresh:
                p.join()
            print(f"  N = {n:>9}: the run writes review.pt ({(out / 'review.pt').stat().st_size / 2 ** 20:.1f} MiB) "
                  f"in {written:5.1f} s; the page opens in {1000 * opened[n]:7.1f} ms ({answered} answers found), "
                  f"a screen deep in a view {1000 * deep:5.1f} ms, an answer {1000 * answer:5.1f} ms, "
                  f"peak RSS {peak:5.2f} GiB ({before:.2f} before opening)", flush=True)
        print(f"  opening at N = {N} takes x{opened[N] / opened[reference_N]:.2f} the time at N = {reference_N}",
              flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---- checking image files before training: what each check costs and what it finds

IMAGENET_TRAIN = 1281167


def natural_image(seed, width=500, height=375):
    """A PIL RGB image with a natural photo's statistics, for JPEG timings: noise with a 1/f
    amplitude spectrum (as natural images have), mostly shared by the channels, and a few flat
    shapes with hard edges; pure noise would not compress and flat colour would compress to nothing."""
    from PIL import Image, ImageDraw
    g = torch.Generator().manual_seed(seed)
    fy, fx = torch.fft.fftfreq(height)[:, None], torch.fft.rfftfreq(width)[None]
    amplitude = (fx ** 2 + fy ** 2).sqrt().clamp(min=1 / max(width, height)).reciprocal()  # [H, W // 2 + 1]
    phase = torch.exp(2j * torch.pi * torch.rand(3, height, width // 2 + 1, generator=g))
    x = torch.fft.irfft2(amplitude * phase, s=(height, width))  # [3, H, W]
    x = 0.8 * x.mean(0, keepdim=True) + 0.2 * x  # mostly luminance, some colour
    x = (128 + 40 * (x - x.mean()) / x.std()).clamp(0, 255).to(torch.uint8)
    image = Image.fromarray(x.permute(1, 2, 0).contiguous().numpy())
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = (torch.rand(2, generator=g) * torch.tensor([width, height])).tolist()
        w, h = (20 + 100 * torch.rand(2, generator=g)).tolist()
        colour = tuple(torch.randint(0, 256, (3,), generator=g).tolist())
        shape = draw.ellipse if torch.rand(1, generator=g) < 0.5 else draw.rectangle
        shape([x0, y0, x0 + w, y0 + h], fill=colour)
    return image


def problem_files(folder, image):
    """One file per problem a check must find, and two a check must let pass -> {kind: path}:
    `image` saved in each format then cut to half its length, an empty file, text named .jpg, a
    folder named .jpg, 32-bit integer and float TIFFs outside 0..65535 and [0, 1] (no white point),
    and two usable files: a 16-bit PNG and a JPEG with an EXIF orientation."""
    import numpy as np
    from PIL import Image
    folder = Path(folder)
    files = {}
    small = image.resize((250, 188))
    for fmt, suffix in (("JPEG", "jpg"), ("PNG", "png"), ("GIF", "gif"), ("WEBP", "webp"), ("TIFF", "tif"),
                        ("BMP", "bmp")):
        path = folder / f"truncated.{suffix}"
        small.save(path, fmt)
        whole = path.read_bytes()
        path.write_bytes(whole[:len(whole) // 2])
        files[f"truncated {fmt}"] = path
    files["empty file"] = folder / "empty.jpg"
    files["empty file"].write_bytes(b"")
    files["text named .jpg"] = folder / "notes.jpg"
    files["text named .jpg"].write_text("not an image\n")
    files["folder named .jpg"] = folder / "folder.jpg"
    files["folder named .jpg"].mkdir(exist_ok=True)
    grey = np.asarray(small.convert("L")).astype(np.int64)
    files["32-bit integers over 65535"] = folder / "int32.tif"
    Image.fromarray((grey * 1000).astype(np.int32)).save(files["32-bit integers over 65535"])
    files["floats outside [0, 1]"] = folder / "float.tif"
    Image.fromarray(grey.astype(np.float32)).save(files["floats outside [0, 1]"])
    files["16-bit PNG (usable)"] = folder / "sixteen.png"
    Image.fromarray((grey * 257).astype(np.uint16)).save(files["16-bit PNG (usable)"])
    files["JPEG with orientation (usable)"] = folder / "turned.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    small.save(files["JPEG with orientation (usable)"], exif=exif)
    return files


def header_check(path):
    from PIL import Image
    with Image.open(path):
        pass


def full_decode(path):
    from PIL import Image
    with Image.open(path) as im:
        im.load()


def draft_decode(path):
    """Pillow's draft mode: a JPEG decoded at 1/8 scale (every coefficient still read; a smaller
    inverse DCT); other formats in full."""
    from PIL import Image
    with Image.open(path) as im:
        im.draft("RGB", (im.width // 8, im.height // 8))
        im.load()


def file_sha256(path):
    import hashlib
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def refused(check, path):
    """Whether a check refuses the file: imagefiles.image_problem names a problem, the others raise."""
    import imagefiles
    if check is imagefiles.image_problem:
        return check(str(path)) is not None
    try:
        check(str(path))
    except Exception:
        return True
    return False


def decode_costs(n, threads, repeats=3):
    """Section decode: the cost per image of each check on n generated JPEGs of ImageNet's size
    (the files in the page cache: a cold disk adds its read time, the same for every check), one
    thread then pools of `threads`, each the best of `repeats` passes, as wall time and as the
    process's CPU time (their ratio: the cores kept busy, which shows whether the decodes ran in
    parallel, free of the GIL, even where other work shares the cores), extrapolated to
    ImageNet's train set, and to 16 free cores as the CPU time / 16; then what each check refuses
    among problem_files."""
    import tempfile
    from concurrent.futures import ThreadPoolExecutor
    import imagefiles
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    checks = {"header (Image.open)": header_check, "full decode (Image.open + load)": full_decode,
              "draft decode (JPEG at 1/8 scale)": draft_decode,
              "imagefiles.image_problem (the check)": imagefiles.image_problem,
              "sha256 of the bytes (for comparison)": file_sha256}

    def per_image(fn, paths, t):
        """(wall, CPU) seconds per image, the pass with the least wall time."""
        best = (float("inf"), 0.0)
        for _ in range(repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            if t == 1:
                for p in paths:
                    fn(p)
            else:
                with ThreadPoolExecutor(t) as pool:
                    list(pool.map(fn, paths))
            best = min(best, ((time.perf_counter() - t0) / len(paths), (time.process_time() - c0) / len(paths)))
        return best

    def line(what, wall, cpu=None):
        busy = f"CPU {1000 * cpu:6.3f} ms ({cpu / wall:4.2f} cores busy)" if cpu else " " * 32
        print(f"  {what:45s} {1000 * wall:7.3f} ms/image {busy} {1 / wall:7.0f} images/s   1.28 M images: "
              f"{IMAGENET_TRAIN * wall / 60:6.1f} min", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for i in range(n):
            paths.append(os.path.join(folder, f"{i:05d}.jpg"))
            natural_image(i).save(paths[-1], quality=92)
        size = sum(os.path.getsize(p) for p in paths) / n / 1024
        print(f"checking image files: {n} generated JPEGs, 500 x 375, mean {size:.0f} KB (ImageNet's train set: "
              f"about 110 KB, {IMAGENET_TRAIN} images); {cores} CPU cores here (load average "
              f"{os.getloadavg()[0]:.1f}); per image, best of {repeats} passes, files in the page cache", flush=True)
        for p in paths:  # the page cache warmed, so every check reads from memory
            file_sha256(p)
        for what, fn in checks.items():
            line(what, *per_image(fn, paths, 1))
            for t in (t for t in threads if t > 1 and fn in (full_decode, imagefiles.image_problem)):
                wall, cpu = per_image(fn, paths, t)
                line(f"  {t} threads", wall, cpu)
                if fn is imagefiles.image_problem and t == max(threads):
                    line("  16 threads on 16 free cores (CPU time / 16)", cpu / 16)
        files = problem_files(folder, natural_image(0))
        print("  which files each check refuses (header / full decode / draft / image_problem):", flush=True)
        for kind, path in files.items():
            marks = " / ".join("refused" if refused(fn, path) else "passes" for what, fn in checks.items()
                               if fn is not file_sha256)
            why = imagefiles.image_problem(str(path))
            print(f"    {kind:32s} {marks}" + (f"   ({why})" if why else ""), flush=True)


def main(argv=None):
    p = runs.Parser(description="time each method's hot path on random weights of real size",
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--sections", default="towers,coft", help=f"comma-separated, of {', '.join(SECTIONS)}")
    a("--models", default="ViT-B/16,RN50", help=f"comma-separated, of {', '.join(clip_model.CONFIGS)}")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--precision", default="auto", help="comma-separated, of auto, fp32, bf16, fp16 (several: ratios at the end)")
    a("--batch", type=runs.number_type(int, 1), default=None, help="images per step (default 64 on GPU, 8 on CPU)")
    a("--prompts", type=runs.number_type(int, 4), default=256, help="prompts per text-tower step (towers)")
    a("--classes", default=None, help="Phase-I class counts (default 10,100,1000 on GPU, 10,100 on CPU)")
    a("--images", type=runs.number_type(int, 1), default=None,
      help="images in the generation pass (default 4096 GPU, 32 CPU)")
    a("--steps", type=runs.number_type(int, 1), default=None, help="timed steps per figure (default 10 GPU, 2 CPU)")
    a("--grad-checkpointing", action="store_true", help="recompute transformer blocks in backward (coft)")
    a("--pool", type=runs.number_type(int, 2), default=None, help="vecaf: pool size N (default 1281167 GPU, 100000 CPU)")
    a("--centroids", type=runs.number_type(int, 1), default=None, help="vecaf: K (default 12811 GPU, 1000 CPU)")
    a("--select-batch", type=runs.number_type(int, 1), default=65536, help="vecaf: samples per centroid step")
    a("--label-pool", type=runs.number_type(int, 2), default=1281167, help="labels: the unlabelled pool N")
    a("--reference-pool", type=runs.number_type(int, 2), default=100000,
      help="labels: N for the side-by-side run with the full N x C matrices")
    a("--pool-files", type=runs.number_type(int, 100), default=100000, help="pool: image files generated")
    a("--official-candidates", type=runs.number_type(int, 1), default=None,
      help="craft: candidates of the official loop actually timed (then x40/k; default 40 GPU, 2 CPU)")
    a("--page-pool", type=runs.number_type(int, 300), default=1281167, help="page: the pool N of the generated run")
    a("--decode-images", type=runs.number_type(int, 1), default=200, help="decode: generated JPEGs timed")
    a("--decode-threads", default="2,16", help="decode: thread pool sizes timed besides one thread")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    sections = args.sections.split(",")
    names = args.models.split(",")
    unknown = [s for s in sections if s not in SECTIONS] + [n for n in names if n not in clip_model.CONFIGS]
    if unknown:
        p.error(f"unknown section or model {unknown[0]!r}")
    batch = args.batch or (64 if gpu else 8)
    classes = [int(c) for c in (args.classes or ("10,100,1000" if gpu else "10,100")).split(",")]
    images, steps = args.images or (4096 if gpu else 32), args.steps or (10 if gpu else 2)
    figures = {}
    try:
        precisions = [train.resolve_precision(device, x) for x in args.precision.split(",")]
    except train.RunError as e:
        p.error(str(e))
    for precision in precisions:
        amp, _ = train.amp_settings(device, precision)
        report = reporter(device, figures, precision)
        cpu = "" if gpu else f" (capability {torch.backends.cpu.get_cpu_capability()}, native bf16 " \
            f"{ {True: 'yes', False: 'no', None: 'unknown'}[train.cpu_bf16()]})"
        print(f"device {torch.cuda.get_device_name(device) if gpu else 'cpu'}{cpu}, torch {torch.__version__}, "
              f"{precision} (autocast {str(amp.get('dtype', 'off')).removeprefix('torch.')}), threads "
              f"{torch.get_num_threads()}, peak bf16 {device_peak_tflops(device) or '-'} TFLOP/s", flush=True)
        if "towers" in sections:
            towers(names, batch, args.prompts, steps, device, amp, report)
        if "coft" in sections:
            coft_stages(names, batch, classes, images, steps, device, amp, report, args.grad_checkpointing)
        if "craft" in sections:
            craft_costs(names, batch, classes, steps, device, amp, report,
                        args.official_candidates or (40 if gpu else 2))
        if "vecaf" in sections:
            vecaf_selection(args.pool or (1281167 if gpu else 100000), args.centroids or (12811 if gpu else 1000), 512,
                            args.select_batch, steps, device, report)
        if "labels" in sections and precision == precisions[0]:  # fp32 similarities at any precision
            label_costs(args.label_pool, args.reference_pool)
        if "pool" in sections and precision == precisions[0]:
            pool_costs(args.pool_files)
        if "page" in sections and precision == precisions[0]:
            page_costs(args.page_pool)
        if "ddp" in sections:
            ddp_scaling(names, batch, steps, device, amp, report)
        if "ref" in sections:
            reference(names, batch, classes, steps, device, amp)
        if "decode" in sections and precision == precisions[0]:  # no model, no precision
            decode_costs(args.decode_images, [int(t) for t in args.decode_threads.split(",")])
    if len(precisions) > 1:  # each figure's time at every precision, and the speed-up over the first
        print(f"time per step: {' vs '.join(precisions)}", flush=True)
        for what, t in figures.items():
            if all(x in t for x in precisions):
                base = t[precisions[0]]
                print(f"  {what:62s} " + "  ".join(f"{1000 * t[x]:9.1f} ms (x{base / t[x]:.2f})" for x in precisions),
                      flush=True)


if __name__ == "__main__":
    main()
