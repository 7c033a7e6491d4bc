"""The inner runs a network is meta-trained on: an update network's own training of a sampled task
(:class:`_Inner`, written functionally so the meta-loss is differentiable in the network's weights) or a
nested optimizer's with a :class:`~nestopt.nets.Controller` (:class:`_ControllerInner`). Both carry
their state across truncations and can snapshot and restore it (the ES particles replay from it)."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from .. import tasks as task_registry
from .._checks import check_seed
from ..nets import UpdateNet
from ..train import LoopResult, train_loop


class _Loss(nn.Module):
    """``task.loss(model, batch)`` as a module, so ``functional_call`` can swap in the parameters."""

    def __init__(self, task: Any, model: nn.Module) -> None:
        super().__init__()
        self.task, self.model = task, model

    def forward(self, batch: Any) -> torch.Tensor:
        return self.task.loss(self.model, batch)


class _Inner:
    """One task's inner training run, carried across truncations."""

    def __init__(self, net: UpdateNet, family: str, seed: int) -> None:
        self.family, self.seed = family, seed
        self.task = task_registry.family(family).sample(seed)
        model = self.task.init(seed)
        self.module = _Loss(self.task, model)
        self.params = {f"model.{k}": v.detach().clone() for k, v in model.named_parameters()}
        self.state = {k: net.init_state(v) for k, v in self.params.items()}
        self.next_batch = self.task.sampler(seed)
        self.t = 0
        self.loss0: float | None = None
        self.name = getattr(self.task, "name", family)

    def surrogate(self, net: UpdateNet, steps: int, step_size: float) -> tuple[torch.Tensor, list[float]]:
        """The research note's surrogate for ``DirectUpdateMLP``: at each step, ``1 - cos(delta,
        -g)`` plus ``(log rms(delta) - log step_size)^2``, through that step's update only (no
        backpropagation through the trajectory); the inner run follows the network's own updates."""
        terms, losses = [], []
        for _ in range(steps):
            params = {k: v.requires_grad_() for k, v in self.params.items()}
            batch = self.next_batch(self.t)
            loss = functional_call(self.module, params, (batch,))
            if self.loss0 is None:
                self.loss0 = max(float(loss.detach()), 1e-12)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            self.t += 1
            step_terms = []
            for (k, p), g in zip(params.items(), grads):
                g = torch.zeros_like(p) if g is None else g
                delta, self.state[k] = net.update(p.detach(), g, self.state[k], self.t)
                self.state[k] = {n: b.detach() for n, b in self.state[k].items()}
                cos = (delta.reshape(-1) @ -g.reshape(-1)) / (delta.norm() * g.norm() + 1e-12)
                mag = torch.log(delta.pow(2).mean().add(1e-30).sqrt()) - math.log(step_size)
                step_terms.append(1.0 - cos + mag * mag)
                self.params[k] = (p + delta).detach()
            terms.append(torch.stack(step_terms).mean())
            losses.append(float(loss.detach()))
        return torch.stack(terms).mean(), losses

    def draw(self, steps: int) -> list[Any]:
        """The next ``steps + 1`` batches, so several unrolls can see the same ones (ES pairs)."""
        return [self.next_batch(self.t + i) for i in range(steps + 1)]

    def snapshot(self) -> tuple[Any, ...]:
        return dict(self.params), {k: dict(v) for k, v in self.state.items()}, self.t, self.loss0

    def restore(self, snap: tuple[Any, ...]) -> None:
        params, state, self.t, self.loss0 = snap
        self.params = {k: v.detach() for k, v in params.items()}
        self.state = {k: dict(v) for k, v in state.items()}

    def unroll(self, net: UpdateNet, steps: int, second_order: bool, batches: list[Any] | None = None
               ) -> tuple[torch.Tensor, list[float]]:
        params = {k: v.detach().requires_grad_() for k, v in self.params.items()}
        state = self.state
        terms, losses = [], []
        for j in range(steps):
            batch = batches[j] if batches is not None else self.next_batch(self.t)
            loss = functional_call(self.module, params, (batch,))
            if self.loss0 is None:
                self.loss0 = max(float(loss.detach()), 1e-12)
            grads = torch.autograd.grad(loss, list(params.values()), create_graph=second_order,
                                        retain_graph=True, allow_unused=True)
            self.t += 1
            new_params, new_state = {}, {}
            for (k, p), g in zip(params.items(), grads):
                g = torch.zeros_like(p) if g is None else (g if second_order else g.detach())
                delta, new_state[k] = net.update(p, g, state[k], self.t)
                new_params[k] = p + delta
            params, state = new_params, new_state
            terms.append(torch.log(loss / self.loss0 + 1e-12))
            losses.append(float(loss.detach()))
        # the loss after the last update closes the unroll
        batch = batches[steps] if batches is not None else self.next_batch(self.t)
        last = functional_call(self.module, params, (batch,))
        terms.append(torch.log(last / self.loss0 + 1e-12))
        self.params = {k: v.detach() for k, v in params.items()}
        self.state = {k: {n: b.detach() for n, b in s.items()} for k, s in state.items()}
        return torch.stack(terms).mean(), losses


