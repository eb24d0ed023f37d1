#!/usr/bin/env python3
"""peer_transformers.py: the naive peer for bench_cuda -- the same model shape
in PyTorch/transformers, bf16, eager, random weights made on the GPU.

    python3 bench/peer_transformers.py [qwen3|qwen15] [--layers N]

Prints decode tokens/s at batch 1 (greedy steps with the KV cache, context
512) and the time of a 512-token prefill, median of several runs, CUDA
events. Weights are random (same shape as the published config); only speed
is measured.
"""
import statistics
import sys
import time

import torch
import transformers

which = sys.argv[1] if len(sys.argv) > 1 else "qwen15"
layers = None
if "--layers" in sys.argv:
    layers = int(sys.argv[sys.argv.index("--layers") + 1])

if which == "qwen3":
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=40960,
        rope_theta=1e6, rms_norm_eps=1e-6)
else:
    cfg = transformers.Qwen2MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
        num_key_value_heads=16, num_experts=60, num_experts_per_tok=4, norm_topk_prob=False,
        max_position_embeddings=8192, rope_theta=1e6, rms_norm_eps=1e-6)
full_layers = cfg.num_hidden_layers
if layers:
    cfg.num_hidden_layers = layers
cfg._attn_implementation = "sdpa"
t0 = time.time()
torch.manual_seed(0)
with torch.device("cuda"):
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
model.eval()
print(f"peer {which}: transformers {transformers.__version__} torch {torch.__version__}, "
      f"{cfg.num_hidden_layers}/{full_layers} layers, built in {time.time() - t0:.1f} s, "
      f"{torch.cuda.memory_allocated() / 1e9:.1f} GB", flush=True)

def timed(fn, reps):
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return statistics.median(ts)

with torch.no_grad():
    ids = torch.randint(0, cfg.vocab_size, (1, 512), device="cuda")
    model(ids)  # warm-up
    t_pre = timed(lambda: model(ids), 5)
    out = model(ids, use_cache=True)
    past = out.past_key_values
    nxt = out.logits[:, -1:].argmax(-1)

    def step():
        global past, nxt
        o = model(nxt, past_key_values=past, use_cache=True)
        past = o.past_key_values
        nxt = o.logits[:, -1:].argmax(-1)

    for _ in range(3):
        step()
    t_dec = timed(step, 20)
scale = full_layers / cfg.num_hidden_layers
print(f"peer {which} bf16: prefill 512 tokens {t_pre * 1e3:.1f} ms; decode batch 1 "
      f"{t_dec * 1e3:.2f} ms/step = {1 / t_dec:.1f} tok/s"
      + (f" (measured on {cfg.num_hidden_layers} layers; x{scale:.1f} for the full model: "
         f"prefill {t_pre * scale * 1e3:.1f} ms, decode {1 / (t_dec * scale):.1f} tok/s)" if scale != 1 else ""))
