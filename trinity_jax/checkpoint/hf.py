"""Hugging Face AFMoE interop: import a `AfmoeForCausalLM` directory, export ours to one (SPEC §1, HF layout).

Import accepts experts per expert (as `save_pretrained` writes them:
`mlp.experts.K.{gate,up,down}_proj.weight`) or fused as held in memory
(`mlp.experts.gate_up_proj [E, 2I, d]` gate half first, `mlp.experts.down_proj [E, d, I]`), in one
`model.safetensors` or sharded with `model.safetensors.index.json`. Export writes the per-expert
layout plus `config.json`, loadable by `transformers.AfmoeForCausalLM.from_pretrained` without
`trust_remote_code`. Every check happens before anything is written; files appear atomically.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np

from trinity_jax.config import ConfigError, ModelConfig, model_config

_HF_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
              "num_hidden_layers", "num_dense_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "num_experts",
              "num_experts_per_tok", "num_shared_experts", "route_scale", "global_attn_every_n_layers",
              "sliding_window", "mup_enabled", "tie_word_embeddings")
# What transformers' `AfmoeConfig` uses for a key that config.json leaves out (the dataclass defaults in
# transformers/models/afmoe/configuration_afmoe.py, transformers 5.24; rope_theta from its default
# rope_parameters). `from_pretrained` fills missing keys from these, so import does too -- not from our
# ModelConfig, whose defaults differ (µP on, window 64, k=4, ...). num_key_value_heads None = num_attention_heads.
# tests/test_cli_export.py compares this table with `transformers.AfmoeConfig()`.
AFMOE_DEFAULTS: dict[str, Any] = {
    "vocab_size": 200192, "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 1408,
    "num_hidden_layers": 32, "num_dense_layers": 1, "num_attention_heads": 16, "num_key_value_heads": None,
    "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 16384, "rms_norm_eps": 1e-5,
    "num_experts": 64, "num_experts_per_tok": 6, "num_shared_experts": 2, "route_scale": 1.0,
    "global_attn_every_n_layers": 4, "sliding_window": 1024, "mup_enabled": False, "tie_word_embeddings": False,
    "rope_theta": 10000.0}
# Missing from config.json these are refused rather than defaulted (a trimmed config cannot mean 2048 wide).
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
# Files an HF export directory may hold; a non-empty directory with anything else is not overwritten.
_HF_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# Values hub configs may carry; anything else for these keys is rejected.
_ACCEPTED = {"score_func": ("sigmoid",), "route_norm": (True,), "n_group": (1, None),
             "topk_group": (1, None), "attention_bias": (False,), "model_type": ("afmoe",)}


class HFFormatError(ValueError):
    """A Hugging Face directory is missing a file or key, has a wrong shape or an unsupported value."""


# ----------------------------------------------------------------------------- config

def config_from_hf(hf: dict[str, Any], source: str = "config.json", **overrides) -> ModelConfig:
    """HF AfmoeConfig dict -> our ModelConfig; unsupported values raise naming the key."""
    for key, allowed in _ACCEPTED.items():
        if key in hf and hf[key] not in allowed:
            raise HFFormatError(f"{source}: {key}={hf[key]!r} is not supported; allowed: {list(allowed)}")
    # Both keys are read (transformers folds an old-style rope_scaling into rope_parameters, with
    # "type" for "rope_type"): any scaling is refused, plain RoPE would silently differ from HF.
    for key in ("rope_parameters", "rope_scaling"):
        r = hf.get(key) or {}
        kind = r.get("rope_type", r.get("type", "default"))
        scaling = sorted(set(r) - {"rope_type", "type", "rope_theta"})
        if kind != "default" or scaling:
            raise HFFormatError(f"{source}: {key}={r!r}: RoPE scaling is not supported; allowed: "
                                "rope_type 'default' with rope_theta only")
    rope = hf.get("rope_parameters") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", AFMOE_DEFAULTS["rope_theta"]))
    missing = [k for k in _REQUIRED if hf.get(k) is None]
    if missing:
        raise HFFormatError(f"{source}: missing required field {missing[0]!r}")
    # absent keys: AfmoeConfig's defaults (as from_pretrained); an explicit null head_dim / num_key_value_heads
    # is what transformers' modeling code reads as hidden_size // heads / num_attention_heads.
    kw: dict[str, Any] = {k: hf.get(k, AFMOE_DEFAULTS[k]) for k in _HF_FIELDS}
    if kw["num_key_value_heads"] is None:
        kw["num_key_value_heads"] = kw["num_attention_heads"]
    if kw["head_dim"] is None:
        kw["head_dim"] = kw["hidden_size"] // kw["num_attention_heads"]
    nulls = [k for k in _HF_FIELDS if kw[k] is None]
    if nulls:
        raise HFFormatError(f"{source}: {nulls[0]}=null is not supported; give a value or leave the key out "
                            f"(then AfmoeConfig's default {AFMOE_DEFAULTS[nulls[0]]!r} applies)")
    kw["rope_theta"] = float(theta)
    for tok in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = hf.get(tok)
        if isinstance(v, list):
            v = v[0] if v else None
        if v is not None:
            kw[tok] = int(v)
    kw.update(overrides)
    try:
        cfg = model_config(**kw)
    except ConfigError as e:
        raise HFFormatError(f"{source}: {e}") from None
    layer_types = hf.get("layer_types")
    if layer_types is not None and tuple(layer_types) != cfg.layer_types:
        raise HFFormatError(f"{source}: layer_types={layer_types} does not follow global_attn_every_n_layers="
                            f"{cfg.global_attn_every_n_layers} (expected {list(cfg.layer_types)}); "
                            "only the periodic pattern is supported")
    return cfg


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """Our ModelConfig -> an AfmoeConfig dict; ablations HF cannot express raise an error."""
    for name, trinity in (("attention_gate", True), ("qk_norm", True), ("nope_global", True),
                          ("sandwich_norm", True)):
        if getattr(cfg, name) != trinity:
            raise HFFormatError(f"model.{name}={getattr(cfg, name)} has no Hugging Face AFMoE equivalent; "
                                f"export needs model.{name}={trinity}")
    out = {k: getattr(cfg, k) for k in _HF_FIELDS}
    out.update(architectures=["AfmoeForCausalLM"], model_type="afmoe",
               rope_parameters={"rope_theta": cfg.rope_theta, "rope_type": "default"},
               layer_types=list(cfg.layer_types), bos_token_id=cfg.bos_token_id,
               eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id, attention_bias=False,
               initializer_range=cfg.sigma, dtype="float32")
    return out


# ----------------------------------------------------------------------------- weights

def _layer_slot(cfg: ModelConfig, i: int) -> tuple[str, int]:
    return ("dense_layers", i) if i < cfg.num_dense_layers else ("moe_layers", i - cfg.num_dense_layers)


_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_mlp_layernorm", "post_mlp_layernorm")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def params_to_hf(cfg: ModelConfig, variables: dict) -> dict[str, np.ndarray]:
    """Our variables -> HF state dict in the per-expert layout that save_pretrained writes."""
    p, bal = variables["params"], variables.get("balance", {})
    f32 = lambda a: np.ascontiguousarray(np.asarray(a, dtype=np.float32))  # noqa: E731
    sd = {"model.embed_tokens.weight": f32(p["embed_tokens"]["embedding"]),
          "model.norm.weight": f32(p["norm"]["scale"]),
          "lm_head.weight": f32(np.asarray(p["lm_head"]["kernel"]).T)}
    for i in range(cfg.num_hidden_layers):
        stack, li = _layer_slot(cfg, i)
        lp, pre = p[stack], f"model.layers.{i}."
        for n in _NORMS:
            sd[pre + f"{n}.weight"] = f32(lp[n]["scale"][li])
        for n in _ATTN:
            sd[pre + f"self_attn.{n}.weight"] = f32(np.asarray(lp["self_attn"][n]["kernel"][li]).T)
        for n in ("q_norm", "k_norm"):
            sd[pre + f"self_attn.{n}.weight"] = f32(lp["self_attn"][n]["scale"][li])
        mlp = lp["mlp"]
        if stack == "dense_layers":
            for n in _MLP:
                sd[pre + f"mlp.{n}.weight"] = f32(np.asarray(mlp[n]["kernel"][li]).T)
            continue
        sd[pre + "mlp.router.gate.weight"] = f32(np.asarray(mlp["router"]["kernel"][li]).T)
        sd[pre + "mlp.expert_bias"] = f32(bal["moe_layers"]["mlp"]["expert_bias"][li])
        for n in _MLP:  # zero-width tensors when num_shared_experts == 0 (what HF itself builds)
            w = (np.asarray(mlp["shared_experts"][n]["kernel"][li]).T if cfg.num_shared_experts else
                 np.zeros((0, cfg.hidden_size) if n != "down_proj" else (cfg.hidden_size, 0)))
            sd[pre + f"mlp.shared_experts.{n}.weight"] = f32(w)
        for n in _MLP:
            w = np.asarray(mlp["experts"][n][li])                         # [E, in, out]
            for e in range(cfg.num_experts):
                sd[pre + f"mlp.experts.{e}.{n}.weight"] = f32(w[e].T)
    return sd


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Per-expert-layout key -> shape, for validation."""
    d, dh, hq, hkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    i_d, im, e, s = cfg.intermediate_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_shared_experts
    out = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,),
           "lm_head.weight": (cfg.vocab_size, d)}
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        out.update({pre + f"{n}.weight": (d,) for n in _NORMS})
        out.update({pre + "self_attn.q_proj.weight": (hq * dh, d), pre + "self_attn.k_proj.weight": (hkv * dh, d),
                    pre + "self_attn.v_proj.weight": (hkv * dh, d), pre + "self_attn.o_proj.weight": (d, hq * dh),
                    pre + "self_attn.gate_proj.weight": (hq * dh, d), pre + "self_attn.q_norm.weight": (dh,),
                    pre + "self_attn.k_norm.weight": (dh,)})
        if i < cfg.num_dense_layers:
            out.update({pre + "mlp.gate_proj.weight": (i_d, d), pre + "mlp.up_proj.weight": (i_d, d),
                        pre + "mlp.down_proj.weight": (d, i_d)})
            continue
        out.update({pre + "mlp.router.gate.weight": (e, d), pre + "mlp.expert_bias": (e,)})
        if s:
            out.update({pre + "mlp.shared_experts.gate_proj.weight": (im * s, d),
                        pre + "mlp.shared_experts.up_proj.weight": (im * s, d),
                        pre + "mlp.shared_experts.down_proj.weight": (d, im * s)})
        for k in range(e):
            out.update({pre + f"mlp.experts.{k}.gate_proj.weight": (im, d),
                        pre + f"mlp.experts.{k}.up_proj.weight": (im, d),
                        pre + f"mlp.experts.{k}.down_proj.weight": (d, im)})
    return out


