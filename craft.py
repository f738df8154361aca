"""
CraFT: collaborative fine-tuning of a black-box CLIP (Wang, Liang, He, Wang, Tan, "Connecting
the Dots: Collaborative Fine-tuning for Black-Box Vision-Language Models", ICML 2024,
arXiv 2402.04050; official code github.com/mrflogs/CraFT).

Few-shot classification with a CLIP we may only query: send a soft prompt context and images,
get back the logits 100 * cos(image, class text). Two modules are trained without ever seeing a
weight or a gradient of the model:
  - prompt generation (input side): p = p0 + reshape(A z), z searched by CMA-ES (cmaes.py);
  - prediction refinement (output side): a residual MLP on the logits, y_hat = l + g(l);
and they train collaboratively: per generation, one CMA-ES generation with the MLP frozen, then
one MLP epoch with the prompt frozen, each with a KL term that keeps the other module's
prediction in view (the prediction-consistent loss).

    python craft.py --dataset dtd --data-root DATA --clip RN50 --shots 16 --out runs/craft-dtd
    python craft.py --clip demo --shots 16 --method bbt       the offline digits, BBT baseline
    python craft.py --table runs/craft/*                      results table of finished runs

Methods (--method): craft; bbt (the CMA-ES prompt alone, CE fitness); mlp (the refinement MLP
alone, prompt fixed at p0); coop (white-box prompt tuning with gradients through our CLIP, the
reference the paper compares to); probe (logistic regression on the shots' image features).
Every run also reports zero-shot accuracy (dataset template, and p0 = the search's start).
"""
import signal
import sys

if __name__ == "__main__":  # Ctrl-C while torch loads exits quietly (130); from main on, runs.run_cli speaks
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))

import argparse
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import clip_model
import data
import standin
import ddp
import runs
import train
from cmaes import CMAES
from clip_model import unit
from runs import number_type, shown
from train import RunError, seed_of

# -----------------------------------------------------------------------------
# The black box


def prompt_parts(clip, classnames):
    """The fixed parts of every class prompt "[SOS] p_1 .. p_n {class}.": the [SOS] input
    embedding [width] and the ids after the context, "{class}. [EOT]" [C, L-1]."""
    tokens = clip_model.tokenize([name.replace("_", " ") + "." for name in classnames], clip.context_length)
    return clip.token_embedding.weight[tokens[0, 0]].detach(), tokens[:, 1:]


def word_embeddings(clip, words):
    """The token embeddings [n, width] of `words`, without [SOS] / [EOT]: p0 for "a photo of a"."""
    return clip.token_embedding.weight[clip_model.tokenizer().encode(words)].detach().clone()


def class_text_features(clip, sos, suffix, contexts):
    """Unit text features [P, C, D] of the prompts "[SOS] p {class}." for P contexts p [P, n, width]:
    the shared prefix [SOS, p] is encoded once per context (clip_model.CLIP.encode_text_shared)."""
    prefix = torch.cat([sos.to(contexts)[None, None].expand(len(contexts), 1, -1), contexts], dim=1)  # [P, 1+n, width]
    return unit(clip.encode_text_shared(prefix, suffix))


