"""Decode step of a random-weight Qwen2 (7B shape by default) on a GPU: engine eager, engine
with captured graphs, transformers ``generate``, and the roofline, at several batch sizes.

::

    .venv/bin/python tools/gpu_decode_bench.py --backend cuda --profile out/gpu/cuda_profile.yaml \\
        --batches 1,64,256 --context 512 --json out/gpu/decode.json
    .venv/bin/python tools/gpu_decode_bench.py --backend cpu --shape tiny   # checks the script itself

Roofline of one decode step: (weight bytes + KV bytes read by the batch) / the profile's long-stream
sequential bandwidth. Weights are random (no download): timing does not depend on values.
The engine runs ``ForwardBatch`` over a KV arena with each sequence in one run of
``--context`` tokens; transformers runs ``generate`` with a prompt of ``--context`` tokens
and reports (time of N+1 new tokens - time of 1) / N per step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _random_model(spec, device, dtype):  # type: ignore[no-untyped-def]
    import torch

    from odma_mlu.models.qwen2 import LayerWeights, Qwen2ForwardModel

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, device=device, dtype=dtype) * 0.02)

    h, q, kv, inter = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim, \
        spec.intermediate_size
    layers = [LayerWeights(torch.ones(h, device=device, dtype=dtype), w(q + 2 * kv, h), w(q + 2 * kv), w(h, q),
                           torch.ones(h, device=device, dtype=dtype), w(2 * inter, h), w(h, inter))
              for _ in range(spec.num_layers)]
    return Qwen2ForwardModel(spec, w(spec.vocab_size, h), layers, torch.ones(h, device=device, dtype=dtype),
                             w(spec.vocab_size, h))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", choices=("cuda", "mlu", "cpu"), default="cuda")
    ap.add_argument("--shape", default="deepseek-r1-distill-qwen-7b", help="built-in shape, or 'tiny'")
    ap.add_argument("--profile", default=None, help="measured device profile YAML (roofline bandwidth)")
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--json", default=None)
    ns = ap.parse_args(argv)
    import dataclasses

    import torch

    from odma_mlu.backends import get_backend
    from odma_mlu.config import ModelSpec, load_model_spec
    from odma_mlu.engine.graph_runner import DecodeGraphRunner
    from odma_mlu.kvcache.arena import KVArena, KVLocation
    from odma_mlu.models.attention import ForwardBatch, SequenceInput

    backend = get_backend(ns.backend)
    dev = backend.device
    dtype = torch.float16 if ns.backend != "cpu" else torch.float32
    if ns.shape == "tiny":
        spec = ModelSpec(name="tiny", hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=2, head_dim=32,
                         intermediate_size=512, vocab_size=1024, max_position_embeddings=4096, dtype="float32")
    else:
        spec = load_model_spec(ns.shape)
    batches = [int(b) for b in ns.batches.split(",")]
    model = _random_model(spec, dev, dtype)
    cap = max(batches) * (ns.context + ns.steps + 8)
    arena = KVArena(dataclasses.replace(spec), cap, device=dev, dtype=dtype)
    bw = None
    if ns.profile:
        from emulator.profile import load_profile

        bw = load_profile(ns.profile).stream_bandwidth_bytes_per_s
    elem = torch.tensor([], dtype=dtype).element_size()
    weight_bytes = spec.num_params * elem
    rows = []
    for b in batches:
        span = ns.context + ns.steps + 8
        inputs = [SequenceInput((7,), ns.context, KVLocation(((i * span, span),))) for i in range(b)]
        kv_bytes = b * (ns.context + 1) * arena.bytes_per_token
        row: dict[str, object] = {"batch": b, "context_tokens": ns.context, "weight_bytes": weight_bytes,
                                  "kv_read_bytes": kv_bytes}
        if bw:
            row["roofline_ms"] = 1e3 * (weight_bytes + kv_bytes) / bw

        def timed(fn) -> float:  # type: ignore[no-untyped-def]
            for _ in range(3):
                fn()
            times = []
            for _ in range(ns.steps):
                backend.synchronize()
                t = time.perf_counter()
                fn()
                backend.synchronize()
                times.append(time.perf_counter() - t)
            return 1e3 * statistics.median(times)

        row["engine_eager_ms"] = timed(lambda: model.forward(ForwardBatch.build(inputs, dev), arena))
        runner = DecodeGraphRunner(model, arena, backend, max_batch=max(batches),
                                   use_graphs=backend.new_graph() is not None)
        row["engine_graph_ms"] = timed(lambda: runner.run(inputs))
        row["graphs_captured"] = runner.num_graphs
        rows.append(row)
        print(json.dumps(row), flush=True)
    del arena
    if not ns.no_hf:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        cfg = Qwen2Config(hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
                          num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
                          intermediate_size=spec.intermediate_size, vocab_size=spec.vocab_size,
                          max_position_embeddings=spec.max_position_embeddings, tie_word_embeddings=False)
        del model
        backend.empty_cache()
        with torch.device(dev):
            hf = Qwen2ForCausalLM(cfg).to(dtype).eval()
        for row in rows:
            b = int(row["batch"])  # type: ignore[arg-type]
            ids = torch.randint(0, spec.vocab_size, (b, ns.context), device=dev)

            def gen(n: int) -> float:
                backend.synchronize()
                t = time.perf_counter()
                with torch.inference_mode():
                    hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, pad_token_id=0)
                backend.synchronize()
                return time.perf_counter() - t

            gen(2)
            one, many = gen(1), gen(ns.steps + 1)
            row["hf_generate_ms"] = 1e3 * (many - one) / ns.steps
            print(json.dumps(row), flush=True)
    if ns.json:
        Path(ns.json).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.json).write_text(json.dumps({"backend": backend.describe(), "shape": spec.name, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
