/*
 * test_cuda_tp.cu: the tensor-parallel CUDA backend (backend_cuda.h) on
 * whatever GPUs the machine has (one is enough: ranks share it through the
 * host communicator, devices = 0,0).
 *
 *  - synthesized models (qwen2_moe and qwen3_moe GPTQ group 32, mixtral
 *    bf16 with one KV head, so KV heads are split and replicated): a
 *    two-piece prefill then six two-piece decode steps (the decode steps
 *    are captured in CUDA graphs where allowed) at tp = 2 and 4 on one GPU
 *    (host communicator) and at tp = 1 through NCCL (collectives inside the
 *    graphs); every logit row within the tolerance `lightmoe verify` uses
 *    for CUDA (row L2 1e-2) of the CPU backend, like the plain CUDA backend,
 *    and argmax equal wherever the CPU's top-1 margin is clear;
 *  - refusals with their messages: a default devices list asking for more
 *    GPUs than visible, a device id that does not exist, NCCL with two ranks
 *    on one GPU, a split that cuts a GPTQ group.
 * Without a GPU it prints why and exits 77 (ctest SKIP).
 */
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern "C" { /* C headers without C++ guards (before backend_cuda.h includes one) */
#include "engine/backends.h"
#include "engine/model.h"
#include "engine/synth.h"
}
#include "engine/backend_cuda.h"
#include "engine/cuda_model.h"
#include "tests/check_msg.h"

static int last_graphs; /* graphs the last open_run's rank 0 captured */

enum { STEPS = 7, ROWS = 9 + 2 * (STEPS - 1) };

/* Logits of every row: prefill of two pieces (6 and 3 tokens), then
 * STEPS - 1 decode steps of one token per piece. */
static int run(backend *be, int32_t V, float *out, lm_err *err)
{
    int rc = backend_kv_init(be, 4, 16, err);
    int32_t toks[9] = {3, 260, 7, 99, 1, 256, 300, 12, 44}, ss[3] = {0, 6, 9}, sp[2] = {0, 0};
    int32_t bt[2][8] = {{5, 2, 9, 0, 1, 3, 4, 6}, {7, 8, 10, 11, 12, 13, 14, 15}};
    int32_t rows[9] = {0, 1, 2, 3, 4, 5, 6, 7, 8};
    backend_batch b = {2, 9, toks, ss, sp, &bt[0][0], 8, 9, rows, out};
    if (!rc)
        rc = backend_forward(be, &b, err);
    for (int s = 1; !rc && s < STEPS; s++) {
        int32_t t2[2] = {17 + s, 40 + 3 * s}, ss2[3] = {0, 1, 2}, sp2[2] = {5 + s, 2 + s};
        int32_t r2[2] = {0, 1};
        backend_batch d = {2, 2, t2, ss2, sp2, &bt[0][0], 8, 2, r2,
                           out + (size_t)(9 + 2 * (s - 1)) * V};
        rc = backend_forward(be, &d, err);
    }
    return rc;
}

static int open_run(const model *m, const char *dev, int tp, const int *devices, int comm_kind,
                    float *out, char *name, lm_err *err)
{
    backend_options bo;
    backend_options_default(&bo);
    bo.device = dev;
    bo.tp = tp;
    bo.devices = devices;
    bo.max_tokens = 16;
    bo.threads = 2;
    backend *be = NULL;
    int rc = comm_kind >= 0 ? backend_cuda_tp_create(m, &bo, comm_kind, &be, err)
                            : backend_open(m, &bo, &be, err);
    if (rc)
        return rc;
    backend_info info;
    backend_get_info(be, &info);
    snprintf(name, 64, "%s", info.name);
    CHECK(info.tensor_parallel == tp && info.vocab == m->cfg.vocab, "%s: info tp %d vocab %d",
          name, info.tensor_parallel, info.vocab);
    rc = run(be, m->cfg.vocab, out, err);
    /* decode steps replayed from CUDA graphs (rank 0): with NCCL the
     * collectives are captured too; the host communicator allows none */
    const int is_cuda = !strcmp(dev, "cuda");
    const int ng = last_graphs = is_cuda ? cu_state_graph_count(backend_cuda_state(be)) : 0;
    if (is_cuda)
        printf("  %-44s decode graphs captured: %d\n", name, ng);
    if (strstr(name, "host-comm"))
        CHECK(ng == 0, "%s: %d graphs with the host communicator", name, ng);
    fflush(stdout); /* a crash in the next case keeps what passed */
    backend_destroy(be);
    return rc;
}

