"""Typed, frozen experiment configs, built once from an ml_collections ConfigDict and validated.

An experiment file (experiments/*.py) returns a ConfigDict with the groups
``model, mesh, optim, data, train, checkpoint``. ``from_config_dict`` turns it into an
``ExperimentConfig`` of frozen dataclasses, rejecting unknown fields, wrong types and values
that break a rule, with one error that names the field (``ConfigError``).

``model`` fields use the Hugging Face ``AfmoeConfig`` names (SPEC §1) so they map one to one.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Optional

__all__ = [
    "ConfigError", "ModelConfig", "MeshConfig", "OptimConfig", "PhaseConfig", "DataConfig",
    "TrainConfig", "CheckpointConfig", "SFTConfig", "ExperimentConfig", "from_config_dict", "to_config_dict",
    "MOE_IMPLS", "ATTENTION_IMPLS", "REMAT_POLICIES",
]


class ConfigError(ValueError):
    """A config value breaks a rule; the message names the field and what is allowed."""


MOE_IMPLS = ("auto", "dense_reference", "ragged_dot", "block_sparse", "pallas")
ATTENTION_IMPLS = ("auto", "xla", "local_blocks", "dot_product_attention")
REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_except_moe")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The AFMoE architecture (SPEC §1-3). Field names follow transformers' AfmoeConfig."""

    vocab_size: int = 8192
    hidden_size: int = 128
    intermediate_size: int = 384
    moe_intermediate_size: int = 64
    num_hidden_layers: int = 4
    num_dense_layers: int = 1
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    num_experts: int = 16
    num_experts_per_tok: int = 4
    num_shared_experts: int = 1
    route_scale: float = 1.0
    global_attn_every_n_layers: int = 4
    sliding_window: int = 64
    mup_enabled: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int = 0
    # --- initialisation (SPEC §3); None means the report's sigma = 0.5 / sqrt(hidden_size)
    init_std: Optional[float] = None
    router_init_std: Optional[float] = None  # None: same as init_std; 0.0: zeros as in HF
    # --- numerics / implementation choices
    dtype: str = "float32"          # compute dtype; params are always float32 (master weights)
    moe_impl: str = "auto"          # see MOE_IMPLS; auto picks the fastest for the backend
    capacity_factor: float = 0.0    # 0: dropless; > 0: drop overflow tokens deterministically
    attention_impl: str = "auto"   # see ATTENTION_IMPLS / model.attention.self_attention
    remat_policy: str = "none"
    # layers per scan iteration (>= the stack: fully unrolled; faster steps on CPU, no stacked
    # residual buffers, longer compile). 0 = auto: fully unrolled for 16-bit compute on CPU, where
    # scanned layers stack bf16 residuals with dynamic-update-slice, which XLA:CPU runs by
    # converting the whole stack to f32 and back at every layer (the bench's bf16 step: 2.97 s
    # scanned, 1.84 s unrolled); 1 elsewhere.
    scan_unroll: int = 0
    # --- ablation switches (defaults are Trinity)
    attention_gate: bool = True
    qk_norm: bool = True
    nope_global: bool = True        # global layers without RoPE; False: RoPE everywhere
    sandwich_norm: bool = True      # False: pre-norm only (no post-attn / post-mlp norms)

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.num_dense_layers

    @property
    def sigma(self) -> float:
        return self.init_std if self.init_std is not None else 0.5 / math.sqrt(self.hidden_size)

    def is_global_layer(self, i: int) -> bool:
        """SPEC §1.2: layer i is global iff (i + 1) % global_attn_every_n_layers == 0."""
        return (i + 1) % self.global_attn_every_n_layers == 0

    @property
    def layer_types(self) -> tuple[str, ...]:
        return tuple("full_attention" if self.is_global_layer(i) else "sliding_attention"
                     for i in range(self.num_hidden_layers))

    def validate(self) -> None:
        _positive(self, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim",
                  "global_attn_every_n_layers", "max_position_embeddings")
        if self.sliding_window < 1:
            raise ConfigError(f"model.sliding_window={self.sliding_window}: must be >= 1")
        if not 0 <= self.num_dense_layers <= self.num_hidden_layers:
            raise ConfigError(
                f"model.num_dense_layers={self.num_dense_layers}: must be in "
                f"[0, num_hidden_layers={self.num_hidden_layers}]")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"model.num_key_value_heads={self.num_key_value_heads} must divide "
                f"model.num_attention_heads={self.num_attention_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim={self.head_dim}: must be even (RoPE rotates halves)")
        if self.num_moe_layers > 0:
            _positive(self, "num_experts", "num_experts_per_tok", "moe_intermediate_size")
            if self.num_experts_per_tok > self.num_experts:
                raise ConfigError(
                    f"model.num_experts_per_tok={self.num_experts_per_tok} must be <= "
                    f"model.num_experts={self.num_experts}")
            if self.num_shared_experts < 0:
                raise ConfigError(f"model.num_shared_experts={self.num_shared_experts}: must be >= 0")
        if self.route_scale <= 0:
            raise ConfigError(f"model.route_scale={self.route_scale}: must be > 0")
        if self.rms_norm_eps <= 0:
            raise ConfigError(f"model.rms_norm_eps={self.rms_norm_eps}: must be > 0")
        if self.hidden_act != "silu":
            raise ConfigError(f"model.hidden_act={self.hidden_act!r}: only 'silu' is supported")
        if self.capacity_factor < 0:
            raise ConfigError(f"model.capacity_factor={self.capacity_factor}: must be >= 0 (0 = dropless)")
        if self.tie_word_embeddings:
            raise ConfigError("model.tie_word_embeddings=True: Trinity uses an untied lm_head; only False is supported")
        for name in ("init_std", "router_init_std"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ConfigError(f"model.{name}={v}: must be >= 0 or None")
        _choice(self, "model", "dtype", DTYPES)
        _choice(self, "model", "moe_impl", MOE_IMPLS)
        _choice(self, "model", "attention_impl", ATTENTION_IMPLS)
        _choice(self, "model", "remat_policy", REMAT_POLICIES)
        if self.scan_unroll < 0:
            raise ConfigError(f"model.scan_unroll={self.scan_unroll}: must be >= 1, or 0 for auto")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            v = getattr(self, name)
            if not 0 <= v < self.vocab_size:
                raise ConfigError(f"model.{name}={v}: must be in [0, vocab_size={self.vocab_size})")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axis sizes; -1 means inferred from the device count (at most one axis)."""

    replica: int = 1
    fsdp: int = -1
    expert: int = 1
    tensor: int = 1
    ep_buffer_factor: float = 0.0   # 0: all-to-all buffers sized so nothing drops

    def validate(self) -> None:
        sizes = {a: getattr(self, a) for a in ("replica", "fsdp", "expert", "tensor")}
        for a, v in sizes.items():
            if v == 0 or v < -1:
                raise ConfigError(f"mesh.{a}={v}: must be a positive size or -1 (inferred)")
        if sum(v == -1 for v in sizes.values()) > 1:
            raise ConfigError(f"mesh: at most one axis may be -1 (inferred), got {sizes}")
        if self.ep_buffer_factor < 0:
            raise ConfigError(f"mesh.ep_buffer_factor={self.ep_buffer_factor}: must be >= 0")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Muon for hidden matrices, AdamW for embedding / lm_head / 1-D params (SPEC §4)."""

    muon_lr: float = 1e-3
    adam_lr: float = 3e-4
    muon_momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    ns_dtype: str = "float32"          # float32 | bfloat16: operands of the Newton–Schulz products (f32 results)
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    adam_eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    warmup_steps: int = 2000
    decay: str = "linear_to_zero"     # linear_to_zero | cosine_to_fraction | none
    decay_final_fraction: float = 0.0  # cosine_to_fraction: final LR / peak (Large 0.1)
    decay_start_phase: int = -1        # index of the data phase where decay starts (-1: last)
    router_on_muon: bool = True
    hidden_optimizer: str = "muon"     # muon | adamw (ablation / like-for-like benchmarks: every matrix on AdamW)

    def validate(self) -> None:
        _choice(self, "optim", "decay", ("linear_to_zero", "cosine_to_fraction", "none"))
        _choice(self, "optim", "hidden_optimizer", ("muon", "adamw"))
        _choice(self, "optim", "ns_dtype", ("float32", "bfloat16"))
        for name in ("muon_lr", "adam_lr", "weight_decay", "clip_norm", "adam_eps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"optim.{name}={getattr(self, name)}: must be >= 0")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps}: must be >= 0")
        if self.ns_steps < 1:
            raise ConfigError(f"optim.ns_steps={self.ns_steps}: must be >= 1")
        if not 0.0 <= self.decay_final_fraction <= 1.0:
            raise ConfigError(f"optim.decay_final_fraction={self.decay_final_fraction}: must be in [0, 1]")


@dataclasses.dataclass(frozen=True)
class PhaseConfig:
    """One data phase: a token budget and a mixture {source name: weight}."""

    name: str = "phase1"
    tokens: int = 0
    mixture: tuple = ()  # tuple of (source, weight) pairs, sorted by source

    def validate(self, sources: tuple[str, ...], where: str) -> None:
        if self.tokens <= 0:
            raise ConfigError(f"{where}.tokens={self.tokens}: must be > 0")
        if not self.mixture:
            raise ConfigError(f"{where}.mixture is empty: give at least one source with a weight > 0")
        for src, w in self.mixture:
            if src not in sources:
                raise ConfigError(f"{where}.mixture names unknown source {src!r}; "
                                  f"known sources (data.sources): {sorted(sources)}")
            if w < 0:
                raise ConfigError(f"{where}.mixture[{src!r}]={w}: weights must be >= 0")
        if sum(w for _, w in self.mixture) <= 0:
            raise ConfigError(f"{where}.mixture: weights must sum to > 0")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Corpus, tokenizer, token shards and the grain pipeline (issue: data)."""

    sources: tuple = (("stdlib", "stdlib"),)   # (name, spec) pairs; spec 'stdlib' or a path
    phases: tuple = ()                         # tuple[PhaseConfig]; empty: one phase of all sources
    tokenizer: str = ""                        # path to a tokenizer.json; "" trains a BPE on the corpus
    loading: str = "packed"                    # packed | rsdb
    rsdb_buffer: int = 64                      # user-visible RSDB buffer size (documents)
    intra_doc_mask: bool = True                # segment ids + restarting positions
    val_fraction: float = 0.02
    seed: int = 0
    cache_dir: str = ""                        # token shards; "" = <workdir>/data
    sft: str = "builtin"                       # chat JSONL path, or 'builtin'

    def validate(self) -> None:
        _choice(self, "data", "loading", ("packed", "rsdb"))
        names = tuple(n for n, _ in self.sources)
        if not names:
            raise ConfigError("data.sources is empty: give at least one (name, 'stdlib' | path)")
        if len(set(names)) != len(names):
            raise ConfigError(f"data.sources has duplicate names: {names}")
        for i, p in enumerate(self.phases):
            p.validate(names, f"data.phases[{i}]")
        if self.rsdb_buffer < 1:
            raise ConfigError(f"data.rsdb_buffer={self.rsdb_buffer}: must be >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction}: must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Run length, batch shape, losses and router balancing (SPEC §4)."""

    steps: int = 100
    batch_size: int = 8        # global sequences per step
    seq_len: int = 256
    microbatches: int = 1      # gradient accumulation
    log_every: int = 10
    eval_every: int = 0        # 0: only at the end
    eval_batches: int = 4
    seed: int = 0
    z_loss_weight: float = 1e-6
    balance_loss_weight: float = 1e-4
    balance: str = "smebu"     # smebu | sign | none
    smebu_lambda: float = 5e-4
    smebu_beta: float = 0.5
    smebu_kappa: float = 2.0
    sign_gamma: float = 1e-3
    # sequence positions per cross-entropy chunk (a chunk is [batch, chunk]). 128: on the bench
    # model (batch 8, vocab 8192) 32 MB of fp32 logits a chunk instead of 128 MB; the step is no
    # slower than with the whole 512-position sequence as one chunk (1.01x, replicated builds).
    loss_chunk_size: int = 128
    max_nonfinite_steps: int = 5
    peak_flops: float = 0.0    # per device (CPU: per process); 0 = measure a matmul at start-up for MFU
    batch_ramp: tuple = ()     # ((tokens_seen, batch_size), ...) ascending

    def validate(self) -> None:
        _positive(self, "steps", "batch_size", "seq_len", "microbatches", "log_every",
                  "eval_batches", "loss_chunk_size", "max_nonfinite_steps")
        _choice(self, "train", "balance", ("smebu", "sign", "none"))
        if self.batch_size % self.microbatches:
            raise ConfigError(f"train.microbatches={self.microbatches} must divide "
                              f"train.batch_size={self.batch_size}")
        for name in ("z_loss_weight", "balance_loss_weight", "smebu_lambda", "sign_gamma"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)}: must be >= 0")
        if not 0.0 <= self.smebu_beta < 1.0:
            raise ConfigError(f"train.smebu_beta={self.smebu_beta}: must be in [0, 1)")
        last = -1
        for i, ramp in enumerate(self.batch_ramp):
            if len(ramp) != 2 or ramp[0] <= last or ramp[1] < 1:
                raise ConfigError(f"train.batch_ramp[{i}]={ramp}: entries are (tokens_seen, batch_size) "
                                  "with strictly increasing tokens_seen and batch_size >= 1")
            last = ramp[0]


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 50            # steps between saves
    keep: int = 2              # last K step checkpoints kept (variants are kept apart)
    async_save: bool = True
    variant_dtype: str = "bfloat16"

    def validate(self) -> None:
        _positive(self, "every", "keep")
        _choice(self, "checkpoint", "variant_dtype", DTYPES)


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    """The post-training stage that turns Base into Preview (SPEC §4): LR warms linearly to
    lr_fraction × the pre-training peaks, then decays linearly to 0; assistant-only loss."""

    steps: int = 0             # 0: no SFT stage (no Preview)
    lr_fraction: float = 0.1
    warmup_steps: int = 10
    batch_size: int = 16

    def validate(self) -> None:
        if self.steps < 0 or self.warmup_steps < 0:
            raise ConfigError(f"sft.steps={self.steps}, sft.warmup_steps={self.warmup_steps}: must be >= 0")
        if self.steps and self.warmup_steps >= self.steps:
            raise ConfigError(f"sft.warmup_steps={self.warmup_steps} must be < sft.steps={self.steps}")
        if not 0 < self.lr_fraction <= 1:
            raise ConfigError(f"sft.lr_fraction={self.lr_fraction}: must be in (0, 1]")
        _positive(self, "batch_size")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    model: ModelConfig = ModelConfig()
    mesh: MeshConfig = MeshConfig()
    optim: OptimConfig = OptimConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    sft: SFTConfig = SFTConfig()

    def validate(self) -> "ExperimentConfig":
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        if self.train.seq_len > self.model.max_position_embeddings:
            raise ConfigError(f"train.seq_len={self.train.seq_len} exceeds "
                              f"model.max_position_embeddings={self.model.max_position_embeddings}")
        n, d = max(1, len(self.data.phases)), self.optim.decay_start_phase
        if not -n <= d < n:
            raise ConfigError(f"optim.decay_start_phase={d}: the data plan has {n} phase(s) "
                              f"(data.phases); allowed values are -{n}..{n - 1}")
        if n > 1 and self.optim.decay != "none" and d % n == 0:
            raise ConfigError(f"optim.decay_start_phase={d}: the decay would start in the first "
                              f"data phase, at whose end TrueBase (the checkpoint before any LR "
                              f"decay) is taken; allowed values are 1..{n - 1} or -{n - 1}..-1")
        return self


