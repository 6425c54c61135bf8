"""Rollout: sampling y ~ mu with log mu from inference engines, and keeping their weights in
step with the trainer. SGLang is imported only when a server-side helper is used (weight
serialisation, process groups), never at package import."""
from .engine import NamedTensorBucket, RolloutEngine, Sample, SamplingParams
from .parity import ParityError, ParityResult, check_parity, parity_probe, probe_tokens
from .server import RouterSpec, ServerSpec, SGLangRouter, SGLangServer, detect_device
from .sglang_engine import RolloutError, SGLangEngine
from .teacher_server import ServedTeacher

__all__ = ["NamedTensorBucket", "RolloutEngine", "Sample", "SamplingParams", "ParityError",
           "ParityResult", "check_parity", "parity_probe", "probe_tokens", "RouterSpec",
           "ServerSpec", "SGLangRouter", "SGLangServer", "detect_device", "RolloutError",
           "SGLangEngine", "ServedTeacher"]
