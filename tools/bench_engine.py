"""Throughput of the real engine against transformers ``generate`` on the same small model.

::

    .venv/bin/python tools/bench_engine.py --json out/bench_engine.json

The workload: ``--requests`` (64) Alpaca prompts with their real Vicuna-7B output lengths
(``../shared/data/lengths/alpaca_vicuna7b_train.jsonl``, first N records with an output
length in [1, --max-new-tokens]). Every request generates exactly its recorded length on
both sides, greedy: the engine with ``ignore_eos`` and ``max_new_tokens = length``;
transformers with ``min_new_tokens = max_new_tokens``.

How transformers is batched (static batching, the best it offers without a server): the
requests in arrival order, ``--hf-batch`` at a time, left-padded to the longest prompt of
the batch and decoded until the longest output of the batch is done. Tokens a request
generates past its own length are waste: tokens/s counts only each request's own length
(the same total as the engine). Batch 1 wastes nothing but runs every step at M=1; larger
batches amortize the weights over more rows but wait for their longest member, so the
script measures the batch sizes in ``--hf-batch`` (comma list) and reports the best as the
baseline. Sorting by true output length would use knowledge the engine does not have.

The model (4 layers, hidden 512, 8 heads, 2 KV heads, intermediate 1408, float32) is written
with tests/tiny_model.make_tiny_qwen2 unless ``--model`` names a folder. CPU, torch threads
``--threads`` (1 by default: the CPU profile was measured single-threaded and the machine
has 2 shared cores). Timings are wall clock; the load average is recorded next to them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "lengths" / "alpaca_vicuna7b_train.jsonl"


def load_requests(path: Path, n: int, max_new: int) -> list[dict]:
    out = []
    with path.open() as f:
        for line in f:
            r = json.loads(line)
            if 1 <= int(r["output_tokens"]) <= max_new and r["prompt"].strip():
                out.append({"id": r["id"], "prompt": r["prompt"], "output_tokens": int(r["output_tokens"])})
            if len(out) == n:
                break
    if len(out) < n:
        raise SystemExit(f"{path}: only {len(out)} usable records, {n} requested")
    return out


def run_engine(model_dir: Path, prompts: list[list[int]], lengths: list[int], policy: str, max_new: int,
               kv_tokens: int) -> dict:
    from dataclasses import replace

    from odma_mlu.config import SchedulerConfig
    from odma_mlu.engine.commands import default_predictor
    from odma_mlu.engine.llm_engine import LLMEngine
    from odma_mlu.engine.sampler import SamplingParams

    predictor = default_predictor() if policy in ("odma", "s3") else None
    engine = LLMEngine(model_dir, kv_policy=policy, backend="cpu", kv_capacity_tokens=kv_tokens,
                       predictor=predictor, scheduler=replace(SchedulerConfig(), max_new_tokens=max_new))
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in lengths]
    # warm-up: one short request (first-call allocations, kernel selection)
    engine.generate([prompts[0]], SamplingParams(max_new_tokens=4, ignore_eos=True))
    steps = 0
    t0 = time.perf_counter()
    c0 = time.process_time()
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    got: dict[str, int] = {}
    while engine.has_unfinished():
        steps += 1
        for out in engine.step():
            if out.finished:
                got[out.request_id] = len(out.token_ids)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    tokens = sum(got[i] for i in ids)
    assert tokens == sum(lengths), f"engine generated {tokens} tokens, expected {sum(lengths)}"
    return {"system": f"odma-mlu engine ({policy})", "policy": policy, "tokens": tokens, "wall_s": wall,
            "cpu_s": cpu, "tokens_per_s": tokens / wall, "steps": steps,
            "preemptions": engine.scheduler.num_preemptions,
            "overflows": getattr(engine.policy, "overflowed_requests", None)}


def run_hf(model_dir: Path, prompts: list[list[int]], lengths: list[int], batch: int, pad_id: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()

    def gen(chunk_prompts: list[list[int]], new: int) -> torch.Tensor:
        width = max(len(p) for p in chunk_prompts)
        ids = torch.full((len(chunk_prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk_prompts):  # left padding, as decoder-only generation needs
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=pad_id)
        return out[:, width:]

    gen([prompts[0]], 4)  # warm-up
    generated = 0
    t0 = time.perf_counter()
    c0 = time.process_time()
    for s in range(0, len(prompts), batch):
        chunk, want = prompts[s:s + batch], lengths[s:s + batch]
        out = gen(chunk, max(want))
        generated += out.numel()
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    useful = sum(lengths)
    return {"system": f"transformers generate (static batches of {batch})", "hf_batch": batch,
            "tokens": useful, "generated_incl_waste": generated, "wall_s": wall, "cpu_s": cpu,
            "tokens_per_s": useful / wall}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="Qwen2 model folder (default: write the 4-layer hidden-512 one)")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--policies", default="odma,paged")
    ap.add_argument("--hf-batch", default="1,8,16", help="comma list of static batch sizes to try for transformers")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, metavar="OUT")
    ns = ap.parse_args(argv)

    import torch

    torch.set_num_threads(ns.threads)
    model_dir = Path(ns.model) if ns.model else ROOT / "out" / "bench_engine_model"
    if not ns.model and not (model_dir / "config.json").is_file():
        from tiny_model import make_tiny_qwen2

        make_tiny_qwen2(model_dir, num_layers=4, hidden=512, heads=8, kv_heads=2, intermediate=1408)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    reqs = load_requests(Path(ns.data), ns.requests, ns.max_new_tokens)
    prompts = [tok.encode(r["prompt"], add_special_tokens=False) for r in reqs]
    lengths = [r["output_tokens"] for r in reqs]
    kv_tokens = sum(len(p) + n for p, n in zip(prompts, lengths)) + 4096
    load = [os.getloadavg()[0]]
    print(f"{len(reqs)} requests: prompt tokens {sum(map(len, prompts))} (median {statistics.median(map(len, prompts))}),"
          f" output tokens {sum(lengths)} (median {statistics.median(lengths)}, max {max(lengths)}); "
          f"torch threads {torch.get_num_threads()}, load average {load[0]:.2f}", flush=True)
    results = []
    for policy in [p for p in ns.policies.split(",") if p]:
        r = run_engine(model_dir, prompts, lengths, policy, ns.max_new_tokens, kv_tokens)
        results.append(r)
        print(f"{r['system']:<44} {r['tokens']:>6} tokens {r['wall_s']:8.2f} s  {r['tokens_per_s']:8.1f} tok/s "
              f"(cpu {r['cpu_s']:.2f} s, {r['steps']} steps)", flush=True)
        load.append(os.getloadavg()[0])
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    hf = []
    for b in [int(x) for x in ns.hf_batch.split(",") if x]:
        r = run_hf(model_dir, prompts, lengths, b, pad_id)
        hf.append(r)
        results.append(r)
        print(f"{r['system']:<44} {r['tokens']:>6} tokens {r['wall_s']:8.2f} s  {r['tokens_per_s']:8.1f} tok/s "
              f"(cpu {r['cpu_s']:.2f} s, {r['generated_incl_waste']} generated incl. padding waste)", flush=True)
        load.append(os.getloadavg()[0])
    best_hf = max(hf, key=lambda r: r["tokens_per_s"]) if hf else None
    ratios = {}
    if best_hf:
        for r in results:
            if "policy" in r:
                ratios[r["policy"]] = r["tokens_per_s"] / best_hf["tokens_per_s"]
                print(f"engine {r['policy']} / best transformers ({best_hf['system']}): {ratios[r['policy']]:.2f}x")
    doc = {"model": str(model_dir), "data": ns.data, "requests": len(reqs), "prompt_tokens": sum(map(len, prompts)),
           "output_tokens": sum(lengths), "torch_threads": torch.get_num_threads(), "load_average": load,
           "results": results, "best_hf": best_hf["system"] if best_hf else None, "ratio_vs_best_hf": ratios}
    if ns.json:
        Path(ns.json).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.json).write_text(json.dumps(doc, indent=2))
        print(f"wrote {ns.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
