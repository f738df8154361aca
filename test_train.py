"""Tests of train.py: the training loop (schedule, clipping, non-finite stop) and the seeded loaders."""

import os

import pytest
import torch

import ddp
import runs
import train


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
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # no momentum, no weight decay
    history = train.fit(model, lambda mdl, b, _: {"loss": ((mdl.w * b[0][0]).sum(), 1)}, lambda e: [(x[None],) for x in g],
                        epochs=1, opt=opt, schedule=train.warmup_epochs_then_cosine(0), device=torch.device("cpu"),
                        seed=0, clip_grad=clip_grad, log_every=0)
    norms = history["grad_norm"]
    assert norms == pytest.approx([5.0, 0.5, 10.0])
    clipped = [x * min(1.0, clip_grad / x.norm()) if clip_grad else x for x in g]
    w = [torch.zeros(2), -clipped[0], -(clipped[0] + 0.75 * clipped[1])]  # the weights each step's loss sees
    expected = -(clipped[0] + 0.75 * clipped[1] + 0.25 * clipped[2])
    assert torch.allclose(model.w.detach(), expected, atol=1e-6)
    assert history["loss"] == pytest.approx([float(a @ b) for a, b in zip(w, g)])
    summary = train.grad_norm_summary(norms, clip_grad)
    assert summary["median_norm"] == pytest.approx(5.0) and summary["max_norm"] == pytest.approx(10.0)
    assert summary["clipped_fraction"] == pytest.approx(2 / 3 if clip_grad else 0.0) and summary["steps"] == 3


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

    def step(mdl, b, draws):  # finite during epoch 1, NaN at the 2nd step of epoch 2
        loss = mdl(b[0]).sum()
        return {"loss": (loss * float("nan") if step.calls == 5 else loss, 1)}
    step.calls = 0

    def counted(mdl, b, draws):
        step.calls += 1
        return step(mdl, b, draws)

    ckpt = tmp_path / "s.ckpt"
    with pytest.raises(train.RunError, match=r"stage x: non-finite loss \(loss nan, .* at step 5 of 6 \(epoch 2\).*"
                                             r"last good checkpoint is .*s.ckpt \(epoch 1\)"):
        train.fit(model, counted, lambda e: batches, epochs=2, opt=train.sgd(model, 0.1),
                  schedule=train.warmup_epochs_then_cosine(1), device=torch.device("cpu"), seed=0,
                  checkpoint=runs.RecordedFile(ckpt, None, False), tag="stage x", log_every=0)
    saved = torch.load(ckpt, weights_only=False)
    assert saved["epoch"] == 0 and torch.isfinite(saved["model"]["weight"]).all()
    assert torch.isfinite(model.weight).all()  # the NaN never reached the weights


def test_precision_settings():
    """auto is fp32 on a CPU (bf16 changes numbers, so it is asked for); fp16 needs a GPU; each
    setting gives the autocast arguments and scaler it names."""
    cpu = torch.device("cpu")
    assert train.resolve_precision(cpu, "auto") == "fp32"
    assert train.amp_settings(cpu, "auto") == (dict(device_type="cpu", enabled=False), None)
    assert train.amp_settings(cpu, "fp32") == (dict(device_type="cpu", enabled=False), None)
    assert train.amp_settings(cpu, "bf16") == (dict(device_type="cpu", dtype=torch.bfloat16), None)
    with pytest.raises(train.RunError, match="fp16 needs a GPU"):
        train.amp_settings(cpu, "fp16")
    with torch.autocast(**train.amp_settings(cpu, "bf16")[0]):
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.bfloat16


