"""Megatron-core plumbing the trainer drives: DDP wrapping, the (distributed) optimizer and its
LR schedule (optimizer), forward/backward through Megatron's pipeline schedules (schedule), one
optimizer step (step), the supervised cross-entropy loss (cross_entropy) and the fixes for
megatron-core's torch-AdamW fallback (adamw_fallback). Nothing here knows about MOPD: the
trainer (``mopd_megatron.trainer``, ``mopd_megatron.train``) passes its loss function in."""
