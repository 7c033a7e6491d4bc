"""User-supplied pieces: hypergradient solvers as callables, meta-gradient estimators as classes."""

from __future__ import annotations

import copy
import doctest
import json

import pytest
import torch

from nestopt.hyper import Bilevel, SolveInfo, conjugate_gradient, implicit_hypergradient, neumann
from nestopt.meta import ES, GradientEstimator, HybridAdamNet, MetaConfig, PersistentES, TruncatedBackprop, meta_train
from nestopt.meta.estimators import Estimate

DT = torch.float64


def _problem():
    """Ridge regression with a dict of weights (two leaves) and one log-decay per weight, at its optimum."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 5, generator=g, dtype=DT), torch.randn(40, generator=g, dtype=DT)
    xv, yv = torch.randn(30, 5, generator=g, dtype=DT), torch.randn(30, generator=g, dtype=DT)

    def inner(w, h):
        pred = x @ w["a"] + w["b"].sum()
        return 0.5 * ((pred - y) ** 2).mean() + 0.5 * (h["a"].exp() * w["a"] ** 2).sum() + \
            0.5 * (h["b"].exp() * w["b"] ** 2).sum()

    def outer(w, h):
        return 0.5 * ((xv @ w["a"] + w["b"].sum() - yv) ** 2).mean()

    lam = {"a": torch.full((5,), -2.0, dtype=DT), "b": torch.full((1,), -2.0, dtype=DT)}
    w = {"a": torch.zeros(5, dtype=DT, requires_grad=True), "b": torch.zeros(1, dtype=DT, requires_grad=True)}
    opt = torch.optim.LBFGS(list(w.values()), max_iter=200, tolerance_grad=1e-14, tolerance_change=0)

    def closure():
        opt.zero_grad()
        loss = inner(w, lam)
        loss.backward()
        return loss

    opt.step(closure)
    return inner, outer, {k: v.detach() for k, v in w.items()}, lam


def test_user_solver_gets_the_hvp_and_rhs_and_matches_the_builtin():
    inner, outer, w, lam = _problem()
    seen = []

    def counted_cg(matvec, b, iters=20, init=None, check=True):
        hv = matvec([torch.ones_like(t) for t in b])
        seen.append(([tuple(t.shape) for t in b], [tuple(t.shape) for t in hv], iters, check))
        return conjugate_gradient(matvec, b, iters=iters, init=init, check=check)

    ours, info = implicit_hypergradient(inner, outer, w, lam, solver=counted_cg, iters=15, damping=1e-3,
                                        return_info=True)
    builtin = implicit_hypergradient(inner, outer, w, lam, solver="cg", iters=15, damping=1e-3)
    assert seen == [([(5,), (1,)], [(5,), (1,)], 15, True)]  # called once, lists shaped like the weights' leaves
    assert all(torch.equal(ours[k], builtin[k]) for k in lam)
    assert info.solver == "cg" and info.residual < 1e-6 and set(info.solution) == {"a", "b"}
    # the built-in functions stand for their names, numbers and all
    by_fn = implicit_hypergradient(inner, outer, w, lam, solver=neumann, iters=30, alpha=0.2, max_residual=10.0)
    by_name = implicit_hypergradient(inner, outer, w, lam, solver="neumann", iters=30, alpha=0.2, max_residual=10.0)
    assert all(torch.equal(by_fn[k], by_name[k]) for k in lam)


def test_user_dense_solver_with_a_dict_info_matches_the_dense_builtin():
    inner, outer, w, lam = _problem()

    def my_dense(matvec, b):  # takes no options: none are passed; no residual: the caller computes it
        n = sum(t.numel() for t in b)
        cols = [torch.cat([t.reshape(-1) for t in matvec(list(torch.split(e, [t.numel() for t in b])))])
                for e in torch.eye(n, dtype=DT)]
        x = torch.linalg.solve(torch.stack(cols, 1), torch.cat([t.reshape(-1) for t in b]))
        return [c.view_as(t) for c, t in zip(torch.split(x, [t.numel() for t in b]), b)], {"iterations": n}

    hg, info = implicit_hypergradient(inner, outer, w, lam, solver=my_dense, return_info=True)
    dense = implicit_hypergradient(inner, outer, w, lam, solver="dense")
    assert isinstance(info, SolveInfo) and info.solver == "my_dense" and info.iterations == 6
    assert info.residual is not None and info.residual < 1e-10
    for k in lam:
        torch.testing.assert_close(hg[k], dense[k], rtol=1e-8, atol=1e-12)


def test_bad_solvers_name_the_argument_and_the_choices():
    inner, outer, w, lam = _problem()
    with pytest.raises(ValueError, match=r"solver='lu' is invalid: expected one of cg, neumann, dense$"):
        implicit_hypergradient(inner, outer, w, lam, solver="lu")
    with pytest.raises(ValueError, match=r"solver=42 is invalid: expected one of cg, neumann, dense, or a callable"):
        implicit_hypergradient(inner, outer, w, lam, solver=42)
    with pytest.raises(ValueError, match="must return x as a list of tensors shaped like b"):
        implicit_hypergradient(inner, outer, w, lam, solver=lambda matvec, b: (torch.zeros(3), {}))
    with pytest.raises(ValueError, match=r"solver='lu' is invalid: expected one of cg, neumann, dense"):
        Bilevel(inner, outer, w, lam, solver="lu")  # at construction, not at the first step
    with pytest.raises(ValueError, match="solver="):
        Bilevel(inner, outer, w, lam, solver="cg", solver_kwargs={"solver": "dense"})


def test_bilevel_takes_a_user_solver():
    inner, outer, w, lam = _problem()
    calls = []

    def counted(matvec, b, **opts):
        calls.append(sorted(opts))
        return conjugate_gradient(matvec, b, **{k: opts[k] for k in ("iters", "tol", "init", "check")})

    kwargs = dict(inner_steps=5, solver_kwargs={"iters": 10, "damping": 1e-3})
    ours = Bilevel(inner, outer, w, lam, solver=counted, **kwargs).run(2)
    builtin = Bilevel(inner, outer, w, lam, **kwargs).run(2)
    assert calls == [["alpha", "check", "init", "iters", "tol"]] * 2  # **opts: every option
    assert ours == builtin


def test_solvers_docstring_example_runs():
    import nestopt.hyper.solvers as solvers

    assert doctest.testmod(solvers).failed == 0


class _Frozen(GradientEstimator):
    """Advances the inner run with the network and returns a zero meta-gradient."""

    name = "frozen"

    def __init__(self):
        self.calls = []

    def estimate(self, net, task, steps, gen, unrolls=None):
        self.calls.append((steps, task.t, isinstance(gen, torch.Generator)))
        _, losses = task.unroll(net, steps, False)
        return Estimate(torch.tensor(0.0), losses, grad=torch.zeros(sum(p.numel() for p in net.parameters())))


def _cfg(**kw):
    return MetaConfig(**{"families": ("quadratic",), "unroll": 2, "horizon": 4, "outer_steps": 3, "seed": 5, **kw})


def test_a_user_estimator_plugs_into_the_meta_trainer(tmp_path):
    net = HybridAdamNet()
    before = copy.deepcopy(net.state_dict())
    est = _Frozen()
    hist = meta_train(net, _cfg(method=est, reg=0.0), checkpoint=tmp_path / "c.pt")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items()), "a zero meta-gradient moves nothing"
    assert est.calls == [(2, 0, True), (2, 2, True), (2, 0, True)]  # a new task after horizon=4 inner steps
    assert [h["inner_t"] for h in hist] == [2, 4, 2] and not any(h["skipped"] for h in hist)
    assert json.loads(torch.load(tmp_path / "c.pt", weights_only=False)["config"])["method"] == "frozen"


def test_estimator_instances_and_names_are_the_same_run():
    for name, inst in (("tbptt", TruncatedBackprop()), ("es", ES(sigma=0.01, pairs=2))):
        a = HybridAdamNet()
        b = copy.deepcopy(a)
        ha = meta_train(a, _cfg(method=name, es_pairs=2))
        hb = meta_train(b, _cfg(method=inst))
        assert [h["meta_loss"] for h in ha] == [h["meta_loss"] for h in hb], name
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters())), name


def test_bad_methods_keep_their_messages():
    with pytest.raises(ValueError, match=r"^method='sgd' is invalid: expected one of tbptt, surrogate, es, pes$"):
        MetaConfig(method="sgd").check()
    with pytest.raises(ValueError, match="pass an instance"):
        MetaConfig(method=TruncatedBackprop).check()


def test_persistent_es_state_round_trips():
    net = HybridAdamNet(hidden=2)
    pes = PersistentES(pairs=2, sigma=0.01)
    task = pes.new_task(net, "quadratic", 3)
    pes.estimate(net, task, 2, torch.Generator().manual_seed(0))
    state = pes.state_dict()
    assert len(state["xi"]) == 2 and len(state["particles"]) == 4 and bool(state["xi"][0].abs().sum() > 0)
    other = PersistentES(pairs=2)
    other.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(other.xi, pes.xi))
    with pytest.raises(ValueError, match="pairs=3"):
        PersistentES(pairs=3).load_state_dict(state)