/* Worst row L2 error relative to ref, and top-1 disagreements where the
 * reference margin exceeds twice the row's max |delta|. */
static void compare(const char *what, const float *got, const float *ref, int32_t V,
                    double *ret_rel)
{
    double worst = 0;
    int bad = 0;
    for (int r = 0; r < ROWS; r++) {
        const float *g = got + (size_t)r * V, *f = ref + (size_t)r * V;
        double d2 = 0, f2 = 0, mx = 0;
        int ag = 0, af = 0;
        for (int32_t i = 0; i < V; i++) {
            double d = (double)g[i] - f[i];
            d2 += d * d;
            f2 += (double)f[i] * f[i];
            mx = fabs(d) > mx ? fabs(d) : mx;
            ag = g[i] > g[ag] ? i : ag;
            af = f[i] > f[af] ? i : af;
        }
        float second = -INFINITY;
        for (int32_t i = 0; i < V; i++)
            if (i != af && f[i] > second)
                second = f[i];
        double rel = sqrt(d2 / (f2 > 0 ? f2 : 1));
        worst = rel > worst ? rel : worst;
        if (ag != af && f[af] - second > 2 * mx)
            bad++;
    }
    printf("  %-44s row rel-L2 <= %.2e, top-1 disagreements %d\n", what, worst, bad);
    CHECK(worst <= 1e-2 && bad == 0, "%s: row rel-L2 %g, %d top-1 disagreements", what, worst,
          bad);
    *ret_rel = worst;
}

static void test_model(const char *arch, int gptq, int have_nccl)
{
    synth_options o;
    synth_options_default(&o);
    o.arch = arch;
    o.gptq = gptq;
    o.group = 32; /* tp = 4 gives 32-column expert shards: whole groups */
    char dir[64];
    snprintf(dir, sizeof dir, "/tmp/lm_cutp_XXXXXX");
    if (!mkdtemp(dir)) {
        CHECK(0, "mkdtemp");
        return;
    }
    lm_err err = {0, ""};
    model *m = NULL;
    int rc = synth_write(dir, &o, &err);
    if (!rc)
        rc = model_load(dir, NULL, &m, &err);
    CHECK(rc == 0, "%s: %s", arch, err.msg);
    if (!m)
        return;
    const int32_t V = m->cfg.vocab;
    const size_t n = (size_t)ROWS * V;
    float *ref = (float *)calloc(n, 4), *c1 = (float *)calloc(n, 4), *got = (float *)calloc(n, 4);
    char name[64];
    printf("%s%s (heads %d, KV heads %d):\n", arch, gptq ? " gptq g32" : " bf16", m->cfg.n_heads,
           m->cfg.n_kv_heads);
    double rel1 = 0, rel = 0;
    CHECK(open_run(m, "cpu", 1, NULL, -1, ref, name, &err) == 0, "cpu: %s", err.msg);
    rc = open_run(m, "cuda", 1, NULL, -1, c1, name, &err);
    CHECK(rc == 0, "cuda: %s", err.msg);
    if (!rc)
        compare("cuda (tp 1, no communicator) vs cpu", c1, ref, V, &rel1);
    const int zeros[4] = {0, 0, 0, 0};
    for (int tp = 2; tp <= 4; tp *= 2) {
        memset(got, 0, n * 4);
        rc = open_run(m, "cuda", tp, zeros, -1, got, name, &err);
        CHECK(rc == 0, "tp %d: %s", tp, err.msg);
        if (rc)
            continue;
        char what[128];
        snprintf(what, sizeof what, "%s vs cpu", name);
        compare(what, got, ref, V, &rel);
        CHECK(strstr(name, "host-comm") != NULL, "tp %d on one GPU named '%s'", tp, name);
    }
    if (have_nccl) {
        memset(got, 0, n * 4);
        rc = open_run(m, "cuda", 1, NULL, CUDA_TP_COMM_NCCL, got, name, &err);
        CHECK(rc == 0, "nccl tp 1: %s", err.msg);
        /* INT4 experts: decode steps need no host round trip, so with NCCL
         * (all-reduces captured) they run as graphs */
        CHECK(rc || !gptq || last_graphs > 0, "nccl tp 1: no decode graph captured");
        if (!rc) {
            char what[128];
            snprintf(what, sizeof what, "%s vs cpu", name);
            compare(what, got, ref, V, &rel);
            /* one rank: the collectives add nothing; only the unfused final
             * norm of each layer may round differently from the plain backend */
            double mx = 0;
            for (size_t i = 0; i < n; i++)
                mx = fabs((double)got[i] - c1[i]) > mx ? fabs((double)got[i] - c1[i]) : mx;
            printf("  nccl tp 1 vs plain CUDA backend: max |delta| %.3g\n", mx);
        }
    }
    free(ref);
    free(c1);
    free(got);
    model_free(m);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    CHECK(system(cmd) == 0, "rm");
}