# ----------------------------------------------------------------------------- helpers

def _positive(obj, *names):
    group = _GROUP_OF.get(type(obj), type(obj).__name__)
    for n in names:
        v = getattr(obj, n)
        if v < 1:
            raise ConfigError(f"{group}.{n}={v}: must be >= 1")


def _choice(obj, group, name, allowed):
    v = getattr(obj, name)
    if v not in allowed:
        raise ConfigError(f"{group}.{name}={v!r}: allowed values are {list(allowed)}")


_GROUPS = {"model": ModelConfig, "mesh": MeshConfig, "optim": OptimConfig, "data": DataConfig,
           "train": TrainConfig, "checkpoint": CheckpointConfig, "sft": SFTConfig}
_GROUP_OF = {v: k for k, v in _GROUPS.items()}


def _to_plain(x: Any) -> Any:
    """ConfigDict / FrozenConfigDict / FieldReference -> plain python containers."""
    if hasattr(x, "to_dict"):
        x = x.to_dict()
    if hasattr(x, "get") and callable(getattr(x, "get")) and hasattr(x, "keys") and not isinstance(x, dict):
        x = {k: x[k] for k in x.keys()}
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against annotation `tp` (int/float/bool/str/Optional/tuple), coercing ints to floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}={value!r}: expected a bool, got {type(value).__name__}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}={value!r}: expected an int, got {type(value).__name__}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}={value!r}: expected a number, got {type(value).__name__}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}={value!r}: expected a string, got {type(value).__name__}")
        return value
    return value