class _ControllerInner:
    """A task trained by ``NestedOptimizer(AdamW, signal="frozen", controller=net)``, one group per
    tensor, at a base rate drawn log-uniformly from ``CONTROLLER_LRS`` (1e-4 to 1) by the task's
    seed: rates far too small and far too large for every family, so a controller that helps
    across them has to correct in both directions. Same interface as :class:`_Inner` for ES and
    PES (its meta-loss is not differentiable in ``net``)."""

    def __init__(self, net: Any, family: str, seed: int) -> None:
        from ..optim.nested import NestedOptimizer

        self.family, self.seed = family, seed
        self.task = task_registry.family(family).sample(seed)
        self.model = self.task.init(seed)
        lo, hi = (math.log(x) for x in CONTROLLER_LRS)
        u = torch.rand((), generator=torch.Generator().manual_seed(seed + 1)).item()
        self.lr = math.exp(lo + (hi - lo) * u)
        self.opt = NestedOptimizer(self.model.parameters(), torch.optim.AdamW, controller=net, signal="frozen",
                                   features=net.features, per_tensor_groups=True, lr=self.lr)
        self.next_batch = self.task.sampler(seed)
        self.t = 0
        self.loss0: float | None = None
        self.name = f"{getattr(self.task, 'name', family)} lr {self.lr:.1e}"

    draw = _Inner.draw

    def step_inputs(self) -> dict[str, Any]:
        """Keywords for the nested step at inner step ``self.t`` (for features that read them; none here)."""
        return {}

    def snapshot(self) -> tuple[Any, ...]:
        return ({k: v.clone() for k, v in self.model.state_dict().items()},
                copy.deepcopy(self.opt.state_dict(controller=False)), self.t, self.loss0)

    def restore(self, snap: tuple[Any, ...]) -> None:
        model, opt, self.t, self.loss0 = snap
        self.model.load_state_dict(model)
        self.opt.load_state_dict(opt)  # saved without the controller: its weights are the ones set now

    def unroll(self, net: Any, steps: int, second_order: bool, batches: list[Any] | None = None
               ) -> tuple[torch.Tensor, list[float]]:
        if second_order:
            raise ValueError("a nested controller is meta-trained by ES or PES: its runs are not differentiable")
        terms, losses = [], []

        def batch_at(j: int) -> Any:
            return batches[j] if batches is not None else self.next_batch(self.t)

        def loss_at(j: int) -> torch.Tensor:
            return self.task.loss(self.model, batch_at(j))

        def record(step: int, loss: float, res: LoopResult) -> None:
            self.t += 1
            if self.loss0 is None:
                self.loss0 = max(loss, 1e-12)
            terms.append(math.log(loss / self.loss0 + 1e-12))
            losses.append(loss)

        # the nested step reads the loss: step(loss=...) after the closure's backward; a non-finite loss
        # does not stop the run (its meta-loss reports it), and errors propagate
        train_loop(self.opt, steps, lambda b: self.task.loss(self.model, b), batch=batch_at,
                   step_fn=lambda c: (loss := c(), self.opt.step(loss=loss, **self.step_inputs()))[0], on_step=record,
                   divergence=None, catch=())
        with torch.no_grad():
            last = float(loss_at(steps))
        terms.append(math.log(last / self.loss0 + 1e-12) if math.isfinite(last) else math.nan)
        return torch.tensor(sum(terms) / len(terms)), losses


CONTROLLER_LRS = (1e-4, 1.0)


def make_inner(net: Any, family: str, seed: int) -> _Inner | _ControllerInner:
    """The inner run a network is meta-trained on: an update network's own, or a nested optimizer's
    for a :class:`~nestopt.nets.Controller`."""
    from ..nets import Controller

    if not isinstance(net, UpdateNet | Controller):
        raise TypeError(f"net={type(net).__name__} is invalid: expected an UpdateNet (HybridAdamNet, LinearUpdate, ...) "
                        "or a nested optimizer's Controller")
    if not isinstance(family, str):
        raise TypeError(f"family={family!r} is invalid: expected a task family name ({', '.join(task_registry.family_names())})")
    check_seed("seed", seed)
    return _ControllerInner(net, family, seed) if isinstance(net, Controller) else _Inner(net, family, seed)