class BlackBox:
    """Our CLIP served as a black box (the paper's setting): a user sends soft prompt contexts
    [P, n, width] and images and receives the logits scale * cos(v, t_k) [P, B, C], computed under
    no_grad. No parameter, feature or gradient leaves it. It counts its work: `queries["prompts"]`
    = contexts whose C class prompts went through the text tower (the budget counts the search's
    share of these; the official code counts only those), `queries["images"]` = images encoded.
    Like a service with file upload, `upload` keeps a set's image embeddings for later queries
    (the official code's pre-extracted features), each image encoded (and counted) once."""

    def __init__(self, clip, classnames, device, amp, scale=100.0, eval_batch=256):
        self._clip = clip.eval().requires_grad_(False)
        self._device, self._amp, self._eval_batch = device, amp, eval_batch
        self._classnames = list(classnames)
        self.scale = scale
        sos, suffix = prompt_parts(clip, classnames)
        self._sos, self._suffix = sos.to(device), suffix.to(device)
        self._images = {}
        self._last = None  # (contexts, text features) of the last prompt query
        # text-tower batch: about 4096 prompts (contexts x classes) per call on a GPU, 1024 on a CPU,
        # where smaller calls run faster (their activations fit the cache)
        self._chunk = max(1, (4096 if device.type == "cuda" else 1024) // len(classnames))
        self.queries = {"prompts": 0, "images": 0}

    def word_embeddings(self, words):
        """The input embeddings [n, width] of `words` (no [SOS]/[EOT]): the vocabulary a prompt is
        written in, which the paper's setting hands to the user (p0); not a query."""
        return word_embeddings(self._clip, words)

    def class_tokens(self):
        """The longest class part of a prompt, "{class}. [EOT]", in tokens (what a context adds to)."""
        return int(self._suffix.argmax(1).max()) + 1

    def forget(self):
        """Drop the remembered last prompt (a new generation queries its prompt afresh)."""
        self._last = None

    @torch.no_grad()
    def _text(self, contexts):
        contexts = contexts.to(self._device, torch.float32)
        if self._last is not None and torch.equal(self._last[0], contexts):
            return self._last[1]
        with torch.autocast(**self._amp):
            t = torch.cat([class_text_features(self._clip, self._sos, self._suffix, c)
                           for c in contexts.split(self._chunk)])  # [P, C, D]
        self.queries["prompts"] += len(contexts)
        self._last = (contexts.clone(), t)
        return t

    @torch.no_grad()
    def _encode(self, x):
        with torch.autocast(**self._amp):
            v = self._clip.encode_image(x.to(self._device, non_blocking=True))
        self.queries["images"] += len(x)
        return v.float()

    @torch.no_grad()
    def upload(self, name, dataset, workers=0, seed=0):
        """Keep the image embeddings of `dataset` ((image, label, index) items) under `name`; `seed`
        draws its random augmentation, if any (train.loader)."""
        loader = train.loader(dataset, self._eval_batch, seed, workers=workers)
        self._images[name] = torch.cat([self._encode(x) for x, _, _ in loader])  # [N, D]

    @torch.no_grad()
    def logits(self, contexts, images, raw=False):
        """Logits [P, B, C] (fp32) for contexts [P, n, width] and images: an uploaded set's name or
        a batch [B, 3, R, R]. raw=True reproduces the official code's MLP step, whose image
        features are not normalised: scale * v.t / |t| instead of scale * cos(v, t)."""
        v = self._images[images] if isinstance(images, str) else self._encode(images)
        v = v if raw else unit(v)  # [B, D]
        t = self._text(contexts)  # [P, C, D]
        with torch.autocast(self._device.type, enabled=False):
            return self.scale * v.float() @ t.float().transpose(1, 2)

    @torch.no_grad()
    def hard_prompt_logits(self, prompts, images):
        """Logits [B, C] of hand-written prompts for an uploaded set, the zero-shot reference:
        `prompts` per class (a template's, or a prompts file's, each class's prompts averaged as in
        clip_model.text_classifier). As many prompt queries as the most prompts a class has (one
        for a template)."""
        with torch.autocast(**self._amp):
            t = clip_model.text_classifier(self._clip, prompts, self._device)  # [C, D]
        self.queries["prompts"] += max(len(p) for p in prompts)
        return self.scale * clip_model.similarity(unit(self._images[images]), t)


# -----------------------------------------------------------------------------
# The two modules and their losses


class PromptGenerator:
    """Input side: p = p0 + reshape(A z) (BBT's random projection): p0 [n, width] the embeddings of
    "a photo of a", A [n*width, d] fixed, entries N(0, std^2), so the search runs in d dimensions
    (intrinsic dimension, 512) instead of n*width."""

    def __init__(self, p0, d, std, seed):
        g = torch.Generator().manual_seed(seed)
        self.p0 = p0.float()
        self.A = (torch.randn(p0.numel(), d, generator=g) * std).to(p0.device)  # [n*width, d]

    def __call__(self, z):
        """z [P, d] -> contexts [P, n, width]."""
        return self.p0 + (z.to(self.A) @ self.A.T).view(len(z), *self.p0.shape)


class Refiner(nn.Module):
    """Output side: residual prediction refinement y_hat = l + g(l), g = W2 relu(W1 l + b1) + b2
    on the logit vector (hidden 256; 512 on ImageNet), PyTorch's default initialisation as in the
    official code."""

    def __init__(self, classes, hidden=256):
        super().__init__()
        self.g = nn.Sequential(nn.Linear(classes, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, l):
        return l + self.g(l)


def kl(p_logits, q_logits):
    """KL(softmax(p) || softmax(q)) summed over classes, averaged over images: [..., N, C] -> [...]
    (torch's F.kl_div(log_softmax(q), softmax(p), reduction="batchmean") per leading index)."""
    log_p, log_q = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean(-1)


def cross_entropy(l, y):
    """Mean cross-entropy over images per leading index: l [..., N, C], y [N] -> [...]."""
    log_p = F.log_softmax(l, -1)
    return -log_p.gather(-1, y.expand(log_p.shape[:-1]).unsqueeze(-1)).squeeze(-1).mean(-1)


def fitness(l, y, refiner, lam):
    """The prompt's loss L_I = CE(l, y) + lam * KL(P_O || P_I), per candidate: l [P, N, C] -> [P];
    P_I = softmax(l), P_O = softmax(l + g(l)) with the refiner frozen (None: BBT, CE alone)."""
    f = cross_entropy(l, y)
    if refiner is not None and lam:
        with torch.no_grad():
            f = f + lam * kl(refiner(l), l)
    return f


def refinement_loss(l, y, refiner, lam_o):
    """The refiner's loss L_O = CE(y_hat, y) + lam_O * KL(P_I || P_O), y_hat = l + g(l), with the
    prompt (and so l [N, C]) frozen."""
    y_hat = refiner(l)
    loss = F.cross_entropy(y_hat, y)
    return loss + lam_o * kl(l, y_hat) if lam_o else loss


def consistency_weight(t, budget, n, lam):
    """lambda_O(t): the refiner's KL term weighs lam while the search has used t <= budget / n
    queries, then 0 (the official schedule; n = 1 keeps it on throughout)."""
    return lam if t <= budget // n else 0.0


# -----------------------------------------------------------------------------
# A run: its settings, what its parts share


SEARCHES = ("craft", "bbt")  # methods that search the prompt
REFINES = ("craft", "mlp")  # methods that train the refiner


@dataclass(frozen=True)
class Settings:
    """CraFT's hyperparameters (Sec. 3 and the official per-dataset settings, SETTINGS) and those
    of the white-box CoOp reference, from the CLI's flags (settings_of)."""
    method: str  # craft; bbt (search only); mlp (refiner only); coop; probe
    budget: int  # prompt queries of the search
    popsize: int  # CMA-ES population (queries per generation)
    intrinsic_dim: int  # d, the dimension of z
    a_std: float  # std of the entries of A (p = p0 + A z)
    sigma0: float  # CMA-ES initial step size
    bound: float  # box bound on z (0: none)
    cma: str  # "full" or "separable"
    prompt: str  # the prompt in use after a generation: "mean", "sample-mean" or "best"
    aug: str  # the shots' augmentation: "crop", "inception" or "none"
    hidden: int  # refiner width
    lr: float  # refiner Adam learning rate
    batch: int  # refiner batch
    lam: float  # lambda, the weight of both KL terms
    n: int  # the refiner's KL term is off after budget / n queries
    raw_image_features: bool
    ckpt_every: int  # generations between checkpoints
    trace_every: int  # generations between dev-split evaluations (0: none); recorded, never used
    coop_epochs: int  # CoOp's epochs (by shots unless given: coop_epochs_for)
    coop_lr: float
    coop_batch: int


def settings_of(args):
    """The CLI's (resolved) flags -> Settings."""
    given = {f: getattr(args, f) for f in Settings.__dataclass_fields__}
    return Settings(**{**given, "coop_epochs": args.coop_epochs or coop_epochs_for(args.shots, args.dataset)})


@dataclass
class Run(runs.Run):
    """What a run's parts share, made once by `prepare` (runs.Run: its folder, config, how it
    computes, the seeded loaders)."""
    task: data.Task
    clip: clip_model.CLIP  # used by the white-box references only (coop, probe)
    box: BlackBox
    shots: data.ImageDataset  # the few-shot train images under the --aug transform
    y_shots: torch.Tensor  # [K*C]
    evaluated: data.ImageDataset  # the eval split under the test transform
    y_eval: torch.Tensor
    dev: data.ImageDataset | None  # the dev split under the test transform, for --trace-every
    shifts: dict  # --eval-datasets: name -> (images under the test transform, its classes [C'], labels [N])
    ctx_init: str  # the words of p0
    p0: torch.Tensor  # [n, width] their embeddings
    scale: float  # the black box's logit scale
    predictions: dict


# -----------------------------------------------------------------------------
# The stages: the zero-shot references, CraFT, then the white-box references


def zero_shot(run):
    """Zero-shot references (no training): the dataset's hand-written template (your images: the
    prompts of a {class: [prompts]} --classes file, where given), and p0 ("a photo of a {}.",
    where the search starts). Nothing without a labelled eval split."""
    if run.y_eval is None:
        run.metrics["zero_shot_acc"] = run.metrics["p0_acc"] = None
        return
    run.box.upload("eval", run.evaluated, run.workers)
    l_template = run.box.hard_prompt_logits(data.zero_shot_prompts(run.task), "eval")
    l_p0 = run.box.logits(run.p0[None], "eval")[0]
    run.metrics["zero_shot_acc"] = train.accuracy(l_template.cpu(), run.y_eval)
    run.metrics["p0_acc"] = train.accuracy(l_p0.cpu(), run.y_eval)
    run.predictions["zero_shot"] = l_template.argmax(1).cpu()
    hand_written = "the prompts of --classes" if run.task.prompts else repr(run.task.templates[0])
    print(f"zero-shot ({hand_written}): {run.metrics['zero_shot_acc']:.2f}; "
          f"p0 ({run.ctx_init + ' {}.'!r}): {run.metrics['p0_acc']:.2f}", flush=True)


def collaborate(run, settings):
    """CraFT's collaborative training (--method craft), or one module alone (bbt: the CMA-ES
    prompt with the CE fitness; mlp: the refiner with the prompt fixed at p0). Per generation:
    one CMA-ES generation (popsize prompt queries on the pre-extracted features of one augmented
    view of the shots) with the refiner frozen, then one refiner epoch (refiner_epoch) with the
    prompt frozen. A checkpoint is written every --ckpt-every generations; --resume continues
    from it to the same result. Inference: one query with the final prompt, then argmax of l + g(l)."""
    search, refine = settings.method in SEARCHES, settings.method in REFINES
    G = settings.budget // settings.popsize  # generations
    y_view = run.y_shots.to(run.device)
    # the fitness's features: one augmented view, drawn from the run's seed and extracted once
    run.box.upload("view", run.shots, run.workers, seed_of(run.seed, "view"))
    generator = PromptGenerator(run.p0, settings.intrinsic_dim, settings.a_std, seed_of(run.seed, "A"))
    torch.manual_seed(seed_of(run.seed, "refiner"))
    refiner = Refiner(len(run.task.classnames), settings.hidden).to(run.device) if refine else None
    opt = torch.optim.Adam(refiner.parameters(), lr=settings.lr) if refine else None
    es = CMAES(torch.zeros(settings.intrinsic_dim), settings.sigma0, settings.popsize,
               (-settings.bound, settings.bound) if settings.bound else None, settings.cma == "separable",
               seed_of(run.seed, "cma-es")) if search else None
    if settings.trace_every:
        run.box.upload("dev", run.dev, run.workers)
        y_dev = torch.tensor([label for _, label in run.dev.items])
    ckpt = runs.RecordedFile(runs.ckpt_path(run.out, "collaborate"), run.config, run.resume)
    start, z, history = resume_collaboration(ckpt, settings.intrinsic_dim, run.box, es, refiner, opt)
    log = GenerationLog(G, start, run.log_every)
    cost = train.StageCost(run.device)
    for g in range(start, G):
        run.box.forget()
        if search:  # input side: one CMA-ES generation, refiner frozen
            Z = es.ask()  # [popsize, d]
            f = torch.cat([fitness(run.box.logits(generator(Zc), "view"), y_view, refiner, settings.lam)
                           for Zc in Z.split(max(1, 2 ** 24 // (len(y_view) * len(run.task.classnames))))])
            if not torch.isfinite(f).all():  # CMA-ES cannot rank NaN / inf fitness values
                raise RunError(f"generation {g + 1}: non-finite prompt fitness {f[~torch.isfinite(f)][0].item():.4g} "
                               f"(prompts beyond what the text tower takes: --sigma0 {settings.sigma0:g}, --bound "
                               f"{settings.bound:g}; or a diverged refiner: --lr {settings.lr:g}); stopped, "
                               f"{last_checkpoint(ckpt)}: lower them")
            es.tell(f.double().cpu())
            z = (es.mean if settings.prompt == "mean" else es.best_x if settings.prompt == "best"
                 else es.sample(settings.popsize).mean(0))[None].float()
            history["best_fitness"].append(f.min().item())
        t = (g + 1) * settings.popsize  # queries the search has used by now (the official `steps`)
        ctx = generator(z)  # [1, n, width]
        if refine:  # output side: one epoch of the refiner, prompt frozen
            lam_o = consistency_weight(t, settings.budget, settings.n, settings.lam)
            history["refine_loss"].append(refiner_epoch(run, settings, refiner, opt, ctx, lam_o, g, ckpt))
        if search:
            history["prompt_fitness"].append(fitness(run.box.logits(ctx, "view"), y_view, refiner, settings.lam).item())
        done = g + 1
        if settings.trace_every and (done % settings.trace_every == 0 or done == G):  # recorded, never used to choose
            acc = train.accuracy(classify(run.box, ctx, "dev", refiner).cpu(), y_dev)
            history["dev_trace"].append([done, t, acc])  # generation, search queries, dev accuracy
        log(done, history, es, run.box)
        if done % settings.ckpt_every == 0 or done == G:
            ckpt.save({"generation": done, "z": z, "history": history, "queries": dict(run.box.queries),
                       "es": es.state_dict() if es else None, "refiner": refiner.state_dict() if refiner else None,
                       "opt": opt.state_dict() if opt else None})
    cost.record(run.metrics, "train")
    run.box.forget()
    run.metrics[f"{settings.method}_acc"] = None
    if run.y_eval is not None:
        run.predictions[settings.method] = classify(run.box, generator(z), "eval", refiner).cpu()
        run.metrics[f"{settings.method}_acc"] = train.accuracy(run.predictions[settings.method], run.y_eval)
    for name, (images, classes, y) in run.shifts.items():  # the same classifier under distribution shift
        run.box.upload(name, images, run.workers)
        run.predictions[name] = classify(run.box, generator(z), name, refiner, classes).cpu()
        run.metrics.setdefault("shift_acc", {})[name] = train.accuracy(run.predictions[name], y)
    run.metrics["history"] = history
    run.metrics["deploy_params"] = {"prompt": run.p0.numel(), "z": settings.intrinsic_dim if search else 0,
                                    "refiner": sum(p.numel() for p in refiner.parameters()) if refiner else 0}


def refiner_epoch(run, settings, refiner, opt, ctx, lam_o, g, ckpt):
    """The output side of generation g: one epoch of the refiner (Adam, constant lr) on L_O over
    freshly augmented shots, the prompt ctx [1, n, width] frozen (--aug none: over the view's
    logits, fixed under the frozen prompt: one query serves the epoch, no image re-encoded).
    Returns the epoch's mean loss; a refiner that diverges is stopped here, in one line."""
    epoch = run.shots  # (augmented image, label, index)
    if settings.aug == "none":
        l_view = run.box.logits(ctx, "view", raw=settings.raw_image_features)[0].cpu()  # [K*C, C]
        epoch = data.ImageDataset(list(zip(l_view, run.y_shots.tolist())), lambda l: l)  # (logits, label, index)
    last = {}

    def loss(model, batch, _):
        x, y, _ = batch
        l = x if settings.aug == "none" else run.box.logits(ctx, x, raw=settings.raw_image_features)[0]  # [B, C]
        last["l"] = l
        return {"loss": (refinement_loss(l, y, model, lam_o), len(y))}
    try:
        history = train.fit(refiner, loss, lambda e: run.loader(epoch, settings.batch, ("refine", g), shuffle=True),
                            epochs=1, opt=opt, schedule=lambda *_: 1.0, device=run.device,
                            seed=seed_of(run.seed, "refine", g), precision=run.precision,
                            tag=f"the refiner's epoch in generation {g + 1}", log_every=0)
    except RunError as e:
        raise RunError(f"{e}; CraFT's run: {last_checkpoint(ckpt)}") from None
    with torch.no_grad():  # a step can leave the outputs non-finite behind a finite loss: said now,
        diverged = not torch.isfinite(refiner(last["l"])).all()  # not at the next generation, or never
    if diverged:
        raise RunError(f"generation {g + 1}: the refiner diverged in its epoch (its outputs are no longer "
                       f"finite; --lr {settings.lr:g}); stopped, {last_checkpoint(ckpt)}: lower it")
    return sum(history["loss"]) / len(history["loss"])


def resume_collaboration(ckpt, d, box, es, refiner, opt):
    """(first generation, z [1, d], history): a fresh start (z = 0: p0), or where the checkpoint
    left off, its CMA-ES state, refiner, Adam and query counters restored."""
    state = ckpt.load()
    if state is None:
        return 0, torch.zeros(1, d), {"best_fitness": [], "prompt_fitness": [], "refine_loss": [], "dev_trace": []}
    if es:
        es.load_state_dict(state["es"])
    if refiner:
        refiner.load_state_dict(state["refiner"])
        opt.load_state_dict(state["opt"])
    box.queries.update(state["queries"])  # they include the uploads just redone
    print(f"collaborate: resumed from {ckpt.path} after generation {state['generation']}", flush=True)
    return state["generation"], state["z"], state["history"]


def last_checkpoint(ckpt):
    """Where a stopped collaborate() can be resumed from, in words."""
    if not ckpt.path.exists():
        return "no checkpoint was written yet"
    return f"its last checkpoint is {ckpt.path} (generation {runs.read_torch(ckpt.path)['generation']})"


class GenerationLog:
    """collaborate's progress line every log_every generations (and after the last)."""

    def __init__(self, G, start, every):
        self.G, self.start, self.every, self.t0 = G, start, every, time.time()

    def __call__(self, done, history, es, box):
        if not self.every or (done % self.every and done != self.G):
            return
        parts = [f"best fitness {history['best_fitness'][-1]:.3f} prompt {history['prompt_fitness'][-1]:.3f} "
                 f"sigma {es.sigma:.3g}"] if es else []
        parts += [f"refine loss {history['refine_loss'][-1]:.3f}"] if history["refine_loss"] else []
        eta = (time.time() - self.t0) / (done - self.start) * (self.G - done)
        print(f"gen {done}/{self.G} " + " ".join(parts) + f" queries {box.queries['prompts']} eta {eta:.0f}s",
              flush=True)


@torch.no_grad()
def classify(box, ctx, images, refiner=None, classes=None):
    """CraFT's classifier as deployed: one query with the context ctx [1, n, width], then argmax of
    l + g(l) over all classes, or over `classes` [C'] only (ImageNet-A / -R cover 200 of ImageNet's
    1000: the official robustness script's label mapping). Returns the predicted labels [B]."""
    l = box.logits(ctx, images)[0]  # [B, C]
    if refiner is not None:
        l = refiner.eval()(l)
        if not torch.isfinite(l).all():  # argmax would name one class for every image, silently
            raise RunError("the refiner's outputs are not finite (it diverged: lower --lr); nothing is reported")
    if classes is None:
        return l.argmax(1)
    classes = classes.to(l.device)
    return classes[l[:, classes].argmax(1)]


class CoOp(nn.Module):
    """The white-box reference (Zhou et al., "Learning to Prompt for Vision-Language Models",
    2022): the context p [n, width] itself, learned by gradients through the text tower."""

    def __init__(self, p0):
        super().__init__()
        self.ctx = nn.Parameter(p0.clone().float())


def coop(run, settings):
    """CoOp on the same shots and augmentation: SGD lr 0.002 (momentum 0.9, weight decay 5e-4),
    batch 32, one warm-up epoch at a constant 1e-5, then cosine; the context starts at p0; logits
    scale * cos(v, t) as the black box gives them. Trained through train.fit (a checkpoint per epoch)."""
    clip = run.clip
    sos, suffix = (t.to(run.device) for t in prompt_parts(clip, run.task.classnames))
    model = CoOp(run.p0).to(run.device)

    def text():
        return class_text_features(clip, sos, suffix, model.ctx[None])[0]  # [C, D]

    def loss(m, batch, _):
        x, y, _ = batch
        with torch.no_grad():
            v = unit(clip.encode_image(x))
        return {"CE": (F.cross_entropy(run.scale * clip_model.similarity(v, text()), y), len(y))}

    def schedule(step, total, per_epoch):  # CoOp's constant warm-up, then cosine over all epochs
        return 1e-5 / settings.coop_lr if step < per_epoch else 0.5 * (1 + math.cos(math.pi * step / total))
    cost = train.StageCost(run.device)
    history = train.fit(model, loss, lambda e: run.loader(run.shots, settings.coop_batch, ("coop", e), shuffle=True),
                        epochs=settings.coop_epochs, opt=train.sgd(model, settings.coop_lr, 0.9, 5e-4),
                        schedule=schedule, device=run.device, seed=seed_of(run.seed, "coop"), precision=run.precision,
                        checkpoint=runs.RecordedFile(runs.ckpt_path(run.out, "coop"), run.config, run.resume),
                        tag="coop", log_every=run.log_every)
    cost.record(run.metrics, "train")
    run.metrics["coop_acc"] = None
    if run.y_eval is not None:
        with torch.no_grad(), torch.autocast(**run.amp):
            t = text()
        l = train.predict(lambda x: run.scale * clip_model.similarity(unit(clip.encode_image(x)), t),
                          run.loader(run.evaluated, run.eval_batch, ("eval",)), run.device, run.amp)[0]
        run.metrics["coop_acc"] = train.accuracy(l, run.y_eval)
        run.predictions["coop"] = l.argmax(1)
    run.metrics["history"] = {"loss": history["loss"]}
    run.metrics["deploy_params"] = {"prompt": run.p0.numel(), "z": 0, "refiner": 0}


def linear_probe(run):
    """Logistic regression on the normalised image features of the shots (test transform, no
    augmentation), train.logistic_regression: a white-box reference."""
    test = data.make_transform("test", run.clip.visual, run.task)
    shots = data.ImageDataset(run.shots.items, test, exif_orientation=run.task.exif_orientation)
    l = run.linear_probe(run.clip, shots, run.y_shots, run.evaluated, len(run.task.classnames))
    run.metrics["probe_acc"] = train.accuracy(l, run.y_eval)
    run.predictions["probe"] = l.argmax(1)
    run.metrics["deploy_params"] = {"prompt": 0, "z": 0, "refiner": 0,
                                    "head": (run.clip.cfg.embed_dim + 1) * l.shape[1]}


# -----------------------------------------------------------------------------
# A finished run's classifier, rebuilt from its checkpoint (deploy.py)


class DeployedClassifier(nn.Module):
    """CraFT's classifier as one module: images -> l + g(l), l = scale * cos(v, t) with the class
    text features t [C, D] of the final prompt computed once (one prompt query), g the refiner
    (none for BBT and CoOp). The same numbers as `classify`, without the black box's bookkeeping."""

    def __init__(self, clip, t, scale, refiner=None):
        super().__init__()
        self.clip, self.scale, self.refiner = clip, scale, refiner
        self.register_buffer("t", t)

    def forward(self, x):
        v = unit(self.clip.encode_image(x)).float()  # [B, D]
        with torch.autocast(v.device.type, enabled=False):
            l = self.scale * v @ self.t.float().T  # [B, C]
            return l if self.refiner is None else self.refiner(l)


def final_classifier(out, clip, config, metrics, classnames):
    """A finished run's classifier from its last checkpoint: craft / bbt / mlp: the prompt
    p0 + reshape(A z) of the final z (A redrawn from the run's seed) and the refiner; coop: the
    learned context. None for the linear probe, which keeps no weights."""
    method = config["method"]
    if method == "probe":
        return None
    p0 = word_embeddings(clip, config["ctx_init"]).float()
    if method == "coop":
        ctx, refiner = runs.read_torch(runs.ckpt_path(out, "coop"), runs.REDO_STAGE)["model"]["ctx"], None
    else:
        state = runs.read_torch(runs.ckpt_path(out, "collaborate"), runs.REDO_STAGE)
        ctx = PromptGenerator(p0, config["intrinsic_dim"], config["a_std"], seed_of(config["seed"], "A"))(state["z"])[0]
        refiner = None
        if state["refiner"] is not None:
            refiner = Refiner(len(classnames), config["hidden"])
            refiner.load_state_dict(state["refiner"])
    sos, suffix = prompt_parts(clip, classnames)
    with torch.no_grad():
        t = class_text_features(clip, sos.to(p0), suffix.to(p0.device), ctx[None].to(p0))[0]  # [C, D]
    return DeployedClassifier(clip, t, metrics["scale"], refiner).eval()


# -----------------------------------------------------------------------------
# A run, end to end


def end_to_end(args):
    """Zero-shot references, then the method; writes metrics.json and predictions.pt."""
    run, settings = prepare(args)  # the parts see these settings, never the flags
    zero_shot(run)
    if settings.method == "probe":
        linear_probe(run)
    elif settings.method == "coop":
        coop(run, settings)
    else:
        collaborate(run, settings)
    run.metrics["queries"] = dict(run.box.queries, search=settings.budget if settings.method in SEARCHES else 0)
    print(f"{settings.method}: {shown(run.metrics[f'{settings.method}_acc'])} on {run.metrics['eval_split']} "
          f"({run.box.queries['prompts']} prompt queries, {run.box.queries['images']} images encoded)", flush=True)
    return runs.finish_run(run.out, run.metrics, run.predictions, run.t0)


def check_args(args):
    """Flag combinations that cannot work, refused before anything is loaded (each number's range
    is checked by the parser)."""
    if ddp.launched_rank()[1] > 1:  # N copies of one run would race on one folder
        raise RunError("craft.py runs in one process (its black box answers queries; nothing to split over GPUs): "
                       "run it with python, not torchrun")
    if args.budget is not None and args.budget < args.popsize:
        raise RunError(f"--budget {args.budget} is smaller than one CMA-ES generation (--popsize {args.popsize} "
                       f"queries): give --budget {args.popsize} or more")
    if args.budget is not None and args.budget % args.popsize:  # the search spends whole generations
        low = args.budget // args.popsize * args.popsize
        raise RunError(f"--budget {args.budget} is not a whole number of CMA-ES generations of --popsize "
                       f"{args.popsize} queries: give {low} or {low + args.popsize}")
    if args.labels and args.shots:
        raise RunError("--shots N draws N labelled images per class and --labels gives the labelled images: give "
                       "one of the two")
    if not args.ctx_init.split():
        raise RunError("--ctx-init is empty: give the words the prompt starts from (e.g. 'a photo of a'); an empty "
                       "context leaves the search nothing to change")
    if args.method not in SEARCHES + REFINES:
        for flag, value in (("--trace-every", args.trace_every), ("--eval-datasets", args.eval_datasets)):
            if value:
                raise RunError(f"{flag} evaluates CraFT's classifier (prompt + refiner), which --method "
                               f"{args.method} does not train: drop it")


def prepare(args):
    """The checks, the run folder and the backbone, cheap mistakes first -> (Run, Settings), with
    the defaults that follow a labels file's shot count resolved."""
    check_args(args)
    standin.check_backbone("--clip", args.clip, args.clip_act)
    runs.check_out(args.out, args.resume, args.restart, runs.input_files(args))
    device = runs.check_device(args.device)
    args = runs.with_precision(args, device)
    t0 = time.time()
    task = data.task_of(args)
    eval_items = data.eval_items(task, args.eval_split)
    if args.method == "probe" and not eval_items:
        raise RunError("--method probe keeps no weights, so without a labelled check set (--check) it would "
                       "report nothing: add --check DIR or use another --method")
    labels = data.read_labels(args.labels, task) if args.labels else None
    if labels is not None:
        picked, y_picked = labels.index, labels.y
        args = with_shot_defaults(args, labels, task)
    else:
        picked = data.few_shot(task, args.shots, seed_of(args.seed, "shots"))
        y_picked = torch.tensor([task.train[i][1] for i in picked.tolist()])
    if args.trace_every and not task.dev:
        raise RunError(f"--trace-every evaluates on the dev split, which {args.dataset} does not have: drop it")
    if args.eval_datasets and args.dataset.lower() != "imagenet":
        raise RunError(f"--eval-datasets evaluates a classifier of ImageNet's classes: use it with --dataset "
                       f"imagenet, not {args.dataset}")
    shifts = {name: data.imagenet_shift(name, args.data_root) for name in args.eval_datasets or []}
    config, how = runs.settings(args, UNRECORDED_FLAGS)
    if labels is not None:
        config["labels"] = labels.digest()
    images = data.record(task)
    config.update(data=data.fingerprint(images), clip=standin.backbone_id("--clip", args.clip, args.clip_act))
    if args.resume:  # the images must be those the run was made with: said in words, before the backbone loads
        data.check_same_images(runs.saved_images(args.out), images, args.out)
    torch.manual_seed(args.seed)
    clip, _ = standin.load("--clip", args.clip, args.clip_act, device)
    clip.requires_grad_(False)
    amp = train.amp_settings(device, args.precision)[0]
    # --scale left out: what the model was trained with (the config records the flag as given)
    scale = args.scale or clip.logit_scale.exp().item()
    box = BlackBox(clip, task.classnames, device, amp, scale, args.eval_batch)
    p0 = box.word_embeddings(args.ctx_init).to(device)  # [n, width]
    longest = box.class_tokens()
    if 1 + len(p0) + longest > clip.context_length:
        raise RunError(f"a prompt of --ctx-init {args.ctx_init!r} ({len(p0)} tokens) and the longest class name "
                       f"needs {1 + len(p0) + longest} tokens, more than the backbone's {clip.context_length}: "
                       f"use a shorter --ctx-init")
    # every check passed: now --restart
    out = runs.open_run(args.out, config, args.resume, args.restart, how=how, inputs=runs.input_files(args),
                        images=images)
    items = [task.train[i] for i in picked.tolist()]
    crop = data.make_transform("test" if args.aug == "none" else args.aug, clip.visual, task)
    test = data.make_transform("test", clip.visual, task)
    shifts = {name: (data.ImageDataset(items, test, exif_orientation=False),  # ImageNet's shifts: the papers' decode
                     torch.tensor(classes), torch.tensor([lab for _, lab in items]))
              for name, (items, classes) in shifts.items()}
    shots = args.shots if labels is None else len(labels) / len(task.classnames)  # uneven: the mean per class
    metrics = {"dataset": args.dataset, "classnames": task.classnames, "clip": args.clip, "method": args.method,
               "shots": shots, "seed": args.seed, "eval_split": args.eval_split, "precision": args.precision,
               "scale": scale,
               "budget": args.budget if args.method in SEARCHES + ("mlp",) else None, "time_s": {}}
    if labels is None:
        print(f"{data.named(task.name)}: {len(task.classnames)} classes, {args.shots} shots each, {len(eval_items)} "
              f"{args.eval_split} images; backbone {args.clip} on {device}, {args.precision}; method {args.method}",
              flush=True)
    else:
        counts = labels.per_class(len(task.classnames))
        print(f"{data.named(task.name)}: {len(task.classnames)} classes, {len(labels)} labelled images from "
              f"{args.labels} ({min(counts)}-{max(counts)} per class), {len(eval_items)} {args.eval_split} images; "
              f"backbone {args.clip} on {device}, {args.precision}; method {args.method}", flush=True)
        print(labels.summary(), flush=True)
        if min(counts) == 0:
            absent = [c for c, n in zip(task.classnames, counts) if n == 0]
            print(f"warning: {runs.counted(len(absent), 'class', 'classes')} {'has' if len(absent) == 1 else 'have'} "
                  f"no labelled image ({', '.join(absent[:3])}{', ...' if len(absent) > 3 else ''}): the search and "
                  f"the refiner never see {'it' if len(absent) == 1 else 'them'}", flush=True)
    if not eval_items:
        print("no labelled check set (--check): no accuracy is reported", flush=True)
    run = Run(**runs.fields_of(args, out, config, device, args.resume), task=task, clip=clip, box=box,
              shots=data.ImageDataset(items, crop, labels=y_picked.tolist(), exif_orientation=task.exif_orientation),
              y_shots=y_picked, evaluated=data.ImageDataset(eval_items, test, exif_orientation=task.exif_orientation),
              y_eval=torch.tensor([lab for _, lab in eval_items]) if eval_items else None,
              dev=data.ImageDataset(task.dev, test, exif_orientation=task.exif_orientation) if args.trace_every
              else None, shifts=shifts,
              ctx_init=args.ctx_init, p0=p0, scale=scale, metrics=metrics, predictions={}, t0=t0)
    return run, settings_of(args)


# -----------------------------------------------------------------------------
# CLI


# the official configs (RN50, 16 shots): sigma0, bound (None: unbounded), std of A, n (lambda_O is
# switched off after budget/n queries), MLP batch, lambda. ImageNet's A has nn.Linear's default
# initialisation (uniform, std 1/sqrt(3*512)); its MLP is 512 wide.
SETTINGS = {
    "caltech101": (1, 5, 0.2, 4, 256, 0.1), "oxford_pets": (0.02, 5, 0.2, 1, 64, 0.1),
    "stanford_cars": (1, 5, 0.2, 4, 256, 0.1), "oxford_flowers": (1, 5, 0.2, 4, 256, 0.1),
    "food101": (1, None, 0.2, 1, 256, 1.0), "fgvc_aircraft": (0.02, None, 0.2, 4, 256, 0.1),
    "sun397": (1, 5, 0.2, 4, 256, 0.1), "dtd": (0.02, 5, 1.0, 1, 256, 0.001),
    "eurosat": (0.02, 5, 1.0, 1, 256, 0.01), "ucf101": (1, 5, 0.2, 4, 256, 0.1),
    "imagenet": (1, None, (3 * 512) ** -0.5, 1, 256, 0.0),
}
DEFAULT_SETTINGS = SETTINGS["caltech101"]  # the row most datasets share, for any other dataset
SETTING_FLAGS = ("sigma0", "bound", "a_std", "n", "batch", "lam")

# flags config.json leaves out: they change how a run goes, never its numbers (besides runs.UNRECORDED_FLAGS)
UNRECORDED_FLAGS = ("ckpt_every",)


def budget_for(shots, dataset=""):
    """The official code's query budget by shots: 8000 for 8-16, 4000 for 2-4, 2000 for 1; its
    ImageNet script: 4000 for 2-16 (the paper's text says 8000: give --budget 8000)."""
    if dataset.lower() == "imagenet":
        return 4000 if shots >= 2 else 2000
    return 8000 if shots >= 8 else 4000 if shots >= 2 else 2000


def coop_epochs_for(shots, dataset=""):
    """CoOp's epochs (Zhou et al. 2022, its configs): 50 for 1 shot, 100 for 2-4, 200 for 8-16;
    on ImageNet 50 for every shot count."""
    if dataset.lower() == "imagenet":
        return 50
    return 200 if shots >= 8 else 100 if shots >= 2 else 50


def parser():
    p = runs.Parser(description="CraFT: collaborative fine-tuning of a black-box CLIP (few-shot)",
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    data.add_flags(p, "digits (offline demo), a CoOp dataset name, imagefolder, cifar10, cifar100")
    a("--labels", default=None, metavar="FILE",
      help="the labelled images instead of --shots: a CSV path,class (paths relative to --images / --data-root); "
           "any number per class (the fitness and the refiner's loss are means over images, so a class with more "
           "images weighs more)")
    a("--clip", default="demo", help="demo (the offline stand-in), an OpenAI release (RN50 ... ViT-L/14@336px), "
      "open_clip:ARCH/TAG[=FILE], a Hugging Face CLIPModel folder or hf:ORG/NAME, or a checkpoint file "
      "(with --clip-act)")
    a("--out", default="runs/craft")
    a("--method", default="craft", choices=["craft", "bbt", "mlp", "coop", "probe"],
      help="bbt: CMA-ES prompt only (CE fitness); mlp: refinement MLP only (prompt p0); coop: white-box prompt "
           "tuning (gradients through CLIP); probe: logistic regression on the shots' features")
    a("--shots", type=number_type(int, 1), default=None,
      help="train images per class, drawn with the seed (CoOp: 1, 2, 4, 8, 16); default 16 unless --labels")
    runs.run_flags(p)
    a("--table", nargs="+", metavar="RUN_DIR", help="print a results table of finished runs and exit")
    a("--eval-split", default="test", choices=["test", "dev"], help="dev: for choosing settings (never test)")
    a("--ckpt-every", type=number_type(int, 1), default=10, help="generations between checkpoints")
    a("--trace-every", type=number_type(int, 0), default=0, metavar="G",
      help="every G generations, record the current prompt + refiner's dev-split accuracy (metrics history "
           "dev_trace; never used to choose anything); 0: off")
    a("--eval-datasets", nargs="+", default=None, choices=list(data.IMAGENET_SHIFTS), metavar="NAME",
      help="with --dataset imagenet: also evaluate the final prompt + refiner on these distribution-shift test "
           f"sets in CoOp's layout under --data-root ({', '.join(data.IMAGENET_SHIFTS)})")
    # prompt generation
    a("--budget", type=number_type(int, 1), default=None, help="prompt queries of the search (default by shots, the "
      "official code's: 8000 for 8-16, 4000 for 2-4, 2000 for 1; imagenet: 4000 for 2-16)")
    a("--popsize", type=number_type(int, 2), default=40)
    a("--intrinsic-dim", type=number_type(int, 1), default=512, help="dimension d of z")
    a("--ctx-init", default="a photo of a", help="p0: the words the context starts from")
    a("--sigma0", type=number_type(float, 0, low_open=True), default=None, help="CMA-ES initial step size")
    a("--bound", type=number_type(float, 0), default=None, help="box bound on z (0: none)")
    a("--a-std", type=number_type(float, 0, low_open=True), default=None, help="std of the entries of A")
    a("--cma", default="full", choices=["full", "separable"], help="separable: diagonal covariance (sep-CMA-ES)")
    a("--prompt", default="mean", choices=["mean", "sample-mean", "best"],
      help="the prompt in use after each generation: the CMA-ES mean; the official code's mean of a fresh sample "
           "(small datasets) or best so far (ImageNet)")
    a("--aug", default=None, choices=["crop", "inception", "none"],
      help="train augmentation (the fitness's view and every refiner / CoOp epoch): crop: random resized crop of "
           "50-100%% + flip where allowed (official); inception: of 8-100%% (the official ImageNet data); none: the "
           "test transform. Default crop; inception for imagenet, none for digits (docs/craft.md)")
    a("--scale", type=number_type(float, 0, low_open=True), default=None,
      help="logit scale of the black box (default: the backbone's own, exp(logit_scale): 100 for the released "
           "CLIPs, as the official code's fixed 100; ~14 for the demo stand-in)")
    # prediction refinement
    a("--hidden", type=number_type(int, 1), default=None, help="refiner width (256; 512 on ImageNet)")
    a("--lr", type=number_type(float, 0, low_open=True), default=1e-3, help="refiner Adam learning rate")
    a("--batch", type=number_type(int, 1), default=None, help="refiner batch")
    a("--lam", type=number_type(float, 0), default=None, help="weight of both KL terms (prediction consistency)")
    a("--n", type=number_type(int, 1), default=None,
      help="the refiner's KL term is switched off after budget/n queries")
    a("--raw-image-features", action="store_true",
      help="the official code's quirk: the refiner trains on logits of unnormalised image features (its search "
           "and inference use normalised ones)")
    # white-box CoOp
    a("--coop-epochs", type=number_type(int, 1), default=None,
      help="default by shots: 50 (1), 100 (2-4), 200 (8-16); imagenet: 50 (CoOp's configs)")
    a("--coop-lr", type=number_type(float, 0, low_open=True), default=0.002)
    a("--coop-batch", type=number_type(int, 1), default=32)
    return p


def resolve_defaults(args):
    """Defaults that depend on other flags: the budget by shots, the official per-dataset settings
    where the dataset is one of the paper's (else the row most of them share), workers by device.
    Returns a resolved copy of the flags."""
    args = argparse.Namespace(**vars(args))
    args.dataset = data.dataset_name(args)
    if args.shots is None and not args.labels:
        args.shots = 16
    if args.budget is None and args.shots:  # whole generations of --popsize (--labels: with_shot_defaults)
        args.budget = max(budget_for(args.shots, args.dataset) // args.popsize, 1) * args.popsize
    row = dict(zip(SETTING_FLAGS, SETTINGS.get(args.dataset.lower(), DEFAULT_SETTINGS)))
    row["bound"] = row["bound"] or 0.0
    for k, v in row.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.aug is None:  # the stand-in reads 32-px digits: crops of 50-100% take its zero-shot 78% -> 37%
        args.aug = "none" if args.dataset.lower() == "digits" else \
            "inception" if args.dataset.lower() == "imagenet" else "crop"
    if args.hidden is None:
        args.hidden = 512 if args.dataset.lower() == "imagenet" else 256
    if args.workers is None:
        args.workers = train.default_workers(args.device)
    return args


def with_shot_defaults(args, labels, task):
    """The defaults that follow the shot count (the budget, CoOp's epochs), for labelled images
    from a file: by their mean number per class, rounded (at least 1)."""
    args = argparse.Namespace(**vars(args))
    shots = max(1, round(len(labels) / len(task.classnames)))
    if args.budget is None:
        args.budget = max(budget_for(shots, args.dataset) // args.popsize, 1) * args.popsize
    args.coop_epochs = args.coop_epochs or coop_epochs_for(shots, args.dataset)
    return args


def run_summary(m):
    acc = next((m[k] for k in ("craft_acc", "bbt_acc", "mlp_acc", "coop_acc", "probe_acc") if k in m), None)
    return {"shots": m["shots"], "zero-shot": m["zero_shot_acc"], "p0": m["p0_acc"], "acc": acc,
            "prompt queries": m["queries"]["prompts"], "images": m["queries"]["images"],
            "train s": m["time_s"].get("train"), "time s": m["time_s"]["total"]}


def main(argv=None):
    args = parser().parse_args(argv)
    if args.table:
        methods = ("craft", "bbt", "mlp", "coop", "probe")  # a run's "method" in metrics.json
        return runs.run_cli(lambda: runs.table(runs.finished_runs(args.table, methods), run_summary))
    return runs.run_cli(lambda: end_to_end(resolve_defaults(args)),
                        runs.saved_in(args.out, "the finished stages and the last checkpoint"), errors=data.USER_ERRORS)


if __name__ == "__main__":
    main()
