#!/usr/bin/env python3
"""The peer of bench_tokenizer.c: the same 1 MB mixed English/Chinese text
through the Hugging Face `tokenizers` library (Rust), one encode() call per
repetition, single string, like bench_tokenizer does with lightmoe.

    python3 -m venv /tmp/tokvenv && /tmp/tokvenv/bin/pip install tokenizers
    /tmp/tokvenv/bin/python bench/tokenizer_peer.py MODEL_DIR [--mb N] [--reps R]

The generator mirrors make_text() in bench_tokenizer.c byte for byte; the
FNV-1a hash and the token count printed must equal bench_tokenizer's.
"""
import argparse
import time

import tokenizers
from tokenizers import Tokenizer

EN = ["the", "model", "routes", "each", "token", "to", "two", "of", "eight", "experts", "and",
      "weights", "are", "stored", "in", "4-bit", "groups", "with", "fp16", "scales", "while",
      "attention", "uses", "a", "paged", "KV", "cache", "that", "grows", "by", "blocks", "of",
      "16", "tokens", "The", "scheduler", "batches", "requests", "continuously", "so", "latency",
      "stays", "low", "even", "under", "load", "It's", "we'll", "don't", "GPU", "memory", "is",
      "limited", "but", "throughput", "matters", "more", "than", "anything", "else", "here",
      "for", "serving", "3.14159", "2024", "x**2", "f(x)", "def", "return", "None", "self",
      "quantization", "calibration", "perplexity", "benchmark", "daemon", "gRPC", "stream"]
ZH = ["混合专家", "模型", "在", "推理", "时", "只", "激活", "一部分", "参数", "，", "因此",
      "显存", "占用", "更", "低", "。", "量化", "到", "四", "位", "之后", "精度", "损失",
      "很小", "部署", "成本", "大幅", "下降", "我们", "使用", "连续", "批处理", "调度器",
      "提高", "吞吐量", "本地化", "服务", "的", "性能", "测试", "结果", "表明", "、",
      "轻量级", "系统", "设计", "实测", "中文", "文本", "分词器"]
M64 = (1 << 64) - 1


class Rng:
    def __init__(self):
        self.s = 0x2545F4914F6CDD1D

    def next(self):
        s = self.s
        s ^= (s << 13) & M64
        s ^= s >> 7
        s ^= (s << 17) & M64
        self.s = s
        return s


def make_text(target):
    rng = Rng()
    out = bytearray()
    sentence = 0
    while len(out) < target:
        zh = rng.next() % 3 == 0
        words = 6 + rng.next() % 14
        for w in range(words):
            s = ZH[rng.next() % len(ZH)] if zh else EN[rng.next() % len(EN)]
            if not zh and w:
                out += b" "
            out += s.encode()
        out += ("。" if zh else ". ").encode()
        sentence += 1
        if sentence % 7 == 0:
            out += b"\n\n"
    return bytes(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--mb", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--paragraphs", type=int, default=0)
    a = ap.parse_args()
    raw = make_text(int(a.mb * 1000000))
    h = 1469598103934665603
    for b in raw:
        h = ((h ^ b) * 1099511628211) & M64
    text = raw.decode()
    if a.paragraphs:   # split after "\n\n" like bench_tokenizer --paragraphs 1
        pieces = [p + "\n\n" for p in text.split("\n\n")]
        pieces[-1] = pieces[-1][:-2]
        pieces = [p for p in pieces if p]
    else:
        pieces = [text]
    t0 = time.perf_counter()
    tok = Tokenizer.from_file(f"{a.model}/tokenizer.json")
    t_load = time.perf_counter() - t0
    times = []
    n = 0
    for _ in range(a.reps):
        t0 = time.perf_counter()
        n = sum(len(tok.encode(p, add_special_tokens=False).ids) for p in pieces)
        times.append(time.perf_counter() - t0)
    best = min(times)
    print(f"text: {len(raw)} bytes, fnv1a64 {h:016x}")
    mode = "per paragraph" if a.paragraphs else "one call"
    print(f"tokenizers {tokenizers.__version__} ({mode}): load {t_load:.3f} s, {n} tokens, best {best:.3f} s "
          f"({n / best:.0f} tokens/s, {len(raw) / best / 1e6:.1f} MB/s), "
          f"mean {sum(times) / len(times):.3f} s over {a.reps} reps")


if __name__ == "__main__":
    main()
