"""The trainer's parts: builds (builders), the start-up checks against the models' configs
(model_checks) and the output paths (output_paths), rollout batches and packing (batch), the
student's loss under Megatron's schedules (loss), greedy eval (evaluate), weight sync (sync),
checkpoint contents (state), CLI (cli), the phase watchdog (watchdog) and per-phase peak memory
(memory). In-trainer sampling and record/replay engines live in rollout/. The loop itself is
``mopd_megatron.train``."""
