"""The real-size smoke (smoke.py) as a test: random full-size ViT-B/16 and RN50 checkpoints in the
OpenAI layout, 224-px images, the 77-token context and the paper's Phase-I capacity, every method
end to end. Minutes on 2 CPU cores, so left out of the default suite: `pytest -m realsize` (.ci/run
runs it). The GPU check's CPU parts, on tiny models, run in the default suite."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import smoke


def config(run):
    return json.loads((run / "config.json").read_text())["config"]


@pytest.mark.realsize
def test_every_method_runs_end_to_end_at_real_size(tmp_path, capsys):
    """Every part exits 0, and each ran at the size it claims: CoFT+'s Phase I on ViT-B/16 holds
    20 deep VPT tokens in each of the 12 blocks (768 wide) and 16 context tokens of 512, its
    Phase II a full ViT-B/16 image tower; CraFT on RN50 searched one generation of 40 prompts;
    VeCAF selected 3 images per loop. Every stage recorded its time and peak memory."""
    smoke.main(["--device", "cpu", "--out", str(tmp_path)])
    table = capsys.readouterr().out
    print(table)  # the time and peak memory of every stage, for the CI log
    vit_run = tmp_path / "coftplus-vit"
    c = config(vit_run)
    assert (c["M"], c["vpt_tokens"], c["vpt"], c["rounds"], c["contrast"]) == (16, 20, "deep", 2, True)
    phase1 = torch.load(vit_run / "stages" / "phase1_round2_model1.pt", weights_only=True)["model"]
    vpt = next(v for k, v in phase1.items() if "vpt" in k)
    ctx = next(v for k, v in phase1.items() if "ctx" in k)
    assert tuple(vpt.shape) == (12, 20, 768) and ctx.shape[-1] == 512 and ctx.shape[-2] == 16
    phase2 = torch.load(vit_run / "stages" / "branch2.pt", weights_only=True)["model"]
    assert sum(v.numel() for k, v in phase2.items() if "visual" in k) > 80e6  # ViT-B/16's image tower
    for run, stages in ((vit_run, ("zero_shot", "phase1", "filter", "phase2")),
                        (tmp_path / "coftplus-rn", ("zero_shot", "phase1", "filter", "phase2")),
                        (tmp_path / "craft-vit", ("train",)), (tmp_path / "craft-rn", ("train",))):
        m = json.loads((run / "metrics.json").read_text())
        assert all(m["time_s"][s] > 0 and m["peak_mib"][s] > 0 for s in stages), (run, m["peak_mib"])
    craft_rn = json.loads((tmp_path / "craft-rn" / "metrics.json").read_text())
    assert craft_rn["queries"]["prompts"] - craft_rn["budget"] >= 2 and craft_rn["budget"] == 40
    vecaf_vit = json.loads((tmp_path / "vecaf-vit" / "metrics.json").read_text())
    assert [loop["selected"] for loop in vecaf_vit["loops"]] == [3, 6]
    assert all(loop["peak_mib"] > 0 for loop in vecaf_vit["loops"])
    for part in ("CoFT+ ViT", "CoFT+ RN50", "CraFT ViT", "CraFT RN50", "VeCAF ViT"):
        assert f"{part}: ok" in table


def test_the_gpu_check_refuses_in_one_line_without_a_gpu(tmp_path):
    """`bash run.sh gpu-check` on a machine without a GPU: one line that says so and what to run
    instead, before anything is written."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    env = {**os.environ, "OUT": str(tmp_path / "runs"),
           "PATH": os.pathsep.join((os.path.dirname(sys.executable), os.environ.get("PATH", "")))}
    r = subprocess.run(["bash", str(Path(smoke.__file__).parent / "run.sh"), "gpu-check"], capture_output=True,
                       text=True, env=env)
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(errors) == 1 and "needs a CUDA GPU" in errors[0], r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "runs").exists()


def test_the_gpu_checks_cpu_parts_run_on_tiny_models(tmp_path, capsys):
    """The GPU check's parts a CPU can run (CoFT+ at the Phase-I capacity the model holds,
    --grad-checkpointing, torchrun with one process on gloo, CraFT, VeCAF, bench.py), on tiny
    models: each exits 0 and its stages are in the table."""
    smoke.main(["--gpu", "--device", "cpu", "--size", "tiny", "--out", str(tmp_path)])
    table = capsys.readouterr().out
    for part in ("CoFT+ ViT, paper capacity", "CoFT --grad-checkpointing", "torchrun 1 process (gloo), CoFT+",
                 "CraFT RN50", "VeCAF ViT", "bench.py towers, batch 2"):
        assert f"{part}: ok" in table, table
    assert "CoFT fp16" not in table  # a GPU-only part is left out on a CPU
    for run in ("coftplus", "checkpointing", "torchrun"):  # each at the capacity the tiny context holds
        metrics = json.loads((tmp_path / run / "metrics.json").read_text())
        assert config(tmp_path / run)["M"] == 4 and "phase2" in metrics["peak_mib"]
    assert "image tower fwd+bwd" in table  # bench.py's figures are in the output
