"""
Use a finished run, of any of the three CLIs (coft.py, craft.py, vecaf.py): its final classifier
in your own code, and new images classified by it.

    python deploy.py RUN IMAGES...              one CSV line per image: path, class, probability
    python deploy.py RUN IMAGES... --topk 5 --csv predictions.csv

In your own code (a plain nn.Module: no argparse, run folder or torchrun in the way):

    import deploy, imagefiles
    model, classnames, transform = deploy.load("runs/dtd")
    x = torch.stack([transform(imagefiles.load_image(p)) for p in paths])   # [B, 3, R, R]
    probs = model(x).softmax(-1)                                     # [B, C]

imagefiles.load_image reads a file as a viewer shows it (EXIF orientation, 16-bit, transparency:
imagefiles.decode_image), as the CLI does; Image.open(p).convert("RGB") would not.

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
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import torch

import clip_model
import coft
import craft
import data
import imagefiles
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


def finished_config(out):
    """A finished run folder's config.json ({"config", "how"}), else one line saying what the folder is."""
    if not (out / "metrics.json").exists():
        raise RunError(f"{out} holds no finished run (no metrics.json): finish it with its command and --resume"
                       if (out / "config.json").exists() else f"{out} is not a run folder (no config.json)")
    return runs.read_config(out)


def rebuild(run_dir, device="cpu", clip=None, clip_act=None):
    """load(), and the backbone CLIP the classifier was built on (for export)."""
    out = Path(run_dir)
    saved = finished_config(out)
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
    """Files and folders -> (image paths, the files of folders that were passed over: not images
    by their extension): a folder lists as --images does (imagefiles.list_images: recursively, sorted,
    hidden files left out, links followed, each file once); a file given by name is taken as it
    is. A missing path or a folder without images is one line; what a folder holds that cannot be
    read (a folder without permission, a link to nothing) is warned about, the rest classified."""
    found, other, seen = [], [], {}
    for p in paths:
        if os.path.isdir(p):
            listing = imagefiles.list_images(p, seen)
            if not listing.files and not listing.problems:
                raise RunError(f"{p} holds no images (looked for {' '.join(imagefiles.IMAGE_EXTENSIONS)} in it and "
                               f"below)")
            for path, why in listing.problems:
                print(f"warning: {path}: {why}", file=sys.stderr, flush=True)
            found += [os.path.normpath(f) for f in listing.files]  # './a.png' as 'a.png'
            other += listing.others
        elif os.path.isfile(p):
            key = imagefiles.identity(os.stat(p))
            if key not in seen:
                seen[key] = p
                found.append(p)
        else:
            raise RunError(f"{p}: no such file or folder")
    return [str(f) for f in found], other


class Images(torch.utils.data.Dataset):
    """(index, transformed image or None, error line or None) per path: an unreadable file is
    reported, not fatal. New images are read as a viewer shows them, EXIF orientation included
    (imagefiles.decode_image), whatever data the run was trained on."""

    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return i, self.transform(imagefiles.decode_image(self.paths[i], exif_orientation=True)), None
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


PREDICTIONS_HEADER = ("path", "class", "probability")


