"""AdaLoRA's rank allocation during training (the schedule of PEFT's `RankAllocator` and
`AdaLoraModel.update_and_allocate`), for the `adalora` sites of one adapter set.

```python
allocator = surgery.AdaLoRAAllocator(model, total_step=len(loader) * epochs)
for step, batch in enumerate(loader):
    loss = model(**batch).loss          # includes the orthogonality penalty (PEFT's forward adds it too)
    loss.backward(); optimizer.step()
    allocator.update_and_allocate(step) # after backward, before zero_grad
    optimizer.zero_grad()
trainer = Trainer(..., callbacks=[allocator.callback()])   # or: the same from a transformers Trainer
```

Importance of each parameter element: I = |θ·∇θ|, smoothed Ī ← β₁Ī + (1−β₁)I, uncertainty Ū ← β₂Ū + (1−β₂)|I − Ī|,
score s = Ī·Ū; a triplet i of a site scores s(λᵢ) + mean_j s(Aᵢⱼ) + mean_j s(Bⱼᵢ). Budget b(t): Σ init_r for
t ≤ tinit, then target_r·sites + (Σ init_r − target_r·sites)·(1 − (t−tinit)/(T−tfinal−tinit))³, every deltaT
steps the triplets scoring at or below the (Σ init_r − b)-th smallest score get λ = 0; at t = T − tfinal the
pattern is fixed (kept in each site's `rank_pattern` buffer, saved) and re-applied every later step.
"""
from __future__ import annotations

import torch
from torch import nn

from surgery.errors import SurgeryError
from surgery.modules.adalora import AdaLoRA
from surgery.rewrite.host import store_of


