/*
 * test_tp.c: the host communicator and the tensor-parallel CPU backend.
 *
 *  - all_reduce_sum / all_gather with 3 rank threads against the expected
 *    sums (rank order), bit-identical on every rank, repeated back to back;
 *  - tp = 2 and 4 on synthesized GPTQ (group 32) and bf16 models of every
 *    architecture (KV heads split and replicated) match tp = 1 logits;
 *  - refused layouts: heads not divisible, a split that cuts a GPTQ group,
 *    act-order INT4 split by columns; each with a message naming it.
 */
#include "engine/backends.h"
#include "engine/comm.h"
#include "engine/model.h"
#include "engine/synth.h"
#include "engine/tp_shard.h"
#include "tests/engine/check.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NR 3
#define CNT 1001

static comm *comms[NR];
static float results[NR][CNT], gathered[NR][NR * 7];

static void *rank_main(void *arg)
{
    int r = (int)(intptr_t)arg;
    float *buf = results[r];
    for (int it = 0; it < 50; it++) {
        for (int i = 0; i < CNT; i++)
            buf[i] = (float)(r + 1) * 0.1f + (float)i * 1e-3f + (float)it;
        comm_all_reduce_sum(comms[r], buf, CNT, NULL);
    }
    float send[7];
    for (int i = 0; i < 7; i++)
        send[i] = (float)(r * 100 + i);
    comm_all_gather(comms[r], send, gathered[r], 7, NULL);
    return NULL;
}

static void test_comm(void)
{
    lm_err err = {0};
    CHECK(comm_host_create(NR, comms, &err) == 0);
    pthread_t th[NR];
    for (int r = 0; r < NR; r++)
        pthread_create(&th[r], NULL, rank_main, (void *)(intptr_t)r);
    for (int r = 0; r < NR; r++)
        pthread_join(th[r], NULL);
    for (int i = 0; i < CNT; i++) {
        float s = 0.f;
        for (int r = 0; r < NR; r++)
            s = r ? s + ((float)(r + 1) * 0.1f + (float)i * 1e-3f + 49.f)
                  : (0.1f + (float)i * 1e-3f + 49.f);
        for (int r = 0; r < NR; r++)
            CHECK(results[r][i] == s);
    }
    for (int r = 0; r < NR; r++)
        for (int k = 0; k < NR; k++)
            for (int i = 0; i < 7; i++)
                CHECK(gathered[r][k * 7 + i] == (float)(k * 100 + i));
    for (int r = 0; r < NR; r++)
        comm_destroy(comms[r]);
    CHECK_ERR(comm_host_create(0, comms, &err), err, -EINVAL, "0 ranks");
}

/* Logits of a 2-piece batch (prefill then one decode step) at a given tp. */
static int run(const model *m, int tp, float *out, lm_err *err)
{
    backend_options bo;
    backend_options_default(&bo);
    bo.tp = tp;
    bo.threads = 2;
    bo.max_tokens = 5; /* forces chunking too */
    backend *be = NULL;
    int rc = backend_open(m, &bo, &be, err);
    if (rc)
        return rc;
    rc = backend_kv_init(be, 4, 16, err);
    int32_t V = m->cfg.vocab;
    int32_t toks[9] = {3, 260, 7, 99, 1, 256, 300, 12, 44}, ss[3] = {0, 6, 9}, sp[2] = {0, 0};
    int32_t bt[2][8] = {{5, 2, 9, 0, 1, 3, 4, 6}, {7, 8, 10, 11, 12, 13, 14, 15}};
    int32_t rows[9] = {0, 1, 2, 3, 4, 5, 6, 7, 8};
    backend_batch b = {2, 9, toks, ss, sp, &bt[0][0], 8, 9, rows, out, NULL, NULL, 0, NULL};
    if (!rc)
        rc = backend_forward(be, &b, err);
    int32_t t2[2] = {17, 18}, ss2[3] = {0, 1, 2}, sp2[2] = {6, 3}, r2[2] = {0, 1};
    backend_batch d = {2, 2, t2, ss2, sp2, &bt[0][0], 8, 2, r2, out + 9 * (size_t)V, NULL, NULL, 0, NULL};
    if (!rc)
        rc = backend_forward(be, &d, err);
    if (!rc) {
        backend_info info;
        backend_get_info(be, &info);
        CHECK(info.tensor_parallel == tp && info.vocab == V);
    }
    backend_destroy(be);
    return rc;
}