def _unfuse_experts(cfg: ModelConfig, sd: dict[str, np.ndarray], where: str) -> dict[str, np.ndarray]:
    """Fused `mlp.experts.gate_up_proj` / `down_proj` -> per-expert keys (shape-checked)."""
    out = dict(sd)
    im, d, e = cfg.moe_intermediate_size, cfg.hidden_size, cfg.num_experts
    for i in range(cfg.num_dense_layers, cfg.num_hidden_layers):
        pre = f"model.layers.{i}.mlp.experts."
        if pre + "gate_up_proj" not in out:
            continue
        gu, dn = out.pop(pre + "gate_up_proj"), out.pop(pre + "down_proj", None)
        if dn is None:
            raise HFFormatError(f"{where}: missing key {pre}down_proj (fused experts need both tensors)")
        if gu.shape != (e, 2 * im, d) or dn.shape != (e, d, im):
            raise HFFormatError(f"{where}: {pre}gate_up_proj/down_proj have shapes {gu.shape}/{dn.shape}; "
                                f"expected {(e, 2 * im, d)}/{(e, d, im)}")
        for k in range(e):
            out[pre + f"{k}.gate_proj.weight"] = gu[k, :im]
            out[pre + f"{k}.up_proj.weight"] = gu[k, im:]
            out[pre + f"{k}.down_proj.weight"] = dn[k]
    return out


