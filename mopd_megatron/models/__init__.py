"""The student's and teachers' Megatron models: HF ``config.json`` <-> ``TransformerConfig``
fields and the layouts a model can be split into (hf_config), GPTModel chunks for this rank
(builder), FP8 availability (fp8)."""