static void test_tp_model(const char *arch, int gptq)
{
    synth_options o;
    synth_options_default(&o);
    o.arch = arch;
    o.gptq = gptq;
    o.group = 32; /* tp=4 gives 32-column expert shards: whole groups */
    char dir[64];
    snprintf(dir, sizeof dir, "/tmp/lm_tp_XXXXXX");
    if (!mkdtemp(dir))
        return;
    lm_err err = {0};
    model *m = NULL;
    CHECK(synth_write(dir, &o, &err) == 0 && model_load(dir, NULL, &m, &err) == 0);
    if (!m)
        return;
    size_t n = 11 * (size_t)m->cfg.vocab;
    float *ref = malloc(n * sizeof(float)), *got = malloc(n * sizeof(float));
    CHECK(run(m, 1, ref, &err) == 0);
    for (int tp = 2; tp <= 4; tp *= 2) {
        int rc = run(m, tp, got, &err);
        if (rc)
            fprintf(stderr, "%s tp=%d: %s\n", arch, tp, err.msg);
        CHECK(rc == 0);
        double mx = 0, rmax = 0;
        for (size_t i = 0; i < n; i++) {
            mx = fabs(got[i] - ref[i]) > mx ? fabs(got[i] - ref[i]) : mx;
            rmax = fabs(ref[i]) > rmax ? fabs(ref[i]) : rmax;
        }
        if (!(mx <= 1e-5 * rmax + 1e-5))
            fprintf(stderr, "%s%s tp=%d: max |delta| %g (max |logit| %g)\n", arch,
                    gptq ? " gptq" : "", tp, mx, rmax);
        CHECK(mx <= 1e-5 * rmax + 1e-5);
    }
    CHECK_ERR(run(m, 3, got, &err), err, -EINVAL, "4 attention heads do not divide evenly");
    free(ref);
    free(got);
    model_free(m);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    CHECK(system(cmd) == 0);
}

static void test_refusals(void)
{
    synth_options o;
    synth_options_default(&o);
    o.arch = "qwen2_moe";
    o.gptq = 1;
    o.group = 128; /* expert width 128: tp=2 would make 64-column shards */
    char dir[64];
    snprintf(dir, sizeof dir, "/tmp/lm_tp_XXXXXX");
    if (!mkdtemp(dir))
        return;
    lm_err err = {0};
    model *m = NULL;
    float *out = NULL;
    CHECK(synth_write(dir, &o, &err) == 0 && model_load(dir, NULL, &m, &err) == 0);
    if (m) {
        out = malloc(11 * sizeof(float) * (size_t)m->cfg.vocab);
        CHECK_ERR(run(m, 2, out, &err), err, -EINVAL, "would cut a GPTQ group of 128");
        model_free(m);
        m = NULL;
    }
    o.group = 64;
    o.act_order = 1;
    CHECK(synth_write(dir, &o, &err) == 0 && model_load(dir, NULL, &m, &err) == 0);
    if (m) {
        CHECK_ERR(run(m, 2, out, &err), err, -EINVAL, "act-order");
        model_free(m);
    }
    free(out);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    CHECK(system(cmd) == 0);
}

/* The shared sharding helpers the CUDA backend uses too (tp_shard.h). */
static void test_shard_helpers(void)
{
    lm_err err = {0};
    int shared = -1;
    int ok[3] = {0, 1, 2}, rep[4] = {0, 0, 1, 1}, bad[2] = {0, 2}, neg[1] = {-1};
    CHECK(tp_devices_check(ok, 3, 3, &shared, &err) == 0 && shared == 0);
    CHECK(tp_devices_check(rep, 4, 2, &shared, &err) == 0 && shared == 1);
    CHECK_ERR(tp_devices_check(bad, 2, 2, &shared, &err), err, -EINVAL,
              "rank 1 asks for device 2, but only devices 0..1 are visible");
    CHECK_ERR(tp_devices_check(neg, 1, 2, &shared, &err), err, -EINVAL, "device -1");
    CHECK_ERR(tp_devices_check(ok, 1, 0, &shared, &err), err, -ENODEV, "no CUDA device");
    CHECK(tp_vocab_stride(384, 4) == 96 && tp_vocab_stride(385, 4) == 97 &&
          tp_vocab_stride(7, 1) == 7);
    model_config c;
    memset(&c, 0, sizeof c);
    c.n_layers = 2;
    c.layer_moe[0] = c.layer_moe[1] = 1;
    c.n_heads = 8;
    c.n_kv_heads = 2;
    c.moe_intermediate = 64;
    c.shared_intermediate = 128;
    c.intermediate = 6; /* no dense layer: not checked */
    CHECK(tp_layout_check(&c, 8, &err) == 0); /* 2 KV heads replicated over 8 ranks */
    CHECK_ERR(tp_layout_check(&c, 3, &err), err, -EINVAL, "8 attention heads");
    c.n_kv_heads = 3;
    c.n_heads = 12;
    CHECK_ERR(tp_layout_check(&c, 4, &err), err, -EINVAL, "3 KV heads neither split");
    c.n_kv_heads = 4;
    c.moe_intermediate = 66;
    CHECK_ERR(tp_layout_check(&c, 4, &err), err, -EINVAL, "moe_intermediate_size 66");
    c.layer_moe[1] = 0;
    c.moe_intermediate = 64;
    CHECK_ERR(tp_layout_check(&c, 4, &err), err, -EINVAL, "intermediate_size 6");
}

int main(void)
{
    test_shard_helpers();
    test_comm();
    test_tp_model("qwen2_moe", 1);
    test_tp_model("qwen2_moe", 0);
    test_tp_model("qwen3_moe", 1);
    test_tp_model("mixtral", 0);
    test_refusals();
    CHECK_DONE();
}
