"""runtime/: launcher environments, the CPU compatibility layer (each patch is needed, and
the layer is inert with CUDA), and the HF-config model description."""
import json
import subprocess
import sys

import pytest
import torch
from dist_helpers import run_ranks

from mopd_megatron.runtime import cpu_compat
from mopd_megatron.runtime.distributed import launch_env


def test_launch_env_torchrun():
    le = launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1",
                     "MASTER_PORT": "1234"})
    assert (le.rank, le.world_size, le.local_rank, le.master_addr, le.master_port, le.source) == \
        (3, 8, 1, "n1", 1234, "torchrun")


def test_launch_env_slurm_derives_master_from_nodelist(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the node-list parser is used
    le = launch_env({"SLURM_PROCID": "37", "SLURM_NTASKS": "64", "SLURM_LOCALID": "5",
                     "SLURM_JOB_NODELIST": "gpu[007-014,020]", "SLURM_JOB_ID": "123456"})
    assert (le.rank, le.world_size, le.local_rank, le.source) == (37, 64, 5, "slurm")
    assert le.master_addr == "gpu007"
    assert le.master_port == 20000 + 123456 % 20000


def test_launch_env_single_process():
    assert launch_env({}).world_size == 1


def _compat_scenario(rank, world_size):
    """Touches every patched megatron-core path: model build (rotary device), RNG tracker,
    tied embeddings at PP=2 (Tensor.cuda), DDP + distributed optimizer (type strings)."""
    from megatron.core import tensor_parallel
    from megatron_helpers import build, microbatches, tiny_config

    from mopd_megatron.mcore.cross_entropy import masked_token_ce
    from mopd_megatron.config import OptimizerConfig
    from mopd_megatron.mcore.optimizer import build_optimizer, wrap_ddp
    from mopd_megatron.mcore.step import train_step
    _, hf, chunks = build(tiny_config("LlamaForCausalLM"), pp=2)
    torch.manual_seed(0)
    before = torch.get_rng_state().clone()
    with tensor_parallel.get_cuda_rng_tracker().fork():
        torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before), "RNG tracker fork leaked"
    settings = OptimizerConfig(lr=1e-3)
    ddp = wrap_ddp(chunks, settings)
    optimizer, scheduler = build_optimizer(ddp, settings, 1, torch.float32)
    assert train_step(ddp, optimizer, scheduler, microbatches(), masked_token_ce,
                      vocab_size=hf.vocab_size, tp_rank=0).ok


@pytest.mark.slow
@pytest.mark.parametrize("patch", sorted(cpu_compat.PATCHES))
def test_each_cpu_compat_patch_is_needed(patch, monkeypatch):
    monkeypatch.setenv("MOPD_CPU_COMPAT_SKIP", patch)  # inherited by the spawned ranks
    with pytest.raises(RuntimeError, match="a rank failed"):
        run_ranks(_compat_scenario, 2, timeout=180)


def test_cpu_compat_scenario_passes_with_all_patches():
    run_ranks(_compat_scenario, 2, timeout=180)


def test_cpu_compat_is_inert_when_cuda_is_available():
    code = ("import torch; torch.cuda.is_available = lambda: True\n"
            "from mopd_megatron.runtime import cpu_compat\n"
            "real_cuda = torch.Tensor.cuda\n"
            "assert cpu_compat.apply() == []\n"
            "import megatron.core.parallel_state as ps\n"
            "assert ps.torch is torch and torch.Tensor.cuda is real_cuda\n"
            "print('inert')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "inert" in out.stdout, out.stderr[-2000:]


def test_hf_config_families(tmp_path):
    from megatron_helpers import tiny_config

    from mopd_megatron.models.hf_config import hf_config_dict, load_hf_config
    llama = load_hf_config(tiny_config("LlamaForCausalLM"))
    assert llama.rope_scaling_factor == 8.0 and llama.tie_word_embeddings
    assert not llama.qkv_bias and not llama.qk_layernorm and llama.num_query_groups == 2
    qwen2 = load_hf_config(tiny_config("Qwen2ForCausalLM"))
    assert qwen2.qkv_bias and not qwen2.qk_layernorm and qwen2.rope_theta == 1e6
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_config("Qwen3ForCausalLM")))
    qwen3 = load_hf_config(tmp_path)
    assert qwen3.qk_layernorm and not qwen3.qkv_bias and qwen3.kv_channels == 16
    kw = qwen3.transformer_config_kwargs()
    assert (kw["num_layers"], kw["num_query_groups"], kw["kv_channels"]) == (2, 2, 16)
    back = hf_config_dict(qwen3)  # the same field table, the other way
    for key in ("num_hidden_layers", "num_key_value_heads", "head_dim", "intermediate_size"):
        assert back[key] == tiny_config("Qwen3ForCausalLM")[key]


