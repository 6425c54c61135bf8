"""The trainer's parts: builds (builders), the start-up checks against the models' configs
(model_checks) and the output paths (output_paths), rollout batches (batch), micro-batches by
count or token budget, packing and response slots (microbatches), the student's MOPD objective
(sampled or KL signal) under Megatron's schedules and the reduction of its metrics
(objective), the eval plan the dry-runs print (eval_plan) and greedy eval (evaluate), weight sync (sync), the final HF export (hf_export),
preemption signals (preemption), CLI (cli), the phase watchdog (watchdog) and per-phase peak
memory (memory). Checkpoint contents live in checkpoint/, the Megatron plumbing (optimizer,
schedules, one step) in mcore/, every rollout engine in rollout/. The loop itself is
``mopd_megatron.train``."""
