"""Run metrics: metrics.jsonl + TensorBoard writer, FLOPs/MFU, and the end-of-run PNG plots."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from trinity_jax.model.mlp import dot_nn

__all__ = ["MetricsWriter", "read_metrics", "truncate_metrics", "to_python", "flops_per_token",
           "measure_matmul_peak", "host_cpu", "describe_host", "peak_flops_total", "plot_losses",
           "plot_expert_load"]


def to_python(metrics: dict) -> dict:
    """Device arrays -> floats / ints / nested lists (JSON-able)."""
    out = {}
    for k, v in metrics.items():
        a = np.asarray(jax.device_get(v))
        if a.ndim == 0:
            out[k] = int(a) if np.issubdtype(a.dtype, np.integer) else float(a)
        else:
            out[k] = a.tolist()
    return out


def _summary_writer_class():
    """tensorboardX's ``SummaryWriter``, imported without torch.

    tensorboardX's writer imports torch whenever it is installed (as it is next to the parity
    tests), only so that it can accept torch tensors; that import cost every run's start-up
    1.7 s alone and ~4.5 s of a tiny CLI run (17.8 -> 13 s). We log Python floats, so torch
    is hidden from that one import when it is not already loaded, and importable again right
    after.
    """
    if "tensorboardX.writer" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None          # `import torch` raises ImportError while this is set
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def read_metrics(workdir: str) -> list[dict]:
    """``workdir/metrics.jsonl``'s records (a line cut by a kill is skipped)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def truncate_metrics(workdir: str, step: int) -> list[dict]:
    """Drop metrics.jsonl records after `step` (in place: an open append handle stays valid)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    kept = [r for r in read_metrics(workdir) if int(r.get("step", 0)) <= step]
    with open(path, "r+") as f:
        f.write("".join(json.dumps(r, allow_nan=True) + "\n" for r in kept))
        f.truncate()
    return kept


class MetricsWriter:
    """One JSON object per line to ``workdir/metrics.jsonl`` and scalars to ``workdir/tb/``.

    Only process 0 writes (pass ``enabled=False`` elsewhere). Lists are written to JSON;
    TensorBoard gets scalars, and a list ``x`` becomes ``x/0, x/1, ...``.
    """

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.workdir = workdir
        self.records: list[dict] = []
        self._f = None
        self._tb = None
        if not enabled:
            return
        self._f = open(os.path.join(workdir, "metrics.jsonl"), "a")
        self._open_tb()

    def _open_tb(self, purge_step: Optional[int] = None) -> None:
        # tensorboardX names a file by the second and the host only: the resumed writer, opened
        # within the second of the first, gets a suffix (and sorts after it) instead of
        # overwriting it
        suffix = "" if purge_step is None else ".resumed"
        try:
            self._tb = _summary_writer_class()(os.path.join(self.workdir, "tb"), purge_step=purge_step,
                                               filename_suffix=suffix)
        except ImportError:  # flax's writer needs tensorflow; without tensorboardX skip TB
            self._tb = None

    def resume_at(self, step: int) -> None:
        """The run goes on from `step` (a restored checkpoint, or 0 for a fresh start in a used
        workdir): metrics.jsonl keeps only the records up to it (they become ``records``), and
        TensorBoard is told to drop the points after it that an earlier run wrote (a new event
        file opened with tensorboardX's ``purge_step``), so re-run steps do not appear twice."""
        if not self.enabled:
            return
        self.records = truncate_metrics(self.workdir, step)
        if self._tb is not None:
            self._tb.close()
            self._open_tb(purge_step=step + 1)

    def write(self, record: dict) -> None:
        self.records.append(record)
        if not self.enabled:
            return
        self._f.write(json.dumps(record, allow_nan=True) + "\n")
        self._f.flush()
        if self._tb is not None:
            step = int(record["step"])
            for k, v in record.items():
                if k == "step" or v is None or isinstance(v, str):
                    continue
                values = enumerate(v) if isinstance(v, list) else [(None, v)]
                for i, x in values:
                    if isinstance(x, (int, float)) and math.isfinite(x):
                        self._tb.add_scalar(k if i is None else f"{k}/{i}", x, step)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


# ----------------------------------------------------------------------------- FLOPs / MFU

def flops_per_token(model_cfg, seq_len: int, params: Any = None) -> float:
    """Train FLOPs per token: ``model.counting.train_flops_per_token`` if present, else
    6 × active parameters (experts counted at k/E, embedding lookup excluded)."""
    try:
        from trinity_jax.model.counting import train_flops_per_token
    except ImportError:
        train_flops_per_token = None
    if train_flops_per_token is not None:
        return float(train_flops_per_token(model_cfg, seq_len))
    active = 0.0
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        p = "/".join(str(getattr(k, "key", k)) for k in path)
        n = math.prod(x.shape)
        if "embed_tokens" in p:
            continue
        if "/experts/" in p:
            n *= model_cfg.num_experts_per_tok / model_cfg.num_experts
        active += n
    return 6.0 * active


def measure_matmul_peak(n: int = 2048, repeats: int = 3, dtype=jnp.float32) -> float:
    """Achieved FLOP/s of an n³ matmul in `dtype` on the default device (best of ``repeats``).

    The product accumulates into an fp32 result, as the model's do: XLA:CPU runs a bf16 product
    with a bf16 result ~5x slower (upcast to an f32 dot), which would understate the peak.
    Random operands: a GPU's matrix units run measurably faster on constant data."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(dot_nn)
    f(a, a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def host_cpu(cpuinfo: str = "/proc/cpuinfo") -> dict:
    """The host CPU a CPU measurement ran on: {"model", "cores", "bf16_matmul"}.

    Sessions here land on different hosts, and the bf16 matmul peak follows the instruction
    set (`amx_bf16` tiles on Intel, `avx512_bf16` dot products on AMD Zen 4: the 2048³ bf16
    peak on 2 cores was 525-1,380 GFLOP/s in sessions whose host went unrecorded, 350-390 on
    a Zen 4 host), so a speed figure is only comparable with others from the same kind of
    host. Where the file cannot be read, model and ISA are "unknown"."""
    model, flags = "unknown", None
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model == "unknown":
                    model = value.strip()
                elif key == "flags" and flags is None:
                    flags = set(value.split())
    except OSError:
        pass
    isa = "unknown" if flags is None else next((f for f in ("amx_bf16", "avx512_bf16") if f in flags), "none")
    return {"model": model, "cores": os.cpu_count(), "bf16_matmul": isa}


def describe_host() -> str:
    """One line naming the JAX backend and, on CPU, the host CPU (see host_cpu)."""
    backend = jax.default_backend()
    line = f"{backend} ({jax.devices()[0].device_kind})"
    if backend == "cpu":
        cpu = host_cpu()
        line += f"; host {cpu['model']}, {cpu['cores']} cores, bf16 matmul ISA {cpu['bf16_matmul']}"
    return line


def peak_flops_total(train_cfg, dtype=jnp.float32) -> tuple[float, str]:
    """Peak FLOP/s of all devices together and how it was obtained.

    ``train.peak_flops`` is per device (on CPU per process: its emulated devices share the
    host's cores, so multiplying by them would make MFU 8x too low); 0 measures a matmul in
    `dtype` (the model's compute dtype: bf16 products run 2-4x faster than f32 ones on these
    CPUs) at start-up, and on CPU that host figure is the total.
    """
    if train_cfg.peak_flops > 0:
        if jax.default_backend() == "cpu":
            return train_cfg.peak_flops * jax.process_count(), "train.peak_flops × processes (CPU)"
        return train_cfg.peak_flops * jax.device_count(), "train.peak_flops × devices"
    peak = measure_matmul_peak(dtype=dtype)
    what = f"measured {jnp.dtype(dtype).name} 2048³ matmul"
    if jax.default_backend() == "cpu":
        return peak, f"{what} (CPU: all devices share the cores)"
    return peak * jax.device_count(), f"{what} × devices"


# ----------------------------------------------------------------------------- plots

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_losses(records: list[dict], path: str) -> Optional[str]:
    """loss / ce (and val_loss where present) against step."""
    rows = [r for r in records if "loss" in r]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    for key in ("loss", "ce"):
        ax.plot(steps, [r[key] for r in rows], label=key)
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", label="val_loss")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_expert_load(counts: np.ndarray, path: str, title: str = "") -> Optional[str]:
    """Heatmap of load n_i / n̄ per MoE layer (rows) and expert (columns)."""
    counts = np.asarray(counts, np.float64)
    if counts.ndim != 2 or counts.shape[0] == 0:
        return None
    rel = counts / np.maximum(counts.mean(-1, keepdims=True), 1e-9)
    plt = _pyplot()
    size = (max(4, counts.shape[1] * 0.25 + 2), max(2.5, counts.shape[0] * 0.4 + 1.5))
    fig, ax = plt.subplots(figsize=size)
    im = ax.imshow(rel, aspect="auto", cmap="viridis", vmin=0)
    fig.colorbar(im, ax=ax, label="load / mean load")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(title or "expert load")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
