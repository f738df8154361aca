"""Tests of bench.py: every section prints its figures on tiny models (seconds, no timing asserted)."""
import re

import pytest

import bench
import clip_model as cm

TINY = ["--models", "tiny-vit,tiny-rn", "--batch", "2", "--prompts", "4", "--classes", "3", "--images", "4",
        "--steps", "1", "--device", "cpu"]


def test_bench_prints_every_section_and_stage(capsys):
    bench.main(["--sections", "towers,coft", *TINY])
    out = capsys.readouterr().out
    for stage in ("image tower fwd+bwd", "text tower fwd+bwd up to EOT", "text tower fwd+bwd at 77 tokens",
                  "(a) image tower", "(b) Phase-I step, C=3", "at full length", "shared prefix", "losses", "optimizer",
                  "(c) Phase-II step, batch 4 + momentum", "(d) generation pass"):
        for model in ("tiny-vit", "tiny-rn"):  # once per model
            assert re.search(rf"{model}\S* .*{re.escape(stage)}", out), (model, stage)
    assert "images/s" in out and "prompts/s" in out and "MiB (RSS)" in out and ", fp32 (autocast off)," in out


def test_bench_compares_precisions_side_by_side(capsys):
    bench.main(["--sections", "towers", *TINY, "--precision", "fp32,bf16"])
    out = capsys.readouterr().out
    assert ", fp32 (autocast off)," in out and ", bf16 (autocast bfloat16)," in out
    table = out.split("time per step: fp32 vs bf16")[1].splitlines()[1:]
    assert len(table) == 6 and all(line.count(" ms (x") == 2 and "(x1.00)" in line for line in table)


def test_bench_refuses_unknown_sections_models_and_cpu_fp16(capsys):
    for argv in (["--sections", "towrs"], ["--models", "ViT-Z/1"], ["--precision", "fp16", "--device", "cpu"]):
        with pytest.raises(SystemExit):
            bench.main(argv)
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1


def test_bench_reference_side_by_side(capsys):
    pytest.importorskip("open_clip")
    bench.main(["--sections", "ref", "--models", "tiny-vit", "--batch", "2", "--classes", "3", "--steps", "1",
                "--device", "cpu"])
    out = capsys.readouterr().out
    assert "open_clip" in out
    diff = float(re.search(r"max feature difference ([0-9.e+-]+)", out).group(1))
    assert diff < 1e-4  # both sides encode the same prompts to the same features


def test_vit_flops_known_value():
    # ViT-B/16 at 224px, counted by hand: 12 blocks of 197 tokens, 768 wide (QKV, output, MLP and attention
    # products) plus the patch embedding, ~17.6 G multiply-adds = ~35.1 GFLOPs forward, without the projection
    assert bench.vit_flops(cm.CONFIGS["ViT-B/16"]) / 1e9 == pytest.approx(35.1, rel=0.02)