def test_hf_config_errors_name_the_problem(tmp_path):
    from megatron_helpers import tiny_config

    from mopd_megatron.models.hf_config import UnsupportedModelError, load_hf_config
    with pytest.raises(UnsupportedModelError, match="supported: LlamaForCausalLM, "
                                                    "Qwen2ForCausalLM, Qwen3ForCausalLM"):
        load_hf_config({"architectures": ["GPT2LMHeadModel"]})
    bad = tiny_config("LlamaForCausalLM")
    bad["rope_scaling"] = dict(bad["rope_scaling"], high_freq_factor=2.0)
    with pytest.raises(UnsupportedModelError, match="high_freq_factor=2.0"):
        load_hf_config(bad)
    (tmp_path / "config.json").write_text('{"architectures": [\n  "LlamaForCausalLM",,]}')
    with pytest.raises(ValueError, match=r"config.json: line 2"):
        load_hf_config(tmp_path)


def test_padded_vocab_and_masking():
    from mopd_megatron.models.builder import mask_padded_vocab_, padded_vocab_size
    assert padded_vocab_size(250, 128, 1) == 256 and padded_vocab_size(250, 128, 2) == 256
    assert padded_vocab_size(151936, 128, 8) == 151936  # TP-independent: lcm(128, tp)
    assert padded_vocab_size(250, 128, 3) == 384
    shards = [torch.zeros(3, 128) for _ in range(2)]  # V=250 padded to 256 over TP=2
    for r, s in enumerate(shards):
        mask_padded_vocab_(s, 250, r)
    full = torch.cat(shards, -1)
    assert torch.isinf(full[:, 250:]).all() and (full[:, :250] == 0).all()


def test_fp8_refused_without_transformer_engine_or_hopper():
    from mopd_megatron.config import ConfigError, FP8Config
    from mopd_megatron.models.fp8 import FP8UnavailableError, check_fp8
    if torch.cuda.is_available():
        pytest.skip("this check is about machines without a GPU")
    with pytest.raises(FP8UnavailableError, match="model.fp8.enabled=true but no CUDA GPU"):
        check_fp8(FP8Config(enabled=True))
    check_fp8(FP8Config(enabled=False))  # disabled FP8 is always fine
    # Megatron refuses delayed scaling with BF16 first/last layers at model build: the section
    # refuses it first, naming the field.
    with pytest.raises(ConfigError, match="model.fp8.first_last_layers_bf16"):
        FP8Config(enabled=True, recipe="delayed")
    FP8Config(enabled=True, recipe="delayed", first_last_layers_bf16=False)


def _group_timeouts(rank, world_size):
    import torch.distributed as dist

    from mopd_megatron.runtime import init_runtime
    lay = init_runtime(tp=2, pp=1, timeout_minutes=7)

    def minutes(group):  # what the gloo backend of the group will wait, as torch holds it
        return group._get_backend(torch.device("cpu")).options._timeout.total_seconds() / 60
    return {"default": minutes(dist.group.WORLD), "tp": minutes(lay.tp_group),
            "pp": minutes(lay.pp_group), "dp": minutes(lay.dp_group),
            "node": minutes(lay.node_group)}


def test_timeout_minutes_reaches_every_process_group():
    """runtime.timeout_minutes (the Trainer passes it to init_runtime, tests/test_recipe_fields)
    is the timeout of the default group, Megatron's groups and the node groups (new_group does
    not inherit the default group's: it would be torch's 30 minutes)."""
    for got in run_ranks(_group_timeouts, 2, timeout=180):
        assert got == {"default": 7.0, "tp": 7.0, "pp": 7.0, "dp": 7.0, "node": 7.0}
