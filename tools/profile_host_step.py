"""Host time of one engine decode step at a large batch (CPU, tiny model).

::

    .venv/bin/python tools/profile_host_step.py --batch 256 --repeats 5 [--cprofile]

Host time = the step's wall time minus the time spent inside ``model.forward`` (scheduling,
step metadata, sampling, stop checks, bookkeeping), and, reported next to it, the forward's
own wall time on a model so small (2 layers, hidden 64) that it is almost all host work
too (building attention metadata, per-group Python, kernel dispatch). Every request has a
prompt of ``--prompt-tokens`` and runs long enough that all measured steps are pure
decode steps at the full batch. Reports the median over ``--repeats`` runs of the median
step (the machine is shared: medians, not means).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def measure(model_dir: Path, policy: str, batch: int, prompt_tokens: int, steps: int,
            cprofile: bool) -> dict[str, float]:
    from dataclasses import replace

    import torch

    from odma_mlu.config import SchedulerConfig
    from odma_mlu.engine.llm_engine import LLMEngine
    from odma_mlu.engine.sampler import SamplingParams

    max_new = steps + 8
    kv = batch * (prompt_tokens + max_new) + 4096
    eng = LLMEngine(model_dir, kv_policy=policy, backend="cpu", kv_capacity_tokens=kv,
                    scheduler=replace(SchedulerConfig(), max_new_tokens=max_new, max_num_seqs=batch,
                                      max_num_batched_tokens=max(8192, batch * prompt_tokens)))
    params = SamplingParams(max_new_tokens=max_new, ignore_eos=True)
    for i in range(batch):
        eng.add_request([3 + (i * 7 + j) % 300 for j in range(prompt_tokens)], params)
    eng.step()  # the prefill step
    eng.step()  # first decode (warm-up)
    forward_s: list[float] = []
    inner = eng.model.forward

    def timed_forward(*args, **kwargs):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        out = inner(*args, **kwargs)
        forward_s.append(time.perf_counter() - t)
        return out

    eng.model.forward = timed_forward  # type: ignore[method-assign]
    prof = None
    if cprofile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    step_s: list[float] = []
    for _ in range(steps):
        t = time.perf_counter()
        outs = eng.step()
        step_s.append(time.perf_counter() - t)
        assert len(outs) == batch, f"{len(outs)} outputs in a step of batch {batch}"
    if prof is not None:
        import pstats

        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(35)
    host = [s - f for s, f in zip(step_s, forward_s)]
    torch.set_num_threads(torch.get_num_threads())
    return {"step_ms": 1e3 * statistics.median(step_s), "forward_ms": 1e3 * statistics.median(forward_s),
            "host_ms": 1e3 * statistics.median(host)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--policies", default="odma,paged")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cprofile", action="store_true")
    ns = ap.parse_args(argv)
    import torch

    torch.set_num_threads(ns.threads)
    from tiny_model import make_tiny_qwen2

    model_dir = ROOT / "out" / "profile_host_model"
    if not (model_dir / "config.json").is_file():
        make_tiny_qwen2(model_dir)
    for policy in ns.policies.split(","):
        runs = [measure(model_dir, policy, ns.batch, ns.prompt_tokens, ns.steps, ns.cprofile and i == 0)
                for i in range(ns.repeats)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"{policy:<6} batch {ns.batch}: host {med['host_ms']:.2f} ms/step (outside forward), forward "
              f"{med['forward_ms']:.2f} ms, step {med['step_ms']:.2f} ms; medians of {ns.repeats} runs x "
              f"{ns.steps} steps; per run host ms {[round(r['host_ms'], 2) for r in runs]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
