"""LoRA adapters served side by side: any mix of adapters (and none) in one batch.

`load_adapters` reads PEFT adapter folders (or hub ids) with peft itself (its config class and
its weights loader), checks that each adapter only touches the language model's linear
projections, and lays every adapter's low-rank matrices side by side per layer.

Applying them (S-LoRA / punica style, written with plain matrix multiplies): for a projection
W with adapters 1..N of rank r each, the step computes

    delta = ((x @ A_cat.T) * mask) @ B_cat.T        A_cat: (N*r, in), B_cat: (out, N*r)

where row t of `mask` holds adapter a's scale on a's r columns and zero elsewhere (a = the
adapter of the request token t belongs to; a row with no adapter is all zero). Shapes do not
depend on which adapters a batch holds, so the same code serves prefill and decode steps and is
captured in the decode CUDA graphs. The extra work is two thin matrix multiplies per projection,
proportional to N*r (for 4 adapters of rank 16: 64 columns next to the 4096 of the weights).

q/k/v and gate/up are fused in the step (one weight each); their adapters are fused the same way:
A stacked, B block-diagonal, so each fused projection gets its delta from one pair of multiplies.

Only the language model is adapted: the vision encoder stays the base model's, so an image's
features are the same whatever the adapter, and the features cache is shared by all. The KV
state differs, so the prefix cache keys on the adapter (see Sequence).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import torch

from chat.engine.adapters import LoraError

log = logging.getLogger(__name__)

# The step's projection groups and the modules each holds, in the order their outputs are laid out.
GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
          "down": ("down_proj",)}
MODULE_GROUP = {m: g for g, mods in GROUPS.items() for m in mods}
KEY = re.compile(r"(?:^|\.)language_model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.\w+)?\.weight$")


@dataclass
class Adapter:
    """One adapter as read: per (layer, module) its A (r, in) and B (out, r) and its scale."""

    name: str
    source: str
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    scales: dict[tuple[int, str], float]
    rank: int


def _pattern_value(patterns: dict, module_key: str, default):
    """peft's rank_pattern / alpha_pattern: the first key that matches the end of the module's name."""
    for key, value in (patterns or {}).items():
        if re.search(rf"(^|\.){key}$", module_key) or re.fullmatch(key, module_key):
            return value
    return default


def read_adapter(name: str, source: str, n_layers: int) -> Adapter:
    """Read one PEFT LoRA adapter (folder or hub id) with peft; refuse what the engine cannot apply."""
    from peft import PeftConfig
    from peft.utils import load_peft_weights

    try:
        config = PeftConfig.from_pretrained(source)
        state = load_peft_weights(source, device="cpu")
    except Exception as exc:  # noqa: BLE001 - any failure to read is the same sentence to the operator
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        raise LoraError(f"adapter '{name}' ({source}) could not be read: {first}") from None
    kind = getattr(config, "peft_type", None)
    if str(getattr(kind, "value", kind)).upper() != "LORA":
        raise LoraError(f"adapter '{name}' is a {kind} adapter; only LoRA adapters are served")
    for flag, what in (("use_dora", "DoRA"), ("modules_to_save", "modules_to_save (full copies of modules)")):
        if getattr(config, flag, None):
            raise LoraError(f"adapter '{name}' uses {what}, which the engine does not apply")
    if getattr(config, "bias", "none") not in (None, "none"):
        raise LoraError(f"adapter '{name}' trains biases (bias='{config.bias}'), which the engine does not apply")
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        found = KEY.search(key)
        if found is None or found.group(2) not in MODULE_GROUP:
            raise LoraError(f"adapter '{name}' changes '{key}'; only the language model's q/k/v/o and MLP "
                            "projections can be adapted (the vision encoder stays the base model's)")
        layer, module, which = int(found.group(1)), found.group(2), found.group(3)
        if layer >= n_layers:
            raise LoraError(f"adapter '{name}' has layer {layer}; the model has {n_layers}")
        pairs.setdefault((layer, module), {})[which] = tensor
    if not pairs:
        raise LoraError(f"adapter '{name}' holds no LoRA weights")
    weights, scales, rank = {}, {}, 0
    for (layer, module), ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise LoraError(f"adapter '{name}' lacks lora_A or lora_B for layer {layer} {module}")
        r = ab["A"].shape[0]
        alpha = _pattern_value(config.alpha_pattern, f"layers.{layer}.{module}", config.lora_alpha)
        scales[(layer, module)] = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        weights[(layer, module)] = (ab["A"], ab["B"])
        rank = max(rank, r)
    return Adapter(name, source, weights, scales, rank)


class LoraSet:
    """Every loaded adapter, fused per layer and projection group for the step (see the module text)."""

    def __init__(self, adapters: list[Adapter], layers: list, dtype: torch.dtype, device: torch.device) -> None:
        self.names = tuple(a.name for a in adapters)
        self.index = {name: i + 1 for i, name in enumerate(self.names)}  # 0: the base model
        self.rank = max(a.rank for a in adapters)
        n, r = len(adapters), self.rank
        self.a: list[dict[str, torch.Tensor]] = []
        self.b: list[dict[str, torch.Tensor]] = []
        self.groups = sorted({MODULE_GROUP[m] for a in adapters for _, m in a.weights}, key=list(GROUPS).index)
        for i, layer in enumerate(layers):
            a_layer, b_layer = {}, {}
            for group in self.groups:
                mods = [module_of(layer, m) for m in GROUPS[group]]
                ins = mods[0].in_features
                outs = [m.out_features for m in mods]
                a_cat = torch.zeros(len(mods) * n * r, ins, dtype=torch.float32)
                b_cat = torch.zeros(sum(outs), len(mods) * n * r, dtype=torch.float32)
                row = 0
                for k, module in enumerate(GROUPS[group]):
                    for j, adapter in enumerate(adapters):
                        col = (k * n + j) * r
                        found = adapter.weights.get((i, module))
                        if found is not None:
                            a, b = found
                            if a.shape[1] != ins or b.shape[0] != outs[k]:
                                raise LoraError(f"adapter '{adapter.name}' does not fit this model: layer {i} "
                                                f"{module} is {ins}->{outs[k]}, the adapter {a.shape[1]}->{b.shape[0]}")
                            # The scale rides on B, so the step's mask is 0/1.
                            a_cat[col : col + a.shape[0]] = a.float()
                            b_cat[row : row + outs[k], col : col + a.shape[0]] = b.float() * adapter.scales[(i, module)]
                    row += outs[k]
                a_layer[group] = a_cat.to(device=device, dtype=dtype)
                b_layer[group] = b_cat.to(device=device, dtype=dtype)
            self.a.append(a_layer)
            self.b.append(b_layer)
        # mask[group][adapter index] -> (width,) 0/1 row; index 0 (no adapter) is all zero.
        self.mask_table = {}
        for group in self.groups:
            width = len(GROUPS[group]) * n * r
            table = torch.zeros(n + 1, width, dtype=dtype)
            for k in range(len(GROUPS[group])):
                for j in range(n):
                    col = (k * n + j) * r
                    table[j + 1, col : col + r] = 1
            self.mask_table[group] = table.to(device)
        log.info("LoRA adapters: %s (rank up to %d, groups %s)", ", ".join(self.names), r, ", ".join(self.groups))

    def masks(self, adapter_rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per group, the (T, width) mask of a step whose row t belongs to adapter `adapter_rows[t]`."""
        return {g: table.index_select(0, adapter_rows) for g, table in self.mask_table.items()}

    def delta(self, layer: int, group: str, x: torch.Tensor, masks: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """What the adapters add to `group`'s projection of x (T, in); None when no adapter touches it."""
        a = self.a[layer].get(group)
        if a is None:
            return None
        return torch.nn.functional.linear(torch.nn.functional.linear(x, a) * masks[group], self.b[layer][group])


def module_of(layer, name: str):
    """A decoder layer's projection `name` (q_proj ... down_proj)."""
    return getattr(layer.self_attn if name in GROUPS["qkv"] + GROUPS["o"] else layer.mlp, name)


def load_adapters(specs: dict[str, str], model, base_name: str = "") -> LoraSet | None:
    """Read every adapter of `specs` ({name: folder or hub id}); None when there are none."""
    if not specs:
        return None
    if base_name and base_name in specs:
        raise LoraError(f"adapter name '{base_name}' is the base model's name; choose another")
    layers = list(model.model.language_model.layers)
    adapters = [read_adapter(name, source, len(layers)) for name, source in specs.items()]
    embed = model.get_input_embeddings().weight  # the activations' type (a quantized weight is not it)
    return LoraSet(adapters, layers, embed.dtype, embed.device)
