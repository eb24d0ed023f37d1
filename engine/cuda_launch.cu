/*
 * cuda_launch.cu: the process-wide switch of programmatic dependent launch
 * (see cu_launch in cuda_common.cuh).
 *
 * Why process-wide: every launcher of the engine's kernels would otherwise
 * need a state argument. The device check and LIGHTMOE_CUDA_PDL are read
 * once; cu_pdl_allow narrows that for the calling thread (the engine
 * thread of a state: off for a portable state and for steps of more than
 * cu_pdl_max_tokens tokens, where it measured slower on the H100, see
 * docs/PERF.md). Threads: the probe is a relaxed atomic, the allow flag is
 * per thread.
 */
#include <stdlib.h>

#include "engine/cuda_common.cuh"

static int g_probe = -1;     /* -1 unknown, else device sm_90+ and not disabled by env */
static int g_max_tokens = 4; /* LIGHTMOE_CUDA_PDL=N: steps of at most N tokens */
static __thread int g_allow = 1;

extern "C" int cu_pdl_enabled(void)
{
    int p = __atomic_load_n(&g_probe, __ATOMIC_RELAXED);
    if (p < 0) {
        int dev = 0, major = 0;
        const char *e = getenv("LIGHTMOE_CUDA_PDL");
        if (e && e[0] >= '1' && e[0] <= '9')
            __atomic_store_n(&g_max_tokens, atoi(e), __ATOMIC_RELAXED);
        p = 0;
        if (!(e && e[0] == '0') && cudaGetDevice(&dev) == cudaSuccess &&
            cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess)
            p = major >= 9;
        __atomic_store_n(&g_probe, p, __ATOMIC_RELAXED);
    }
    return p && g_allow;
}

extern "C" void cu_pdl_allow(int on)
{
    g_allow = on ? 1 : 0;
}

/* on: the setting unless the variable starts with '0' (on by default) or
 * '1' (off by default) */
static int env_switch(int *slot, const char *name, int def)
{
    int v = __atomic_load_n(slot, __ATOMIC_RELAXED);
    if (v < 0) {
        const char *e = getenv(name);
        v = e && e[0] == (def ? '0' : '1') ? !def : def;
        __atomic_store_n(slot, v, __ATOMIC_RELAXED);
    }
    return v;
}

static int env_switch_set(int *slot, const char *name, int def, int on)
{
    const int was = env_switch(slot, name, def);
    __atomic_store_n(slot, on ? 1 : 0, __ATOMIC_RELAXED);
    return was;
}

extern "C" int cu_env_switch(int *slot, const char *name)
{
    return env_switch(slot, name, 1);
}

extern "C" int cu_env_switch_set(int *slot, const char *name, int on)
{
    return env_switch_set(slot, name, 1, on);
}

extern "C" int cu_env_switch_off(int *slot, const char *name)
{
    return env_switch(slot, name, 0);
}

extern "C" int cu_env_switch_off_set(int *slot, const char *name, int on)
{
    return env_switch_set(slot, name, 0, on);
}

/* LIGHTMOE_CUDA_EARLY=0 turns the loads before the dependency wait off
 * (see cu_early_loads in cuda_common.cuh). */
static int g_early = -1;

extern "C" int cu_early_loads(void)
{
    return cu_env_switch(&g_early, "LIGHTMOE_CUDA_EARLY");
}

extern "C" int cu_set_early_loads(int on)
{
    return cu_env_switch_set(&g_early, "LIGHTMOE_CUDA_EARLY", on);
}

extern "C" int cu_pdl_max_tokens(void)
{
    cu_pdl_enabled(); /* reads the environment once */
    return __atomic_load_n(&g_max_tokens, __ATOMIC_RELAXED);
}

/* The kernel timeline (cu_trace_begin / cu_trace_end, cuda_common.cuh). */
#ifdef LIGHTMOE_CUDA_TRACE
#include <errno.h>

#define TRACE_UNITS 32 /* translation units with kernels */
static void (*g_trace_set[TRACE_UNITS])(cu_trace_rec *);
static int g_trace_n;
static cu_trace_rec *g_trace_buf;
static const size_t g_trace_len = (size_t)CU_TRACE_LAUNCHES * CU_TRACE_BLOCKS;

extern "C" void cu_trace_register(void (*set)(cu_trace_rec *))
{
    if (g_trace_n < TRACE_UNITS) g_trace_set[g_trace_n++] = set;
}

extern "C" int cu_trace_begin(lm_err *err)
{
    if (!g_trace_buf)
        CUDA_TRY(err, cudaMalloc(&g_trace_buf, g_trace_len * sizeof *g_trace_buf));
    CUDA_TRY(err, cudaMemset(g_trace_buf, 0, g_trace_len * sizeof *g_trace_buf));
    for (int i = 0; i < g_trace_n; i++)
        g_trace_set[i](g_trace_buf);
    CUDA_TRY(err, cudaDeviceSynchronize());
    return 0;
}

extern "C" int cu_trace_end(cu_trace_rec **recs, size_t *n, lm_err *err)
{
    *recs = NULL;
    *n = 0;
    if (!g_trace_buf) return lm_err_set(err, -EINVAL, "cu_trace_end: no cu_trace_begin before");
    CUDA_TRY(err, cudaDeviceSynchronize());
    for (int i = 0; i < g_trace_n; i++)
        g_trace_set[i](NULL);
    cu_trace_rec *h = (cu_trace_rec *)malloc(g_trace_len * sizeof *h);
    if (!h) return lm_err_set(err, -ENOMEM, "cu_trace_end: no memory for the copy");
    cudaError_t e = cudaMemcpy(h, g_trace_buf, g_trace_len * sizeof *h, cudaMemcpyDeviceToHost);
    if (e != cudaSuccess) {
        free(h);
        return cuda_err(err, e, "cu_trace_end: copy");
    }
    size_t k = 0;
    for (size_t i = 0; i < g_trace_len; i++)
        if (h[i].t1) h[k++] = h[i];
    *recs = h;
    *n = k;
    return 0;
}
#else
#include <errno.h>
extern "C" int cu_trace_begin(lm_err *err)
{
    return lm_err_set(err, -ENOTSUP, "the kernel timeline needs a build with -DLIGHTMOE_CUDA_TRACE=ON");
}
extern "C" int cu_trace_end(cu_trace_rec **recs, size_t *n, lm_err *err)
{
    *recs = NULL;
    *n = 0;
    return lm_err_set(err, -ENOTSUP, "the kernel timeline needs a build with -DLIGHTMOE_CUDA_TRACE=ON");
}
#endif
