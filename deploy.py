"""
Use a finished run, of any of the three CLIs (coft.py, craft.py, vecaf.py): its final classifier
in your own code, and new images classified by it.

    python deploy.py RUN IMAGES...              one CSV line per image: path, class, probability
    python deploy.py RUN IMAGES... --topk 5 --csv predictions.csv

In your own code (a plain nn.Module: no argparse, run folder or torchrun in the way):

    import deploy
    model, classnames, transform = deploy.load("runs/dtd")
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])   # [B, 3, R, R]
    probs = model(x).softmax(-1)                                               # [B, C]

The classifier is exactly the one the run reports: CoFT / CoFT+ the ensemble of its Phase-II
branches (Sec. 3.2.2), top-K / labelled shots their model, self-training its last round; CraFT the
final prompt and the refiner, BBT the prompt, CoOp the learned context; VeCAF the model of its last
loop. It is rebuilt from the run's saved stages on the backbone the run recorded (checked by its
sha256), with the run's class names and test transform.
"""
import signal
import sys

if __name__ == "__main__":  # Ctrl-C while torch loads exits quietly (130); from main on, runs.run_cli speaks
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))

import argparse
import csv
import json
import os
import tempfile
from pathlib import Path

import torch

import clip_model
import coft
import craft
import data
import runs
import standin
import train
import vecaf
from train import RunError


def cli_of(config):
    """Which CLI made a run, from its settings: CraFT's have an intrinsic dimension, VeCAF's an
    evaluation grid (both CLIs also have a "probe" method, so the method alone cannot tell)."""
    return "craft" if "intrinsic_dim" in config else "vecaf" if "eval_grid" in config else "coft"


def load(run_dir, device="cpu", clip=None, clip_act=None):
    """A finished run folder -> (model, classnames, transform): `model` maps a batch of images
    [B, 3, R, R] (made by `transform` from PIL images) to logits [B, C], in eval mode on `device`.
    `clip` (and `clip_act`): the backbone's checkpoint where the run's own --clip value no longer
    finds it (a moved file); it must be the same weights (sha256)."""
    return rebuild(run_dir, device, clip, clip_act)[:3]


def rebuild(run_dir, device="cpu", clip=None, clip_act=None):
    """load(), and the backbone CLIP the classifier was built on (for export)."""
    out = Path(run_dir)
    if not (out / "metrics.json").exists():
        raise RunError(f"{out} holds no finished run (no metrics.json): finish it with its command and --resume"
                       if (out / "config.json").exists() else f"{out} is not a run folder (no config.json)")
    saved = runs.read_config(out)
    try:
        metrics = json.loads((out / "metrics.json").read_text())
        if not isinstance(metrics, dict) or "clip" not in metrics or "method" not in metrics:
            raise ValueError("no run's metrics")
    except (OSError, ValueError) as e:
        raise RunError(f"{out / 'metrics.json'} is damaged or not from a finished run of this code "
                       f"({type(e).__name__}: {str(e)[:60]}): rerun the run with --resume") from None
    config, how = saved["config"], saved.get("how", {})
    name, act = clip or metrics["clip"], clip_act or how.get("clip_act")
    if standin.backbone_id("--clip", name, act) != config["clip"]:
        raise RunError(f"{name} is not the backbone {out} was made with ({config['clip']}): give that checkpoint "
                       f"(--clip / clip=)")
    if config.get("fft_backbone"):
        raise RunError(f"{out} fine-tuned another backbone in Phase II (--fft-backbone): not supported here yet")
    classnames = metrics.get("classnames") or data.load_task(config["dataset"], how.get("data_root")).classnames
    device = runs.check_device(str(device))
    backbone, _ = standin.load("--clip", name, act, "cpu")
    backbone.requires_grad_(False)
    classifier = {"coft": coft_classifier, "craft": craft_classifier, "vecaf": vecaf_classifier}[cli_of(config)](
        out, backbone, config, metrics, classnames)
    return classifier.to(device).eval(), classnames, clip_model.preprocess_of(backbone.visual), backbone


def coft_classifier(out, clip, config, metrics, classnames):
    tags = coft.final_stages(metrics, config)
    if tags is None:
        raise RunError(f"{out} is a {metrics['method']} run without a trained classifier (the linear probe keeps "
                       f"no weights; --phase 1 stops before Phase II)")
    branches = [coft.branch_from_stage(runs.read_torch(runs.stage_path(out, t), runs.REDO_STAGE)["model"], clip.visual,
                                       len(classnames)) for t in tags]
    return coft.Ensemble(branches) if len(branches) > 1 else branches[0]


def craft_classifier(out, clip, config, metrics, classnames):
    model = craft.final_classifier(out, clip, config, metrics, classnames)
    if model is None:
        raise RunError(f"{out} is a linear-probe run, which keeps no weights")
    return model


def vecaf_classifier(out, clip, config, metrics, classnames):
    return vecaf.final_classifier(out, clip, metrics, classnames)


