"""LoRA adapters (Hu et al. 2021) on the UNet and the text encoder, as diffusers' pipelines load them.

A LoRA layer adds a low-rank update to a base weight: W' = W + s * w * (alpha / r) * B @ A, with A
[r, I(, kh, kw)] and B [O, r(, 1, 1)] in PyTorch layout, r the rank, alpha the adapter's alpha (peft's
`lora_alpha`, kohya's `.alpha`; alpha / sqrt(r) under rsLoRA), w the adapter's weight (`set_adapters`)
and s the per-call scale (diffusers' `cross_attention_kwargs={"scale": s}`, which also scales the text
encoder's LoRA).

Params stay pure: unfused adapters live inside the params pytree, so they travel with the params through
`jit` and sharding, under `params["lora"]`:

    {"adapters": {adapter: {component: {torch_module: {"A": [r, I, ...], "B": [O, r, ...], "scale": ()}}}},
     "active": {adapter: {component: weight ()}},
     "fused": {adapter: {component: {"weight": (), "lora_scale": ()}}}}

`torch_module` is the PyTorch module name (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`);
A and B keep the file's PyTorch layout and `scale` is alpha / r. The base param a module adds to, and how
A is laid out against it, come from the component's conversion `Rules` and `LAYOUTS`, as the base
weights themselves were converted. `lora_params(params, s)` gives plain params with the active, unfused
adapters merged; `fuse_lora` merges into the stored base weights (remembering what it added, for
`unfuse_lora`).

Files: diffusers/peft safetensors (`unet.<module>.lora_A.weight`, adapter metadata in the header), the
older diffusers spellings (`...attn1.processor.to_q_lora.down.weight`, `...lora_linear_layer.up.weight`),
and kohya / A1111 (`lora_unet_<module_with_underscores>.lora_down.weight`, `.lora_up.weight`, `.alpha`;
`lora_te_` for the text encoder).
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from unclip_jax.weights import tables
from unclip_jax.weights.checkpoint import StateDict
from unclip_jax.weights.convert import LAYOUTS, ConversionError, Rules, plan
from unclip_jax.weights.safetensors_io import read_metadata, save_file

LORA = "lora"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"

# The components a LoRA file may address, and how their PyTorch names become our param paths.
COMPONENT_RULES: dict[str, Rules] = {"unet": tables.UNET, "text_encoder": tables.CLIP_TEXT}
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}

# Older diffusers spellings -> peft's `<module>.lora_A.weight` / `<module>.lora_B.weight` (the attention
# processor names differ between the UNet's and CLIP's projections).
_COMMON_SPELLINGS = (
    (r"\.processor\.", "."),
    (r"\.(?:lora(?:_linear_layer)?\.down|lora_down)\.weight$", ".lora_A.weight"),
    (r"\.(?:lora(?:_linear_layer)?\.up|lora_up)\.weight$", ".lora_B.weight"),
)
_SPELLINGS = {
    "unet": ((r"\.to_(q|k|v)_lora\.", r".to_\1.lora."), (r"\.to_out_lora\.", ".to_out.0.lora.")) + _COMMON_SPELLINGS,
    "text_encoder": ((r"\.to_(q|k|v)_lora\.", r".\1_proj.lora."), (r"\.to_out_lora\.", ".out_proj.lora."))
    + _COMMON_SPELLINGS,
}
_UNSUPPORTED = {
    "lora_magnitude_vector": "DoRA", "dora_scale": "DoRA", "lora_embedding_": "embedding LoRA",
    "hada_": "LoHa", "lokr_": "LoKr", "lora_B.bias": "LoRA bias", "lora_mid": "LoCon mid weights",
}
# Our param paths join a numeric part to its parent (`to_out.0` -> `to_out_0`); these PyTorch names
# carry the underscore themselves (diffusers' TimestepEmbedding).
_OWN_UNDERSCORE = re.compile(r"linear_[12]")


class LoraError(ValueError):
    """A LoRA file or call does not fit the pipeline; the message names the tensor, module or adapter."""


# ---------------------------------------------------------------------------------------------- reading


def _open(path_or_state_dict, weight_name: str | None) -> tuple[Mapping, dict, str]:
    """(state dict of lazily read arrays, adapter config per component, a name for errors)."""
    if isinstance(path_or_state_dict, Mapping):
        return dict(path_or_state_dict), {}, "state dict"
    path = os.fspath(path_or_state_dict)
    if os.path.isdir(path):
        path = os.path.join(path, weight_name or LORA_WEIGHT_NAME)
    if not os.path.isfile(path):
        raise LoraError(f"{path}: no such LoRA file")
    state = StateDict([path])  # headers checked; data read on access
    raw = read_metadata(path).get(METADATA_KEY) if path.endswith(".safetensors") else None
    config: dict[str, dict] = collections.defaultdict(dict)
    for key, value in (json.loads(raw) if raw else {}).items():
        component, _, field = key.partition(".")
        config[component][field] = value
    return state, dict(config), path


def _torch_name(path: tuple[str, ...]) -> str:
    """Our module path -> the PyTorch module name (`layers_0` -> `layers.0`)."""
    return ".".join(p if _OWN_UNDERSCORE.fullmatch(p) else re.sub(r"_(\d+)$", r".\1", p) for p in path)


def _kohya_names(base_params) -> dict[str, str]:
    """kohya's module spelling (dots as underscores) -> the PyTorch module name, for every kernel."""
    names = {}
    for path in traverse_util.flatten_dict(base_params):
        if path[-1] == "kernel":
            torch_name = _torch_name(path[:-1])
            names[torch_name.replace(".", "_")] = torch_name
            if path[0] == "text_model":  # transformers v5's flat CLIPTextModel has no `text_model.`
                names[_torch_name(path[1:-1]).replace(".", "_")] = torch_name
    return names


