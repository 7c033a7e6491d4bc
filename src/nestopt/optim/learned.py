r"""``LearnedOptimizer``: a drop-in ``torch.optim.Optimizer`` whose update comes from an update
network (:mod:`nestopt.meta.nets`).

    ``p <- p * (1 - lr * c * weight_decay) + lr * delta``,  ``delta, state = net.update(p, g, state, t)``

where ``c`` is the network's own step size (decay is decoupled and scaled like the step, as in
AdamW). ``lr`` is a plain multiplier (default 1: the network's learned step sizes as they are), so
torch schedulers work; ``step()`` needs no closure; the optimizer holds only the per-parameter
buffers the network names (``state_dict`` round-trips them), never the network's weights.

``net`` is an :class:`~nestopt.meta.nets.UpdateNet`, or a path to a ``.safetensors`` file written
by :func:`save_net`. A missing, unreadable or mismatched file raises ``ValueError`` naming the file
and what was expected; nothing falls back silently. ``net="default"`` is reserved for the
pretrained network the package will ship; until it does, it raises and says so.

Fast paths (each tested against the network's reference ``update``): the hybrid network runs
torch's fused AdamW kernel per tensor at the learned rate, with its per-tensor statistics kept by
exact recursions (one extra read of gradients, momenta and parameters); the per-element MLP is
evaluated in chunks so the hidden activations stay in cache.

A non-finite gradient skips the whole step (``opt.counters["nonfinite"]``).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.adamw import adamw as _adamw

from .._checks import check_number
from ..meta.nets import DirectUpdateMLP, HybridAdamNet, UpdateNet, build
from .hypergradient import fused_ok

SHIPPED = Path(__file__).resolve().parent.parent / "meta" / "weights" / "default.safetensors"
FORMAT = "nestopt-update-net/1"


def save_net(net: UpdateNet, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``net``'s weights and configuration to a ``.safetensors`` file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    header = {"format": FORMAT, "config": json.dumps(net.config()), "meta": json.dumps(meta or {})}
    save_file(tensors, str(path), metadata=header)
    return path


def load_net(path: str | Path) -> torch.nn.Module:
    """The network stored at ``path`` (see :func:`save_net`); ``ValueError`` naming the file if
    it is missing, unreadable, of another format, or its tensors do not fit its configuration."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"net={str(path)!r} is invalid: no such file (expected a .safetensors file "
                         "written by nestopt.optim.learned.save_net)")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"net file {str(path)!r} could not be read as safetensors: {e}") from e
    if header.get("format") != FORMAT:
        raise ValueError(f"net file {str(path)!r} has format {header.get('format')!r}; expected {FORMAT!r}")
    try:
        net = build(json.loads(header["config"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"net file {str(path)!r} has an invalid configuration: {e}") from e
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != got:
        raise ValueError(f"net file {str(path)!r} does not match its configuration {net.config()}: "
                         f"expected tensors {expected}, found {got}")
    net.load_state_dict(tensors)
    return net


def net_metadata(path: str | Path) -> dict[str, Any]:
    """The ``meta`` record stored with a network file (how it was made), ``{}`` if none."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("meta", "{}"))


def _resolve(net: UpdateNet | str | Path) -> UpdateNet:
    if isinstance(net, UpdateNet):
        return net
    if isinstance(net, str) and net == "default":
        if not SHIPPED.is_file():
            raise ValueError("net='default' is invalid in this version: nestopt does not ship pretrained "
                             f"weights yet (expected {SHIPPED}); pass an UpdateNet or a path written by save_net")
        return load_net(SHIPPED)
    if isinstance(net, str | Path):
        loaded = load_net(net)
        if not isinstance(loaded, UpdateNet):
            raise ValueError(f"net file {str(net)!r} holds a {loaded.config()['kind']}, not an update network: "
                             "pass it to NestedOptimizer(controller=...)")
        return loaded
    raise ValueError(f"net={net!r} is invalid: expected 'default', a path to a .safetensors file, or an UpdateNet")


class LearnedOptimizer(Optimizer):
    """See the module docstring.

    Args:
        params: parameters or param-group dicts.
        net: ``"default"``, a path, or an :class:`~nestopt.meta.nets.UpdateNet`.
        lr: multiplier on the network's update (what a scheduler drives).
        weight_decay: decoupled decay, scaled by ``lr`` and the network's step size.
        chunk: elements per chunk for the per-element MLP's evaluation (default: 32768 on the
            CPU, where the hidden activations then stay in cache; whole tensors on a GPU, where
            each chunk costs kernel launches).
    """

    def __init__(self, params: Iterable[Any], net: UpdateNet | str | Path = "default", lr: float = 1.0,
                 weight_decay: float = 0.0, *, chunk: int | None = None) -> None:
        check_number("lr", lr, lo=0.0)
        check_number("weight_decay", weight_decay, lo=0.0)
        self.net = _resolve(net)
        self.net.requires_grad_(False)
        self.chunk = chunk
        self.counters = {"steps": 0, "nonfinite": 0}
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(g, p) for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not work:
            return loss
        for _, p in work:
            st = self.state[p]
            if not st:
                st.update(self.net.init_state(p))
                st["step"] = torch.zeros((), dtype=torch.float32)
                for k, v in list(st.items()):
                    if k != "step" and v.dim() == 0:
                        # per-tensor scalars as Python floats: Optimizer.load_state_dict would cast a
                        # float64 tensor to the parameter's dtype and lose the round trip
                        st[k] = float(v)
        if isinstance(self.net, HybridAdamNet):
            ok = self._hybrid(work)
        else:
            ok = self._generic(work)
        if ok:
            self.counters["steps"] += 1
        else:
            self.counters["nonfinite"] += 1
        return loss

    # -- the hybrid network on torch's fused AdamW kernel -------------------------------------------
    def _hybrid(self, work: list[tuple[dict[str, Any], torch.Tensor]]) -> bool:
        net = self.net
        assert isinstance(net, HybridAdamNet)
        b1, b2 = net.betas
        ps = [p for _, p in work]
        gs = [p.grad for p in ps]
        ms = [self.state[p]["exp_avg"] for p in ps]
        # One read of gradients, momenta and parameters for every tensor, one host sync.
        rows = [torch.stack([torch.dot(g.reshape(-1), m.reshape(-1)), torch.dot(g.reshape(-1), g.reshape(-1)),
                             torch.dot(p.reshape(-1), p.reshape(-1))]).double() for g, m, p in zip(gs, ms, ps)]
        host = torch.stack(rows).tolist()
        if not all(math.isfinite(v) for row in host for v in row):
            return False
        base = math.exp(float(net.base))
        plan = []
        for (group, p), (gm, gg, pp) in zip(work, host):
            st = self.state[p]
            s, mm, vs = net.scale_from_sums(gm, gg, pp, float(st["m_sq"]), float(st["v_sum"]), p.numel(),
                                            int(st["step"]) + 1)
            plan.append((group["lr"] * base * math.exp(float(s)), mm, vs))
        if not all(math.isfinite(lr_i) for lr_i, _, _ in plan):
            return False  # a degenerate feature: nothing has been touched yet
        for (group, p), g, m, (lr_i, mm, vs) in zip(work, gs, ms, plan):
            st, fused = self.state[p], fused_ok([p])
            # torch's AdamW kernel at this tensor's rate (it advances st["step"] itself)
            _adamw([p], [g], [m], [st["exp_avg_sq"]], [], [st["step"]], foreach=not fused,
                   fused=fused, amsgrad=False, beta1=b1, beta2=b2, lr=lr_i,
                   weight_decay=group["weight_decay"], eps=net.eps, maximize=False)
            st["m_sq"], st["v_sum"] = mm, vs
        return True

    def _net_on(self, device: torch.device) -> UpdateNet:
        """The network on ``device`` (a copy per device, made once; the CPU original is kept)."""
        if device.type == "cpu":
            return self.net
        cache = self.__dict__.setdefault("_device_nets", {})
        if device not in cache:
            cache[device] = copy.deepcopy(self.net).to(device)
        return cache[device]

    # -- any network through its reference update (the MLP chunked) --------------------------------
    def _generic(self, work: list[tuple[dict[str, Any], torch.Tensor]]) -> bool:
        gs = [p.grad for _, p in work]
        if not all(math.isfinite(v) for v in torch.stack([torch.dot(g.reshape(-1), g.reshape(-1)) for g in gs]).tolist()):
            return False
        for group, p in work:
            st = self.state[p]
            st["step"] += 1
            t = int(st["step"])
            net = self._net_on(p.device)
            bufs = {k: st[k] for k in self.net.buffers}
            c = getattr(net, "step_mult", 1.0)
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * c * group["weight_decay"])
            if isinstance(net, DirectUpdateMLP):
                chunk = self.chunk or (1 << 15 if p.device.type == "cpu" else 1 << 62)
                _mlp_apply_(net, p, p.grad, bufs, t, chunk, group["lr"])
                continue
            delta, new = net.update(p, p.grad, bufs, t)
            p.add_(delta, alpha=group["lr"])
            for k, v in new.items():
                st[k].copy_(v)
        return True


def _mlp_apply_(net: DirectUpdateMLP, p: torch.Tensor, g: torch.Tensor, state: dict[str, torch.Tensor], t: int,
                chunk: int, alpha: float) -> None:
    """``p += alpha * delta`` with ``delta`` from ``net.update``, evaluated ``chunk`` elements at a
    time so the hidden activations stay in cache, and the buffers advanced in place (same
    arithmetic as the reference; the per-tensor normalisers are computed over the whole tensor
    first)."""
    new = net.advance(g, state, inplace=True)
    norms = net.normalisers(p, g, new)
    flat = p.view(-1) if p.is_contiguous() else None
    if flat is None:  # rare: a non-contiguous parameter
        p.add_(net.step_from_rows(net.rows(p, g, new, norms, t)).reshape(p.shape).to(p.dtype), alpha=alpha)
        return
    n = flat.numel()
    for i in range(0, n, chunk):
        sl = slice(i, min(i + chunk, n))
        flat[sl].add_(net.step_from_rows(net.rows(p, g, new, norms, t, sl)).to(p.dtype), alpha=alpha)
