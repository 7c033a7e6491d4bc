r"""Update networks for learned optimizers: ``nn.Module``\ s that own the meta-parameters.

Each network defines a *pure* per-tensor update,

    ``delta, new_state = net.update(p, g, state, t)``

which is differentiable with respect to the network's weights (the meta-trainer backpropagates
through it) and holds no per-parameter tensors itself: those live in ``state`` (a dict of
tensors, the optimizer's buffers), so one network serves any number of parameters.
:class:`~nestopt.optim.LearnedOptimizer` applies ``p <- p + lr * delta``.

- :class:`HybridAdamNet`: Adam's direction ``m_hat / (sqrt(v_hat) + eps)`` times a learned
  per-tensor step size ``exp(base + s)``, where ``s`` is a small MLP of scale-free per-tensor
  statistics (gradient/momentum agreement, momentum consistency, the relative update size and
  training progress). 2 buffers per parameter. At initialisation (``s = 0``) it is Adam with
  rate ``exp(base)`` (1e-3): meta-training starts from a working optimizer.
- :class:`DirectUpdateMLP`: a per-element MLP. ``features="seed"`` takes the research note's
  ``[log|g|, sign g, log|m|, sign m]``; ``"extended"`` (default) takes the gradient, two momenta
  (0.9 and 0.99) and the parameter, each divided by its tensor's RMS, plus the Adam ratios
  ``m/sqrt(v)`` and ``g/sqrt(v)``. The output ``(d, a)`` gives ``delta = -c d exp(c a)`` with
  ``c = 1e-3`` (a small initial step, as in Metz et al.'s MLP optimizers). 1 buffer per
  parameter for ``"seed"``, 3 for ``"extended"``.
- :class:`LinearUpdate`: a per-element update linear in the gradient, both momenta and the parameter
  (each divided by a per-tensor scale) and the Adam ratios: the shipped default, cheap enough to
  run as one fused elementwise pass. 3 buffers per parameter.
- :class:`CoordinateLSTM`: Andrychowicz et al. (2016)'s coordinatewise LSTM on log/sign
  preprocessed gradients (``2 * hidden`` buffers per parameter).
- :class:`GradientAttention`: one attention head over each element's last ``window`` normalised
  gradients (``window`` buffers per parameter).
"""

from __future__ import annotations

import abc
import math

import torch
from torch import nn

from .._checks import check_choice, check_int, check_number

_EPS = 1e-8


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean().add(1e-30).sqrt()