class AdaLoRAAllocator:
    """Reallocates the rank budget of adapter set `name`'s AdaLoRA sites (default: the only set having some).

    `total_step` overrides the spec's. With `add_orth_reg=True` (PEFT's behaviour) a forward hook on `model` adds
    orth_reg_weight · the orthogonality penalty to the output's `loss` whenever the output has one; `remove()`
    takes the hook away. Errors: no AdaLoRA sites, sites with different schedules, no total_step.
    """

    def __init__(self, model: nn.Module, name: str | None = None, *, total_step: int | None = None,
                 add_orth_reg: bool = True):
        store = store_of(model)
        records = store.records if store is not None else {}
        found = {n: [s for s in r.weight_sites if isinstance(s.adapter, AdaLoRA)] for n, r in records.items()}
        found = {n: sites for n, sites in found.items() if sites}
        if name is None:
            if len(found) != 1:
                raise SurgeryError(f"AdaLoRAAllocator: pass name= (adapter sets with AdaLoRA sites: {sorted(found)})")
            name = next(iter(found))
        if name not in found:
            raise SurgeryError(f"AdaLoRAAllocator: adapter set {name!r} has no AdaLoRA sites; sets with some: "
                               f"{sorted(found)}")
        self.sites = {f"{s.rule}/{s.key}": s.adapter for s in found[name]}
        schedules = {self._schedule(a.options) for a in self.sites.values()}
        if len(schedules) != 1:
            raise SurgeryError(f"AdaLoRAAllocator: the AdaLoRA rules of {name!r} have different schedules "
                               f"{sorted(schedules)}; one allocator shares one budget")
        options = next(iter(self.sites.values())).options
        self.target_r, self.tinit, self.tfinal, self.deltaT = (options.target_r, options.tinit, options.tfinal,
                                                               options.deltaT)
        self.beta1, self.beta2, self.orth_reg_weight = options.beta1, options.beta2, options.orth_reg_weight
        self.total_step = total_step if total_step is not None else options.total_step
        if not self.total_step:
            raise SurgeryError("AdaLoRAAllocator: total_step is not set (give it in the spec or here)")
        if self.total_step - self.tfinal <= self.tinit:
            raise SurgeryError(f"AdaLoRAAllocator: total_step {self.total_step} leaves no pruning phase after "
                               f"tinit {self.tinit} and before tfinal {self.tfinal}")
        self.init_bgt = sum(a.lora_E.shape[0] for a in self.sites.values())
        self.target_bgt = self.target_r * len(self.sites)
        self.rank_pattern: dict[str, torch.Tensor] | None = None
        self.reset_ipt()
        self._handle = model.register_forward_hook(self._add_orth_reg) if add_orth_reg else None

    @staticmethod
    def _schedule(o) -> tuple:
        return (o.target_r, o.tinit, o.tfinal, o.deltaT, o.beta1, o.beta2, o.orth_reg_weight, o.total_step)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    # -------------------------------------------------------------- the penalty

    def orthogonal_regularization(self) -> torch.Tensor:
        """mean over every A and B of ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F (PEFT's, before the weight)."""
        terms = []
        for adapter in self.sites.values():
            for p, cov in ((adapter.lora_A, adapter.lora_A @ adapter.lora_A.T),
                           (adapter.lora_B, adapter.lora_B.T @ adapter.lora_B)):
                eye = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
                terms.append(torch.norm(cov - eye, p="fro"))
        return torch.stack(terms).mean()

    def _add_orth_reg(self, module, args, output):
        loss = getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor):
            output.loss = loss + self.orth_reg_weight * self.orthogonal_regularization()
        return output

    # -------------------------------------------------------------- importance and budget

    def reset_ipt(self) -> None:
        self.exp_avg_ipt: dict[tuple[str, str], torch.Tensor] = {}
        self.exp_avg_unc: dict[tuple[str, str], torch.Tensor] = {}

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """(budget, whether to mask at this step)."""
        if step <= self.tinit:
            return self.init_bgt, False
        if step > self.total_step - self.tfinal:
            return self.target_bgt, True
        coeff = 1 - (step - self.tinit) / (self.total_step - self.tfinal - self.tinit)
        budget = int((self.init_bgt - self.target_bgt) * (coeff ** 3) + self.target_bgt)
        return budget, step % self.deltaT == 0

    @torch.no_grad()
    def update_ipt(self) -> None:
        for key, adapter in self.sites.items():
            for pname in ("lora_A", "lora_B", "lora_E"):
                p = getattr(adapter, pname)
                if p.grad is None:
                    raise SurgeryError(f"AdaLoRAAllocator: {key}.{pname} has no gradient; call update_and_allocate "
                                       f"after backward and before zero_grad")
                ipt = (p * p.grad).abs().detach()
                avg = self.exp_avg_ipt.get((key, pname), torch.zeros_like(p))
                unc = self.exp_avg_unc.get((key, pname), torch.zeros_like(p))
                avg = self.beta1 * avg + (1 - self.beta1) * ipt
                self.exp_avg_unc[(key, pname)] = self.beta2 * unc + (1 - self.beta2) * (ipt - avg).abs()
                self.exp_avg_ipt[(key, pname)] = avg

    def _score(self, key: str, pname: str) -> torch.Tensor:
        return self.exp_avg_ipt[(key, pname)] * self.exp_avg_unc[(key, pname)]

    @torch.no_grad()
    def mask_to_budget(self, budget: int) -> dict[str, torch.Tensor]:
        """Zero the λ of the lowest-scoring triplets so that `budget` remain; the kept pattern per site."""
        triplets = {}
        for key in self.sites:
            a = self._score(key, "lora_A").mean(dim=1, keepdim=True)
            b = self._score(key, "lora_B").mean(dim=0).view(-1, 1)
            triplets[key] = self._score(key, "lora_E").view(-1) + torch.cat([a, b], dim=1).sum(dim=1)
        pattern = {}
        k = self.init_bgt - budget
        threshold = torch.kthvalue(torch.cat(list(triplets.values())), k=k)[0].item() if k > 0 else None
        for key, adapter in self.sites.items():
            keep = triplets[key] > threshold if threshold is not None else torch.ones_like(triplets[key], dtype=bool)
            adapter.lora_E.masked_fill_(~keep.view(-1, 1), 0.0)
            pattern[key] = keep
        return pattern

    @torch.no_grad()
    def mask_using_rank_pattern(self) -> None:
        for key, adapter in self.sites.items():
            adapter.lora_E.masked_fill_(~self.rank_pattern[key].view(-1, 1).to(adapter.lora_E.device), 0.0)

    def update_and_allocate(self, global_step: int) -> int | None:
        """One step of the schedule (call after backward, before zero_grad). Returns the budget, or None once
        the allocation is fixed."""
        final = self.total_step - self.tfinal
        if global_step < final:
            self.update_ipt()
            budget, mask = self.budget_schedule(global_step)
            if mask:
                self.rank_pattern = self.mask_to_budget(budget)
            return budget
        if global_step == final:
            budget, _ = self.budget_schedule(global_step)
            self.rank_pattern = self.mask_to_budget(budget)
            for key, adapter in self.sites.items():
                adapter.rank_pattern.copy_(self.rank_pattern[key])
            self.reset_ipt()
            return budget
        if self.rank_pattern is None:
            self.rank_pattern = {key: a.rank_pattern.clone() for key, a in self.sites.items()}
        self.mask_using_rank_pattern()
        return None

    def callback(self):
        """A transformers TrainerCallback calling `update_and_allocate(state.global_step)` after each optimizer
        step (before the Trainer zeroes the gradients)."""
        from transformers import TrainerCallback

        allocator = self

        class AdaLoRACallback(TrainerCallback):
            def on_optimizer_step(self, args, state, control, **kwargs):
                allocator.update_and_allocate(state.global_step)

        return AdaLoRACallback()