def params_from_hf(cfg: ModelConfig, sd: dict[str, np.ndarray], where: str = "checkpoint") -> dict:
    """HF state dict (either expert layout) -> our variables {'params', 'balance'}; all keys checked first."""
    sd = _unfuse_experts(cfg, sd, where)
    expected = _expected_shapes(cfg)
    for key, shape in expected.items():
        if key not in sd:
            raise HFFormatError(f"{where}: missing key {key!r}")
        if tuple(sd[key].shape) != shape:
            raise HFFormatError(f"{where}: key {key!r} has shape {tuple(sd[key].shape)}, expected {shape}")
    # HF builds a zero-width shared expert when num_shared_experts == 0: nothing to import.
    extra = sorted(k for k in sd if k not in expected and not k.endswith("rotary_emb.inv_freq")
                   and not (".shared_experts." in k and 0 in sd[k].shape))
    if extra:
        raise HFFormatError(f"{where}: unexpected key {extra[0]!r} ({len(extra)} unexpected in all); "
                            "does config.json match the weights?")
    g = lambda k: np.asarray(sd[k], dtype=np.float32)  # noqa: E731
    nd, nm = cfg.num_dense_layers, cfg.num_moe_layers

    def stack(layers, fn):
        return np.stack([fn(i) for i in layers]) if layers else None

    def layer_tree(layers, moe):
        t = {n: {"scale": stack(layers, lambda i, n=n: g(f"model.layers.{i}.{n}.weight"))} for n in _NORMS}
        attn = {n: {"kernel": stack(layers, lambda i, n=n: g(f"model.layers.{i}.self_attn.{n}.weight").T)}
                for n in _ATTN}
        for n in ("q_norm", "k_norm"):
            attn[n] = {"scale": stack(layers, lambda i, n=n: g(f"model.layers.{i}.self_attn.{n}.weight"))}
        t["self_attn"] = attn
        if not moe:
            t["mlp"] = {n: {"kernel": stack(layers, lambda i, n=n: g(f"model.layers.{i}.mlp.{n}.weight").T)}
                        for n in _MLP}
            return t
        mlp = {"router": {"kernel": stack(layers, lambda i: g(f"model.layers.{i}.mlp.router.gate.weight").T)},
               "experts": {n: stack(layers, lambda i, n=n: np.stack(
                   [g(f"model.layers.{i}.mlp.experts.{k}.{n}.weight").T for k in range(cfg.num_experts)]))
                   for n in _MLP}}
        if cfg.num_shared_experts:
            mlp["shared_experts"] = {n: {"kernel": stack(
                layers, lambda i, n=n: g(f"model.layers.{i}.mlp.shared_experts.{n}.weight").T)} for n in _MLP}
        t["mlp"] = mlp
        return t

    params = {"embed_tokens": {"embedding": g("model.embed_tokens.weight")},
              "norm": {"scale": g("model.norm.weight")},
              "lm_head": {"kernel": g("lm_head.weight").T}}
    if nd:
        params["dense_layers"] = layer_tree(list(range(nd)), False)
    variables = {"params": params}
    if nm:
        moe_layers = list(range(nd, cfg.num_hidden_layers))
        params["moe_layers"] = layer_tree(moe_layers, True)
        variables["balance"] = {"moe_layers": {"mlp": {"expert_bias": stack(
            moe_layers, lambda i: g(f"model.layers.{i}.mlp.expert_bias"))}}}
    return variables