class UpdateNet(nn.Module, metaclass=abc.ABCMeta):
    """Base class: ``buffers`` names the per-parameter state, ``update`` is the pure rule."""

    kind: str = ""
    buffers: tuple[str, ...] = ()

    def init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: torch.zeros_like(p, memory_format=torch.preserve_format) for name in self.buffers}

    @abc.abstractmethod
    def update(self, p: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor], t: int
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(delta, new_state)`` for parameter ``p`` with gradient ``g`` at step ``t`` (from 1)."""

    def config(self) -> dict[str, object]:
        """What :func:`build` needs to rebuild this network (saved next to the weights)."""
        return {"kind": self.kind}


class HybridAdamNet(UpdateNet):
    """Adam direction with a learned per-tensor step size (see the module docstring).

    Args:
        hidden: width of the per-tensor MLP.
        betas, eps: Adam's.
        base_lr: the initial step size ``exp(base)`` (learned, in log space).
        max_log_scale: ``|s|`` is bounded by this (tanh), so one tensor's step is at most
            ``e^max_log_scale`` times the base rate either way.
    """

    kind = "hybrid"
    buffers = ("exp_avg", "exp_avg_sq", "m_sq", "v_sum")  # the last two are per-tensor scalars
    N_FEATURES = 4

    def __init__(self, hidden: int = 16, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 base_lr: float = 1e-3, max_log_scale: float = 3.0) -> None:
        super().__init__()
        check_int("hidden", hidden, lo=1)
        if not isinstance(betas, tuple | list) or len(betas) != 2:
            raise ValueError(f"betas={betas!r} is invalid: expected a pair (beta1, beta2) in [0, 1)")
        check_number("betas[0]", betas[0], lo=0.0, hi=1.0, hi_open=True)
        check_number("betas[1]", betas[1], lo=0.0, hi=1.0, hi_open=True)
        check_number("eps", eps, lo=0.0, lo_open=True)
        check_number("base_lr", base_lr, lo=0.0, lo_open=True)
        check_number("max_log_scale", max_log_scale, lo=0.0, lo_open=True)
        self.hidden, self.betas, self.eps, self.max_log_scale = hidden, tuple(betas), eps, max_log_scale
        self.base = nn.Parameter(torch.tensor(math.log(base_lr)))
        self.net = nn.Sequential(nn.Linear(self.N_FEATURES, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def config(self) -> dict[str, object]:
        return {"kind": self.kind, "hidden": self.hidden, "betas": list(self.betas), "eps": self.eps,
                "max_log_scale": self.max_log_scale}

    def init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        # running ||m||^2 and sum(v) of the tensor are kept by exact recursions of the moment updates
        z = torch.zeros_like(p, memory_format=torch.preserve_format)
        return {"exp_avg": z, "exp_avg_sq": z.clone(), "m_sq": torch.zeros((), dtype=torch.float64),
                "v_sum": torch.zeros((), dtype=torch.float64)}

    def log_scale(self, feats: torch.Tensor) -> torch.Tensor:
        return self.max_log_scale * torch.tanh(self.net(feats).squeeze(-1) / self.max_log_scale)

    def sums(self, p: torch.Tensor, g: torch.Tensor, m_prev: torch.Tensor) -> tuple[float, float, float]:
        """``g . m_prev``, ``||g||^2``, ``||p||^2``: the one read of the tensors a step needs."""
        gd, md, pd = g.detach().reshape(-1), m_prev.detach().reshape(-1), p.detach().reshape(-1)
        row = torch.stack([torch.dot(gd, md), torch.dot(gd, gd), torch.dot(pd, pd)]).double().tolist()
        return row[0], row[1], row[2]

    def scale_from_sums(self, gm: float, gg: float, pp: float, m_sq: float, v_sum: float, n: int, t: int
                        ) -> tuple[torch.Tensor, float, float]:
        """Log step scale ``s`` (differentiable in the weights) and the new running sums."""
        b1, b2 = self.betas
        mm = max(b1 * b1 * m_sq + 2 * b1 * (1 - b1) * gm + (1 - b1) ** 2 * gg, 0.0)  # >= 0 up to rounding
        vs = max(b2 * v_sum + (1 - b2) * gg, 0.0)
        feats = hybrid_features(gm, gg, m_sq, mm, vs, pp, n, t, self.betas, math.exp(float(self.base.detach())))
        return self.log_scale(torch.tensor(feats, dtype=self.base.dtype)), mm, vs

    def tensor_scale_from_sums(self, gm: torch.Tensor, gg: torch.Tensor, pp: torch.Tensor, m_sq: torch.Tensor,
                               v_sum: torch.Tensor, n: torch.Tensor, t: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`scale_from_sums` for many tensors at once, on float64 tensors (one entry per
        tensor) with no host read: the same operations in the same order, the features of a tensor
        NaN where the float version gives NaN. For a capturable step."""
        b1, b2 = self.betas
        mm = torch.clamp(b1 * b1 * m_sq + 2 * b1 * (1 - b1) * gm + (1 - b1) ** 2 * gg, min=0.0)
        vs = torch.clamp(b2 * v_sum + (1 - b2) * gg, min=0.0)
        feats = tensor_hybrid_features(gm, gg, m_sq, mm, vs, pp, n, t, self.betas, torch.exp(self.base.detach().double()))
        return self.log_scale(feats.to(self.base.dtype)), mm, vs

    def update(self, p, g, state, t):  # type: ignore[no-untyped-def]
        b1, b2 = self.betas
        m_prev = state["exp_avg"]
        gm, gg, pp = self.sums(p, g, m_prev)
        s, mm, vs = self.scale_from_sums(gm, gg, pp, float(state["m_sq"]), float(state["v_sum"]), p.numel(), t)
        m = torch.lerp(m_prev, g, 1 - b1)
        v = state["exp_avg_sq"] * b2 + (1 - b2) * g * g
        u = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + self.eps)
        delta = -torch.exp(self.base + s).to(p.dtype) * u
        new = {"exp_avg": m, "exp_avg_sq": v, "m_sq": torch.tensor(mm, dtype=torch.float64),
               "v_sum": torch.tensor(vs, dtype=torch.float64)}
        return delta, new