static void test_refusals(int visible, int have_nccl)
{
    synth_options o;
    synth_options_default(&o);
    o.gptq = 1;
    o.group = 128; /* expert width 128: tp = 2 would make 64-column shards */
    char dir[64];
    snprintf(dir, sizeof dir, "/tmp/lm_cutp_XXXXXX");
    if (!mkdtemp(dir))
        return;
    lm_err err = {0, ""};
    model *m = NULL;
    CHECK(synth_write(dir, &o, &err) == 0 && model_load(dir, NULL, &m, &err) == 0, "%s", err.msg);
    if (!m)
        return;
    float *out = (float *)calloc((size_t)ROWS * m->cfg.vocab, 4);
    char name[64];
    const int zz[2] = {0, 0}, bad[2] = {0, 99};
#define REFUSED(call, code, needle) \
    do { \
        err.msg[0] = 0; \
        int rc_ = (call); \
        printf("  refused (%d): %s\n", rc_, err.msg); \
        CHECK(rc_ == (code) && strstr(err.msg, needle), "expected %d '%s', got %d '%s'", code, \
              needle, rc_, err.msg); \
    } while (0)
    printf("refusals:\n");
    REFUSED(open_run(m, "cuda", 2, zz, -1, out, name, &err), -EINVAL,
            "would cut a GPTQ group of 128");
    REFUSED(open_run(m, "cuda", 2, bad, -1, out, name, &err), -EINVAL,
            "rank 1 asks for device 99");
    if (visible == 1)
        REFUSED(open_run(m, "cuda", 2, NULL, -1, out, name, &err), -EINVAL, "devices = 0,0");
    model_free(m);
    m = NULL;
    o.group = 32; /* a layout that splits: the communicator is what fails */
    CHECK(synth_write(dir, &o, &err) == 0 && model_load(dir, NULL, &m, &err) == 0, "%s", err.msg);
    /* NCCL takes one GPU per rank: with one GPU visible it says so, with
     * more it refuses the device given to two ranks */
    if (have_nccl && m)
        REFUSED(open_run(m, "cuda", 2, zz, CUDA_TP_COMM_NCCL, out, name, &err), -EINVAL,
                visible == 1 ? "2 ranks but 1 CUDA device visible" : "given to ranks 0 and 1");
    free(out);
    model_free(m);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    CHECK(system(cmd) == 0, "rm");
}

int main(void)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
        printf("SKIP: no CUDA device (%s); GPU tests run on the GPU machine\n",
               e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
        return 77;
    }
#ifdef LIGHTMOE_HAVE_NCCL
    const int have_nccl = 1;
#else
    const int have_nccl = 0;
    printf("built without NCCL: the NCCL cases are skipped\n");
#endif
    test_model("qwen2_moe", 1, have_nccl);
    test_model("qwen3_moe", 1, have_nccl);
    test_model("mixtral", 0, have_nccl);
    test_refusals(n, have_nccl);
    printf("%s\n", failures ? "FAILED" : "all passed");
    return failures;
}
