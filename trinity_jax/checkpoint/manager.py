"""Orbax checkpoints of the whole train state + the grain iterator, and exact resume.

`CheckpointCallback` plugs into the train loop (`trinity_jax.train.loop.Callback`):
- every `checkpoint.every` steps, at phase ends and at the end it saves asynchronously
  `state` (params, optimizer state, expert_bias, SMEBU momentum, step, RNG — the TrainState)
  and `data` (the grain iterator state, which also carries the phase position);
- on start it restores the newest *complete and readable* checkpoint onto the run's mesh
  (an abstract target with the new shardings, so a checkpoint saved on 8 devices restores on
  2×4 or on 1), skipping partial or corrupted ones with a message naming them;
- SIGTERM finishes the current step, saves synchronously and exits with status 0.
Orbax writes each step into a temporary directory and renames it when complete, so a SIGKILL
during an async save leaves no step that looks complete.
"""
from __future__ import annotations

import os
import shutil
import signal
from typing import Callable, Iterable

import jax

_ITEMS = ("state", "data")


class Preempted(SystemExit):
    """Raised after the SIGTERM save; exits with status 0."""

    def __init__(self, step: int):
        super().__init__(0)
        self.step = step


def _grain_args():
    import grain

    return grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore


def make_manager(directory: str, keep: int, async_save: bool):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=_ITEMS)


class CheckpointCallback:
    """Save/restore the train state and data iterator of a `Run` (see module docstring)."""

    def __init__(self, directory: str, *, every: int, keep: int = 2, async_save: bool = True,
                 extra_steps: Iterable[int] = (), handle_sigterm: bool = True,
                 log: Callable = print):
        self.directory = directory
        self.every, self.keep, self.async_save = every, keep, async_save
        self.extra_steps = set(int(s) for s in extra_steps)
        self.handle_sigterm = handle_sigterm
        self.log = log
        self.manager = None
        self.restored_step: int | None = None
        self._stop = False
        self._old_handler = None

    # -- restore -------------------------------------------------------------------------
    def on_start(self, run) -> None:
        import orbax.checkpoint as ocp

        _, restore_data = _grain_args()
        self.manager = make_manager(self.directory, self.keep, self.async_save)
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(run.abstract_state),
                    data=restore_data(run.data.train)))
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped
                path = os.path.join(self.directory, str(step))
                self.log(f"checkpoint {path} is incomplete or corrupted ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}); skipping it and trying the previous one")
                self._quarantine(step)
                continue
            run.state = restored.state
            self.restored_step = step
            if hasattr(run, "writer"):
                run.writer.resume_at(step)      # metrics.jsonl and tb/ keep the steps <= step
            self.log(f"resumed from checkpoint step {step} ({self.directory})")
            break
        if self.handle_sigterm:
            self._old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _quarantine(self, step: int) -> None:
        """Move a bad step aside (kept for inspection) so it is never picked again."""
        src = os.path.join(self.directory, str(step))
        if os.path.isdir(src) and jax.process_index() == 0:
            dst = os.path.join(self.directory, f"corrupt-{step}")
            shutil.rmtree(dst, ignore_errors=True)
            os.replace(src, dst)
        self.manager.reload()

    def _on_sigterm(self, signum, frame) -> None:
        self._stop = True

    # -- save ----------------------------------------------------------------------------
    def save(self, run, step: int, *, force: bool = False) -> None:
        import orbax.checkpoint as ocp

        save_data, _ = _grain_args()
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(run.state),
                                                        data=save_data(run.data.train)), force=force)

    def on_step_end(self, run, step: int, metrics) -> None:
        if self._stop:
            self.save(run, step, force=True)
            self.manager.wait_until_finished()
            self.log(f"SIGTERM: saved step {step} to {self.directory}; exiting")
            raise Preempted(step)
        if step % self.every == 0 or step in self.extra_steps:
            self.save(run, step)

    def on_end(self, run) -> None:
        step = int(jax.device_get(run.state.step))
        self.save(run, step)
        self.close()

    def close(self) -> None:
        if self.manager is not None:
            self.manager.wait_until_finished()
            self.manager.close()
            self.manager = None
        if self._old_handler is not None:
            signal.signal(signal.SIGTERM, self._old_handler)
            self._old_handler = None

    def latest_step(self) -> int | None:
        mgr = self.manager or make_manager(self.directory, self.keep, False)
        try:
            return mgr.latest_step()
        finally:
            if self.manager is None:
                mgr.close()
