"""The MOPD training loop (MiMo-V2-Flash s4.4): one step = one rollout batch.

    rollout -> teacher scores | rewards (GRPO A_ORM) -> student update -> weight sync -> log/save

(the verifiers score on rank 0 while the teachers score: the loss needs both, nothing before it)

The Trainer's constructor is an ordered list of builds (trainer/builders.py); ``train_step``
names the phases (each timed as time/<phase>, measured as mem/<phase>_max_gib and watched by
trainer/watchdog.py); everything else lives in small modules under ``mopd_megatron/trainer/``,
checkpoints under ``checkpoint/`` and the Megatron plumbing under ``mcore/``.
``mopd train`` (trainer/cli.py) builds a Trainer from a recipe and runs it.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable

import torch
import torch.distributed as dist

from .checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from .config import MOPDConfig
from .logging import MetricLogger, PhaseTimer
from .rewards import grpo_advantages
from .rollout.engine import SamplingParams
from .runtime import broadcast_object
from .trainer import builders
from .trainer.batch import RolloutBatch
from .trainer.microbatches import (Batching, Prepared, fill_from_slots, padded_fraction,
                                   per_domain_sums, rank_microbatches, rollout_logp_slots,
                                   slot_values)
from .trainer.evaluate import greedy_accuracy, load_eval_rows
from .trainer.memory import PhaseMemory, memory_report
from .trainer.objective import make_mopd_loss_fn, reduce_microbatch_metrics
from .trainer.preemption import Preempted, StopSignals
from .trainer.watchdog import PhaseWatchdog

__all__ = ["Trainer", "Prepared"]


class Trainer:
    """``hooks``: {phase name: fn(trainer, step)} run as each phase starts (tests use them to
    crash at exact points); ``engine``: a RolloutEngine to use instead of the recipe's;
    ``stop``: signal handlers installed earlier by the caller (trainer/preemption.py)."""

    def __init__(self, cfg: MOPDConfig, *, engine=None, hooks: dict[str, Callable] | None = None,
                 stop: StopSignals | None = None):
        from .runtime import init_runtime, launch_env
        self.cfg, self.hooks = cfg, dict(hooks or {})
        # From the start: a SIGTERM during the builds must not kill the rank mid-collective.
        self.stop = stop if stop is not None else StopSignals()
        par, rt = cfg.parallel, cfg.runtime
        self.inputs = builders.preflight(cfg, launch_env().world_size,        # 1. every check
                                         own_engine=engine is None)
        self.layout = init_runtime(par.tp, par.pp, par.vpp, cfg.train.seed,  # 2. groups, seeds
                                   timeout_minutes=rt.timeout_minutes)
        self.watchdog = PhaseWatchdog(self.layout.rank, rt.phase_warn_seconds,
                                      timeout_minutes=rt.timeout_minutes)
        try:
            with self.watchdog.phase("start-up", None):
                self._build(cfg, engine)
        except BaseException:
            self.watchdog.close()
            self.stop.close()
            raise

    def _build(self, cfg: MOPDConfig, engine) -> None:
        from .data import DomainSampler
        from .runtime import device
        from .teachers import TeacherPool
        self.device = device()
        if self.device.type == "cpu" and cfg.train.cpu_threads is not None:
            torch.set_num_threads(cfg.train.cpu_threads)
        with self.watchdog.phase("start-up: resume lookup", None):
            # Known before the build: a resume loads its checkpoint only, never model.checkpoint.
            self.resume_path = resolve_resume(cfg)
        with self.watchdog.phase("start-up: student", None):                # 3. student
            self.chunks, self.optimizer, self.scheduler = builders.build_student(
                cfg, self.inputs.hf, load=self.resume_path is None)
        with self.watchdog.phase("start-up: teachers", None):
            self.teachers = TeacherPool.build(                                # 4. frozen teachers
                cfg.teachers, lambda hf_dir: builders.build_chunks(hf_dir, cfg, frozen=True),
                lambda chunks, t, i: builders.load_weights(chunks, t.checkpoint, t.format, None))
        self.sampler = DomainSampler(self.inputs.dataset, cfg.data.domain_weights, cfg.data.seed)  # 5.
        with self.watchdog.phase("start-up: engines", None):
            self.engines = builders.Engines(engine, engine) if engine is not None else \
                builders.build_engines(cfg, self.chunks, self.inputs, self.layout)  # 6. rollout
        self.engine = self.engines.driver
        # Server engines exist on the driver (rank 0) only: every rank learns how to drive it.
        self.engine_collective, self.engine_needs_sync = broadcast_object(
            (self.engine.collective, self.engine.needs_weight_sync)
            if self.engine is not None else None)
        self.eval_rows = load_eval_rows(cfg, self.inputs.tokenizer)          # 7. held-out prompts
        self.losses: list[float] = []
        self._pending = None  # one-step-off rollout in flight (train.async_rollout)
        self._probed = False  # parity checked since start or resume (rollout.parity_interval)
        self._released = False  # colocated engines' memory given to training
        if self.engines.placement is not None and dist.get_rank() == 0:
            from .rollout.placement import format_placement
            print("\n".join("placement " + line
                            for line in format_placement(self.engines.placement)), flush=True)
        with self.watchdog.phase("start-up: resume", None):
            self.start_step = self._resume()                                 # 8. resume
        self.logger = MetricLogger.from_config(                              # 9. metric sinks
            cfg.logging, total_steps=cfg.train.steps, enabled=dist.get_rank() == 0,
            run_config=cfg.to_dict(), resume_step=self.start_step)
        self.timer = PhaseTimer(torch.cuda.synchronize if torch.cuda.is_available() else None)
        self.memory = PhaseMemory()
        self._memory_reported = False  # the plan beside the measurement: once, first step
        self.loss_fn = make_mopd_loss_fn(cfg.loss, cfg.loss.alpha, cfg.rollout.temperature,
                                         self.layout.tp_group_or_none,
                                         vocab_size=self.inputs.hf.vocab_size)
        from .models.builder import packed_attention_format
        self.batching = Batching.from_config(cfg.parallel, cfg.model.fp8.enabled)
        self.packed_format = packed_attention_format()
        self.sampling = SamplingParams(temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                       top_k=cfg.rollout.top_k, max_new_tokens=cfg.rollout.max_new_tokens,
                                       stop_token_ids=(self.inputs.eos_id,))
        from concurrent.futures import ThreadPoolExecutor
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="rollout")

    # --- the loop -----------------------------------------------------------------------------
    def train(self) -> dict:
        with self.watchdog.phase("eval before training", None):
            before = self.evaluate(teachers=True) if self.start_step == 0 else {}
        self.stop_if_asked(self.start_step)
        for step in range(self.start_step + 1, self.cfg.train.steps + 1):
            self.train_step(step)
            self.stop_if_asked(step)
        with self.watchdog.phase("final eval", None):
            after = self.evaluate(teachers=False)
        with self.watchdog.phase("HF export", None):  # every rank writes its share
            self.export_hf()
        self.logger.close()
        return {"before": before, "after": after, "losses": self.losses}

    def train_step(self, step: int) -> dict:
        t0 = time.perf_counter()
        with self.phase("rollout", step):
            batch = broadcast_object(self.rollout())      # y ~ mu and log mu, n per prompt
            pending = self.start_rewards(batch)           # verifiers start (rank 0), in threads
        with self.phase("release", step):                 # (after the broadcast: every engine idle)
            self.release_engines()                        # colocated: free weights + KV cache
        with self.phase("teacher", step):
            prep = self.teacher_scores(batch)             # log pi_dom of each domain's sequences
        with self.phase("reward", step):
            self.finish_rewards(batch, pending, prep)     # r -> GRPO A_ORM (rank 0), broadcast
        with self.phase("student", step):
            results = self.student_update(prep.steps)     # fused MOPD loss, optimizer step(s)
        with self.phase("resume", step):
            self.resume_engines()                         # colocated: re-occupy before sync
        with self.phase("sync", step):
            synced = self.sync_weights(step)              # new weights -> rollout engines
        held_out = self.periodic_eval(step)               # train.eval_interval
        metrics = self.metrics(batch, results, prep, time.perf_counter() - t0) | synced | held_out
        self.report_memory(step, metrics)
        self.losses.append(metrics["loss"])
        self.logger.log(step, metrics)
        if self.should_save(step):
            with self.phase("save", step):
                self.save(step)
        return metrics

    # --- phases ---------------------------------------------------------------------------
    def rollout(self) -> RolloutBatch | None:
        rows = self.sampler.next_batch(self.cfg.train.prompts_per_step)  # same on every rank
        if not self.cfg.train.async_rollout:
            return self._generate(rows)
        # One-step-off: train on the batch generated while the previous step trained, and
        # start the next one now. It samples with the weights of the last sync only:
        # sync_weights waits for it, so no batch mixes two weight versions.
        if self._pending is None:
            self._pending = self._pool.submit(self._generate, rows)
            rows = self.sampler.next_batch(self.cfg.train.prompts_per_step)
        batch = self._pending.result()
        self._pending = self._pool.submit(self._generate, rows)
        return batch

    def _generate(self, rows) -> RolloutBatch | None:
        n = self.cfg.rollout.n_samples_per_prompt
        if self.engine_collective or dist.get_rank() == 0:
            samples = self.engine.generate([r.prompt_ids for r in rows], n, self.sampling)
            return RolloutBatch(rows, samples, n) if dist.get_rank() == 0 else None
        return None

    def start_rewards(self, batch: RolloutBatch) -> object | None:
        """Rank 0 queues the batch on the verifiers' pool (reward.workers) and returns at once."""
        if dist.get_rank() != 0:
            return None
        tok = self.inputs.tokenizer
        batch.texts = [tok.decode(s.token_ids, skip_special_tokens=True) for s in batch.samples]
        return self.inputs.rewards.start_batch(
            [(batch.domain(i), t, batch.rows[s.prompt_index].fields)
             for i, (s, t) in enumerate(zip(batch.samples, batch.texts))])

    def finish_rewards(self, batch: RolloutBatch, pending, prep: Prepared | None = None) -> None:
        """Rank 0 waits for the rewards and turns them into GRPO advantages; every rank gets
        both and, with ``prep``, the advantages land in its micro-batches."""
        if pending is not None:
            rewards = [r.reward for r in pending.result()]
            adv = grpo_advantages(torch.tensor(rewards), batch.n,
                                  scale_by_std=self.cfg.reward.grpo_std_normalize).tolist()
            self.timer.record("reward_scoring", pending.seconds)  # verifier wall time
            sent = (rewards, adv)
        else:
            sent = None
        batch.rewards, batch.advantages = broadcast_object(sent)
        if prep is not None:
            fill_from_slots([mb for s in prep.steps for mb in s], "orm_adv",
                            slot_values(prep.slots, batch.advantages).to(self.device))

    def reward(self, batch: RolloutBatch | None) -> RolloutBatch:
        """Rewards and advantages of a whole batch, synchronously (replay, tests)."""
        batch = broadcast_object(batch)
        self.finish_rewards(batch, self.start_rewards(batch))
        return batch

    def teacher_scores(self, batch: RolloutBatch) -> Prepared:
        """This DP rank's micro-batches for every optimizer step of the rollout batch, with
        ``teacher_logp`` filled on the last pipeline stage (trainer/microbatches.py)."""
        cfg, lay = self.cfg, self.layout
        steps, mine, slots = rank_microbatches(
            batch, self.batching, global_batch_size=cfg.parallel.global_batch_size,
            optimizer_steps=cfg.optimizer.steps_per_rollout, dp=lay.dp, dp_rank=lay.dp_rank,
            pad_id=self.inputs.pad_id, fixed_length=cfg.parallel.pp > 1, device=self.device)
        # log pi_dom at the rollout temperature, the one log pi_theta and log mu are taken at:
        # a teacher equal to the student then gives A = 0 at any temperature.
        sig = self.teachers.score(batch, mine, slots, self.batching, pad_id=self.inputs.pad_id,
                                  vocab_size=self.inputs.hf.vocab_size,
                                  temperature=cfg.rollout.temperature, layout=lay,
                                  packed_format=self.packed_format, signal=cfg.loss.signal,
                                  topk=cfg.loss.topk)
        flat = [mb for s in steps for mb in s]
        kl = {}
        if sig is not None:  # the last pipeline stage
            fill_from_slots(flat, "teacher_logp", sig.logp)
            kl = per_domain_sums(batch, slots,
                                 rollout_logp_slots(batch, slots).to(sig.logp.device) - sig.logp)
            for mb in flat:
                mb["signal"] = sig
        return Prepared(steps, slots, kl, padded_fraction(flat), batch, sig)

    def student_update(self, steps: list[list[dict]]) -> list:
        from .mcore.step import train_step
        return [train_step(self.chunks, self.optimizer, self.scheduler, mbs, self.loss_fn,
                           vocab_size=self.inputs.hf.vocab_size, tp_rank=self.layout.tp_rank,
                           packed_format=self.packed_format)
                for _ in range(self.cfg.optimizer.epochs_per_rollout) for mbs in steps]

    def release_engines(self) -> None:
        """Colocated engines give their GPU memory (weights and KV cache) to training; each
        node's local rank 0 releases its own node's engines."""
        if self.engines.placement is not None and self.engines.node is not None:
            self.engines.node.release_memory()
            self._released = True

    def resume_engines(self) -> None:
        if self._released:
            self.engines.node.resume_memory()
            self._released = False

    def sync_weights(self, step: int) -> dict[str, float]:
        if not self.engine_needs_sync:
            return {}
        from .trainer.sync import push_weights
        if self._pending is not None:
            self._pending.exception()  # one-step-off: the batch in flight finishes on its weights
        # The parity probe is a fixed sequence (the first prompt of the data): deterministic
        # across steps and resumes, and free of ids the engine may treat specially (sampled
        # responses can hold tokens such as the last vocabulary id, which SGLang 0.5.23 on CPU
        # reports back as 0).
        probe = next(iter(self.inputs.dataset.rows_by_domain.values()))[0].prompt_ids
        check = not self._probed or step % self.cfg.rollout.parity_interval == 0
        self._probed = True
        return push_weights(self.engines, self.chunks, self.inputs.hf, self.layout,
                            self.cfg.rollout, step, probe if check else None)

    # --- metrics, checkpoints, eval ------------------------------------------------------
    def metrics(self, batch: RolloutBatch, results, prep: Prepared, seconds: float) -> dict:
        # kl/<teacher>: the exact KL the loss used when there is one, else the sampled
        # estimate mean(log mu - log pi_dom); kl_sampled/<teacher> keeps the estimate then.
        exact = self.cfg.loss.signal != "sampled"
        sampled_key = "kl_sampled" if exact else "kl"
        names = [f"{k}/{t.name}" for k in (("kl", "kl_sampled") if exact else ("kl",))
                 for t in self.teachers.teachers] + ["batch/padded_frac"]
        per_teacher = {"batch/padded_frac": prep.padded}
        for prefix, sums in ((sampled_key, prep.kl), ("kl", prep.exact_kl() if exact else {})):
            for dom, v in sums.items():
                key = f"{prefix}/{self.teachers.by_domain[dom].name}"
                per_teacher[key] = per_teacher.get(key, torch.zeros(2, dtype=torch.float64)) + v
        contributes = self.layout.is_last_stage and self.layout.tp_rank == 0
        m = reduce_microbatch_metrics([x for r in results for x in r.metrics], contributes,
                                      self.cfg.loss.log_entropy, per_teacher, names)
        m.update(self.timer.pop())
        m.update(self.memory.pop())   # this rank's; logged from rank 0
        m["time/step"] = seconds
        m["optim/lr"] = self.optimizer.param_groups[0]["lr"]
        m["optim/skipped"] = float(sum(not r.ok for r in results))
        if results[-1].grad_norm is not None:
            m["optim/grad_norm"] = results[-1].grad_norm
        for s in batch.samples:  # multi-engine fleets: how generation was spread
            if "server" in s.meta:
                key = f"rollout/samples/engine{s.meta['server']}"
                m[key] = m.get(key, 0.0) + 1
        lens = [len(s.token_ids) for s in batch.samples]
        m["response_len/mean"] = sum(lens) / len(lens)
        m["rollout/truncated_frac"] = sum(s.finish_reason == "length" for s in batch.samples) / len(lens)
        m["tokens_per_s"] = sum(len(s.prompt_token_ids) + n for s, n in zip(batch.samples, lens)) / seconds
        adv = torch.tensor(batch.advantages)
        m["adv/orm_mean"], m["adv/orm_std"] = float(adv.mean()), float(adv.std(unbiased=False))
        for d in self.cfg.domains:
            rs = [r for r, dd in zip(batch.rewards, batch.domains) if dd == d]
            if rs:
                m[f"reward/{d}"] = sum(rs) / len(rs)
                m[f"acc/{d}"] = sum(r >= 1.0 for r in rs) / len(rs)
        return m

    def periodic_eval(self, step: int) -> dict:
        every = self.cfg.train.eval_interval
        if not every or step % every:
            return {}
        with self.phase("eval", step):  # after this step's sync: the engine holds its weights
            acc = self.evaluate(teachers=False).get("student", {})
        return {f"eval/{d}": v for d, v in acc.items()}

    def stop_if_asked(self, step: int) -> None:
        """After a step (or before the first): if any rank got SIGTERM/SIGUSR1, every rank
        saves this step (unless it was just saved) and raises Preempted."""
        signum = self.stop.agreed()
        if not signum:
            return
        import signal
        saved = self.start_step > 0 and step == self.start_step  # resumed: already committed
        if self.cfg.checkpoint.dir is not None and step > self.start_step:
            if not self.should_save(step):
                with self.phase("save", step):
                    self.save(step)
            saved = True
        name = signal.Signals(signum).name
        if dist.get_rank() == 0:
            print(f"stopping after step {step} on {name}: "
                  + (f"checkpoint step_{step} committed; the run continues from it "
                     "(checkpoint.resume: auto)" if saved else "nothing saved (checkpoint.dir "
                     "is null, or no step was trained)"), flush=True)
        raise Preempted(step, saved, name)

    def should_save(self, step: int) -> bool:
        c = self.cfg.checkpoint
        return c.dir is not None and (step == self.cfg.train.steps or
                                      (c.save_interval > 0 and step % c.save_interval == 0))

    def save(self, step: int) -> None:
        trainer_state = {"step": step, "sampler": self.sampler.state_dict(),
                         "scheduler": self.scheduler.state_dict(),
                         "engine": self.engine.state_dict() if self.engine is not None else {},
                         "losses": self.losses}
        hook = self.hooks.get("checkpoint_write")
        save_checkpoint(self.cfg.checkpoint.dir, step, self.chunks, self.optimizer,
                        trainer_state, self.cfg.checkpoint.keep_last,
                        before_commit=(lambda tmp: hook(self, step)) if hook else None)

    def _resume(self) -> int:
        path = self.resume_path  # resolved before the student was built
        if path is None:
            return 0
        st = load_checkpoint(path, self.chunks, self.optimizer)
        self.scheduler.load_state_dict(st["scheduler"])
        self.sampler.load_state_dict(st["sampler"])
        if self.engine is not None and st.get("engine"):
            self.engine.load_state_dict(st["engine"])
        self.losses = list(st.get("losses", []))
        if dist.get_rank() == 0:
            print(f"resumed from {path} (step {st['step']})", flush=True)
        if self.engine_needs_sync:
            self.sync_weights(st["step"])
        return int(st["step"])

    def export_hf(self) -> None:
        """The final student as an HF checkpoint (checkpoint.hf_export_dir), converted from the
        last committed checkpoint by every rank together (trainer/hf_export.py)."""
        if self.cfg.checkpoint.hf_export_dir is not None:
            from .trainer.hf_export import export_committed
            export_committed(self.cfg)

    def evaluate(self, teachers: bool) -> dict:
        """Greedy accuracy per domain on data.eval_paths, {who: {domain: acc}} on rank 0: the
        student, and (``teachers``) each teacher on its domains. trainer/eval_plan.py, which the
        dry-runs print, decides where the answers come from.

        On the rollout engine the student evaluated is the weights the engine holds: before
        training the ones it was launched with, which step 1 samples from too; in periodic_eval
        those train_step's sync just pushed; at the final eval those of the last step's sync
        (every step syncs, after a one-step-off rollout in flight has finished; a run resumed at
        its last step: _resume's push), so the final student's."""
        from .trainer.eval_plan import eval_plan
        from .trainer.evaluate import engine_accuracy, greedy_sampling
        plan = eval_plan(self.cfg)
        if not self.eval_rows:
            return {}
        inp = self.inputs
        kw = dict(max_new_tokens=self.cfg.rollout.max_new_tokens, eos_id=inp.eos_id,
                  pad_id=inp.pad_id, vocab_size=inp.hf.vocab_size)
        if plan.on_engine:
            student = engine_accuracy(self.engine, self.engine_collective, self.eval_rows,
                                      inp.tokenizer, inp.rewards, greedy_sampling(self.sampling))
        else:  # rollout.engine=local: the in-trainer sampler is the engine
            student = greedy_accuracy(self.chunks, self.eval_rows, inp.tokenizer, inp.rewards, **kw)
        out = {"student": student}
        if teachers and plan.teachers_skipped:
            if dist.get_rank() == 0:
                print(f"eval: teacher accuracy is not measured: {plan.teachers_skipped}", flush=True)
            return out
        for t in self.teachers.teachers if teachers else []:
            t.onload(self.device)
            out[f"teacher:{t.name}"] = greedy_accuracy(t.chunks, self.eval_rows, inp.tokenizer,
                                                       inp.rewards, domains=t.domains, **kw)
            t.offload_()
        return out

    @contextmanager
    def phase(self, name: str, step: int):
        if name in self.hooks:
            self.hooks[name](self, step)
        with self.watchdog.phase(name, step), self.memory(name), self.timer(name):
            yield

    def report_memory(self, step: int, metrics: dict) -> None:
        """The planner's terms beside the measured phase peaks, on the first step this process
        trains, from the first rank of each pipeline stage."""
        if self._memory_reported:
            return
        self._memory_reported = True
        if self.layout.tp_rank == 0 and self.layout.dp_rank == 0:
            print(memory_report(self.cfg, self.layout, metrics, self.memory, step), flush=True)

    def close(self) -> None:
        self.stop.close()
        self.watchdog.close()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.logger.close()
        for engine in {id(e): e for e in (self.engines.driver, self.engines.node)
                       if e is not None}.values():
            engine.shutdown()
        self.inputs.rewards.close()

