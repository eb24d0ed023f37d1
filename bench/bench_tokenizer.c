/*
 * bench_tokenizer.c: encoding speed of engine/tokenizer.h on 1 MB of mixed
 * English / Chinese text, tokens per second.
 *
 *   bench_tokenizer MODEL_DIR [--mb N] [--reps R] [--paragraphs 1] [--write FILE]
 *
 * The text is generated deterministically (xorshift64 over fixed word and
 * phrase lists; bench/tokenizer_peer.py generates the same bytes and
 * measures the Hugging Face `tokenizers` library on them: both print the
 * FNV-1a hash of the text and the token count, which must agree). Each
 * repetition encodes the whole text in one call, like tokenizer.encode()
 * of one string in Python; with --paragraphs 1 it encodes each paragraph
 * (split after "\n\n", about 1 KB: prompt-sized) with its own call.
 * Speed is reported, never asserted.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "engine/tokenizer.h"

static const char *EN[] = {
    "the", "model", "routes", "each", "token", "to", "two", "of", "eight", "experts", "and",
    "weights", "are", "stored", "in", "4-bit", "groups", "with", "fp16", "scales", "while",
    "attention", "uses", "a", "paged", "KV", "cache", "that", "grows", "by", "blocks", "of",
    "16", "tokens", "The", "scheduler", "batches", "requests", "continuously", "so", "latency",
    "stays", "low", "even", "under", "load", "It's", "we'll", "don't", "GPU", "memory", "is",
    "limited", "but", "throughput", "matters", "more", "than", "anything", "else", "here",
    "for", "serving", "3.14159", "2024", "x**2", "f(x)", "def", "return", "None", "self",
    "quantization", "calibration", "perplexity", "benchmark", "daemon", "gRPC", "stream"};
static const char *ZH[] = {
    "混合专家", "模型", "在", "推理", "时", "只", "激活", "一部分", "参数", "，", "因此",
    "显存", "占用", "更", "低", "。", "量化", "到", "四", "位", "之后", "精度", "损失",
    "很小", "部署", "成本", "大幅", "下降", "我们", "使用", "连续", "批处理", "调度器",
    "提高", "吞吐量", "本地化", "服务", "的", "性能", "测试", "结果", "表明", "、",
    "轻量级", "系统", "设计", "实测", "中文", "文本", "分词器"};

static uint64_t rng = 0x2545F4914F6CDD1Dull;
static uint64_t next(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

/* Sentences alternate between English and Chinese; paragraphs end in "\n\n". */
static char *make_text(size_t target, size_t *ret_len)
{
    size_t cap = target + 4096, len = 0;
    char *t = malloc(cap);
    if (!t)
        return NULL;
    size_t n_en = sizeof(EN) / sizeof(EN[0]), n_zh = sizeof(ZH) / sizeof(ZH[0]);
    int sentence = 0;
    while (len < target) {
        int zh = (int)(next() % 3) == 0;   /* one sentence in three is Chinese */
        int words = 6 + (int)(next() % 14);
        for (int w = 0; w < words; w++) {
            const char *s = zh ? ZH[next() % n_zh] : EN[next() % n_en];
            if (!zh && w)
                t[len++] = ' ';
            size_t l = strlen(s);
            memcpy(t + len, s, l);
            len += l;
        }
        const char *end = zh ? "。" : ". ";
        memcpy(t + len, end, strlen(end));
        len += strlen(end);
        if (++sentence % 7 == 0) {
            memcpy(t + len, "\n\n", 2);
            len += 2;
        }
    }
    *ret_len = len;
    return t;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: bench_tokenizer MODEL_DIR [--mb N] [--reps R] [--write FILE]\n");
        return 2;
    }
    double mb = 1.0;
    int reps = 5;
    const char *write = NULL;
    int paragraphs = 0;
    for (int i = 2; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--mb"))
            mb = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--reps"))
            reps = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--paragraphs"))
            paragraphs = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--write"))
            write = argv[i + 1];
    }
    size_t len = 0;
    char *text = make_text((size_t)(mb * 1000000), &len);
    if (!text)
        return 1;
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < len; i++)
        h = (h ^ (unsigned char)text[i]) * 1099511628211ull;
    if (write) {
        FILE *f = fopen(write, "wb");
        if (!f || fwrite(text, 1, len, f) != len) {
            fprintf(stderr, "cannot write %s\n", write);
            return 1;
        }
        fclose(f);
    }
    lm_err err = {0};
    tokenizer *tok = NULL;
    double t0 = now();
    if (tokenizer_load(argv[1], &tok, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    double t_load = now() - t0;
    double best = 1e30, total = 0;
    size_t n = 0;
    for (int r = 0; r < reps; r++) {
        t0 = now();
        n = 0;
        for (size_t off = 0; off < len;) {
            size_t end = len;
            if (paragraphs) {
                const char *p = strstr(text + off, "\n\n");
                end = p ? (size_t)(p - text) + 2 : len;
            }
            int32_t *ids = NULL;
            size_t k = 0;
            if (tokenizer_encode(tok, text + off, end - off, false, &ids, &k, &err)) {
                fprintf(stderr, "%s\n", err.msg);
                return 1;
            }
            free(ids);
            n += k;
            off = end;
        }
        double dt = now() - t0;
        total += dt;
        if (dt < best)
            best = dt;
    }
    printf("text: %zu bytes, fnv1a64 %016llx\n", len, (unsigned long long)h);
    printf("lightmoe tokenizer (%s): load %.3f s, %zu tokens, best %.3f s (%.0f tokens/s, %.1f MB/s), "
           "mean %.3f s over %d reps\n",
           paragraphs ? "per paragraph" : "one call", t_load, n, best, (double)n / best, (double)len / best / 1e6, total / reps, reps);
    tokenizer_free(tok);
    free(text);
    return 0;
}
