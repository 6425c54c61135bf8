"""The trainer's parts: builds (builders), rollout batches and packing (batch), the student's
loss under Megatron's schedules (loss), in-trainer sampling and eval (generate, evaluate),
record/replay rollouts (replay), weight sync (sync), checkpoint contents (state), CLI (cli).
The loop itself is ``mopd_megatron.train``."""
