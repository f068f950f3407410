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
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise HFFormatError(f"{source}: rope_parameters.rope_type={rope.get('rope_type')!r} is not supported; "
                            "allowed: ['default']")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    kw: dict[str, Any] = {k: hf[k] for k in _HF_FIELDS if k in hf and hf[k] is not None}
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
               if k not in kw]
    if missing:
        raise HFFormatError(f"{source}: missing required field {missing[0]!r}")
    kw["rope_theta"] = float(theta)
    if kw.get("head_dim") is None:
        kw["head_dim"] = kw["hidden_size"] // kw["num_attention_heads"]
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


def save_hf_dir(cfg: ModelConfig, variables: dict, out_dir: str) -> str:
    """Write config.json + model.safetensors (per-expert layout). Atomic: a temp dir renamed into place."""
    from safetensors.numpy import save_file

    hf_cfg = config_to_hf(cfg)                 # validates before anything is written
    sd = params_to_hf(cfg, variables)
    expected = _expected_shapes(cfg)
    for key, shape in expected.items():
        if key not in sd or sd[key].shape != shape:
            raise HFFormatError(f"export: {key} has shape {sd[key].shape}, expected {shape}")
    out_dir = os.path.abspath(out_dir)
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
        if os.path.exists(out_dir):
            old = out_dir + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
