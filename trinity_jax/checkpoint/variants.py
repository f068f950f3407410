"""Released variants (SPEC §5): TrueBase, Base, Preview as params-only checkpoints.

A variant directory holds
    params/          Orbax checkpoint of {'params', 'balance'} in the variant dtype (bf16 default)
    model.json       the ModelConfig (our field names = HF AfmoeConfig names)
    experiment.json  the full resolved experiment config it came from (if any)
    tokenizer.json   the tokenizer (if any)
    metadata.json    name, dtype, step, tokens_seen, phase, parent, source commit, created
and is written atomically (temp dir renamed into place), so a reader never sees half a variant; it replaces
only a missing or empty directory or an earlier variant. `tj.load(path)` loads it; `export(workdir, name,
hf_dir=...)` re-exports on demand and leaves the variant itself untouched unless asked for another dtype.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import subprocess
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from trinity_jax.checkpoint.hf import check_hf_output_dir, check_output_dir, move_into_place
from trinity_jax.config import ConfigError, ModelConfig, model_config

VARIANTS = ("truebase", "base", "preview")
DTYPES = ("bfloat16", "float32", "float16")
_MARKER = "metadata.json"


def source_commit() -> str:
    """The git commit of the code that wrote a file ('unknown' outside a checkout)."""
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        out = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def is_variant_dir(path: str) -> bool:
    return (os.path.isfile(os.path.join(path, _MARKER)) and os.path.isfile(os.path.join(path, "model.json"))
            and os.path.isdir(os.path.join(path, "params")))


def check_variant_output_dir(path: str) -> None:
    """`path` may receive a variant: missing, empty, or an earlier variant (has its metadata.json)."""
    check_output_dir(os.path.abspath(path), "variant",
                     lambda p, names: [] if _MARKER in names else names)


def _cast(tree: Any, dtype: str) -> Any:
    """Leaves in `dtype`; jax arrays stay on their devices (a multi-process run's global arrays
    stay sharded: every process takes part, none holds the whole model)."""
    dt = jnp.dtype(dtype)
    return jax.tree_util.tree_map(lambda x: x.astype(dt) if isinstance(x, jax.Array)
                                  else np.asarray(x).astype(dt), tree)


def save_variant(model, path: str, *, name: str, metadata: dict | None = None, dtype: str = "bfloat16",
                 experiment: dict | None = None) -> str:
    """Write `model` (a LoadedModel) as a variant directory at `path` (replacing an old variant atomically;
    any other non-empty directory there is refused before anything is written)."""
    return save_variant_arrays(model.variables, model.config, path, name=name, metadata=metadata,
                               dtype=dtype, experiment=experiment, tokenizer=model.tokenizer)


def _sync(tag: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(tag)


def save_variant_arrays(variables: dict, config: ModelConfig, path: str, *, name: str,
                        metadata: dict | None = None, dtype: str = "bfloat16",
                        experiment: dict | None = None, tokenizer=None) -> str:
    """`save_variant` for variables that may be global arrays of a multi-process run (a train
    state's): then every process calls it, Orbax writes each process's shards into a temp
    directory of a name they share, and process 0 writes the rest and moves it into place
    (no process gathers the whole model). Single-process: any arrays, a private temp dir."""
    import orbax.checkpoint as ocp

    if dtype not in DTYPES:
        raise ConfigError(f"variant dtype={dtype!r}: allowed {list(DTYPES)}")
    path = os.path.abspath(path)
    check_variant_output_dir(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    main, multi = jax.process_index() == 0, jax.process_count() > 1
    if multi:
        tmp = os.path.join(parent, f".tmp-{os.path.basename(path)}-shared")
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        _sync(f"variant {name}: temp dir")
    else:
        tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(path)}-", dir=parent)
    try:
        tree = {"params": _cast(variables["params"], dtype)}
        if "balance" in variables:
            tree["balance"] = _cast(variables["balance"], "float32")   # expert_bias stays fp32
        ocp.PyTreeCheckpointer().save(os.path.join(tmp, "params"), tree)
        if main:
            with open(os.path.join(tmp, "model.json"), "w") as f:
                json.dump(dataclasses.asdict(config), f, indent=2)
            if experiment is not None:
                with open(os.path.join(tmp, "experiment.json"), "w") as f:
                    json.dump(experiment, f, indent=2)
            if tokenizer is not None:
                src = getattr(tokenizer, "path", None)
                if src and os.path.isfile(src):
                    shutil.copyfile(src, os.path.join(tmp, "tokenizer.json"))
                elif hasattr(tokenizer, "save"):
                    tokenizer.save(os.path.join(tmp, "tokenizer.json"))
            meta = {"name": name, "dtype": dtype, "source_commit": source_commit(),
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
            meta.update(metadata or {})
            with open(os.path.join(tmp, _MARKER), "w") as f:       # written last: marks the dir complete
                json.dump(meta, f, indent=2)
            move_into_place(tmp, path)
        _sync(f"variant {name}: in place")
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_model_config(path: str) -> ModelConfig:
    with open(os.path.join(path, "model.json")) as f:
        raw = json.load(f)
    try:
        return model_config(**raw)
    except ConfigError as e:
        raise ConfigError(f"{path}/model.json: {e}") from None


def load_variant(path: str, compute_dtype: str | None = None):
    """Variant directory -> LoadedModel (params upcast to fp32; compute dtype from the config)."""
    import orbax.checkpoint as ocp

    from trinity_jax.api import LoadedModel

    if not is_variant_dir(path):
        raise ValueError(f"{path}: not a complete variant directory (needs params/, model.json, {_MARKER})")
    cfg = read_model_config(path)
    if compute_dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=compute_dtype)
    with open(os.path.join(path, _MARKER)) as f:
        meta = json.load(f)
    # Restored as host arrays whatever devices wrote them (a multi-process run's variant holds
    # the shardings of its devices, which a notebook does not have).
    ckptr, params_dir = ocp.PyTreeCheckpointer(), os.path.join(path, "params")
    saved = ckptr.metadata(params_dir)
    saved = getattr(getattr(saved, "item_metadata", saved), "tree", saved)
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)
    tree = ckptr.restore(params_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
    variables = jax.tree_util.tree_map(lambda x: jnp.asarray(np.asarray(x), jnp.float32), tree)
    tok = None
    tok_path = os.path.join(path, "tokenizer.json")
    if os.path.isfile(tok_path):
        from trinity_jax.data.tokenizer import load_tokenizer
        tok = load_tokenizer(tok_path, cfg.vocab_size, pad_id=cfg.pad_token_id, bos_id=cfg.bos_token_id,
                             eos_id=cfg.eos_token_id)
    return LoadedModel(cfg, variables, tok, meta, path)


def export(workdir: str, name: str, *, hf_dir: str | None = None, dtype: str | None = None) -> str:
    """Re-export variant `name` of a training workdir as an HF directory and/or re-save it in `dtype`.

    The variant on disk is rewritten only when `dtype` is given and differs from its own (keeping its
    experiment.json, tokenizer and metadata); `dtype=None` leaves it byte-for-byte as it is."""
    if name not in VARIANTS:
        raise ConfigError(f"--variant {name!r}: allowed {list(VARIANTS)}")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype!r}: allowed {list(DTYPES)}")
    path = os.path.join(workdir, "variants", name)
    if not is_variant_dir(path):
        raise FileNotFoundError(f"{path}: variant {name!r} has not been written yet (train through its phase first)")
    if hf_dir:
        check_hf_output_dir(hf_dir)            # before the variant is touched or anything is written
    model = load_variant(path)
    if dtype is not None and dtype != model.metadata.get("dtype"):
        experiment = None
        exp_path = os.path.join(path, "experiment.json")
        if os.path.isfile(exp_path):
            with open(exp_path) as f:
                experiment = json.load(f)
        save_variant(model, path, name=name, metadata=model.metadata | {"dtype": dtype}, dtype=dtype,
                     experiment=experiment)
    if hf_dir:
        from trinity_jax.api import export_hf
        return export_hf(model, hf_dir)
    return path
