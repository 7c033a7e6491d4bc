"""Bad inputs to the public APIs outside the optimizers and the CLI (issue 21): each is refused with an
error that names the argument, the value and what is allowed, never a traceback from inside torch or
NumPy and never a silent wrong answer. Runtime divergence (an unroll, a bilevel inner loop, a schedule
that returns a negative rate) is refused before anything is corrupted."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import nestopt.tasks as T
from nestopt import diagnostics as D
from nestopt.games import linear as GL
from nestopt.games import play
from nestopt.games.lyapunov import lyapunov_exponent, sign_changes
from nestopt.games.ridge_rider import SymmetricWells, random_restarts, ridge_rider
from nestopt.guards import GuardConfig, TrainingGuard
from nestopt.hyper import (Bilevel, HypergradientError, SelfTuningMLP, STNTrainer, conjugate_gradient, dense_solve,
                           implicit_hypergradient, neumann, unrolled_hypergradient)
from nestopt.meta import ES, PersistentES, Surrogate, TruncatedBackprop
from nestopt.meta.inner import make_inner
from nestopt.meta.unrolls import es_gradient
from nestopt.nets import HybridAdamNet, LinearUpdate, build, net_metadata, save_net
from nestopt.schedule import (LargeLRConfig, LargeLRScheduler, constant, cosine, grid_search, join, linear,
                              step_decay, warmup_then)
from nestopt.train import Divergence, train_loop

DT = torch.float64
NAN, INF = math.nan, math.inf


# -- small fixtures ------------------------------------------------------------------------------------

def _inner(w, lam):
    return 50.0 * ((w - 1) ** 2).sum() + 0.5 * lam * (w ** 2).sum()  # curvature ~100: lr 1e3 diverges


def _outer(w, lam):
    return 0.5 * ((w - 0.5) ** 2).sum()


def _w():
    return torch.zeros(3, dtype=DT)


def _lam():
    return torch.tensor(0.5, dtype=DT)


def _matvec(v):
    return [2.0 * t for t in v]


def _opt(lr=0.1):
    return torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=lr)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def _xy(n=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=g), torch.randint(3, (n,), generator=g)


def _guard(**kw):
    m = _mlp()
    return TrainingGuard(m, torch.optim.SGD(m.parameters(), lr=0.1), **kw)


def _game_run(players=None, optimizers=None, **kw):
    game = T.BilinearGame(dim=2)
    ps = game.init(0) if players is None else players(game)
    opts = [torch.optim.SGD(p.parameters(), lr=0.1) for p in ps] if optimizers is None else optimizers
    return play(game, ps, opts, 3, **kw)


def _loop(loss=None, **kw):
    w = nn.Parameter(torch.tensor([3.0]))
    opt = kw.pop("opt", None) or torch.optim.SGD([w], lr=0.1)
    return train_loop(opt, 3, loss or (lambda _: (w ** 2).sum()), **kw)


def _inner_run():
    return make_inner(LinearUpdate(), "quadratic", 0)


def _stn(n_hparams=2, **kw):
    return STNTrainer(SelfTuningMLP([4, 5, 3], n_hparams=n_hparams), **kw)


def _call_schedule(fn, steps=1):
    sched = LargeLRScheduler(_opt(), fn)
    for _ in range(steps):
        sched.optimizer.step()
        sched.step()


# -- the refusals ------------------------------------------------------------------------------------------
# (thunk, exception type, regex the message must match). Every case below did something else before:
# a silent wrong answer, a traceback from inside torch / numpy / Python, or an unclear message.

CASES = [
    # schedules
    pytest.param(lambda: join([constant(1.0), constant(2.0)], [NAN]), ValueError, r"boundaries=.*finite",
                 id="schedule-join-nan-boundary"),
    pytest.param(lambda: join([constant(1.0), constant(2.0)], [INF]), ValueError, r"boundaries=.*finite",
                 id="schedule-join-inf-boundary"),
    pytest.param(lambda: join([constant(1.0), constant(2.0), constant(3.0)], [3, 3]), ValueError,
                 r"boundaries=\(3, 3\).*increasing", id="schedule-join-equal-boundaries"),
    pytest.param(lambda: join([constant(1.0), constant(2.0)], ["5"]), ValueError, r"boundaries=",
                 id="schedule-join-str-boundary"),
    pytest.param(lambda: join([1.0, constant(2.0)], [3]), ValueError, r"pieces\[0\]=1.0.*Schedule",
                 id="schedule-join-non-schedule-piece"),
    pytest.param(lambda: join(constant(1.0), [3]), ValueError, r"pieces=.*sequence", id="schedule-join-pieces-not-list"),
    pytest.param(lambda: step_decay(1.0, [NAN], 0.5), ValueError, r"milestones=", id="schedule-step-nan-milestone"),
    pytest.param(lambda: step_decay(1.0, 5, 0.5), ValueError, r"milestones=5.*sequence", id="schedule-step-int-milestones"),
    pytest.param(lambda: linear(0.0, 1.0, 5)(NAN), ValueError, r"t=nan", id="schedule-call-nan-t"),
    pytest.param(lambda: cosine(1.0, 0.0, 5)("3"), ValueError, r"t='3'", id="schedule-call-str-t"),
    pytest.param(lambda: warmup_then(constant(0.3), 0.01, 0.3, -1.0), ValueError, r"^warmup=-1.0",
                 id="schedule-warmup-negative"),
    pytest.param(lambda: warmup_then(0.3, 0.01, 0.3, 0), ValueError, r"^decay=0.3", id="schedule-warmup-decay-not-schedule"),
    pytest.param(lambda: LargeLRScheduler(_opt(), lambda t: -1.0), ValueError, r"step 0.*-1.0",
                 id="schedule-largelr-negative-rate"),
    pytest.param(lambda: LargeLRScheduler(_opt(), lambda t: NAN), ValueError, r"step 0.*nan", id="schedule-largelr-nan-rate"),
    pytest.param(lambda: LargeLRScheduler(_opt(), lambda t: "x"), ValueError, r"step 0.*'x'", id="schedule-largelr-str-rate"),
    pytest.param(lambda: _call_schedule(lambda t: 0.1 if t < 1 else -0.5), ValueError, r"step 1.*-0.5",
                 id="schedule-largelr-negative-later"),
    pytest.param(lambda: LargeLRScheduler("sgd", constant(0.1)), TypeError, r"^optimizer='sgd'",
                 id="schedule-largelr-optimizer-str"),
    pytest.param(lambda: LargeLRConfig(decay_epochs=(True,)), ValueError, r"^decay_epochs=", id="schedule-config-bool-epoch"),
    pytest.param(lambda: LargeLRConfig(lr_grid=(True, 0.1)), ValueError, r"^lr_grid=", id="schedule-config-bool-rate"),
    pytest.param(lambda: LargeLRConfig.from_dict([("base_lr", 0.1)]), TypeError, r"values=.*mapping",
                 id="schedule-config-from-dict-list"),
    pytest.param(lambda: LargeLRConfig.from_dict({1: 0.1}), ValueError, r"1=0.1.*field", id="schedule-config-int-key"),
    # grid search
    pytest.param(lambda: grid_search(lambda lr: NAN, [0.1, 1.0]), ValueError, r"every run diverged.*0.1, 1.0",
                 id="grid-all-diverged"),
    pytest.param(lambda: grid_search(lambda lr: INF, [0.1, 1.0], minimize=False), ValueError, r"every run diverged",
                 id="grid-all-diverged-maximize"),
    pytest.param(lambda: grid_search(lambda lr: lr, [True, 0.1]), ValueError, r"grid=", id="grid-bool-rate"),
    pytest.param(lambda: grid_search(lambda lr: None, [0.1]), TypeError, r"train\(0.1\) returned None",
                 id="grid-train-returns-none"),
    pytest.param(lambda: grid_search(lambda lr: lr, [0.1, 0.1]), ValueError, r"grid=.*twice", id="grid-duplicate-rate"),
    pytest.param(lambda: grid_search(lambda lr: lr, [0.1], minimize="yes"), ValueError, r"^minimize='yes'",
                 id="grid-minimize-not-bool"),
    pytest.param(lambda: grid_search(3, [0.1]), TypeError, r"^train=3", id="grid-train-not-callable"),
    # hypergradients
    pytest.param(lambda: unrolled_hypergradient(_inner, _outer, _w(), _lam(), steps=50, lr=1e3), HypergradientError,
                 r"diverged at step \d+ .*lr=1000", id="hyper-unrolled-diverges"),
    pytest.param(lambda: unrolled_hypergradient(_inner, _outer, _w(), _lam(), steps=50, lr=lambda h: 1e3 + 0 * h),
                 HypergradientError, r"diverged at step \d+", id="hyper-unrolled-callable-lr-diverges"),
    pytest.param(lambda: unrolled_hypergradient(_inner, _outer, _w(), _lam(), steps=50, lr=1e3, truncate=2),
                 HypergradientError, r"diverged at step \d+", id="hyper-unrolled-truncated-diverges"),
    pytest.param(lambda: unrolled_hypergradient(_inner, lambda w, l: w.sum() * NAN, _w(), _lam(), steps=3),
                 HypergradientError, r"outer_loss.*nan", id="hyper-unrolled-nan-outer"),
    pytest.param(lambda: unrolled_hypergradient(lambda w, l: w * l, _outer, _w(), _lam(), steps=3), ValueError,
                 r"inner_loss must return a scalar", id="hyper-unrolled-vector-inner"),
    pytest.param(lambda: unrolled_hypergradient(lambda w, l: 1.0, _outer, _w(), _lam(), steps=3), ValueError,
                 r"inner_loss must return a scalar Tensor; got float", id="hyper-unrolled-float-inner"),
    pytest.param(lambda: unrolled_hypergradient(_inner, _outer, _w(), _lam(), steps=3, batches=5), ValueError,
                 r"^batches=5", id="hyper-unrolled-int-batches"),
    pytest.param(lambda: unrolled_hypergradient(3, _outer, _w(), _lam(), steps=3), TypeError, r"^inner_loss=3",
                 id="hyper-unrolled-inner-not-callable"),
    pytest.param(lambda: implicit_hypergradient(_inner, "f", _w(), _lam()), TypeError, r"^outer_loss='f'",
                 id="hyper-implicit-outer-not-callable"),
    pytest.param(lambda: Bilevel(_inner, _outer, _w(), _lam(), hyper_optimizer=3), TypeError, r"^hyper_optimizer=3",
                 id="hyper-bilevel-hyper-opt-not-callable"),
    pytest.param(lambda: Bilevel(_inner, _outer, _w(), _lam(), hyper_optimizer=lambda p: 3), TypeError,
                 r"hyper_optimizer.*returned int", id="hyper-bilevel-hyper-opt-returns-int"),
    pytest.param(lambda: Bilevel(_inner, _outer, _w(), _lam(), method="unrolled", unroll_kwargs={"steps": 3}),
                 ValueError, r"unroll_kwargs=.*'steps'", id="hyper-bilevel-unroll-kwargs-steps"),
    pytest.param(lambda: Bilevel(_inner, _outer, _w(), _lam(), method="unrolled", unroll_kwargs={"lrr": 3}),
                 ValueError, r"unroll_kwargs=.*'lrr'.*lr, momentum", id="hyper-bilevel-unroll-kwargs-unknown"),
    pytest.param(lambda: Bilevel(_inner, _outer, _w(), _lam(), solver_kwargs={"iter": 3}), ValueError,
                 r"solver_kwargs=.*'iter'.*iters", id="hyper-bilevel-solver-kwargs-unknown"),
    pytest.param(lambda: conjugate_gradient(_matvec, []), ValueError, r"^b=\[\]", id="hyper-cg-empty-b"),
    pytest.param(lambda: neumann(_matvec, [], alpha=0.1), ValueError, r"^b=\[\]", id="hyper-neumann-empty-b"),
    pytest.param(lambda: dense_solve(_matvec, []), ValueError, r"^b=\[\]", id="hyper-dense-empty-b"),
    pytest.param(lambda: conjugate_gradient(_matvec, torch.ones(3)), TypeError, r"^b=.*list of tensors",
                 id="hyper-cg-tensor-b"),
    pytest.param(lambda: conjugate_gradient(_matvec, [torch.ones(3)], init=[torch.ones(2)]), ValueError,
                 r"^init=.*shaped like b", id="hyper-cg-init-shape"),
    pytest.param(lambda: SelfTuningMLP(5), ValueError, r"^sizes=5", id="hyper-stn-sizes-int"),
    pytest.param(lambda: SelfTuningMLP([4, 3], n_hparams=0), ValueError, r"^n_hparams=0", id="hyper-stn-zero-hparams"),
    pytest.param(lambda: _stn(n_hparams=3), ValueError, r"n_hparams=3.*2", id="hyper-stn-trainer-wrong-hparams"),
    pytest.param(lambda: STNTrainer(nn.Linear(2, 2)), TypeError, r"^model=.*SelfTuningMLP", id="hyper-stn-trainer-not-stn"),
    pytest.param(lambda: _stn().step((torch.full((4, 4), INF), torch.zeros(4, dtype=torch.long)), _xy(4)),
                 HypergradientError, r"training loss is nan", id="hyper-stn-nonfinite-loss"),
    # guards
    pytest.param(lambda: TrainingGuard("model", _opt()), TypeError, r"^model='model'", id="guard-model-not-module"),
    pytest.param(lambda: TrainingGuard(_mlp(), None), TypeError, r"^optimizer=None", id="guard-optimizer-none"),
    pytest.param(lambda: _guard(bogus=1), TypeError, r"bogus.*clip_norm", id="guard-unknown-override"),
    pytest.param(lambda: _guard(config={"clip_norm": 1.0}), TypeError, r"^config=.*GuardConfig", id="guard-config-dict"),
    pytest.param(lambda: _guard().step(torch.ones(3)), ValueError, r"^loss=.*3 elements", id="guard-step-vector-loss"),
    pytest.param(lambda: _guard().step(None), TypeError, r"^loss=None", id="guard-step-none-loss"),
    pytest.param(lambda: _guard().on_eval("x"), ValueError, r"^val_loss='x'", id="guard-on-eval-str"),
    pytest.param(lambda: _guard().on_diagnostics(sparsity="x"), ValueError, r"^sparsity='x'",
                 id="guard-on-diagnostics-str"),
    pytest.param(lambda: _guard(checkpoint_dir=__file__), ValueError, r"^checkpoint_dir=.*a file",
                 id="guard-checkpoint-dir-is-file"),
    # diagnostics
    pytest.param(lambda: D.activation_sparsity(_mlp(), _xy()[0], threshold=-1.0), ValueError, r"^threshold=-1.0",
                 id="diag-sparsity-negative-threshold"),
    pytest.param(lambda: D.activation_sparsity(_mlp(), _xy()[0], threshold=NAN), ValueError, r"^threshold=nan",
                 id="diag-sparsity-nan-threshold"),
    pytest.param(lambda: D.weight_compressibility(_mlp(), threshold=NAN), ValueError, r"^threshold=nan",
                 id="diag-compressibility-nan-threshold"),
    pytest.param(lambda: D.feature_utilization(_mlp(), _xy()[0], threshold=-1), ValueError, r"^threshold=-1",
                 id="diag-utilization-negative-threshold"),
    pytest.param(lambda: D.pruned_accuracy(_mlp(), *_xy(), fractions=0.5), ValueError, r"^fractions=0.5",
                 id="diag-pruned-fractions-float"),
    pytest.param(lambda: D.pruned_accuracy(nn.Sequential(nn.ReLU()), *_xy()), ValueError, r"no weight tensors",
                 id="diag-pruned-no-weights"),
    pytest.param(lambda: D.all_metrics(_mlp(), *_xy(), fractions=(1.5,)), ValueError, r"^fractions=\(1.5,\)",
                 id="diag-all-metrics-fraction-above-one"),
    pytest.param(lambda: D.all_metrics(_mlp(), *_xy(), fractions=(-0.5,)), ValueError, r"^fractions=\(-0.5,\)",
                 id="diag-all-metrics-negative-fraction"),
    pytest.param(lambda: D.all_metrics(_mlp(), *_xy(), threshold=NAN), ValueError, r"^threshold=nan",
                 id="diag-all-metrics-nan-threshold"),
    pytest.param(lambda: D.accuracy(_mlp(), _xy()[0], _xy()[1][:, None]), ValueError, r"^y=.*shape \(8, 1\)",
                 id="diag-accuracy-label-shape"),
    pytest.param(lambda: D.class_separation(_mlp(), _xy()[0], _xy()[1][:5]), ValueError, r"^y=.*shape \(5,\)",
                 id="diag-separation-label-length"),
    pytest.param(lambda: D.all_metrics(_mlp(), _xy()[0], _xy()[1][:5]), ValueError, r"^y=.*shape \(5,\)",
                 id="diag-all-metrics-label-length"),
    # games
    pytest.param(lambda: _game_run(players=lambda g: g.init(0)[:1]), ValueError, r"players=.*1.*2",
                 id="game-play-one-player"),
    pytest.param(lambda: _game_run(optimizers=[None, None]), TypeError, r"optimizers\[0\]=None",
                 id="game-play-optimizer-none"),
    pytest.param(lambda: _game_run(callback=lambda s, p: 3), TypeError, r"callback.*returned int",
                 id="game-play-callback-not-mapping"),
    pytest.param(lambda: play("bilinear", [], [], 3), TypeError, r"^game='bilinear'", id="game-play-game-str"),
    pytest.param(lambda: _game_run(players=lambda g: [g.init(0)[0], "y"], optimizers=[_opt(), _opt()]), TypeError, r"players\[1\]='y'",
                 id="game-play-player-not-module"),
    pytest.param(lambda: lyapunov_exponent(T.BilinearGame(), 3, steps=2), TypeError, r"^make_optimizers=3",
                 id="game-lyapunov-optimizers-not-callable"),
    pytest.param(lambda: GL.block_matrix("gda", 1.0, NAN), ValueError, r"^lr=nan", id="game-linear-nan-lr"),
    pytest.param(lambda: GL.block_matrix("gda", INF, 0.1), ValueError, r"^sigma=inf", id="game-linear-inf-sigma"),
    pytest.param(lambda: GL.block_matrix("momentum", 1.0, 0.1, beta=NAN), ValueError, r"^beta=nan",
                 id="game-linear-nan-beta"),
    pytest.param(lambda: GL.spectral_radius("gda", [], 0.1), ValueError, r"^singular_values=\[\]",
                 id="game-linear-no-singular-values"),
    pytest.param(lambda: GL.best("gda", [1.0], []), ValueError, r"^lrs=\[\]", id="game-linear-best-empty-grid"),
    pytest.param(lambda: sign_changes([0.0, 1.0, 2.0], [-1.0, 1.0]), ValueError, r"values.*3.*exponents.*2",
                 id="game-sign-changes-lengths"),
    pytest.param(lambda: lyapunov_exponent(T.BilinearGame(), lambda ps: [torch.optim.SGD(p.parameters(), lr=0.1)
                                                                        for p in ps], steps=2, warmup=0, seed=1.5),
                 ValueError, r"^seed=1.5", id="game-lyapunov-float-seed"),
    pytest.param(lambda: ridge_rider(SymmetricWells(2), torch.zeros(2, dtype=DT), budget=10, max_ridge=-1), ValueError,
                 r"^max_ridge=-1", id="game-ridge-negative-max-ridge"),
    pytest.param(lambda: ridge_rider(SymmetricWells(2), torch.zeros(2, dtype=DT), budget=10, lr=-0.1), ValueError,
                 r"^lr=-0.1", id="game-ridge-negative-lr"),
    pytest.param(lambda: ridge_rider(SymmetricWells(2), torch.zeros(2, dtype=DT), budget=10, tol=NAN), ValueError,
                 r"^tol=nan", id="game-ridge-nan-tol"),
    pytest.param(lambda: ridge_rider(SymmetricWells(2), torch.zeros(2, dtype=DT), budget=10, merge=-1.0), ValueError,
                 r"^merge=-1.0", id="game-ridge-negative-merge"),
    pytest.param(lambda: ridge_rider(SymmetricWells(2), torch.zeros(2, dtype=torch.long), budget=10), TypeError,
                 r"^x0=.*floating", id="game-ridge-int-start"),
    pytest.param(lambda: random_restarts(SymmetricWells(2), 0, budget=10), ValueError, r"^dim=0",
                 id="game-restarts-zero-dim"),
    pytest.param(lambda: random_restarts(SymmetricWells(2), 2, budget=10, scale=NAN), ValueError, r"^scale=nan",
                 id="game-restarts-nan-scale"),
    # tasks (and the games in nestopt.tasks)
    pytest.param(lambda: T.get(["digits-mlp"]), TypeError, r"^name=\['digits-mlp'\].*string", id="task-get-list"),
    pytest.param(lambda: T.family(None), TypeError, r"^name=None", id="task-family-none"),
    pytest.param(lambda: T.register("my-task", 3), TypeError, r"^factory=3", id="task-register-not-callable"),
    pytest.param(lambda: T.register(3, T.ScalarQuadratic), TypeError, r"^name=3", id="task-register-int-name"),
    pytest.param(lambda: T.AxisQuadratic(target=(1.0, 2.0, 3.0)), ValueError, r"^target=", id="task-axis-target-length"),
    pytest.param(lambda: T.AxisQuadratic(dtype=torch.int64), TypeError, r"^dtype=torch.int64", id="task-axis-int-dtype"),
    pytest.param(lambda: T.ScalarQuadratic(dtype="float32"), TypeError, r"^dtype='float32'", id="task-scalar-str-dtype"),
    pytest.param(lambda: T.RotatedQuadratic(dim=0), ValueError, r"^dim=0", id="task-rotated-zero-dim"),
    pytest.param(lambda: T.AxisQuadratic().point([1.0, 2.0, 3.0]), ValueError, r"^values=.*2", id="task-point-length"),
    pytest.param(lambda: T.get("quad-asym").init(1.5), ValueError, r"^seed=1.5", id="task-init-float-seed"),
    pytest.param(lambda: T.get("digits-logreg").init("0"), ValueError, r"^seed='0'", id="task-array-init-str-seed"),
    pytest.param(lambda: T.get("digits-logreg").sampler(True), ValueError, r"^seed=True", id="task-sampler-bool-seed"),
    pytest.param(lambda: T.generator(2.5), ValueError, r"^seed=2.5", id="task-generator-float-seed"),
    pytest.param(lambda: T.digits_mlp(batch_size=0), ValueError, r"^batch_size=0", id="task-digits-zero-batch"),
    pytest.param(lambda: T.digits_mlp(width=0), ValueError, r"^width=0", id="task-digits-zero-width"),
    pytest.param(lambda: T.digits_mlp(depth=-1), ValueError, r"^depth=-1", id="task-digits-negative-depth"),
    pytest.param(lambda: T.digits_mlp(activation=3), TypeError, r"^activation=3", id="task-digits-bad-activation"),
    pytest.param(lambda: T.MarketConfig(stride=0), ValueError, r"^stride=0", id="task-market-zero-stride"),
    pytest.param(lambda: T.MarketConfig(n_train_assets=30), ValueError, r"^n_train_assets=30", id="task-market-too-many-train"),
    pytest.param(lambda: T.MarketConfig(fast_phi=1.0), ValueError, r"^fast_phi=1.0", id="task-market-unit-phi"),
    pytest.param(lambda: T.MarketConfig(vol=(1e-3,)), ValueError, r"^vol=", id="task-market-short-vol"),
    pytest.param(lambda: T.MarketConfig(val_stride=6), ValueError, r"^val_stride=6", id="task-market-val-stride"),
    pytest.param(lambda: T.MarketConfig(n_bars=100), ValueError, r"^n_bars=100", id="task-market-short-path"),
    pytest.param(lambda: T.TradingTask(config={"n_bars": 10}), TypeError, r"^config=.*MarketConfig",
                 id="task-trading-config-dict"),
    pytest.param(lambda: T.family("quadratic").sample(-1), ValueError, r"^seed=-1", id="task-family-negative-seed"),
    pytest.param(lambda: T.family("teacher-mlp").sample(0.5), ValueError, r"^seed=0.5", id="task-family-float-seed"),
    pytest.param(lambda: T.MixtureGAN(std=-1.0), ValueError, r"^std=-1.0", id="task-gan-negative-std"),
    pytest.param(lambda: T.MixtureGAN(radius=NAN), ValueError, r"^radius=nan", id="task-gan-nan-radius"),
    pytest.param(lambda: T.DiracGAN(gamma=NAN), ValueError, r"^gamma=nan", id="task-dirac-nan-gamma"),
    pytest.param(lambda: T.DiracGAN(start=(1.0,)), ValueError, r"^start=", id="task-dirac-short-start"),
    pytest.param(lambda: T.BilinearGame(dtype=torch.int64), TypeError, r"^dtype=torch.int64", id="task-bilinear-int-dtype"),
    pytest.param(lambda: T.get_game(3), TypeError, r"^name=3", id="task-get-game-int"),
    pytest.param(lambda: T.mixture_centers(0), ValueError, r"^modes=0", id="task-centers-zero-modes"),
    pytest.param(lambda: T.mode_stats(T.MixtureGAN(hidden=4), T.MixtureGAN(hidden=4).init(0)[0], n=0), ValueError,
                 r"^n=0", id="task-mode-stats-zero-samples"),
    pytest.param(lambda: T.mode_stats(T.MixtureGAN(hidden=4), T.MixtureGAN(hidden=4).init(0)[0], min_count=0),
                 ValueError, r"^min_count=0", id="task-mode-stats-zero-count"),
    pytest.param(lambda: T.auc(torch.zeros(3), torch.ones(4)), ValueError, r"scores.*3.*labels.*4",
                 id="task-auc-lengths"),
    # nets
    pytest.param(lambda: HybridAdamNet(betas=(1.0, 0.999)), ValueError, r"^betas\[0\]=1.0", id="net-hybrid-unit-beta"),
    pytest.param(lambda: HybridAdamNet(betas=(0.9,)), ValueError, r"^betas=\(0.9,\)", id="net-hybrid-short-betas"),
    pytest.param(lambda: HybridAdamNet(eps=-1.0), ValueError, r"^eps=-1.0", id="net-hybrid-negative-eps"),
    pytest.param(lambda: build({"kind": "linear", "bogus": 1}), ValueError, r"'bogus'.*step_mult", id="net-build-unknown-key"),
    pytest.param(lambda: build("linear"), TypeError, r"^config='linear'", id="net-build-str"),
    pytest.param(lambda: save_net(object(), "/tmp/never-written.safetensors"), TypeError, r"^net=.*config",
                 id="net-save-not-a-net"),
    pytest.param(lambda: net_metadata("/nonexistent/x.safetensors"), ValueError, r"no such file",
                 id="net-metadata-missing-file"),
    # training loop
    pytest.param(lambda: _loop(loss=lambda _: 1.0), TypeError, r"loss\(batch\) returned float", id="loop-float-loss"),
    pytest.param(lambda: _loop(loss=lambda _: torch.ones(3, requires_grad=True)), TypeError, r"shape \(3,\).*scalar",
                 id="loop-vector-loss"),
    pytest.param(lambda: _loop(clip_norm=-1.0), ValueError, r"^clip_norm=-1.0", id="loop-negative-clip"),
    pytest.param(lambda: _loop(clip_norm=NAN), ValueError, r"^clip_norm=nan", id="loop-nan-clip"),
    pytest.param(lambda: _loop(opt="sgd"), TypeError, r"^opt='sgd'", id="loop-opt-str"),
    pytest.param(lambda: _loop(batch=3), TypeError, r"^batch=3", id="loop-batch-not-callable"),
    pytest.param(lambda: _loop(catch=(3,)), TypeError, r"^catch=\(3,\)", id="loop-catch-not-exceptions"),
    pytest.param(lambda: _loop(divergence="strict"), TypeError, r"^divergence='strict'", id="loop-divergence-str"),
    pytest.param(lambda: _loop(evaluate=lambda: {"acc": 1.0}), KeyError, r"monitor='val_loss'.*acc",
                 id="loop-monitor-missing"),
    pytest.param(lambda: _loop(evaluate=lambda: {"val_loss": "x"}, eval_at_start=False), ValueError,
                 r"val_loss.*'x'", id="loop-monitor-not-number"),
    # meta-training
    pytest.param(lambda: TruncatedBackprop().estimate(LinearUpdate(), _inner_run(), 0, torch.Generator()), ValueError,
                 r"^steps=0", id="meta-tbptt-zero-steps"),
    pytest.param(lambda: Surrogate().estimate(LinearUpdate(), _inner_run(), -1, torch.Generator()), ValueError,
                 r"^steps=-1", id="meta-surrogate-negative-steps"),
    pytest.param(lambda: ES().estimate(LinearUpdate(), _inner_run(), 1.5, torch.Generator()), ValueError,
                 r"^steps=1.5", id="meta-es-float-steps"),
    pytest.param(lambda: make_inner(object(), "quadratic", 0), TypeError, r"^net=.*UpdateNet", id="meta-inner-not-a-net"),
    pytest.param(lambda: make_inner(LinearUpdate(), "quadratic", -1), ValueError, r"^seed=-1", id="meta-inner-negative-seed"),
    pytest.param(lambda: es_gradient(_inner_run(), LinearUpdate(), 2, 0.0, 2, torch.Generator(), []), ValueError,
                 r"^sigma=0.0", id="meta-es-zero-sigma"),
    pytest.param(lambda: es_gradient(_inner_run(), LinearUpdate(), 2, 0.1, 0, torch.Generator(), []), ValueError,
                 r"^pairs=0", id="meta-es-zero-pairs"),
    pytest.param(lambda: es_gradient(_inner_run(), LinearUpdate(), 2, 0.1, 1, torch.Generator(), [None]), ValueError,
                 r"^batches=.*1.*3", id="meta-es-short-batches"),
    pytest.param(lambda: PersistentES(pairs=1).load_state_dict({}), ValueError, r"xi.*particles",
                 id="meta-pes-empty-state"),
]


@pytest.mark.parametrize("make, exc, match", CASES)
def test_bad_input_is_refused_with_a_clear_error(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


# -- refusals that leave the state as it was --------------------------------------------------------------

@pytest.mark.parametrize("method", ["unrolled", "implicit"])
@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_bilevel_divergence_never_corrupts_the_weights(method, on_error):
    kw = ({"unroll_kwargs": {"lr": 1e3}} if method == "unrolled"
          else {"inner_optimizer": lambda p: torch.optim.SGD(p, lr=1e3)})
    b = Bilevel(_inner, _outer, _w(), _lam(), method=method, inner_steps=50, on_error=on_error, **kw)
    w0, lam0 = b.params.clone(), b.hparams.clone()
    if on_error == "raise":
        with pytest.raises(HypergradientError, match=r"diverged at (inner )?step \d+"):
            b.step()
        assert b.history == []
    else:
        rec = b.step()
        assert rec["skipped"] == 1.0 and "diverged" in rec["error"]
    assert torch.equal(b.params, w0) and torch.equal(b.hparams, lam0)  # bitwise as before the step
    assert torch.isfinite(b.params).all()


def test_bilevel_after_a_refused_step_continues_from_the_last_finite_state():
    b = Bilevel(_inner, _outer, _w(), _lam(), method="implicit", inner_steps=40,
                inner_optimizer=lambda p: torch.optim.SGD(p, lr=1e-3))  # a stable rate: the first step trains
    b.step()
    w1 = b.params.clone()
    b.inner_opt.param_groups[0]["lr"] = 1e3
    with pytest.raises(HypergradientError):
        b.step()
    assert torch.equal(b.params, w1) and b.inner_opt.param_groups[0]["lr"] == 1e3


def test_largelr_refusal_leaves_rates_and_clock_unchanged():
    opt = _opt(0.1)
    sched = LargeLRScheduler(opt, lambda t: 0.1 if t < 2 else -1.0)
    opt.step()
    sched.step()
    before = (sched.last_epoch, opt.param_groups[0]["lr"], sched.get_last_lr())
    opt.step()
    with pytest.raises(ValueError, match=r"step 2.*-1.0"):
        sched.step()
    assert (sched.last_epoch, opt.param_groups[0]["lr"], sched.get_last_lr()) == before


def test_largelr_refusal_at_construction_sets_no_rate():
    opt = _opt(0.1)
    with pytest.raises(ValueError):
        LargeLRScheduler(opt, lambda t: -1.0)
    assert opt.param_groups[0]["lr"] == 0.1


def test_grid_search_non_finite_never_wins():
    scores = {0.01: NAN, 0.1: 2.0, 1.0: INF, 3.0: -INF}
    assert grid_search(lambda lr: scores[lr], list(scores)).best_lr == 0.1
    assert grid_search(lambda lr: scores[lr], list(scores), minimize=False).best_lr == 0.1
    assert grid_search(lambda lr: lr, (x for x in (0.3, 0.1))).best_lr == 0.1  # a generator grid is read once


def test_stn_refusal_leaves_the_network_unchanged():
    trainer = _stn()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(HypergradientError):
        trainer.step((torch.full((4, 4), INF), torch.zeros(4, dtype=torch.long)), _xy(4))
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def test_train_loop_usage_errors_are_not_reported_as_divergence():
    # a non-scalar loss or a bad metric used to be caught as a "diverged" run
    with pytest.raises(TypeError):
        _loop(loss=lambda _: torch.ones(3, requires_grad=True), catch=(Exception,))


def test_valid_inputs_still_work():
    # the refusals reach no valid call: the boundaries' edges and the allowed corner values
    assert join([constant(1.0), constant(2.0)], [0])(0) == 2.0
    assert linear(0.0, 1.0, 5)(INF) == 1.0
    assert warmup_then(constant(0.3), 0.01, 0.3, 0)(1) == 0.3
    assert grid_search(lambda lr: (lr - 0.3) ** 2, [0.1, 0.3, 1.0]).best_lr == 0.3
    assert T.generator(3).initial_seed() == T.generator(3).initial_seed()
    assert isinstance(T.get("quad-asym").init(0), nn.Module)
    assert T.MarketConfig() == T.MarketConfig()
    assert T.DiracGAN(gamma=0.0, start=(1e-4, 1e-4)).gamma == 0.0
    res = _loop(clip_norm=INF)
    assert res.steps_done == 3 and not res.diverged
    assert isinstance(GuardConfig(), GuardConfig)


def test_the_optimizer_registry_refuses_a_name_that_is_not_a_string_and_a_bad_rate():
    import torch

    from nestopt.bench import registry

    with pytest.raises(TypeError, match=r"name=\['sgd'\] is invalid: expected an optimizer name"):
        registry.get(["sgd"])
    w = torch.nn.Parameter(torch.ones(2))
    for lr in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"^lr="):
            registry.get("sgd").make([w], lr=lr)