# ----------------------------------------------------------------------------- directories

def is_hf_dir(path: str) -> bool:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        return False
    try:
        with open(cfg_path) as f:
            return json.load(f).get("model_type") == "afmoe"
    except (OSError, json.JSONDecodeError):
        return False


def _safetensor_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        for fn in files:
            if not os.path.isfile(os.path.join(path, fn)):
                raise HFFormatError(f"{index}: names shard {fn!r}, which does not exist")
        return [os.path.join(path, fn) for fn in files]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise HFFormatError(f"{path}: no model.safetensors or model.safetensors.index.json")


def load_hf_dir(path: str, **config_overrides) -> tuple[ModelConfig, dict]:
    """Read an AFMoE directory -> (ModelConfig, variables)."""
    from safetensors.numpy import load_file

    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise HFFormatError(f"{path}: no config.json")
    with open(cfg_path) as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise HFFormatError(f"{cfg_path}: not valid JSON ({e})") from None
    cfg = config_from_hf(hf, cfg_path, **config_overrides)
    sd: dict[str, np.ndarray] = {}
    for fn in _safetensor_files(path):
        sd.update(load_file(fn))
    return cfg, params_from_hf(cfg, sd, path)


def _not_hf_export(path: str, names: list[str]) -> list[str]:
    """Entries that stop `path` being an earlier HF export (config.json, *.safetensors and only the files
    an export holds); [] when it is one."""
    odd = [n for n in names if not ((n in _HF_FILES or n.endswith(".safetensors"))
                                    and os.path.isfile(os.path.join(path, n)))]
    if odd or ("config.json" in names and any(n.endswith(".safetensors") for n in names)):
        return odd
    return names