def test_bench_craft_generation_official_vs_ours(capsys):
    """The two ways of evaluating a generation compute the same fitnesses; the memory lines print."""
    bench.main(["--sections", "craft", "--models", "tiny-vit", "--classes", "3", "--steps", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "generation, official loop (77 tokens; 2 of 40 timed)" in out and re.search(r"ours \(x[0-9.]+ faster\)", out)
    assert float(re.search(r"fitness difference official vs ours: ([0-9.e+-]+)", out).group(1)) < 1e-4
    assert "deployer keeps: CraFT p 256 + refiner" in out
    box, user, coop = map(float, re.search(r"black box .*\) ([0-9.]+) MiB, CraFT's user .*\) ([0-9.]+) MiB; "
                                           r"white-box CoOp ([0-9.]+) MiB", out).groups())
    assert 0 < user < coop and box > 0  # the user's refiner step is far lighter than backprop through a tower


def test_bench_vecaf_selection_ours_vs_official(capsys):
    """Both nearest-unique ways pick for every centroid (mostly the same samples) and the memory lines print."""
    bench.main(["--sections", "vecaf", "--pool", "3000", "--centroids", "40", "--select-batch", "1000", "--steps", "1",
                "--device", "cpu"])
    out = capsys.readouterr().out
    for line in ("centroid step, mini-batch of 1000 (ours)", "centroid step, whole pool (official)",
                 "ensemble: match and average 3 selectors (Hungarian)", "chunked rounds (ours)",
                 "dense sort in index order (official"):
        assert line in out, line
    assert float(re.search(r"the same pick for ([0-9.]+)% of the centroids", out).group(1)) >= 90


def test_bench_ddp_scaling_inputs_and_estimate(capsys):
    """The all-reduce is timed between 2 real gloo processes on a buffer the size of the model's
    trainable parameters (the gradient DDP sends): for tiny-vit with 1000 classes, counted here."""
    bench.main(["--sections", "ddp", "--models", "tiny-vit", "--batch", "4", "--steps", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    ft = cm.ImageClassifier(cm.CLIP(cm.CONFIGS["tiny-vit"]).visual, 1000)
    mib = sum(p.numel() for p in ft.parameters()) * 4 / 2 ** 20
    assert f"all-reduce of its gradient ({mib:.0f} MiB fp32), 2 processes, gloo" in out
    assert [f"{n} processes, global batch 4 ({4 / n:g} each)" in out for n in (2, 4, 8)] == [True] * 3


def test_bench_label_steps_blockwise_beside_the_full_matrices(capsys):
    """Section labels: coft.py's label steps and the full N x C matrices of before, each in its own
    process, at two pool sizes: time and peak memory printed, and the same picks and figures."""
    bench.main(["--sections", "labels", "--label-pool", "5000", "--reference-pool", "3000", "--device", "cpu"])
    out = capsys.readouterr().out
    for n in (3000, 5000):
        for way in ("N x C matrices (before)", "blocks of rows (coft.py)"):
            assert re.search(rf"N = +{n}, {re.escape(way)} +[\d.]+ s  peak RSS +[\d.]+ GiB", out), (n, way)
        assert f"N = {n}: the two ways give the same seed set, clean sets" in out


def test_bench_pool_first_repeat_and_changed_passes(capsys):
    """Section pool: the first pass reads every file, a repeat reads none but the files written within
    the last moments (imagefiles.SETTLE_NS), the pass after 1 % changed reads those again."""
    bench.pool_costs(300, fresh=False)  # as --sections pool --pool-files 300, without its fresh processes
    out = capsys.readouterr().out
    reads = [int(n) for n in re.findall(r"s a file\), +(\d+) files read", out)]
    assert "300 PNG files in 1 folders" in out and len(reads) == 3 and reads[0] == 300
    assert reads[1] <= 300 and reads[2] >= 3  # the repeat may read again what was written within 2 s of it
    assert "at ImageNet's 1281167 files" in out
def test_bench_decode_costs_and_what_each_check_refuses(capsys):
    """Section decode prints each check's cost on generated ImageNet-size JPEGs, its extrapolation
    to 1.28 M images, and which problem files each check refuses: a header read passes truncated
    files that imagefiles.image_problem (the check every pool image gets) refuses, and image_problem
    refuses no usable file."""
    bench.main(["--sections", "decode", "--decode-images", "3", "--decode-threads", "2", "--device", "cpu"])
    out = capsys.readouterr().out
    for what in ("header (Image.open)", "full decode (Image.open + load)", "draft decode (JPEG at 1/8 scale)",
                 "imagefiles.image_problem (the check)", "2 threads", "16 threads on 16 free cores",
                 "sha256 of the bytes"):
        assert re.search(rf"{re.escape(what)} .* ms/image .* images/s   1\.28 M images: +[\d.]+ min", out), what
    table = dict(re.findall(r"^    (.+?) {2,}(\w+ / \w+ / \w+ / \w+)", out, re.M))
    assert len(table) == 13, table
    for kind, marks in table.items():
        header, full, draft, check = marks.split(" / ")
        assert check == ("passes" if "usable" in kind else "refused"), kind
    assert table["truncated JPEG"].startswith("passes / refused / refused")  # the header alone misses it


def test_bench_page_opens_a_large_pool_beside_a_small_one(capsys):
    """Section page: a generated run of N and one of 300 images, each opened as page.py review opens
    it, with the same labels file size; each line says the time to write the index and to open it,
    and every answer of the labels file is found in both pools."""
    bench.page_costs(5000, fresh=False)  # as --sections page --page-pool 5000, without its fresh processes
    out = capsys.readouterr().out
    for n in (300, 5000):
        assert re.search(rf"N = +{n}: the run writes review.pt \([\d.]+ MiB\) in +[\d.]+ s; the page opens in +[\d.]+ "
                         rf"ms \(300 answers found\)", out), n
    assert re.search(r"opening at N = 5000 takes x[\d.]+ the time at N = 300", out)