def _split_key(key: str, params, kohya_cache: dict) -> tuple[str, str, str]:
    """A file key -> (component, PyTorch module, "A" | "B" | "alpha"); LoraError naming it otherwise."""
    for marker, what in _UNSUPPORTED.items():
        if marker in key:
            raise LoraError(f"tensor {key!r}: {what} adapters are not supported")
    kohya = next((p for p in _KOHYA_PREFIXES if key.startswith(p)), None)
    if kohya is not None:
        component = _KOHYA_PREFIXES[kohya]
        name, _, suffix = key[len(kohya):].partition(".")
        kind = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}.get(suffix)
        if component not in params:
            raise LoraError(f"tensor {key!r}: this pipeline has no {component} params to apply it to")
        if component not in kohya_cache:
            kohya_cache[component] = _kohya_names(params[component])
        module = kohya_cache[component].get(name)
        if kind is None or module is None:
            raise LoraError(f"tensor {key!r}: not a LoRA tensor of a {component} layer (kohya format)")
        return component, module, kind
    component, _, rest = key.partition(".")
    if component not in COMPONENT_RULES:
        raise LoraError(
            f"tensor {key!r}: unknown LoRA key format (expected `unet.` / `text_encoder.` prefixed peft keys, "
            "or kohya `lora_unet_` / `lora_te_` keys)"
        )
    for pattern, repl in _SPELLINGS[component]:
        rest = re.sub(pattern, repl, rest)
    for suffix, kind in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".alpha", "alpha")):
        if rest.endswith(suffix):
            return component, rest[: -len(suffix)], kind
    raise LoraError(f"tensor {key!r}: unknown LoRA key format (not a lora_A / lora_B / alpha tensor)")


def _pattern_value(patterns: Mapping, module: str, default):
    """peft's rank/alpha pattern lookup: the first pattern matching a dotted suffix of the module name."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _scale(module: str, rank: int, alpha, config: dict) -> float:
    """alpha / r for one layer: the file's alpha (kohya), else the adapter config's (peft), else 1."""
    if alpha is None and config:
        # peft's LoraConfig default alpha (8) when a hand-written config leaves it out.
        alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
        if config.get("use_rslora"):
            return float(alpha) / math.sqrt(rank)
    return 1.0 if alpha is None else float(alpha) / rank


def _target(component: str, module: str) -> tuple[str, ...]:
    """The param path a LoRA on `module` adds to: its base weight's path, by the conversion rules."""
    path, _ = COMPONENT_RULES[component].module_path(module + ".weight")
    return path + ("kernel",)


def _layout(a, kernel_ndim: int):
    """A [r, I, ...] in PyTorch layout -> [..., I, r]: the base weight's layout transform applied to A."""
    return LAYOUTS.get(("kernel", a.ndim, kernel_ndim), lambda x: x)(a)