# -----------------------------------------------------------------------------
# Classifying image files


def image_files(paths):
    """Files and folders (searched recursively, sorted) -> (image paths, the files of folders that
    were passed over: not images by their extension); a missing path or a folder without images is
    one line."""
    found, other = [], []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file())
            images = [f for f in files if f.suffix.lower() in data.IMAGE_EXTENSIONS]
            if not images:
                raise RunError(f"{p} holds no images (looked for {' '.join(data.IMAGE_EXTENSIONS)} in it and below)")
            found += images
            other += [f for f in files if f.suffix.lower() not in data.IMAGE_EXTENSIONS]
        elif p.is_file():
            found.append(p)
        else:
            raise RunError(f"{p}: no such file or folder")
    return [str(f) for f in found], other


class Images(torch.utils.data.Dataset):
    """(index, transformed image or None, error line or None) per path: an unreadable file is
    reported, not fatal."""

    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return i, self.transform(data.load_image(self.paths[i])), None
        except data.DataError as e:
            return i, None, str(e)


def classify(model, paths, transform, device, topk=1, batch=64, workers=0, precision="auto"):
    """Yield (path, [(class index, probability)] * topk, error) for every path, in order, in
    batches under the device's autocast; an unreadable image yields its error line instead."""
    amp = train.amp_settings(device, precision)[0]
    loader = torch.utils.data.DataLoader(Images(paths, transform), batch_size=batch, num_workers=workers,
                                         collate_fn=list)
    with torch.no_grad():
        for items in loader:
            good, top = [(i, x) for i, x, err in items if err is None], {}
            if good:
                with torch.autocast(**amp):
                    logits = model(torch.stack([x for _, x in good]).to(device))
                p, k = logits.float().softmax(-1).topk(min(topk, logits.shape[-1]), dim=-1)  # [B, topk]
                top = {i: list(zip(k[j].tolist(), p[j].tolist())) for j, (i, _) in enumerate(good)}
            for i, _, err in items:
                yield paths[i], top.get(i) if err is None else None, err


def predict(run_dir, paths, topk=1, csv_path=None, device="cpu", batch=64, workers=0, clip=None, clip_act=None):
    """The CLI: every image's top classes as CSV (path, class, probability[, class_2, probability_2,
    ...]; text cells data.csv_text guarded, so a spreadsheet runs none, and the file reads back as
    --labels) to csv_path (written whole at the end) or stdout; progress on stderr for large sets;
    unreadable images named on stderr and counted, the others classified."""
    files, other = image_files(paths)  # the cheap checks first
    if csv_path is not None and not Path(csv_path).resolve().parent.is_dir():
        raise RunError(f"--csv {csv_path}: its folder does not exist")
    if csv_path is not None and Path(csv_path).is_dir():
        raise RunError(f"--csv {csv_path} is a folder: give the path of the CSV file to write")
    if csv_path is not None and any(runs.same_file(csv_path, f) for f in files
                                    if Path(f).name == Path(csv_path).name or Path(f).is_symlink()):
        raise RunError(f"--csv {csv_path} is one of the images to classify: give another path for the CSV file")
    if other:
        kinds = sorted({f.suffix.lower() or "(none)" for f in other})
        print(f"note: {len(other)} file(s) in the folders given are not images by their extension and are left out "
              f"({', '.join(kinds[:5])}{', ...' if len(kinds) > 5 else ''})", file=sys.stderr, flush=True)
    device = runs.check_device(str(device))
    model, classnames, transform = load(run_dir, device, clip, clip_act)
    topk = min(topk, len(classnames))
    header = ["path", "class", "probability"] + [f"{c}_{r}" for r in range(2, topk + 1)
                                                 for c in ("class", "probability")]
    sink = sys.stdout if csv_path is None else tempfile.NamedTemporaryFile(
        "w", newline="", dir=Path(csv_path).resolve().parent, suffix=".part", delete=False)
    writer = csv.writer(sink)
    writer.writerow(header)
    failed = 0
    try:
        for n, (path, top, err) in enumerate(classify(model, files, transform, device, topk, batch, workers), 1):
            if err is not None:
                failed += 1
                print(f"warning: {err}", file=sys.stderr, flush=True)
            else:
                writer.writerow([data.csv_text(path)] + [v for k, p in top for v in (data.csv_text(classnames[k]),
                                                                                     f"{p:.4f}")])
            if len(files) >= 1000 and (n % (10 * batch) == 0 or n == len(files)):
                print(f"{n}/{len(files)} images", file=sys.stderr, flush=True)
        if failed == len(files):  # nothing classified is a failure, not "0 image(s) classified"
            raise RunError(f"none of the {len(files)} image file(s) could be read (named above): nothing was "
                           f"classified")
    finally:  # the CSV appears whole or not at all
        if csv_path is not None:
            sink.close()
            try:
                if sys.exc_info()[0] is None:
                    os.replace(sink.name, csv_path)
            finally:
                Path(sink.name).unlink(missing_ok=True)
    print(f"{len(files) - failed} image(s) classified" + (f" to {csv_path}" if csv_path else "") +
          (f"; {failed} could not be read (named above)" if failed else ""), file=sys.stderr, flush=True)
    return len(files) - failed, failed