def check_output_dir(path: str, kind: str, not_same_kind) -> None:
    """Refuse to replace `path` unless it is missing, empty, or an earlier output of this kind
    (`not_same_kind(path, names)` lists the entries that say otherwise); raised before anything is
    written, so an unrelated directory is never deleted."""
    if not os.path.lexists(path):
        return
    if not os.path.isdir(path) or os.path.islink(path):
        raise ValueError(f"{path}: exists and is not a directory; the {kind} output must be a new or empty "
                         "directory (or an earlier export, which is replaced)")
    names = sorted(os.listdir(path))
    odd = not_same_kind(path, names) if names else []
    if odd:
        raise ValueError(f"{path}: directory is not empty and is not an earlier {kind} export (it holds "
                         f"{', '.join(repr(n) for n in odd[:3])}{' ...' if len(odd) > 3 else ''}); refusing to "
                         "replace it: choose a new or empty directory, or remove it yourself")


def check_hf_output_dir(path: str) -> None:
    """`path` may receive an HF export: missing, empty, or an earlier HF export."""
    check_output_dir(os.path.abspath(path), "Hugging Face", _not_hf_export)


def move_into_place(tmp: str, path: str) -> None:
    """Rename the finished temp dir `tmp` to `path`; an old `path` is moved aside first (to a name unique to
    `tmp`, never a fixed `path.old` that could be someone's) and deleted only once the new one is in place.
    If the second rename fails the old directory is put back; a crash between them leaves it at `tmp.old`."""
    if not os.path.lexists(path):
        os.replace(tmp, path)
        return
    old = tmp + ".old"
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def save_hf_dir(cfg: ModelConfig, variables: dict, out_dir: str, tokenizer=None) -> str:
    """Write config.json + model.safetensors (per-expert layout) [+ tokenizer.json]. Atomic: a temp dir
    renamed into place; `out_dir` must be missing, empty or an earlier HF export (else nothing is written)."""
    from safetensors.numpy import save_file

    out_dir = os.path.abspath(out_dir)
    check_hf_output_dir(out_dir)
    hf_cfg = config_to_hf(cfg)                 # validates before anything is written
    sd = params_to_hf(cfg, variables)
    expected = _expected_shapes(cfg)
    for key, shape in expected.items():
        if key not in sd or sd[key].shape != shape:
            raise HFFormatError(f"export: {key} has shape {sd[key].shape}, expected {shape}")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-hf-", dir=parent)
    try:
        save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_cfg, f, indent=2)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
                       "pad_token_id": cfg.pad_token_id}, f, indent=2)
        if tokenizer is not None and hasattr(tokenizer, "save"):
            tokenizer.save(os.path.join(tmp, "tokenizer.json"))
        move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
