"""Training (SPEC §4): losses (chunked CE + z-loss), balance (SMEBU / sign), optimizer
(Muon + AdamW), schedules (LR, batch ramp), step (the pure train step), loop (the trainer,
``train(cfg, workdir)``), metrics (jsonl / TensorBoard / plots / MFU), synthetic (test data)."""
