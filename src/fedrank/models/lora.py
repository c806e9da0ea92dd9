"""One base model per process with peft LoRA adapters, one per rank in use.

A client's assignment is written into the adapter of its rank (created on first use and reused
afterwards), its scaling set to exactly what the aggregation method computed (``fedrank.lowrank``'s one
scaling function), and the trained factors read back out. The base model is never copied.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fedrank.aggregation.fold import dense_base, dense_base_layer
from fedrank.models.gated_mlp import lean_gated_mlps
from fedrank.models.loading import page_out
from fedrank.models.onednn import use_onednn, uses_onednn
from fedrank.models.rms_norm import lean_rms_norms
from fedrank.types import ClientAssignment, LoraFactors

log = logging.getLogger(__name__)

# peft 0.21 calls a transformers 5 API that warns on every adapter creation; nothing for users to act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

PAGE_OUT_BYTES = 32 << 20
"""Original weights paged out together while a merged model is built (one read of the process's mappings)."""

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _adapter_name(rank: int) -> str:
    return f"rank{rank}"


class LoraHost:
    """A causal LM with peft LoRA adapters keyed by rank; exactly one is active at a time."""

    def __init__(self, model: nn.Module, target_modules: Sequence[str] = DEFAULT_TARGETS, alpha: float = 16.0):
        from peft.tuners.lora import LoraLayer

        self._lora_layer_type = LoraLayer
        self.base = model
        self.target_modules = tuple(target_modules)
        self.alpha = alpha
        self.peft: Any = None
        self.rank: int | None = None
        self._w0: dict[str, Tensor] = {}
        self._applied_delta: object | None = None
        self._onednn = uses_onednn(model)
        """The LoRA factors' Linear layers follow the base model's (:mod:`fedrank.models.onednn`)."""
        for p in model.parameters():
            p.requires_grad_(False)
        lean_gated_mlps(model)  # less activation memory in training, the same numbers
        lean_rms_norms(model)  # one tensor fewer per norm in evaluation, the same numbers
        self.shapes = self._find_shapes(model)
        if not self.shapes:
            raise ValueError(f"no Linear module of the model matches target_modules {list(target_modules)}")

    def _find_shapes(self, model: nn.Module) -> dict[str, tuple[int, int]]:
        out = {}
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and name.split(".")[-1] in self.target_modules:
                out[name] = (mod.out_features, mod.in_features)
        return out

    @property
    def module(self) -> nn.Module:
        """The model to call (the peft model once an adapter exists)."""
        return self.peft if self.peft is not None else self.base

    def lora_layers(self) -> Iterator[tuple[str, Any]]:
        """(layer name as in :attr:`shapes`, peft LoraLayer) pairs."""
        prefix = "base_model.model."
        for name, mod in self.peft.named_modules():
            if isinstance(mod, self._lora_layer_type):
                yield name.removeprefix(prefix), mod

    def use_rank(self, rank: int) -> None:
        """Activate the adapter of ``rank``, creating it on first use."""
        from peft import LoraConfig, get_peft_model

        name = _adapter_name(rank)
        cfg = LoraConfig(
            r=rank,
            lora_alpha=self.alpha,  # type: ignore[arg-type]  # peft computes alpha / r; floats work
            target_modules=list(self.target_modules),
            lora_dropout=0.0,
        )
        created = self.peft is None or name not in self.peft.peft_config
        if self.peft is None:
            self.peft = get_peft_model(self.base, cfg, adapter_name=name)
        elif created:
            self.peft.add_adapter(name, cfg)
        if self._onednn and created:
            use_onednn(self.peft)
        self.peft.set_adapter(name)
        self.rank = rank

    def load(self, a: ClientAssignment) -> None:
        """Write an assignment in: factors, scaling, which factors train, and the dense delta on the base
        weights (its base delta and its frozen modules folded, :func:`~fedrank.aggregation.fold.dense_base`)."""
        self._apply_base_delta(dense_base(a))
        if not a.factors:
            self.unload()
            return
        self.use_rank(a.rank)
        name = _adapter_name(a.rank)
        seen = set()
        with torch.no_grad():
            for layer, mod in self.lora_layers():
                f = a.factors.get(layer)
                if f is None:
                    raise KeyError(f"assignment has no factors for LoRA layer {layer}")
                mod.lora_A[name].weight.copy_(f.A)
                mod.lora_B[name].weight.copy_(f.B)
                mod.lora_A[name].weight.requires_grad_(a.train_A)
                mod.lora_B[name].weight.requires_grad_(a.train_B)
                mod.scaling[name] = a.scaling
                seen.add(layer)
        extra = set(a.factors) - seen
        if extra:
            raise KeyError(f"assignment has factors for layers the model lacks: {sorted(extra)[:3]}")

    def unload(self) -> None:
        """No LoRA active (the base model alone, plus any base delta)."""
        if self.peft is not None:
            for _, mod in self.lora_layers():
                mod.scaling[_adapter_name(self.rank or 1)] = 0.0
        self.rank = None

    @contextmanager
    def merged(self, a: ClientAssignment) -> Iterator[nn.Module]:
        """The model of assignment ``a`` with its update merged into the weights: W + base_delta
        + s·B_frozen A_frozen + s·B A per layer, and no adapter computed (an adapter of any width costs what the
        base model alone costs).

        The merged weights are new tensors swapped in one layer at a time (the dense ΔW of a layer exists
        only while its merge is computed); the original weights stay untouched and are swapped back on exit,
        bit for bit, so training after an evaluation starts from exactly the weights it would have without one.
        Originals mapped from the model's file leave the resident set meanwhile (:func:`page_out`, every
        :data:`PAGE_OUT_BYTES` of them), so the process does not hold two copies of the weights.
        """
        self._apply_base_delta(None)  # the pristine weights (a FLoRA client may have left its delta in)
        self.unload()
        originals: dict[str, nn.Parameter] = {}
        modules: dict[str, Any] = dict(self.base.named_modules())
        pending: list[Tensor] = []
        pending_bytes = 0
        written = bool(self._w0)  # a base delta was written into the weights: their pages are private copies,
        # which MADV_PAGEOUT can only send to swap (and _w0 holds the originals anyway)
        try:
            with torch.no_grad():
                for name in self.shapes:
                    if not written and pending_bytes >= PAGE_OUT_BYTES:
                        page_out(pending)
                        pending, pending_bytes = [], 0
                    lin: Any = getattr(modules[name], "base_layer", modules[name])  # peft's LoraLayer wraps it
                    w = lin.weight
                    f = a.factors.get(name)
                    update = _layer_update(a, f)
                    base = dense_base_layer(a, name)
                    if base is None and not update:
                        continue  # nothing to add (e.g. round 0: B = 0): no copy
                    merged = w.detach().clone()
                    if base is not None:
                        merged += base.to(device=w.device, dtype=w.dtype)
                    if f is not None and update:
                        B, A = (
                            f.B.to(device=w.device, dtype=torch.float32),
                            f.A.to(device=w.device, dtype=torch.float32),
                        )
                        merged += (a.scaling * (B @ A)).to(w.dtype)
                    originals[name] = w
                    pending.append(w)
                    pending_bytes += w.nbytes
                    lin.weight = nn.Parameter(merged, requires_grad=False)
            if not written:
                page_out(pending)
            if self.peft is not None:
                with self.peft.disable_adapter():
                    yield self.peft
            else:
                yield self.base
        finally:
            for name, w in originals.items():
                getattr(modules[name], "base_layer", modules[name]).weight = w

    def base_parameters(self) -> Iterator[tuple[str, Tensor]]:
        """The base model's own weights (no LoRA factor, no base delta applied), named as in the unwrapped
        model whether or not peft has wrapped its layers yet."""
        self._apply_base_delta(None)
        for name, p in self.base.named_parameters():
            if "lora_" not in name:
                yield name.replace(".base_layer.", "."), p

    def _apply_base_delta(self, delta: dict[str, Tensor] | None) -> None:
        if delta is self._applied_delta:
            return
        with torch.no_grad():
            for name, mod in self.base.named_modules():
                if name in self.shapes:
                    if name not in self._w0:
                        self._w0[name] = mod.weight.detach().clone()
                    w0 = self._w0[name]
                    w = w0 if delta is None else w0 + delta[name].to(device=w0.device, dtype=w0.dtype)
                    mod.weight.copy_(w)
        self._applied_delta = delta

    def read(self) -> dict[str, LoraFactors]:
        """The active adapter's factors (detached copies)."""
        name = _adapter_name(self.rank or 0)
        return {
            layer: LoraFactors(mod.lora_B[name].weight.detach().clone(), mod.lora_A[name].weight.detach().clone())
            for layer, mod in self.lora_layers()
        }

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def lora_pairs(self) -> list[tuple[Tensor, Tensor]]:
        """(B, A) weight tensors of the active adapter, for regularisers such as HetLoRA's."""
        name = _adapter_name(self.rank or 0)
        return [(mod.lora_B[name].weight, mod.lora_A[name].weight) for _, mod in self.lora_layers()]


def _layer_update(a: ClientAssignment, f: LoraFactors | None) -> bool:
    return f is not None and a.scaling != 0.0 and bool(f.B.any()) and bool(f.A.any())


def changes_base(a: ClientAssignment) -> bool:
    """Whether the model of assignment ``a`` may differ from the base model (False: it is the base model,
    e.g. every method's global model before training, where B = 0)."""
    parts = [*a.factors.values(), *(a.frozen or {}).values()]
    return a.base_delta is not None or any(_layer_update(a, f) for f in parts)


def export_peft_adapter(
    out_dir: str | Path,
    factors: dict[str, LoraFactors],
    scaling: float,
    base_model_name_or_path: str,
    target_modules: Sequence[str] = DEFAULT_TARGETS,
) -> Path:
    """Write ``factors`` as a PEFT LoRA adapter directory (adapter_config.json + safetensors).

    ``lora_alpha`` is chosen so that peft's α/r equals ``scaling`` exactly, whatever scaling rule
    (α/r, rsLoRA, FSLoRA's sketch) produced it.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    ranks = {f.rank for f in factors.values()}
    if len(ranks) != 1:
        raise ValueError(f"a PEFT adapter needs one rank across layers, got {sorted(ranks)}")
    rank = ranks.pop()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = LoraConfig(
        r=rank,
        lora_alpha=scaling * rank,  # type: ignore[arg-type]  # peft computes alpha / r; floats work
        target_modules=list(target_modules),
        lora_dropout=0.0,
        base_model_name_or_path=base_model_name_or_path,
        task_type="CAUSAL_LM",
    )
    cfg.save_pretrained(str(out))
    tensors = {}
    for layer, f in factors.items():
        key = f"base_model.model.{layer}"
        tensors[f"{key}.lora_A.weight"] = f.A.detach().float().contiguous()
        tensors[f"{key}.lora_B.weight"] = f.B.detach().float().contiguous()
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    meta = json.loads((out / "adapter_config.json").read_text())
    log.info("exported a rank-%d PEFT adapter (lora_alpha=%g) to %s", rank, meta["lora_alpha"], out)
    return out