def _check_fit(component: str, layers: dict, base_params, source: str) -> None:
    """Plans B @ A of every layer against the base params with the conversion machinery; raises a
    LoraError naming the LoRA tensors whose module is unknown or whose shape does not fit."""
    flat = traverse_util.flatten_dict(base_params)
    shapes, names = {}, {}
    for module, layer in layers.items():
        a, b = layer["A"], layer["B"]
        if b.ndim < 2 or b.shape[1] != a.shape[0] or any(d != 1 for d in b.shape[2:]):
            raise LoraError(f"{source}: tensor {layer['keys']['B']!r} has shape {tuple(b.shape)}; it must be "
                            f"[out, {a.shape[0]}] (or [out, {a.shape[0]}, 1, 1]) to follow {layer['keys']['A']!r}")
        shapes[module + ".weight"] = (b.shape[0],) + tuple(a.shape[1:])
        names[module + ".weight"] = layer["keys"]["A"]
    targets = {p: flat[p] for p in (_target(component, m) for m in layers) if p in flat}
    try:
        plan(shapes, traverse_util.unflatten_dict(targets) if targets else {}, COMPONENT_RULES[component], component)
    except ConversionError as e:
        unknown = [names[k] for k in e.unexpected]
        # ConversionError lists `key (shape) -> param/path (shape)`: B @ A in PyTorch layout, then the kernel.
        parts = [re.fullmatch(r"(\S+) (\(.*?\)) -> (\S+) (\(.*\))", m).groups() for m in e.misshaped]
        bad = [f"{names[k]} (B @ A is {got} in PyTorch layout; {dest} is {want})" for k, got, dest, want in parts]
        raise LoraError(
            f"{source}: the LoRA does not fit the {component}."
            + (f"\n  no such layer: {', '.join(unknown)}" if unknown else "")
            + (f"\n  wrong base shape: {', '.join(bad)}" if bad else "")
        ) from None


def read_lora(path_or_state_dict, params, *, weight_name: str | None = None) -> dict[str, dict]:
    """A LoRA file -> {component: {torch_module: {"A", "B", "scale"}}} (numpy float32), checked against
    the base params (shapes only) before any tensor data is read."""
    state, config, source = _open(path_or_state_dict, weight_name)
    if not state:
        raise LoraError(f"{source}: no tensors")
    grouped: dict[str, dict[str, dict]] = collections.defaultdict(dict)
    kohya_cache: dict = {}
    for key in state:
        component, module, kind = _split_key(key, params, kohya_cache)
        if component not in params:
            raise LoraError(f"tensor {key!r}: this pipeline has no {component} params to apply it to")
        layer = grouped[component].setdefault(module, {"keys": {}})
        if kind in layer["keys"]:
            raise LoraError(f"tensor {key!r}: {module} already has a {kind} from {layer['keys'][kind]!r}")
        layer["keys"][kind] = key
        layer[kind] = state[key] if kind != "alpha" else None  # lazily read arrays: shapes only so far
    out = {}
    for component, layers in grouped.items():
        for module, layer in layers.items():
            missing = [k for k in ("A", "B") if k not in layer["keys"]]
            if missing:
                raise LoraError(f"{source}: LoRA layer {module} ({component}) has no lora_{missing[0]} tensor")
        _check_fit(component, layers, params[component], source)
        out[component] = {}
        for module, layer in layers.items():
            a = np.asarray(layer["A"], np.float32)
            alpha_key = layer["keys"].get("alpha")
            alpha = float(np.asarray(state[alpha_key]).reshape(())) if alpha_key else None
            scale = _scale(module, a.shape[0], alpha, config.get(component, {}))
            out[component][module] = {"A": a, "B": np.asarray(layer["B"], np.float32), "scale": np.float32(scale)}
    return out


# ---------------------------------------------------------------------------------------------- params


def _empty() -> dict:
    return {"adapters": {}, "active": {}, "fused": {}}


def _lora_tree(params) -> dict:
    lora = params.get(LORA) if isinstance(params, Mapping) else None
    return {k: dict(v) for k, v in (lora or _empty()).items()}


def _with(params, lora: dict) -> dict:
    out = {k: v for k, v in params.items() if k != LORA}
    if lora["adapters"]:
        out[LORA] = lora
    return out


def _adapter_names(lora: dict, names) -> list[str]:
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in lora["adapters"]]
    if unknown:
        raise LoraError(f"no adapter named {', '.join(map(repr, unknown))}; loaded: {sorted(lora['adapters'])}")
    return names


def load_lora_weights(params, path_or_state_dict, *, adapter_name: str | None = None,
                      weight_name: str | None = None) -> dict:
    """params with a LoRA file's adapter added, unfused. As in diffusers, the adapter just loaded becomes
    the only active one (weight 1); `set_adapters` activates several. See the module docstring."""
    lora = _lora_tree(params)
    if adapter_name is None:
        adapter_name = f"default_{len(lora['adapters'])}"
    if adapter_name in lora["adapters"]:
        raise LoraError(f"adapter name {adapter_name!r} is already in use; choose another or delete it first")
    layers = read_lora(path_or_state_dict, params, weight_name=weight_name)
    lora["adapters"][adapter_name] = layers
    lora["active"] = {adapter_name: {c: np.float32(1.0) for c in layers}}
    return _with(params, lora)