def test_imports_run_one_way():
    """clip_model and ddp import nothing from the project, train only ddp, runs only these two;
    imagefiles and checkpoints only clip_model, data only clip_model and imagefiles, llm only data
    and imagefiles, page only data, imagefiles and runs; no library imports a method (coft, craft, vecaf, bench), nor a method another
    method."""
    import ast
    from pathlib import Path
    root = Path(train.__file__).parent
    local = {p.stem for p in root.glob("*.py")}

    def imports(module):
        tree = ast.parse((root / f"{module}.py").read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        return names & local

    assert imports("clip_model") == imports("ddp") == set() and imports("train") == {"ddp"}
    assert imports("runs") == {"ddp", "train"}  # the data's and the backbone's errors: each CLI names them
    assert imports("imagefiles") == {"clip_model"} and imports("checkpoints") == {"clip_model"}
    assert imports("data") == {"clip_model", "imagefiles"}
    assert imports("standin") <= {"checkpoints", "clip_model", "data", "ddp", "runs", "train"}
    assert imports("llm") == {"data", "imagefiles"}
    assert imports("page") == {"data", "imagefiles", "runs"}  # the labelling page: a library VeCAF's CLI uses
    libraries = ("clip_model", "checkpoints", "imagefiles", "data", "standin", "train", "ddp", "runs", "llm", "page")
    assert not {"coft", "craft", "vecaf", "bench"} & set().union(*(imports(m) for m in libraries))
    methods = {"coft", "craft", "vecaf"}
    assert all(not (methods - {m}) & imports(m) for m in methods)  # a sibling method depends on no other


# the functions of each method file that may read the parsed flags: its CLI layer
CLI_LAYER = {
    "coft": {"end_to_end", "prepare", "run_config", "settings_of", "check_args", "check_labels", "check_fft_init",
             "check_prompt_flags", "resolve_defaults", "main"},
    "craft": {"end_to_end", "prepare", "check_args", "settings_of", "with_shot_defaults", "resolve_defaults", "main"},
    "vecaf": {"end_to_end", "prepare", "settings_of", "check_args", "resolve_task_defaults", "resolve_defaults", "main",
              "with_the_page"},
}


def test_only_the_cli_layer_reads_the_flags():
    """A method's stages take explicit values (its settings dataclasses, named arguments), so
    they can be called, and copied, without argparse: outside the CLI layer no function takes
    `args` or reads a name `args`."""
    import ast
    from pathlib import Path
    root = Path(train.__file__).parent
    for module, cli in CLI_LAYER.items():
        tree = ast.parse((root / f"{module}.py").read_text())
        for f in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name not in cli):
            reads = {n.id for n in ast.walk(f) if isinstance(n, ast.Name)} | {a.arg for a in ast.walk(f)
                                                                                 if isinstance(a, ast.arg)}
            assert "args" not in reads, f"{module}.{f.name} reads the flags"
        assert cli <= {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, module


@pytest.mark.parametrize("max_steps", [None, 5])
def test_fit_evaluates_at_the_steps_asked_ends_at_max_steps_and_resumes_to_the_same(tmp_path, max_steps):
    """3 epochs of 2 steps, evaluated every 3rd step and after the last; max_steps 5 cuts the last
    epoch after its first step and is the schedule's total. A run killed inside its first
    evaluation (second epoch) or its second (last epoch, cut short by max_steps) resumes to the
    uninterrupted history."""
    def make():
        torch.manual_seed(0)
        model = torch.nn.Linear(2, 1)
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    def loss(m, b, _):
        return {"loss": (m(b[0]).pow(2).mean(), len(b[0]))}
    batches = lambda e: [(torch.ones(3, 2) * (e + 1),), (torch.ones(3, 2) * (e + 2),)]  # noqa: E731
    totals, modes = set(), []

    def schedule(step, total, per_epoch):
        totals.add(total)
        return 1 - step / total  # linear to 0 at the end: the last step's lr shows the total

    def evaluate(m):
        modes.append(m.training)
        return m.weight.sum().item()

    def at(step, total):
        return step % 3 == 0 or step == total

    def fit(evaluate, checkpoint=None):
        model, opt = make()
        history = train.fit(model, loss, batches, epochs=3, opt=opt, schedule=schedule, device="cpu", seed=0,
                            log_every=0, checkpoint=checkpoint, evaluate=evaluate, evaluate_at=at, max_steps=max_steps)
        return history, opt.param_groups[0]["lr"]
    full, last_lr = fit(evaluate)
    steps = max_steps or 6
    assert len(full["loss"]) == steps and totals == {steps} and last_lr == 0.0
    assert [s for s, _ in full["evaluated"]] == ([3, 5] if max_steps else [3, 6]) and modes == [False] * 2
    for k in (1, 2):  # die in the k-th evaluation: in the second epoch, in the last (cut) one
        ckpt = tmp_path / f"c{k}.ckpt"
        calls = []

        def dies(m):
            calls.append(1)
            if len(calls) == k:
                raise KeyboardInterrupt
            return evaluate(m)
        with pytest.raises(KeyboardInterrupt):
            fit(dies, runs.RecordedFile(ckpt, {"r": 1}, False))
        assert fit(evaluate, runs.RecordedFile(ckpt, {"r": 1}, True))[0] == full


def test_shards_cover_the_range_in_order():
    for n, w in ((7, 2), (10, 3), (2, 4), (0, 2)):
        parts = [list(ddp.shard(n, r, w)) for r in range(w)]
        assert sum(parts, []) == list(range(n)) and max(map(len, parts)) - min(map(len, parts)) <= 1




def test_bf16_is_refused_on_a_cpu_that_emulates_it(tmp_path, monkeypatch):
    """The kernel's CPU flags decide: AVX512-BF16, AMX-BF16 or Arm's BF16 multiply bf16 natively;
    without any (AVX2 only) bf16 is refused in one line; where the flags cannot be read, allowed."""
    for flags, native in (("fpu avx2 avx512f avx512_bf16", True), ("fpu avx2 amx_bf16", True),
                          ("fp asimd bf16", True), ("fpu sse avx2 fma", False)):
        (tmp_path / "cpuinfo").write_text(f"processor : 0\nflags : {flags}\n")
        assert train.cpu_bf16(tmp_path / "cpuinfo") is native
    assert train.cpu_bf16(tmp_path / "missing") is None
    for native in (True, None):
        monkeypatch.setattr(train, "cpu_bf16", lambda: native)
        assert train.resolve_precision("cpu", "bf16") == "bf16"
    monkeypatch.setattr(train, "cpu_bf16", lambda: False)
    with pytest.raises(train.RunError, match="bf16 matrix products are emulated, 10-60x slower than fp32: use "
                                             "--precision fp32"):
        train.resolve_precision("cpu", "bf16")
    assert train.resolve_precision("cpu", "fp32") == "fp32"


STAGES = """
import json, torch, train
first = train.StageCost("cpu")
x = torch.ones(64 * 2 ** 20)  # 256 MiB, touched
x.add_(1)
held = first.peak_mib()
del x
second = train.StageCost("cpu")
metrics = {}
second.record(metrics, "stage")
print(json.dumps([held, second.peak_mib(), metrics]))
"""


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
def test_a_stages_peak_memory_counts_its_own_allocations_not_an_earlier_stages():
    """StageCost on a CPU, in a fresh process (a long-lived one reuses freed memory): a stage that
    holds 256 MiB peaks at least that high; the next stage, begun after it was freed, does not
    inherit that peak (VmHWM is reset at its start)."""
    import json
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", STAGES], capture_output=True, text=True, cwd=os.path.dirname(train.__file__))
    held, second, metrics = json.loads(r.stdout.strip().splitlines()[-1])
    assert held - second >= 200, (held, second)
    assert metrics["time_s"]["stage"] >= 0 and metrics["peak_mib"]["stage"] == pytest.approx(second, abs=64)