def hybrid_features(gm: float, gg: float, mm_prev: float, mm: float, vs: float, pp: float, n: int, t: int,
                    betas: tuple[float, float], base: float) -> list[float]:
    """The hybrid network's inputs from per-tensor sums: cos(g, m_prev), log(||m|| / ||g||) (how
    consistent the gradients are), the relative update size ``log(base * rms(m_hat) /
    rms(sqrt(v_hat)) / rms(p))`` / 10, and training progress ``log(1 + t) / log(1e4)``."""
    b1, b2 = betas
    cos = gm / (math.sqrt(gg * mm_prev) + 1e-30)
    consistency = math.sqrt(mm) / (math.sqrt(gg) + 1e-30)
    rms_u = (math.sqrt(mm / n) / (1 - b1**t)) / (math.sqrt(vs / n / (1 - b2**t)) + 1e-30)
    rel = math.log(max(rms_u * base / (math.sqrt(pp / n) + 1e-3), 1e-30))
    if not all(map(math.isfinite, (cos, consistency, rel))):
        return [math.nan] * 4  # a diverging run: the caller sees a non-finite step and drops it
    return [cos, math.log(consistency + 1e-8), rel / 10.0, math.log1p(t) / math.log(1e4)]


def tensor_hybrid_features(gm: torch.Tensor, gg: torch.Tensor, mm_prev: torch.Tensor, mm: torch.Tensor,
                           vs: torch.Tensor, pp: torch.Tensor, n: torch.Tensor, t: torch.Tensor,
                           betas: tuple[float, float], base: torch.Tensor) -> torch.Tensor:
    """:func:`hybrid_features` on float64 tensors (shape ``(k,)`` each, ``k`` tensors): ``(k, 4)``,
    a row of NaNs where a feature is not finite."""
    b1, b2 = betas
    cos = gm / (torch.sqrt(gg * mm_prev) + 1e-30)
    consistency = torch.sqrt(mm) / (torch.sqrt(gg) + 1e-30)
    rms_u = (torch.sqrt(mm / n) / (1 - b1**t)) / (torch.sqrt(vs / n / (1 - b2**t)) + 1e-30)
    rel = torch.log(torch.clamp(rms_u * base / (torch.sqrt(pp / n) + 1e-3), min=1e-30))
    finite = torch.isfinite(cos) & torch.isfinite(consistency) & torch.isfinite(rel)
    feats = torch.stack([cos, torch.log(consistency + 1e-8), rel / 10.0, torch.log1p(t) / math.log(1e4)], 1)
    return torch.where(finite.unsqueeze(1), feats, math.nan)


FEATURE_SETS = ("seed", "extended")