def set_adapters(params, adapter_names, adapter_weights=None) -> dict:
    """Activates exactly `adapter_names` (str or list) with weights: None (1.0), a float, or a list of
    floats or {component: float} dicts, one per adapter. Fused adapters stay fused."""
    lora = _lora_tree(params)
    names = _adapter_names(lora, adapter_names)
    weights = adapter_weights if isinstance(adapter_weights, Sequence) else [adapter_weights] * len(names)
    if len(weights) != len(names):
        raise LoraError(f"{len(weights)} adapter weights for {len(names)} adapters")
    active = {}
    for name, w in zip(names, weights):
        per = w if isinstance(w, Mapping) else {}
        if any(isinstance(v, Mapping) for v in per.values()):
            raise LoraError(f"adapter {name!r}: per-block LoRA weights are not supported; give one float per component")
        unknown = set(per) - set(lora["adapters"][name])
        if unknown:
            raise LoraError(f"adapter {name!r} has no {sorted(unknown)} layers (it has {sorted(lora['adapters'][name])})")
        fused = lora["fused"].get(name, {})
        default = 1.0 if w is None or isinstance(w, Mapping) else float(w)
        active[name] = {c: np.float32(per.get(c, default)) for c in lora["adapters"][name] if c not in fused}
    lora["active"] = active
    return _with(params, lora)


def delete_adapters(params, adapter_names) -> dict:
    """params without the named adapters (what they fused into the base weights stays)."""
    lora = _lora_tree(params)
    for name in _adapter_names(lora, adapter_names):
        for part in lora.values():
            part.pop(name, None)
    return _with(params, lora)


def unload_lora_weights(params) -> dict:
    """params without any adapter (fused weights stay fused, as in diffusers)."""
    return {k: v for k, v in params.items() if k != LORA}


def _add_deltas(base, layers: dict, component: str, coef) -> dict:
    """base params + coef * scale * B @ A of every layer, in each kernel's own layout and dtype."""
    flat = traverse_util.flatten_dict(base)
    for module, layer in layers.items():
        path = _target(component, module)
        kernel = flat[path]
        down = _layout(jnp.asarray(layer["A"]), kernel.ndim)  # [..., I, r]
        up = jnp.asarray(layer["B"]).reshape(layer["B"].shape[:2]).T  # [r, O]
        # The update is small; full-precision matmul keeps it exact on accelerators whose default
        # matmul precision rounds float32 inputs to bfloat16.
        delta = jnp.tensordot(down, up, axes=1, precision=jax.lax.Precision.HIGHEST)
        flat[path] = kernel + (coef * layer["scale"] * delta).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


def lora_params(params, scale=1.0) -> dict:
    """Plain params (no `lora` key) with every active, unfused adapter merged:
    W + scale * weight * (alpha / r) * B @ A. Pure and jit-able (`scale` may be traced); a kernel
    keeps its sharding. Params without adapters are returned as they are (less the `lora` key)."""
    if LORA not in params:
        return params
    lora = params[LORA]
    out = {k: v for k, v in params.items() if k != LORA}
    for name, components in lora["active"].items():
        for component, weight in components.items():
            out[component] = _add_deltas(out[component], lora["adapters"][name][component], component,
                                         scale * weight)
    return out


def fuse_lora(params, lora_scale=1.0, adapter_names=None, components=("unet", "text_encoder")) -> dict:
    """Merges adapters (default: the active ones) into the base weights of `components`, with their
    weights times `lora_scale`; they then no longer follow the per-call scale. `unfuse_lora` undoes it."""
    lora = _lora_tree(params)
    names = list(lora["active"]) if adapter_names is None else _adapter_names(lora, adapter_names)
    out = _with(params, lora)
    for name in names:
        active = dict(lora["active"].get(name, {}))
        fused = dict(lora["fused"].get(name, {}))
        for component in lora["adapters"][name]:
            if component not in components or component in fused:
                continue
            weight = active.pop(component, np.float32(1.0))
            out[component] = _add_deltas(out[component], lora["adapters"][name][component], component,
                                         lora_scale * weight)
            fused[component] = {"weight": weight, "lora_scale": np.float32(lora_scale)}
        if fused:
            lora["fused"][name] = fused
        if active:
            lora["active"][name] = active
        else:
            lora["active"].pop(name, None)
    return out