def _pairs(value: Any, where: str) -> tuple:
    """A mapping or a list of pairs -> a tuple of (key, value) pairs (sorted for mappings)."""
    if isinstance(value, dict):
        return tuple(sorted(value.items()))
    if isinstance(value, (list, tuple)):
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise ConfigError(f"{where}[{i}]={item!r}: expected a (name, value) pair")
            out.append(tuple(item))
        return tuple(out)
    raise ConfigError(f"{where}={value!r}: expected a mapping or a list of pairs")


def _batch_ramp(value: Any, where: str) -> tuple:
    """``[(tokens_seen, batch_size), ...]`` -> a tuple of int pairs (4.9e12 is fine, 32.5 not)."""
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}={value!r}: expected a list of (tokens_seen, batch_size) pairs")
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise ConfigError(f"{where}[{i}]={item!r}: expected a (tokens_seen, batch_size) pair, "
                              f"e.g. {where}=[(4_900_000_000_000, 16384)]")
        out.append(tuple(_coerce(x, int, f"{where}[{i}]") for x in item))
    return tuple(out)


def _build(cls, raw: dict, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a group of fields, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(f"unknown field {where}.{unknown[0]}; allowed fields of {where}: {sorted(names)}")
    kwargs = {}
    for key, value in raw.items():
        fw = f"{where}.{key}"
        if cls is DataConfig and key == "sources":
            kwargs[key] = tuple((str(k), str(v)) for k, v in _pairs(value, fw))
        elif cls is DataConfig and key == "phases":
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{fw}: expected a list of phases")
            kwargs[key] = tuple(_build(PhaseConfig, dict(p), f"{fw}[{i}]") for i, p in enumerate(value))
        elif cls is PhaseConfig and key == "mixture":
            kwargs[key] = tuple((str(k), _coerce(v, float, f"{fw}.{k}")) for k, v in _pairs(value, fw))
        elif cls is TrainConfig and key == "batch_ramp":
            kwargs[key] = _batch_ramp(value, fw)
        else:
            kwargs[key] = _coerce(value, hints[key], fw)
    return cls(**kwargs)


def from_config_dict(cfg: Any) -> ExperimentConfig:
    """ConfigDict (or dict) with groups model/mesh/optim/data/train/checkpoint -> validated config."""
    raw = _to_plain(cfg)
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a ConfigDict of groups, got {type(cfg).__name__}")
    unknown = sorted(set(raw) - set(_GROUPS))
    if unknown:
        raise ConfigError(f"unknown config group {unknown[0]!r}; allowed groups: {sorted(_GROUPS)}")
    groups = {name: _build(cls, raw.get(name, {}), name) for name, cls in _GROUPS.items()}
    return ExperimentConfig(**groups).validate()


def _plain_value(v: Any) -> Any:
    if dataclasses.is_dataclass(v):
        return {f.name: _plain_value(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, tuple):
        return [_plain_value(x) for x in v]
    return v


def to_config_dict(cfg: ExperimentConfig) -> dict:
    """ExperimentConfig -> plain JSON-able dict (inverse of from_config_dict)."""
    out = _plain_value(cfg)
    out["data"]["sources"] = {k: v for k, v in cfg.data.sources}
    for p, praw in zip(cfg.data.phases, out["data"]["phases"]):
        praw["mixture"] = {k: w for k, w in p.mixture}
    return out


def config_diff(a: Any, b: Any, where: str = "", ignore: tuple = ()) -> str | None:
    """The first dotted field where two plain config dicts differ, as "field: A in the run, B
    asked for" (None if equal); fields in ``ignore``, or inside a group named there, are skipped."""
    if where and any(where == i or where.startswith(i + ".") for i in ignore):
        return None
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = config_diff(a.get(k), b.get(k), f"{where}.{k}" if where else k, ignore)
            if d:
                return d
        return None
    return None if a == b else f"{where}: {a!r} in the run, {b!r} asked for"


# What a run may resume with changed: the device layout, checkpointing, logging and evaluation,
# and choices that change neither the parameters nor the schedule, data or maths of the run
# (implementations tested equal, remat, microbatches, compute dtype, the loss chunking).
RESUME_MAY_CHANGE = ("mesh", "checkpoint", "sft", "data.cache_dir", "train.log_every",
                     "train.eval_every", "train.eval_batches", "train.peak_flops",
                     "train.max_nonfinite_steps", "train.microbatches", "train.loss_chunk_size",
                     "model.moe_impl", "model.attention_impl", "model.remat_policy",
                     "model.scan_unroll", "model.dtype", "optim.ns_dtype")


def check_workdir_config(cfg: "ExperimentConfig", workdir: str,
                         may_change: tuple = RESUME_MAY_CHANGE) -> None:
    """ConfigError when ``workdir/config.json`` holds a run of another config: resuming it
    would restore checkpoints of other shapes, or replay its data phases and LR schedule on a
    new plan (a changed ``train.steps`` rescales the phases). Fields in ``may_change`` may
    differ. Nothing is read but that file."""
    import json
    import os

    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        old = json.load(f)
    diff = config_diff(old, json.loads(json.dumps(to_config_dict(cfg))), ignore=may_change)
    if diff:
        raise ConfigError(f"{workdir} holds a run of another config ({diff}); use another "
                          f"--workdir or delete {workdir}")


def model_config(**overrides) -> ModelConfig:
    """Convenience: a validated ModelConfig from keyword overrides (tests, notebooks)."""
    cfg = _build(ModelConfig, overrides, "model")
    cfg.validate()
    return cfg


# ----------------------------------------------------------------------------- experiment files

def default_config_dict():
    """A ConfigDict holding every field with its default: the base every experiment file edits."""
    import ml_collections

    return ml_collections.ConfigDict(to_config_dict(ExperimentConfig()))


def _parse_override(text: str) -> Any:
    import ast

    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        if text.lower() in ("none", "null"):
            return None
        return text


def apply_overrides(cd, overrides: dict[str, str]):
    """Apply `--config.a.b=value` overrides to a ConfigDict (values parsed as Python literals)."""
    def child(node, part: str, dotted: str, upto: str):
        """node[part]: a field of a group, or an index of a list (data.phases.0)."""
        if isinstance(node, (list, tuple)):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--config.{dotted}: {upto} is not an index of the list of "
                                  f"{len(node)} (allowed: 0..{len(node) - 1})")
            return int(part)
        if not hasattr(node, "keys") or part not in node:
            allowed = sorted(node.keys()) if hasattr(node, "keys") else []
            raise ConfigError(f"--config.{dotted}: unknown field {upto}; allowed fields there: {allowed}")
        return part

    for dotted, text in overrides.items():
        parts = dotted.split(".")
        node = cd
        for i, part in enumerate(parts[:-1]):
            node = node[child(node, part, dotted, ".".join(parts[:i + 1]))]
        leaf = child(node, parts[-1], dotted, dotted)
        value = _parse_override(text)
        old = node[leaf]
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(old, str) and not isinstance(value, str):
            value = text
        if isinstance(old, (list, tuple)) and isinstance(value, (list, tuple)):
            value = type(old)(value)
        try:
            node[leaf] = value
        except (TypeError, ValueError) as e:
            raise ConfigError(f"--config.{dotted}={text!r}: {e}") from None
    return cd


def load_config_file(path: str, overrides: dict[str, str] | None = None):
    """Run `get_config()` of an experiment file (`file.py` or `file.py:arg`) and apply overrides.

    Returns the ConfigDict; `from_config_dict` validates it.
    """
    import importlib.util
    import os
    import sys

    arg = None
    if ":" in os.path.basename(path):
        path, arg = path.rsplit(":", 1)
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file")
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if os.path.basename(os.path.dirname(os.path.abspath(path))) == "ablations":
        root = os.path.dirname(root)
    if root not in sys.path:
        sys.path.insert(0, root)
    spec = importlib.util.spec_from_file_location(f"_trinity_cfg_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config {path}: the file defines no get_config()")
    cd = module.get_config(arg) if arg is not None else module.get_config()
    return apply_overrides(cd, overrides or {})