def is_predictions_csv(path):
    """Whether a file is a CSV that `predict` wrote (its header), which --csv may overwrite, unlike
    any other file (a labels file, a run's pseudo_labels.csv)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return tuple(header[:3]) == PREDICTIONS_HEADER


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
    if csv_path is not None and Path(csv_path).exists() and not is_predictions_csv(csv_path):
        raise RunError(f"--csv {csv_path} exists and is not a CSV of this command's predictions (its first line is not "
                       f"{','.join(PREDICTIONS_HEADER)}...): give a new file name; only such a CSV is overwritten")
    if other:
        print(f"note: not images by their extension, so left out: {imagefiles.left_out(other)} in the folders given",
              file=sys.stderr, flush=True)
    device = runs.check_device(str(device))
    model, classnames, transform = load(run_dir, device, clip, clip_act)
    topk = min(topk, len(classnames))
    header = list(PREDICTIONS_HEADER) + [f"{c}_{r}" for r in range(2, topk + 1)
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
        if failed == len(files):  # nothing classified is a failure, not "0 images classified"
            raise RunError(f"{'the image file' if len(files) == 1 else f'none of the {len(files)} image files'} "
                           f"could {'not ' if len(files) == 1 else ''}be read (named above): nothing was classified")
    finally:  # the CSV appears whole or not at all
        if csv_path is not None:
            sink.close()
            try:
                if sys.exc_info()[0] is None:
                    os.replace(sink.name, csv_path)
            finally:
                Path(sink.name).unlink(missing_ok=True)
    print(f"{runs.counted(len(files) - failed, 'image')} classified" + (f" to {csv_path}" if csv_path else "") +
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
    saved instead. Beside the files, export.json names the run they came from (check_export_folder).
    Returns the files written."""
    out = Path(folder)
    identity = check_export_folder(out, run_dir)  # said before the model is rebuilt
    model, classnames, _, backbone = rebuild(run_dir, "cpu", clip, clip_act)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, craft.DeployedClassifier):
        path = out / "craft_classifier.pt"
        write_manifest(out, identity, [path])
        runs.atomic_save({"text_features": model.t, "scale": model.scale, "classnames": classnames,
                          "refiner": None if model.refiner is None else model.refiner.state_dict()}, path)
        print(f"CraFT tunes no CLIP weight (the CLIP is a black box), so there is no fine-tuned CLIP to export; its "
              f"classifier is in {path}: logits = l + refiner(l), l = scale * cos(image feature, text_features)")
        return [path]
    base = backbone.state_dict()
    branches = list(model.branches) if isinstance(model, coft.Ensemble) else [model]
    names = [f"branch{a}" if len(branches) > 1 else "model" for a in range(1, len(branches) + 1)]
    extras = [{k: getattr(b, k) for k in ("vpt", "adapter") if getattr(b, k, None) is not None} for b in branches]
    beside = [out / f"{name}_{'_'.join(extra)}.pt" if extra else None for name, extra in zip(names, extras)]
    write_manifest(out, identity, [f for name, side in zip(names, beside)
                                   for f in (out / f"{name}.pt", out / f"{name}_head.pt", side) if f is not None])
    written = []
    for name, branch, extra, side in zip(names, branches, extras, beside):
        state = {**base, **{f"visual.{k}": v for k, v in branch.visual.state_dict().items()}}
        runs.atomic_save(state, out / f"{name}.pt")
        runs.atomic_save({"weight": branch.head.weight.detach(), "bias": branch.head.bias.detach(),
                          "classnames": classnames}, out / f"{name}_head.pt")
        written += [out / f"{name}.pt", out / f"{name}_head.pt"]
        if extra:
            runs.atomic_save({k: v.detach() if torch.is_tensor(v) else v.state_dict() for k, v in extra.items()}, side)
            written.append(side)
            print(f"note: {name} was fine-tuned with Phase I's {' and '.join(extra)}, which the OpenAI layout has no "
                  f"place for: saved beside, in {written[-1]}; the exported tower alone gives other features",
                  flush=True)
    if len(branches) > 1:
        print(f"the run's classifier is the ensemble of its {len(branches)} branches: the mean of their softmax "
              f"outputs (each branch: logits = head(normalised image feature))", flush=True)
    print(f"wrote {', '.join(str(w) for w in written)} (and {EXPORT_MANIFEST}: the run they came from)", flush=True)
    return written


EXPORT_MANIFEST = "export.json"  # in an export folder: the run its files came from
# every file name an export writes: an export folder without a manifest that holds one of these is refused
EXPORTED = re.compile(r"(model|branch\d+)(_head|_vpt|_adapter|_vpt_adapter)?\.pt|craft_classifier\.pt")


def run_identity(run_dir):
    """A finished run as an export's manifest names it: its folder (resolved) and its config's digest."""
    config = finished_config(Path(run_dir))["config"]
    return {"run": str(Path(run_dir).resolve()),
            "config": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]}


def check_export_folder(out, run_dir):
    """--export FOLDER before the model is rebuilt: a folder, new or holding no other run's export.
    A folder whose export.json names this run (its folder and config) takes the re-export; one whose
    manifest names another run, or that holds an export's file names without a manifest, is refused
    in one line, so no export is overwritten without a word. Returns this run's identity."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--export {out} is a file: give a folder (it is created if missing)")
    identity = run_identity(run_dir)
    manifest = out / EXPORT_MANIFEST
    if manifest.exists():
        try:
            saved = json.loads(manifest.read_text())
            saved = {k: saved[k] for k in identity}
        except (OSError, ValueError, TypeError, KeyError):
            raise RunError(f"--export {out}: its {EXPORT_MANIFEST} is damaged, so which run's export the folder "
                           f"holds is unknown: give another folder") from None
        if saved != identity:
            same = f"an earlier run in {saved['run']}, of other settings" if saved["run"] == identity["run"] \
                else saved["run"]
            raise RunError(f"--export {out} holds the export of another run ({same}): give another folder, or move "
                           f"that export away first")
    elif out.is_dir():
        clash = sorted(f.name for f in out.iterdir() if EXPORTED.fullmatch(f.name))
        if clash:
            raise RunError(f"--export {out} already holds {clash[0]}, and no {EXPORT_MANIFEST} says which run it is "
                           f"from: give another folder, or move the file away first")
    return identity


def write_manifest(out, identity, files):
    """export.json: the run the export's files came from (check_export_folder reads it), written
    before them, so that a re-export of the run after an interrupted export is not refused."""
    runs.write_json({**identity, "files": [Path(f).name for f in files]}, out / EXPORT_MANIFEST)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a finished run folder (any CLI's --out)")
    p.add_argument("images", nargs="*", help="image files and folders (searched recursively)")
    p.add_argument("--export", default=None, metavar="FOLDER", help="write the fine-tuned CLIP (OpenAI layout) and "
                                                                   "its head to FOLDER instead of classifying (a "
                                                                   "folder holding another run's export is refused)")
    p.add_argument("--topk", type=runs.number_type(int, 1), default=1, help="classes per image (default 1)")
    p.add_argument("--csv", default=None, help="write the CSV here (default: stdout); an existing file only if it "
                                               "is an earlier predictions CSV")
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
