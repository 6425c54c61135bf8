"""The SGLang rollout engine against a real SGLang 0.5.23 server.

On CPU (CI) this needs the CPU test harness: `tests/harness/sglang_cpu/setup.sh` (the README
test command runs it). On a GPU machine with SGLang installed the same tests exercise the GPU
paths: server on CUDA with --enable-memory-saver (colocated), CUDA-IPC tensor sync (buckets on
the GPU), NCCL broadcast sync. MOPD_ROLLOUT_TEST_DEVICE=cpu|cuda overrides the detection.
One server is shared by the module (start-up is 20-60 s on two cores); tests that change its
weights restore them. References are float64 forwards of the same checkpoint through
transformers, an implementation independent of SGLang's.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from tests.dist_helpers import free_port

try:
    import sglang  # noqa: F401
except ImportError:
    if os.environ.get("MOPD_ALLOW_NO_SGLANG") == "1":
        pytest.skip("SGLang CPU harness not installed (MOPD_ALLOW_NO_SGLANG=1)",
                    allow_module_level=True)
    raise ImportError("SGLang is not installed: run tests/harness/sglang_cpu/setup.sh "
                      "(or set MOPD_ALLOW_NO_SGLANG=1 to skip these tests)")

from mopd_megatron.rollout import (ParityError, SamplingParams, ServedTeacher, ServerSpec,
                                   SGLangEngine, check_parity, detect_device, parity_probe,
                                   probe_tokens)
from mopd_megatron.rollout.server import RouterSpec, SGLangRouter, SGLangServer
from tools.make_tiny_hf import make_tiny_hf

pytestmark = pytest.mark.slow
DEVICE = os.environ.get("MOPD_ROLLOUT_TEST_DEVICE") or detect_device()

# fp32 server vs float64 reference: observed ~1e-6 per token; 1e-4 leaves room for kernel
# order differences while still being ~3 orders below what one wrong weight tensor causes.
LOGPROB_ATOL = 1e-4
PARITY_TOL = 1e-4


def kill_hard(process) -> None:
    """SIGKILL a server's whole process group at once, as a crashed node would lose it."""
    os.killpg(process.pid, signal.SIGKILL)  # pgid == pid: its own session