def unfuse_lora(params, components=("unet", "text_encoder")) -> dict:
    """Subtracts what `fuse_lora` merged into `components`; those adapters become active again, unfused.

    As in diffusers (peft scales a layer by `lora_scale` before merging it and does not scale it back),
    an unfused adapter comes back with its weight multiplied by the `lora_scale` it was fused with."""
    lora = _lora_tree(params)
    out = _with(params, lora)
    for name in list(lora["fused"]):
        fused = dict(lora["fused"][name])
        active = dict(lora["active"].get(name, {}))
        for component in [c for c in fused if c in components]:
            f = fused.pop(component)
            out[component] = _add_deltas(out[component], lora["adapters"][name][component], component,
                                         -(f["lora_scale"] * f["weight"]))
            active[component] = np.float32(f["weight"] * f["lora_scale"])
        lora["fused"][name] = fused
        if not fused:
            lora["fused"].pop(name)
        if active:
            lora["active"][name] = active
    return out


# ---------------------------------------------------------------------------------------------- saving


def _config_name(module: str) -> str:
    """A module name for the adapter config. peft matches target modules and rank / alpha patterns on
    a dotted suffix, so a name without CLIP's `text_model.` finds the layer in transformers' flat (v5)
    and nested text models alike (the state dict keys keep it: diffusers strips it where needed)."""
    return module.removeprefix("text_model.")


def _most_common(values: dict) -> tuple:
    common = collections.Counter(values.values()).most_common(1)[0][0]
    return common, {re.escape(_config_name(k)): v for k, v in values.items() if v != common}


def save_lora_weights(save_directory: str, params_or_lora, *, adapter_name: str | None = None,
                      weight_name: str | None = None) -> str:
    """Writes one adapter as diffusers writes it (peft keys, PyTorch layouts, the adapter config in the
    safetensors header), so that diffusers' `load_lora_weights` reads it. Returns the file's path."""
    lora = params_or_lora.get(LORA, params_or_lora)
    adapters = lora.get("adapters", {})
    if adapter_name is None:
        if len(adapters) != 1:
            raise LoraError(f"give adapter_name: {len(adapters)} adapters are loaded ({sorted(adapters)})")
        adapter_name = next(iter(adapters))
    if adapter_name not in adapters:
        raise LoraError(f"no adapter named {adapter_name!r}; loaded: {sorted(adapters)}")
    tensors, metadata = {}, {}
    for component, layers in adapters[adapter_name].items():
        ranks, alphas = {}, {}
        for module, layer in layers.items():
            tensors[f"{component}.{module}.lora_A.weight"] = np.asarray(layer["A"], np.float32)
            tensors[f"{component}.{module}.lora_B.weight"] = np.asarray(layer["B"], np.float32)
            ranks[module] = int(layer["A"].shape[0])
            alphas[module] = float(layer["scale"]) * ranks[module]
        r, rank_pattern = _most_common(ranks)
        alpha, alpha_pattern = _most_common(alphas)
        config = {"r": r, "lora_alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
                  "target_modules": sorted(map(_config_name, layers)), "use_rslora": False, "use_dora": False, "lora_bias": False,
                  "peft_type": "LORA"}
        metadata.update({f"{component}.{k}": v for k, v in config.items()})
    os.makedirs(save_directory, exist_ok=True)
    path = os.path.join(save_directory, weight_name or LORA_WEIGHT_NAME)
    save_file(tensors, path, metadata={"format": "pt", METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    return path


class LoraLoaderMixin:
    """diffusers' StableDiffusionLoraLoaderMixin for our pipelines: LoRA on `unet` and `text_encoder`.

    Every method takes and returns params (the dict component -> param tree); nothing on the pipeline
    changes. Call `lora_params(params, scale)` to get the params a forward pass uses.
    """

    def load_lora_weights(self, params, path_or_state_dict, *, adapter_name=None, weight_name=None):
        return load_lora_weights(params, path_or_state_dict, adapter_name=adapter_name, weight_name=weight_name)

    def set_adapters(self, params, adapter_names, adapter_weights=None):
        return set_adapters(params, adapter_names, adapter_weights)

    def delete_adapters(self, params, adapter_names):
        return delete_adapters(params, adapter_names)

    def fuse_lora(self, params, lora_scale=1.0, adapter_names=None, components=("unet", "text_encoder")):
        return fuse_lora(params, lora_scale, adapter_names, components)

    def unfuse_lora(self, params, components=("unet", "text_encoder")):
        return unfuse_lora(params, components)

    def unload_lora_weights(self, params):
        return unload_lora_weights(params)

    def save_lora_weights(self, save_directory, params, *, adapter_name=None, weight_name=None):
        return save_lora_weights(save_directory, params, adapter_name=adapter_name, weight_name=weight_name)