# -----------------------------------------------------------------------------
# Export: the fine-tuned CLIP in the OpenAI layout


def export(run_dir, folder, clip=None, clip_act=None):
    """The fine-tuned CLIP of a run as whole checkpoints in the OpenAI key layout, which
    `--clip FILE --clip-act ACT` here, open_clip (`build_model_from_openai_state_dict`) and other
    CLIP code read: the text tower as it was, the image tower fine-tuned (CoFT: one file per
    Phase-II branch, its classifier being their ensemble; VeCAF: the last loop's), each with its
    linear head as a separate tensor file. What that layout cannot hold (Phase-I VPT tokens or an
    adapter carried into Phase II by --fft-init phase1) is saved beside it and said. CraFT tunes no
    CLIP weight: its classifier (class text features of the final prompt, scale, refiner) is
    saved instead. Returns the files written."""
    out = Path(folder)
    if out.exists() and not out.is_dir():  # said before the model is rebuilt
        raise RunError(f"--export {out} is a file: give a folder (it is created if missing)")
    model, classnames, _, backbone = rebuild(run_dir, "cpu", clip, clip_act)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, craft.DeployedClassifier):
        path = out / "craft_classifier.pt"
        runs.atomic_save({"text_features": model.t, "scale": model.scale, "classnames": classnames,
                          "refiner": None if model.refiner is None else model.refiner.state_dict()}, path)
        print(f"CraFT tunes no CLIP weight (the CLIP is a black box), so there is no fine-tuned CLIP to export; its "
              f"classifier is in {path}: logits = l + refiner(l), l = scale * cos(image feature, text_features)")
        return [path]
    base = backbone.state_dict()
    branches = list(model.branches) if isinstance(model, coft.Ensemble) else [model]
    written = []
    for a, branch in enumerate(branches, 1):
        name = f"branch{a}" if len(branches) > 1 else "model"
        state = {**base, **{f"visual.{k}": v for k, v in branch.visual.state_dict().items()}}
        runs.atomic_save(state, out / f"{name}.pt")
        runs.atomic_save({"weight": branch.head.weight.detach(), "bias": branch.head.bias.detach(),
                          "classnames": classnames}, out / f"{name}_head.pt")
        written += [out / f"{name}.pt", out / f"{name}_head.pt"]
        extra = {k: v for k, v in (("vpt", branch.vpt), ("adapter", branch.adapter)) if v is not None}
        if extra:
            runs.atomic_save({k: v.detach() if torch.is_tensor(v) else v.state_dict() for k, v in extra.items()},
                             out / f"{name}_{'_'.join(extra)}.pt")
            written.append(out / f"{name}_{'_'.join(extra)}.pt")
            print(f"note: {name} was fine-tuned with Phase I's {' and '.join(extra)}, which the OpenAI layout has no "
                  f"place for: saved beside, in {written[-1]}; the exported tower alone gives other features",
                  flush=True)
    if len(branches) > 1:
        print(f"the run's classifier is the ensemble of its {len(branches)} branches: the mean of their softmax "
              f"outputs (each branch: logits = head(normalised image feature))", flush=True)
    print(f"wrote {', '.join(str(w) for w in written)}", flush=True)
    return written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a finished run folder (any CLI's --out)")
    p.add_argument("images", nargs="*", help="image files and folders (searched recursively)")
    p.add_argument("--export", default=None, metavar="FOLDER", help="write the fine-tuned CLIP (OpenAI layout) and "
                                                                   "its head to FOLDER instead of classifying")
    p.add_argument("--topk", type=runs.number_type(int, 1), default=1, help="classes per image (default 1)")
    p.add_argument("--csv", default=None, help="write the CSV here (default: stdout)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=runs.number_type(int, 1), default=64)
    p.add_argument("--workers", type=runs.number_type(int, 0), default=0)
    p.add_argument("--clip", default=None, help="the run's backbone checkpoint, where its recorded path no longer "
                                                "finds it (the same weights: checked by sha256)")
    p.add_argument("--clip-act", default=None, choices=["quick_gelu", "gelu"], help="with --clip: its activation")
    args = p.parse_args(argv)
    if bool(args.images) == bool(args.export):
        p.error("give image files or folders to classify, or --export FOLDER (one of the two)")
    if args.export:
        return runs.run_cli(lambda: export(args.run, args.export, args.clip, args.clip_act), errors=data.USER_ERRORS)
    return runs.run_cli(lambda: predict(args.run, args.images, args.topk, args.csv, args.device, args.batch,
                                        args.workers, args.clip, args.clip_act), errors=data.USER_ERRORS)


if __name__ == "__main__":
    main()