# -- references ------------------------------------------------------------------------------
def hf_model(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()


@torch.no_grad()
def ref_logprobs(model, seq: list[int], temperature: float = 1.0) -> torch.Tensor:
    """[L-1] float64 log softmax(logits / T)(x_t | x_<t), t = 1..L-1."""
    ids = torch.tensor([seq])
    logp = torch.log_softmax(model(ids).logits[0].double() / temperature, dim=-1)   # [L, V]
    return logp[:-1].gather(-1, ids[0, 1:, None]).squeeze(-1)


def state_buckets(path, bucket_bytes=48 * 1024):
    """The checkpoint as HF-named buckets of ~bucket_bytes (what the converter's export yields)."""
    from safetensors.torch import load_file
    buckets, cur, size = [], [], 0
    for name, t in load_file(os.path.join(path, "model.safetensors")).items():
        cur.append((name, t.to(DEVICE)))   # on GPU: CUDA tensors -> CUDA IPC handles
        size += t.numel() * t.element_size()
        if size >= bucket_bytes:
            buckets.append(cur)
            cur, size = [], 0
    return buckets + ([cur] if cur else [])


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    a = make_tiny_hf(str(root / "a"), arch="qwen2", seed=0)
    b = make_tiny_hf(str(root / "b"), arch="qwen2", seed=1)
    return {"a": a, "b": b, "hf_a": hf_model(a), "hf_b": hf_model(b), "logs": str(root)}


def spec(path, logs, name):
    return ServerSpec(model_path=path, port=free_port(), host="127.0.0.1", device=DEVICE,
                      colocated=DEVICE == "cuda", dtype="float32", mem_fraction_static=0.05,
                      max_total_tokens=8192,
                      extra_args=("--log-level", "warning", "--disable-cuda-graph"),
                      log_path=os.path.join(logs, f"{name}.log"))


@pytest.fixture(scope="module")
def fleet(models):
    """The module's server plus a second one for the router test, started together: start-up
    is CPU-bound imports, and overlapping the two saves about a minute on two cores."""
    main = SGLangServer(spec(models["a"], models["logs"], "server_a"), startup_timeout_s=240)
    second = SGLangServer(spec(models["a"], models["logs"], "server_a2"), startup_timeout_s=300)
    try:
        main.start(wait=False)
        second.start(wait=False)
        main.wait_ready()
        yield {"main": main, "second": second}
    finally:
        second.stop()
        main.stop()


@pytest.fixture(scope="module")
def engine(fleet):
    eng = SGLangEngine([fleet["main"].url], [fleet["main"]], concurrency=8,
                       request_timeout_s=120, health_timeout_s=20)
    try:
        yield eng
    finally:
        eng.shutdown()


@pytest.fixture(scope="module")
def batched(fleet):
    """The same server, with up to 4 samples per /generate request (rollout.samples_per_request)."""
    eng = SGLangEngine([fleet["main"].url], [fleet["main"]], concurrency=8,
                       request_timeout_s=120, health_timeout_s=20, samples_per_request=4)
    try:
        yield eng
    finally:
        eng.shutdown()


def assert_matches_reference(samples, hf, atol=LOGPROB_ATOL, temperature=1.0):
    for s in samples:
        ref = ref_logprobs(hf, s.prompt_token_ids + s.token_ids,
                           temperature)[len(s.prompt_token_ids) - 1:]
        got = torch.tensor(s.logprobs, dtype=torch.float64)
        assert got.shape == ref.shape
        assert torch.allclose(got, ref, atol=atol, rtol=0), (got - ref).abs().max().item()


PROMPTS = [[5, 6, 7, 8], [40, 41, 42, 43, 44, 45, 46], [100, 3]]


# -- tests -----------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["engine", "batched"])
def test_generate_logprobs_match_hf_forward(which, models, request):
    # batched: 6 samples in requests of 4 and 2, each sample with its own rid
    engine = request.getfixturevalue(which)
    samples = engine.generate(PROMPTS, n=2, sampling=SamplingParams(
        temperature=1.0, max_new_tokens=12, ignore_eos=True))
    assert [(s.prompt_index, s.sample_index) for s in samples] == \
        [(p, i) for p in range(3) for i in range(2)]
    for s in samples:
        assert len(s.token_ids) == 12 and s.finish_reason == "length"
        assert s.weight_version == "default" and s.prompt_token_ids == PROMPTS[s.prompt_index]
    assert_matches_reference(samples, models["hf_a"])
    # Sampling at T=1 from a peaked tiny model: the 2 samples of a prompt should differ somewhere.
    assert any(samples[2 * p].token_ids != samples[2 * p + 1].token_ids for p in range(3))


def test_logprobs_are_of_the_tempered_distribution(engine, models):
    # The contract the loss relies on: SGLang reports log softmax(logits / T), so the trainer
    # must take log pi_theta at the same T. top_p truncation is NOT renormalised into them.
    for temperature in (0.7, 1.3):
        samples = engine.generate(PROMPTS[:2], 2, SamplingParams(
            temperature=temperature, max_new_tokens=8, ignore_eos=True))
        assert_matches_reference(samples, models["hf_a"], temperature=temperature)
        with pytest.raises(AssertionError):   # and clearly not the T=1 distribution
            assert_matches_reference(samples, models["hf_a"], temperature=1.0)
    samples = engine.generate(PROMPTS[:2], 2, SamplingParams(
        temperature=1.0, top_p=0.5, max_new_tokens=8, ignore_eos=True))
    assert_matches_reference(samples, models["hf_a"])


def test_greedy_matches_hf_argmax(engine, models):
    [s] = engine.generate([PROMPTS[0]], n=1, sampling=SamplingParams(
        temperature=0.0, max_new_tokens=10, ignore_eos=True))
    seq = list(PROMPTS[0])
    with torch.no_grad():
        for _ in range(10):
            seq.append(int(models["hf_a"](torch.tensor([seq])).logits[0, -1].argmax()))
    assert s.token_ids == seq[len(PROMPTS[0]):]


def test_tensor_then_distributed_sync_reach_trainer_weights(engine, models):
    probe = [probe_tokens(512, 48, seed=7), probe_tokens(512, 20, seed=8)]
    ref_a = [ref_logprobs(models["hf_a"], p).tolist() for p in probe]
    ref_b = [ref_logprobs(models["hf_b"], p).tolist() for p in probe]
    assert engine.weight_update_api() == "begin_end"       # probed from the 0.5.23 server
    assert parity_probe(engine, probe, ref_a).mean_abs_diff < PARITY_TOL

    # colocated path: flattened buckets through /update_weights_from_tensor
    stats = engine.update_weights(iter(state_buckets(models["b"])), version="v1")
    from safetensors.torch import load_file
    n_tensors = len(load_file(os.path.join(models["b"], "model.safetensors")))
    assert stats.buckets >= 3 and stats.tensors == n_tensors
    assert check_parity(engine, probe, ref_b, PARITY_TOL).mean_abs_diff < PARITY_TOL
    assert parity_probe(engine, probe, ref_a).mean_abs_diff > 0.1   # it really changed
    [s] = engine.generate([PROMPTS[1]], 1, SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert s.weight_version == "v1"
    assert_matches_reference([s], models["hf_b"])

    # dedicated path: broadcast from this process into the server's TP rank (gloo on CPU,
    # NCCL on GPU)
    engine.connect_weight_group("127.0.0.1", free_port())
    assert engine._dist_sync.backend == ("nccl" if DEVICE == "cuda" else "gloo")
    try:
        engine.update_weights(iter(state_buckets(models["a"])), version="v2")
    finally:
        engine.disconnect_weight_group()
    assert check_parity(engine, probe, ref_a, PARITY_TOL).mean_abs_diff < PARITY_TOL
    assert parity_probe(engine, probe, ref_b).mean_abs_diff > 0.1
    [s] = engine.generate([PROMPTS[1]], 1, SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert s.weight_version == "v2"


def test_parity_probe_refuses_a_bad_sync(engine, models):
    probe = [probe_tokens(512, 32, seed=9)]
    ref_a = [ref_logprobs(models["hf_a"], p).tolist() for p in probe]
    good = state_buckets(models["a"])
    # A sync bug: one layer's q_proj arrives transposed (square, so shapes still agree).
    bad = [[(n, t.t().contiguous() if n == "model.layers.1.self_attn.q_proj.weight" else t)
            for n, t in b] for b in good]
    engine.update_weights(iter(bad), version="bad")
    try:
        with pytest.raises(ParityError, match="parity_tolerance"):
            check_parity(engine, probe, ref_a, tolerance=1e-3)
    finally:
        engine.update_weights(iter(good), version="v2")
    check_parity(engine, probe, ref_a, PARITY_TOL)


def test_release_resume_keeps_generation(engine, models):
    import signal
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    # SIGUSR1 (Slurm's cue for the trainer to save and stop) reaches the whole step: a server
    # the trainer launched ignores it.
    os.killpg(engine.servers[0].process.pid, signal.SIGUSR1)
    before = engine.generate(PROMPTS, 1, greedy)
    assert engine.servers[0].alive()
    engine.release_memory()
    engine.resume_memory()
    after = engine.generate(PROMPTS, 1, greedy)
    assert [s.token_ids for s in after] == [s.token_ids for s in before]
    assert_matches_reference(after, models["hf_a"])


@pytest.mark.parametrize("which", ["engine", "batched"])
def test_abort_in_flight(which, request):
    engine = request.getfixturevalue(which)
    long = SamplingParams(temperature=1.0, max_new_tokens=900, ignore_eos=True)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("s", engine.generate([PROMPTS[0]], 2, long)))
    t0 = time.monotonic()
    t.start()
    # Requests reach the server within milliseconds; a 900-token generation takes ~1-2 s on
    # a quiet 2-core machine, so abort early (at 1.5 s both had sometimes finished).
    time.sleep(0.4)
    engine.abort()
    t.join(timeout=60)
    assert not t.is_alive(), "generate() did not return after abort()"
    samples = out["s"]
    assert [s.finish_reason for s in samples] == ["abort", "abort"]
    assert all(len(s.token_ids) < 900 for s in samples), [len(s.token_ids) for s in samples]
    assert time.monotonic() - t0 < 60
    # the engine is usable again afterwards
    [s] = engine.generate([PROMPTS[0]], 1, SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert s.finish_reason == "length" and len(s.token_ids) == 4


def test_served_teacher_scores_responses(engine, models):
    teacher = ServedTeacher(engine, domain="math")
    responses = [[9, 10, 11], [200, 201, 202, 203, 204]]
    got = teacher.response_logprobs(PROMPTS[:2], responses)
    for p, r, g in zip(PROMPTS, responses, got):
        ref = ref_logprobs(models["hf_a"], p + r)[len(p) - 1:]
        assert len(g) == len(r)
        assert torch.allclose(torch.tensor(g, dtype=torch.float64), ref, atol=LOGPROB_ATOL, rtol=0)


def test_tensor_sync_reaches_every_server(engine, fleet, models):
    """rollout.num_engines > 1 without a router: one push reaches both servers, and batched
    requests spread over them. (The serialized bucket only names shared storage; freed after
    the first server's load, the second server could not open it.)"""
    second = fleet["second"]
    second.wait_ready()
    probe = [probe_tokens(512, 24, seed=11)]
    ref_b = [ref_logprobs(models["hf_b"], p).tolist() for p in probe]
    both = SGLangEngine([engine.clients[0].url, second.url], concurrency=4,
                        request_timeout_s=120, samples_per_request=2)
    try:
        stats = both.update_weights(iter(state_buckets(models["b"])), version="both")
        assert stats.buckets >= 3
        for url in (engine.clients[0].url, second.url):
            one = SGLangEngine.connect([url], concurrency=2, request_timeout_s=120)
            check_parity(one, probe, ref_b, PARITY_TOL)
            one._pool.shutdown()
        samples = both.generate(PROMPTS, 2, SamplingParams(max_new_tokens=6, ignore_eos=True))
        assert len(samples) == 6 and {s.weight_version for s in samples} == {"both"}
        assert_matches_reference(samples, models["hf_b"])
    finally:
        both.update_weights(iter(state_buckets(models["a"])), version="v2")  # what follows expects a
        both._pool.shutdown()


def test_router_with_two_servers(engine, fleet, models):
    import psutil
    second = fleet["second"]
    router = None
    try:
        second.wait_ready()
        urls = [engine.clients[0].url, second.url]
        port = free_port()
        router = SGLangRouter(RouterSpec(tuple(urls), port, "127.0.0.1", prometheus_port=free_port(),
                                         log_path=os.path.join(models["logs"], "router.log"))).start()
        assert sorted(router.workers()) == sorted(urls)
        # Everything the router listens on is loopback (API and Prometheus).
        listening = [c.laddr for p in [psutil.Process(router.process.pid)]
                     for p2 in [p, *p.children(recursive=True)]
                     for c in p2.net_connections(kind="inet") if c.status == "LISTEN"]
        assert listening and all(a.ip == "127.0.0.1" for a in listening), listening
        routed = SGLangEngine(urls, router=router, concurrency=4, request_timeout_s=120)
        samples = routed.generate(PROMPTS, 3, SamplingParams(max_new_tokens=6, ignore_eos=True))
        assert len(samples) == 9 and all(len(s.token_ids) == 6 for s in samples)
        assert_matches_reference(samples, models["hf_a"])
        # sglang-router 0.3.2 takes one rid per request (HTTP 422 for a list): refused up front
        with pytest.raises(ValueError, match="samples_per_request=4 needs direct server URLs"):
            SGLangEngine(urls, router=router, samples_per_request=4)
        routed._pool.shutdown()
    finally:
        if router is not None:
            router.stop()
        second.stop()   # frees its CPU for the rest of the module


def test_server_killed_mid_rollout_is_restarted_and_resubmitted(batched, models):
    # Runs last: it replaces the module's server process. Batched requests (2 + 1 samples):
    # a lost request is resubmitted whole, with fresh rids for each of its samples.
    engine = batched
    engine.samples_per_request = 2
    engine.update_weights(iter(state_buckets(models["a"])), version="v3")
    engine.weight_source = lambda: iter(state_buckets(models["a"]))
    server = engine.servers[0]
    old_pid = server.process.pid
    # Long enough (~seconds on CPU) that the kill lands mid-rollout; prompt + 900 < 1024 context.
    sampling = SamplingParams(temperature=1.0, max_new_tokens=900, ignore_eos=True)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("s", engine.generate(PROMPTS, 1, sampling)))
    t.start()
    time.sleep(0.5)
    assert t.is_alive(), "rollout finished before the kill; lengthen it"
    kill_hard(server.process)
    t.join(timeout=300)
    assert not t.is_alive(), "rollout did not finish after the server was killed"
    samples = out["s"]
    assert engine.restarts == 1 and server.process.pid != old_pid and server.alive()
    assert len(samples) == 3 and all(len(s.token_ids) == 900 for s in samples)
    assert any(s.retries >= 1 for s in samples)
    # the restarted server got the trainer's weights back before serving
    assert all(s.weight_version == "v3" for s in samples)
    assert_matches_reference(samples, models["hf_a"])


def test_unresponsive_server_is_restarted(fleet, models):
    # SIGSTOP: the process is alive but answers nothing (a wedged scheduler, a hung node).
    # Requests time out, /health_generate times out, the engine restarts it and resubmits.
    import signal
    server = fleet["main"]
    eng = SGLangEngine([server.url], [server], concurrency=4, request_timeout_s=8,
                       health_timeout_s=5)
    stopped_pid = server.process.pid
    os.killpg(stopped_pid, signal.SIGSTOP)
    try:
        samples = eng.generate(PROMPTS[:2], 1, SamplingParams(max_new_tokens=8, ignore_eos=True))
    finally:
        if server.process.pid == stopped_pid:   # not restarted: let it run again
            os.killpg(stopped_pid, signal.SIGCONT)
        eng._pool.shutdown()                    # the server itself belongs to the fleet fixture
    assert eng.restarts == 1 and server.process.pid != stopped_pid and server.alive()
    assert all(len(s.token_ids) == 8 and s.retries >= 1 for s in samples)
    assert_matches_reference(samples, models["hf_a"])   # fresh server: model_path's weights


def _killed_after_first(buckets, server, consumed: list):
    """The buckets, with the server SIGKILLed once bucket 0 is loaded (the rest go to a dead
    server); records which buckets were taken."""
    for i, bucket in enumerate(buckets):
        consumed.append(i)
        yield bucket
        if i == 0:
            kill_hard(server.process)


def test_server_killed_during_a_weight_push_is_restarted_and_reported(engine, models):
    """A server dies between two buckets: the remaining buckets are still consumed (in the
    trainer they come from collectives every rank of the node must finish), the server is
    restarted before update_weights returns, and restart_count tells the caller that it must
    push again (trainer/sync.py does)."""
    probe = [probe_tokens(512, 32, seed=11)]
    ref_b = [ref_logprobs(models["hf_b"], p).tolist() for p in probe]
    server = engine.servers[0]
    old_pid, before = server.process.pid, engine.restart_count
    buckets = state_buckets(models["b"])
    consumed = []
    stats = engine.update_weights(_killed_after_first(buckets, server, consumed), version="partial")
    assert consumed == list(range(len(buckets))) and stats.buckets == len(buckets) > 1
    assert stats.lost == (0,) and stats.transport == ("cuda_ipc" if DEVICE == "cuda" else "shm")
    assert engine.restart_count > before and server.process.pid != old_pid and server.alive()
    engine.update_weights(iter(buckets), version="full")   # the caller's second push
    check_parity(engine, probe, ref_b, PARITY_TOL)
    [s] = engine.generate([PROMPTS[1]], 1, SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert s.weight_version == "full"


def test_server_killed_during_a_group_push_rejoins_a_new_update_group(engine, models):
    """The dedicated path: the server dies between two broadcast buckets. The push drains the
    rest, reports every server lost, the server is restarted, and the next push re-creates the
    weight-update group (the new process was in none) and loads it fully."""
    probe = [probe_tokens(512, 32, seed=12)]
    ref_a = [ref_logprobs(models["hf_a"], p).tolist() for p in probe]
    server = engine.servers[0]
    old_pid, before = server.process.pid, engine.restart_count
    buckets = state_buckets(models["a"])
    consumed = []
    engine.connect_weight_group("127.0.0.1", free_port())
    try:
        first_group = engine._dist_sync
        stats = engine.update_weights(_killed_after_first(buckets, server, consumed),
                                      version="partial")
        assert consumed == list(range(len(buckets))) and stats.lost == (0,)
        assert engine.restart_count > before and server.process.pid != old_pid
        engine.update_weights(iter(buckets), version="again")
        assert engine._dist_sync is not first_group   # a new group, with the new process
        check_parity(engine, probe, ref_a, PARITY_TOL)
    finally:
        engine.disconnect_weight_group()
