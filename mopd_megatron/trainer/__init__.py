"""The trainer's parts: builds (builders), rollout batches and packing (batch), the student's
loss under Megatron's schedules (loss), greedy eval (evaluate), weight sync (sync), checkpoint
contents (state), CLI (cli). In-trainer sampling and record/replay engines live in rollout/.
The loop itself is ``mopd_megatron.train``."""
