"""Helpers for the routing tests (random LoRA experts with mixed ranks, a plain MLP)."""

from __future__ import annotations

import torch
from torch import nn

from moerge.experts.expert import Expert, ExpertMetadata, LoraModule
from moerge.model.expert_layer import module_dims


class TwoLayerMLP(nn.Module):
    def __init__(self, d: int = 16, h: int = 24, out: int = 8):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(h, out)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def linear_module_names(model: nn.Module) -> list[str]:
    names = []
    for n, m in model.named_modules():
        if "lm_head" in n or n.endswith("wte"):
            continue
        if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D":
            names.append(n)
    return names


def make_experts(
    model: nn.Module,
    num: int,
    ranks=(2, 4, 3),
    seed: int = 0,
    scale: float = 0.2,
    modules: list[str] | None = None,
) -> list[Expert]:
    """Random LoRA experts over every linear module, ranks cycling through ``ranks`` (mixed ranks)."""
    gen = torch.Generator().manual_seed(seed)
    fan = type(model.get_submodule(linear_module_names(model)[0])).__name__ == "Conv1D"
    experts = []
    for i in range(num):
        r = ranks[i % len(ranks)]
        lora = {}
        for n in modules or linear_module_names(model):
            d_in, d_out = module_dims(model.get_submodule(n))
            A = torch.randn(r, d_in, generator=gen) * scale
            B = torch.randn(d_out, r, generator=gen) * scale
            lora[n] = LoraModule(A, B, alpha=float(2 * r + i), fan_in_fan_out=fan)
        experts.append(Expert(ExpertMetadata(name=f"expert{i}", task=f"task{i}"), lora=lora))
    return experts


def save_peft_adapters(
    base: nn.Module,
    out_dir,
    num: int,
    r: int = 4,
    target_modules=None,
    seed: int = 0,
    fan_in_fan_out: bool = False,
) -> list:
    """Save ``num`` PEFT LoRA adapters (peft's get_peft_model + save_pretrained) whose ΔW have a well-separated
    top singular value (σ = 3, 1, 0.5, …), so PEFT's 15-step power iteration finds the exact prototype."""
    import copy

    from peft import LoraConfig, get_peft_model

    gen = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(num):
        cfg = LoraConfig(
            r=r,
            lora_alpha=2 * r,
            target_modules=target_modules,
            lora_dropout=0.0,
            fan_in_fan_out=fan_in_fan_out,
            init_lora_weights=False,
        )
        pm = get_peft_model(copy.deepcopy(base), cfg)
        sigmas = torch.tensor([3.0, 1.0, 0.5, 0.25, 0.1, 0.05][:r])
        with torch.no_grad():
            for mod in pm.modules():
                if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                    A = mod.lora_A["default"].weight
                    B = mod.lora_B["default"].weight
                    qa, _ = torch.linalg.qr(torch.randn(A.shape[1], r, generator=gen))
                    qb, _ = torch.linalg.qr(torch.randn(B.shape[0], r, generator=gen))
                    A.copy_((sigmas[:, None] * qa.T) * 0.5)
                    B.copy_(qb * 0.4)
        path = f"{out_dir}/adapter{i}"
        pm.save_pretrained(path)
        paths.append(path)
    return paths


TASK_ALPHABETS = {"task0": "abcdefgh ", "task1": "0123456789 ", "task2": "XYZUVW!? "}


def task_texts(task: str, n: int, seed: int = 0, length: int = 24) -> list[str]:
    """Synthetic texts whose character distribution identifies the task."""
    gen = torch.Generator().manual_seed(seed + sum(map(ord, task)))
    chars = TASK_ALPHABETS[task]
    return [
        "".join(chars[i] for i in torch.randint(len(chars), (length,), generator=gen).tolist())
        for _ in range(n)
    ]


def replace_layers(model: nn.Module, factory) -> None:
    """Swap each named module for ``factory(name, module)`` (for reference models written out in tests)."""
    for name, mod in list(model.named_modules()):
        new = factory(name, mod)
        if new is not None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)


class LoopRouterReference(nn.Module):
    """A routed layer written out: per token, scores against per-expert vectors, top-k softmax, and a loop over
    the selected experts' dense ΔW."""

    def __init__(self, base, mods, vectors, score, k):
        super().__init__()
        self.base, self.mods, self.vectors, self.score, self.k = base, mods, vectors, score, k

    def forward(self, x):
        out = self.base(x)
        flat = x.reshape(-1, x.shape[-1])
        extra = torch.zeros(flat.shape[0], out.shape[-1])
        for n in range(flat.shape[0]):
            s = torch.stack([self.score(flat[n], v) for v in self.vectors])
            p = torch.softmax(s, 0)
            top, idx = torch.topk(p, self.k)
            top = top / top.sum()
            for wt, e in zip(top, idx.tolist()):
                extra[n] += wt * (self.mods[e].delta() @ flat[n])
        return out + extra.view(*out.shape)
