"""Telemetry, the loss of accumulated micro-batches, TensorBoard/CSV and Lightning (issue 27, in part)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import _dist_worker as W  # noqa: E402  (every optimizer of nestopt.optim, by name)

from nestopt.guards import TrainingGuard  # noqa: E402
from nestopt.optim import Polyak  # noqa: E402


def _micro(t: int, k: int = 2):
    x, y = W.batch(t, 0, n=16 * k)
    return list(zip(x.chunk(k), y.chunk(k)))


# -- telemetry -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(W.MAKERS))
def test_every_optimizer_reports_its_telemetry_as_floats(name):
    net = W.model()
    opt = W.MAKERS[name](net, None)
    W.train(name, net, opt, 7, lambda t: W.batch(t, 0))
    tel = opt.telemetry()
    assert tel and all(isinstance(v, float) for v in tel.values())
    assert "lr" in tel or "lr/0" in tel
    if hasattr(opt, "counters"):
        assert tel["steps"] == float(opt.counters["steps"]) > 0
    own = {"polyak": "eta", "nested": "mult", "hypergradient": "scale"}
    for head, key in own.items():
        if name.startswith(head) and name != "polyak-group":
            assert tel[key] == pytest.approx({"eta": lambda: opt.param_groups[0]["polyak"]["eta"],
                                              "mult": lambda: opt.param_groups[0]["nested_mult"],
                                              "scale": lambda: opt.param_groups[0]["hd_scale"]}[key]())
    if name == "polyak-group":  # several groups: one value each
        assert {"eta/0", "eta/1", "lr/0", "lr/1"} <= set(tel)
    if name == "nested-hindsight":
        assert tel["hindsight_label"] in (0.1, 0.5, 1.0, 1.5, 2.0)


def test_a_guard_reports_its_rollbacks():
    net = W.model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    guard = TrainingGuard(net, opt)
    guard._event("rollback", "a test")
    tel = guard.telemetry()
    assert tel["guard/rollback"] == 1.0 and tel["guard/steps"] == 0.0


# -- the loss of an accumulated batch ------------------------------------------------------------
def _accumulated(opt_factory, observe: bool):
    torch.manual_seed(0)
    net = W.model()
    opt = opt_factory(net)
    for t in range(6):
        opt.zero_grad()
        losses = []
        for x, y in _micro(t):
            loss = nn.functional.mse_loss(net(x), y)
            (loss / 2).backward()
            losses.append(loss.detach())
            if observe:
                opt.observe_loss(loss)
        if observe:
            opt.step()
        else:
            opt.step(loss=torch.stack(losses).double().mean())
    return W.flat(net)


@pytest.mark.parametrize("make", [lambda m: Polyak(m.parameters(), process_group=None),
                                  lambda m: W.MAKERS["nested-proxy"](m, None)], ids=["polyak", "nested-proxy"])
def test_observed_micro_batch_losses_are_the_loss_of_the_step(make):
    assert torch.equal(_accumulated(make, observe=True), _accumulated(make, observe=False))


def test_observed_losses_win_over_the_closures_value_and_are_forgotten():
    net = W.model()
    opt = Polyak(net.parameters())
    seen = []
    orig = opt._step
    opt._step = lambda items, loss: (seen.append(float(loss)), orig(items, loss))[1]  # type: ignore[method-assign]
    x, y = W.batch(0, 0)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(net(x), y)
        loss.backward()
        return loss / 2  # what Lightning's closure returns under accumulate_grad_batches=2

    opt.observe_loss(3.0)
    opt.observe_loss(1.0, weight=3.0)
    returned = opt.step(closure)
    assert seen == [1.5] and float(returned) != 1.5  # (3 + 3 * 1) / 4; the closure's value returned
    second = opt.step(closure)
    assert seen[1] == pytest.approx(float(second), rel=1e-6)  # nothing left over: the closure's own value


def test_a_failed_step_keeps_the_observed_losses():
    net = W.model()
    opt = Polyak(net.parameters())
    opt.observe_loss(2.0)

    def closure():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(closure)
    assert float(opt.take_observed_loss()) == 2.0


@pytest.mark.parametrize("bad, words", [((1.0, 0.0), "weight=0.0 is invalid"),
                                        ((torch.ones(2), 1.0), "loss has 2 elements")])
def test_observe_loss_refuses_bad_input(bad, words):
    opt = Polyak(W.model().parameters())
    with pytest.raises(ValueError, match=words):
        opt.observe_loss(*bad)


# -- TensorBoard and CSV from a plain loop -------------------------------------------------------
def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_telemetry_reaches_tensorboard_and_csv_from_a_plain_loop(tmp_path):
    from nestopt.integrations.telemetry import TelemetryWriter

    net = W.model()
    opt = Polyak(net.parameters())
    etas = []
    with TelemetryWriter(tmp_path / "tb", csv=tmp_path / "t.csv") as log:
        for t in range(5):
            W.train("polyak", net, opt, 1, lambda _: W.batch(t, 0))
            etas.append(opt.param_groups[0]["polyak"]["eta"])
            log.write(opt, t)
    sc = _scalars(tmp_path / "tb")
    assert [s for s, _ in sc["nestopt/eta"]] == list(range(5))
    assert [v for _, v in sc["nestopt/eta"]] == pytest.approx(etas, rel=1e-6)
    assert [v for _, v in sc["nestopt/steps"]] == [1.0, 2.0, 3.0, 4.0, 5.0]
    rows = list(csv.DictReader((tmp_path / "t.csv").open()))
    eta_rows = [r for r in rows if r["name"] == "nestopt/eta"]
    assert [float(r["value"]) for r in eta_rows] == etas and [int(r["step"]) for r in eta_rows] == list(range(5))


def test_telemetry_writer_refuses_bad_input(tmp_path):
    from nestopt.integrations.telemetry import TelemetryWriter

    with pytest.raises(ValueError, match="needs somewhere to write"):
        TelemetryWriter()
    with TelemetryWriter(csv=tmp_path / "t.csv") as log:
        with pytest.raises(TypeError, match="source=int is invalid"):
            log.write(3, 0)
        with pytest.raises(ValueError, match="step=-1 is invalid"):
            log.write({"a": 1.0}, -1)


# -- Lightning -----------------------------------------------------------------------------------
L = pytest.importorskip("lightning")


class _Module(L.LightningModule):
    def __init__(self, make):
        super().__init__()
        self.net = W.model()
        self.make = make
        self.seen: list[float] = []

    def training_step(self, batch, i):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.seen.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return self.make(self.net)


def _fit(module, tmp_path, callbacks, logger=False, steps=3):
    x, y = W.batch(0, 0, n=16 * 2 * steps)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    trainer = L.Trainer(max_steps=steps, accumulate_grad_batches=2, logger=logger, log_every_n_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=callbacks, default_root_dir=str(tmp_path), accelerator="cpu")
    trainer.fit(module, data)


def test_lightning_accumulation_gives_polyak_the_micro_batch_mean(tmp_path):
    from nestopt.integrations.lightning import NestoptCallback

    got: list[float] = []

    def make(net):
        opt = Polyak(net.parameters())
        orig = opt._step
        opt._step = lambda items, loss: (got.append(float(loss)), orig(items, loss))[1]  # type: ignore[method-assign]
        return opt

    m = _Module(make)
    _fit(m, tmp_path, [NestoptCallback()])
    means = [(a + b) / 2 for a, b in zip(m.seen[::2], m.seen[1::2])]
    assert got == pytest.approx(means, rel=1e-6)
    # without the callback the step reads the last micro-batch's loss divided by 2 (what the issue saw)
    got.clear()
    m = _Module(make)
    _fit(m, tmp_path, [])
    assert got == pytest.approx([b / 2 for b in m.seen[1::2]], rel=1e-6)


def test_lightning_logs_the_telemetry_to_tensorboard(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    from nestopt.integrations.lightning import NestoptCallback

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    _fit(_Module(lambda net: Polyak(net.parameters())), tmp_path, [NestoptCallback()], logger=logger)
    sc = _scalars(Path(logger.log_dir))
    assert [v for _, v in sc["nestopt/steps"]] == [1.0, 2.0, 3.0]
    assert all(v > 0 for _, v in sc["nestopt/eta"])


# -- mixed precision: GradScaler -----------------------------------------------------------------
def _scaler_run(name, scaled):
    net = W.model()
    opt = W.MAKERS[name](net, None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if scaled else None
    for t in range(6):
        x, y = W.batch(t, 0)
        opt.zero_grad()
        loss = nn.functional.mse_loss(net(x), y)
        (scaler.scale(loss) if scaled else loss).backward(create_graph=name in W.CREATE_GRAPH)
        if hasattr(opt, "observe_loss"):
            opt.observe_loss(loss)  # the loss-reading optimizers' recipe: the unscaled loss
        if hasattr(opt, "score_with"):
            opt.score_with(lambda x=x, y=y: nn.functional.mse_loss(net(x), y))  # the hindsight replay's scorer
        if scaled:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if name in W.CREATE_GRAPH:
            for p in net.parameters():
                p.grad = None
    return W.flat(net)


@pytest.mark.parametrize("name", list(W.MAKERS))
def test_grad_scaler_steps_on_unscaled_gradients(name):
    # a power-of-two scale unscales exactly: the scaled run is the unscaled run, bitwise
    assert torch.equal(_scaler_run(name, True), _scaler_run(name, False))


def test_grad_scaler_with_a_closure_is_a_clear_error():
    net = W.model()
    opt = Polyak(net.parameters())
    scaler = torch.amp.GradScaler("cpu")
    x, y = W.batch(0, 0)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(net(x), y)
        scaler.scale(loss).backward()
        return loss

    closure()
    before = W.flat(net)
    with pytest.raises(ValueError, match=r"GradScaler.step\(opt, closure\) would step on scaled gradients"):
        scaler.step(opt, closure)
    assert torch.equal(W.flat(net), before)


def test_grad_scaler_skips_a_step_with_an_inf_and_counts_it():
    net = W.model()
    opt = Polyak(net.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = W.batch(0, 0)
    loss = nn.functional.mse_loss(net(x), y)
    scaler.scale(loss).backward()
    next(net.parameters()).grad[0, 0] = float("inf")
    opt.observe_loss(loss)
    before = W.flat(net)
    scaler.step(opt)
    scaler.update()
    assert torch.equal(W.flat(net), before) and opt.counters["nonfinite"] == 1
    assert scaler.get_scale() == 2.0**9  # the scaler saw the inf and backed off


# -- Hugging Face Trainer ------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")


def _hf_data(n: int = 32):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32, (n, 12), generator=g)
    return [{"input_ids": r, "labels": r} for r in ids]


def _hf_model():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
                                  eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)  # built from a config: nothing is downloaded


def _hf_opt(name, model):
    if name == "muon":
        from nestopt.optim import MuonAdamW, muon_param_groups

        return MuonAdamW(muon_param_groups(model), lr=1e-2)
    return W.MAKERS[name](model, None)


def _hf_run(name, out, steps, resume=None, save=None, report_to=(), opt_hook=None):
    from nestopt.integrations.hf import NestoptTrainer

    model = _hf_model()
    opt = _hf_opt(name, model)
    if opt_hook is not None:
        opt_hook(opt)
    args = transformers.TrainingArguments(str(out), max_steps=steps, per_device_train_batch_size=4,
                                          gradient_accumulation_steps=2, save_strategy="steps" if save else "no",
                                          save_steps=save or 1, report_to=list(report_to), use_cpu=True, seed=0,
                                          logging_steps=1, lr_scheduler_type="constant", disable_tqdm=True)
    trainer = NestoptTrainer(model=model, args=args, train_dataset=_hf_data(), optimizers=(opt, None))
    trainer.train(resume_from_checkpoint=resume)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


HF_NAMES = [n for n in W.MAKERS if n not in W.CREATE_GRAPH]  # (Hutchinson needs backward(create_graph=True))


@pytest.mark.parametrize("name", HF_NAMES)
def test_hf_trainer_trains_and_resumes_bitwise(name, tmp_path):
    whole = _hf_run(name, tmp_path / "a", 4)
    _hf_run(name, tmp_path / "b", 4, save=2)
    resumed = _hf_run(name, tmp_path / "b", 4, resume=str(tmp_path / "b" / "checkpoint-2"))
    assert torch.equal(whole, resumed)
    assert not torch.equal(whole, torch.cat([p.detach().reshape(-1) for p in _hf_model().parameters()]))


def test_hf_trainer_gives_polyak_the_batch_mean_loss(tmp_path):
    from nestopt.integrations.hf import NestoptTrainer

    used: list[float] = []
    micro: list[float] = []

    def hook(opt):
        orig = opt._step
        opt._step = lambda items, loss: (used.append(float(loss)), orig(items, loss))[1]
        orig_observe = opt.observe_loss
        opt.observe_loss = lambda v, weight=1.0: (micro.append(float(v)), orig_observe(v, weight))[1]

    _hf_run("polyak", tmp_path, 3, opt_hook=hook)
    assert len(micro) == 6 and len(used) == 3
    assert used == pytest.approx([(a + b) / 2 for a, b in zip(micro[::2], micro[1::2])], rel=1e-6)
    assert NestoptTrainer.compute_loss is not transformers.Trainer.compute_loss


def test_hf_trainer_logs_the_telemetry_to_tensorboard(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    _hf_run("polyak", tmp_path / "out", 3, report_to=("tensorboard",))
    events = [p.parent for p in tmp_path.rglob("events.out.tfevents.*")]
    assert events, "no event file written"
    sc = _scalars(events[0])
    assert [v for _, v in sc["train/nestopt/steps"]] == [1.0, 2.0, 3.0] and "train/nestopt/eta" in sc


@pytest.mark.parametrize("name", [n for n in W.MAKERS if n not in W.CREATE_GRAPH])
def test_lightning_trains_every_optimizer_with_accumulation(name, tmp_path):
    from nestopt.integrations.lightning import NestoptCallback

    m = _Module(lambda net: _hf_opt(name, net) if name == "muon" else W.MAKERS[name](net, None))
    start = W.flat(m.net)
    _fit(m, tmp_path, [NestoptCallback()], steps=2)
    assert len(m.seen) == 4 and not torch.equal(W.flat(m.net), start)
    assert torch.isfinite(W.flat(m.net)).all()


# -- --log-dir -----------------------------------------------------------------------------------
def _run_cli(argv, tmp_path):
    import os
    import subprocess

    return subprocess.run([sys.executable, "-m", "nestopt", *argv], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _images(log_dir: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0})
    acc.Reload()
    return acc.Tags()["images"]


def test_bench_log_dir_writes_every_curve_and_the_figures(tmp_path):
    r = _run_cli(["bench", "--tasks", "quad-scalar", "--optimizers", "sgd,polyak", "--seeds", "1", "--steps", "20",
                  "--workers", "1", "--out", str(tmp_path / "out"), "--log-dir", str(tmp_path / "tb")], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    sc = _scalars(tmp_path / "tb")
    for run in doc["runs"]:
        tag = f"curves/{run['task']}/{run['optimizer']}/lr={run['lr']:g}/seed={run['seed']}/val_loss"
        assert tag in sc and len(sc[tag]) >= 2
    assert len(_images(tmp_path / "tb")) == len(list((tmp_path / "out").glob("*.png"))) >= 3


def test_meta_train_log_dir_writes_the_meta_losses(tmp_path):
    r = _run_cli(["meta-train", "--net", "linear", "--families", "quadratic", "--method", "pes", "--pairs", "2",
                  "--unroll", "2", "--horizon", "4", "--seed", "3", "--steps", "3", "--out", str(tmp_path / "out"),
                  "--log-dir", str(tmp_path / "tb")], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    history = json.loads((tmp_path / "out" / "history.json").read_text())
    rows = history if isinstance(history, list) else history["history"]
    sc = _scalars(tmp_path / "tb")
    assert [v for _, v in sc["meta/meta_loss"]] == pytest.approx([row["meta_loss"] for row in rows], rel=1e-6)


def test_study_log_dir_writes_the_figures(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nestopt.integrations import logdir

    for name in ("a", "b"):
        plt.figure(figsize=(2, 2))
        plt.plot([0, 1], [1, 0])
        plt.savefig(tmp_path / f"{name}.png")
        plt.close()
    logdir.study(tmp_path / "tb", tmp_path.glob("*.png"))
    assert sorted(_images(tmp_path / "tb")) == ["figures/a", "figures/b"]


@pytest.mark.parametrize("command", [["bench", "--suite", "quick"], ["study", "polyak"], ["meta-train"]])
def test_log_dir_that_is_a_file_is_refused_before_the_work(command, tmp_path, capsys):
    from nestopt.cli import main

    f = tmp_path / "f"
    f.write_text("x")
    assert main([*command, "--out", str(tmp_path / "out"), "--log-dir", str(f)]) == 2
    assert "--log-dir" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["hypergradient-adam", "learned", "complex-momentum", "polyak"])
def test_observed_losses_do_not_pile_up_in_an_optimizer_that_does_not_read_them(name):
    net = W.model()
    opt = W.MAKERS[name](net, None)
    for t in range(3):
        opt.observe_loss(1.0)
        W.train(name, net, opt, 1, lambda _: W.batch(t, 0))
        assert "_observed" not in opt.__dict__