class DirectUpdateMLP(UpdateNet):
    """Per-element MLP update (see the module docstring).

    Args:
        features: ``"seed"`` or ``"extended"``.
        hidden: width of the two hidden layers.
        step_mult, exp_mult: ``c`` in ``delta = -step_mult * d * exp(exp_mult * a)``.
    """

    kind = "mlp"

    def __init__(self, features: str = "extended", hidden: int = 16, step_mult: float = 1e-3,
                 exp_mult: float = 1e-3, seed: int = 0) -> None:
        super().__init__()
        check_choice("features", features, FEATURE_SETS)
        check_int("hidden", hidden, lo=1)
        check_number("step_mult", step_mult, lo=0.0, lo_open=True)
        check_number("exp_mult", exp_mult)
        self.feature_set, self.hidden, self.step_mult, self.exp_mult = features, hidden, step_mult, exp_mult
        self.buffers = ("m",) if features == "seed" else ("m", "m_slow", "v")
        n_in = 4 if features == "seed" else 6
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, 2))

    def config(self) -> dict[str, object]:
        return {"kind": self.kind, "features": self.feature_set, "hidden": self.hidden,
                "step_mult": self.step_mult, "exp_mult": self.exp_mult}

    def advance(self, g: torch.Tensor, state: dict[str, torch.Tensor], inplace: bool = False) -> dict[str, torch.Tensor]:
        """The buffers after this gradient (in place when ``inplace``, for the optimizer)."""
        if inplace:
            state["m"].lerp_(g, 0.1)
            if self.feature_set == "extended":
                state["m_slow"].lerp_(g, 0.01)
                state["v"].mul_(0.999).addcmul_(g, g, value=0.001)
            return state
        new = {"m": torch.lerp(state["m"], g, 0.1)}
        if self.feature_set == "extended":
            new["m_slow"] = torch.lerp(state["m_slow"], g, 0.01)
            new["v"] = state["v"] * 0.999 + 0.001 * g * g
        return new

    def normalisers(self, p: torch.Tensor, g: torch.Tensor, new: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per-tensor RMS of gradient, momenta and parameter (the "normalised per tensor" part)."""
        if self.feature_set == "seed":
            return []
        return [_rms(g), _rms(new["m"]), _rms(new["m_slow"]), _rms(p) + 1e-3]

    def rows(self, p: torch.Tensor, g: torch.Tensor, new: dict[str, torch.Tensor], norms: list[torch.Tensor], t: int,
             sl: slice = slice(None)) -> torch.Tensor:
        """Input rows ``(k, n_in)`` for the elements ``sl`` of the flattened tensor."""
        g = g.reshape(-1)[sl]
        m = new["m"].reshape(-1)[sl]
        if self.feature_set == "seed":
            return torch.stack([torch.log(g.abs() + _EPS), torch.sign(g), torch.log(m.abs() + _EPS), torch.sign(m)], 1)
        m_slow, v, p = new["m_slow"].reshape(-1)[sl], new["v"].reshape(-1)[sl], p.reshape(-1)[sl]
        vh = (v / (1 - 0.999**t)).sqrt() + _EPS
        return torch.stack([g / norms[0], m / norms[1], m_slow / norms[2], p / norms[3],
                            (m / (1 - 0.9**t)) / vh, g / vh], 1)

    def step_from_rows(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x.to(self.net[0].weight.dtype))
        return -self.step_mult * out[:, 0] * torch.exp(self.exp_mult * out[:, 1])

    def update(self, p, g, state, t):  # type: ignore[no-untyped-def]
        new = self.advance(g, state)
        delta = self.step_from_rows(self.rows(p, g, new, self.normalisers(p, g, new), t))
        return delta.reshape(p.shape).to(p.dtype), new


class LinearUpdate(UpdateNet):
    """A per-element update linear in cheap, scale-free features: the shipped default, because its
    whole step is one elementwise pass plus two per-tensor dot products (see
    :class:`~nestopt.optim.LearnedOptimizer`), where a per-element MLP costs tens of Adam steps.

    ``delta = -c (w . x + b)`` with ``c`` = ``step_mult`` and
    ``x = [g/r, m/r, m_slow/r, p/r_p, m_hat/v_hat, g/v_hat]``: momenta 0.9 (``m``) and 0.99
    (``m_slow``), ``v`` the 0.999 average of ``g^2`` (``m_hat``, ``v_hat = sqrt(v/(1-0.999^t)) + 1e-8``
    bias-corrected as in Adam), ``r = sqrt(vbar/(1-0.999^t))`` with ``vbar`` the same average of
    the tensor's mean ``g^2`` (one scalar per tensor, so ``r`` is the tensor's gradient RMS over the
    same window), and ``r_p`` the parameter's RMS plus 1e-3. Every feature is unchanged when the
    loss is scaled. 3 buffers and one scalar per parameter tensor.
    """

    kind = "linear"
    buffers = ("m", "m_slow", "v")

    def __init__(self, step_mult: float = 1e-3, seed: int = 0) -> None:
        super().__init__()
        check_number("step_mult", step_mult, lo=0.0, lo_open=True)
        self.step_mult = step_mult
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Linear(6, 1)

    def config(self) -> dict[str, object]:
        return {"kind": self.kind, "step_mult": self.step_mult}

    def init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        z = torch.zeros_like(p, memory_format=torch.preserve_format)
        return {"m": z, "m_slow": z.clone(), "v": z.clone(), "v_bar": torch.zeros((), dtype=torch.float64)}

    @staticmethod
    def scales(g_sq_mean: float, v_bar: float, p_sq_mean: float, t: int) -> tuple[float, float, float]:
        """``(v_bar', r, r_p)`` from the tensor's mean ``g^2`` and ``p^2`` (host floats: what the
        optimizer's fast path computes once per tensor)."""
        v_bar = 0.999 * v_bar + 0.001 * g_sq_mean
        return v_bar, math.sqrt(v_bar / (1 - 0.999**t) + 1e-30), math.sqrt(p_sq_mean + 1e-30) + 1e-3

    @staticmethod
    def tensor_scales(g_sq_mean: torch.Tensor, v_bar: torch.Tensor, p_sq_mean: torch.Tensor, t: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`scales` on float64 tensors (one entry per tensor), with no host read: the same
        operations in the same order. For a capturable step."""
        v_bar = 0.999 * v_bar + 0.001 * g_sq_mean
        return v_bar, torch.sqrt(v_bar / (1 - 0.999**t) + 1e-30), torch.sqrt(p_sq_mean + 1e-30) + 1e-3

    def update(self, p, g, state, t):  # type: ignore[no-untyped-def]
        m = torch.lerp(state["m"], g, 0.1)
        m_slow = torch.lerp(state["m_slow"], g, 0.01)
        v = state["v"] * 0.999 + 0.001 * g * g
        v_bar = state["v_bar"] * 0.999 + 0.001 * g.double().pow(2).mean()
        r = (v_bar / (1 - 0.999**t) + 1e-30).sqrt().to(g.dtype)
        r_p = (p.double().pow(2).mean() + 1e-30).sqrt().to(p.dtype) + 1e-3
        vh = (v / (1 - 0.999**t)).sqrt() + _EPS
        x = torch.stack([g / r, m / r, m_slow / r, p / r_p, (m / (1 - 0.9**t)) / vh, g / vh], -1)
        delta = -self.step_mult * self.net(x.to(self.net.weight.dtype)).squeeze(-1)
        return delta.to(p.dtype), {"m": m, "m_slow": m_slow, "v": v, "v_bar": v_bar}


def _preprocess(g: torch.Tensor, p: float = 10.0) -> torch.Tensor:
    """Andrychowicz et al.'s gradient preprocessing, per element: ``(log|g| / p, sign g)`` when
    ``|g| >= e^-p``, else ``(-1, e^p g)``. Returns ``(numel, 2)``."""
    g = g.reshape(-1)
    big = g.abs() >= math.exp(-p)
    a = torch.where(big, torch.log(g.abs().clamp_min(1e-38)) / p, torch.full_like(g, -1.0))
    b = torch.where(big, torch.sign(g), g * math.exp(p))
    return torch.stack([a, b], 1)


class CoordinateLSTM(UpdateNet):
    """Coordinatewise LSTM (Andrychowicz et al. 2016): one small LSTM shared by every element, fed
    the preprocessed gradient; its hidden and cell states are the per-parameter buffers
    (``2 * hidden`` floats per parameter). ``delta = -step_mult * Linear(h)``.
    """

    kind = "lstm"

    def __init__(self, hidden: int = 8, step_mult: float = 1e-3, seed: int = 0) -> None:
        super().__init__()
        check_int("hidden", hidden, lo=1)
        check_number("step_mult", step_mult, lo=0.0, lo_open=True)
        self.hidden, self.step_mult = hidden, step_mult
        self.buffers = ("h", "c")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.cell = nn.LSTMCell(2, hidden)
            self.out = nn.Linear(hidden, 1)

    def config(self) -> dict[str, object]:
        return {"kind": self.kind, "hidden": self.hidden, "step_mult": self.step_mult}

    def init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: torch.zeros(p.numel(), self.hidden, dtype=self.out.weight.dtype, device=p.device) for k in self.buffers}

    def update(self, p, g, state, t):  # type: ignore[no-untyped-def]
        x = _preprocess(g).to(self.out.weight.dtype)
        h, c = self.cell(x, (state["h"], state["c"]))
        delta = -self.step_mult * self.out(h).squeeze(1)
        return delta.reshape(p.shape).to(p.dtype), {"h": h, "c": c}


class GradientAttention(UpdateNet):
    """Attention over a short window of past gradients, per element: the last ``window``
    gradients (each divided by its tensor's RMS at the time) are embedded, the newest one queries
    them (one head), and a linear read-out of the attended value gives the step
    (``window`` floats per parameter). ``delta = -step_mult * out``.
    """

    kind = "attention"

    def __init__(self, window: int = 8, dim: int = 8, step_mult: float = 1e-3, seed: int = 0) -> None:
        super().__init__()
        check_int("window", window, lo=1)
        check_int("dim", dim, lo=1)
        check_number("step_mult", step_mult, lo=0.0, lo_open=True)
        self.window, self.dim, self.step_mult = window, dim, step_mult
        self.buffers = ("history",)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = nn.Linear(2, dim)  # (value, age) -> embedding
            self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
            self.out = nn.Linear(dim, 1)

    def config(self) -> dict[str, object]:
        return {"kind": self.kind, "window": self.window, "dim": self.dim, "step_mult": self.step_mult}

    def init_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"history": torch.zeros(p.numel(), self.window, dtype=self.out.weight.dtype, device=p.device)}

    def update(self, p, g, state, t):  # type: ignore[no-untyped-def]
        gn = (g / _rms(g)).reshape(-1, 1).to(self.out.weight.dtype)
        hist = torch.cat([state["history"][:, 1:], gn], 1)  # oldest first, newest last
        age = torch.linspace(-1.0, 0.0, self.window, dtype=hist.dtype, device=hist.device).expand_as(hist)
        e = self.embed(torch.stack([hist, age], 2))  # (numel, window, dim)
        q = self.q(e[:, -1:, :])
        w = torch.softmax((q * self.k(e)).sum(-1) / math.sqrt(self.dim), dim=1)  # (numel, window)
        ctx = (w.unsqueeze(-1) * self.v(e)).sum(1)
        delta = -self.step_mult * self.out(ctx).squeeze(1)
        return delta.reshape(p.shape).to(p.dtype), {"history": hist}


KINDS = {"hybrid": HybridAdamNet, "mlp": DirectUpdateMLP, "linear": LinearUpdate, "lstm": CoordinateLSTM, "attention": GradientAttention}
