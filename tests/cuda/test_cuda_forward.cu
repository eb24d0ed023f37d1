/*
 * test_cuda_forward.cu: the whole forward pass on synthetic models (batched ==
 * unbatched, the INT4 paths agree) and the one-token persistent kernel
 * against the ordinary kernels (part of test_cuda_kernels: `forward`, `mega`).
 */
#include "tests/cuda/cuda_test_util.cuh"

/* ---- whole forward: batched == unbatched, paths agree ---------------------------------- */

void test_forward()
{
    for (int int4 = 0; int4 <= 1; int4++) {
        cu_synth_config c = {"tiny", 2, 256, 4, 2, 64, 512, 512, 8, 2, 0, 160, 384, 32, 1, 1, int4, 10000.f};
        cu_model *m;
        OK(cu_synth_create(&c, 7, &m, ERRP));
        const int bs = 16, max_blocks = 8;
        const vector<vector<int>> prompts = {{5, 9, 200, 3, 3}, vector<int>(17, 11), vector<int>(64, 0)};
        vector<vector<int>> pr = prompts;
        for (auto &p : pr)
            for (size_t i = 0; i < p.size(); i++)
                p[i] = (p[i] + 31 * (int)i) % 512;
        vector<vector<float>> alone[4], batched[4];
        for (int path = 0; path <= 3; path++) {
            cu_options o = {256, 0, path, 0, path == 0}; /* auto path: decode graphs on */
            cu_state *s;
            OK(cu_state_create(m, &o, &s, ERRP));
            OK(cu_state_kv_init(s, bs, 64, ERRP));
            /* each alone (blocks 0.., 8.., 16..), then all together (blocks 32.., 40.., 48..) */
            for (int q = 0; q < 3; q++)
                alone[path].push_back(run_seqs(s, m, {pr[q]}, {0}, {q * 8}, max_blocks));
            vector<float> all = run_seqs(s, m, pr, {0, 0, 0}, {32, 40, 48}, max_blocks);
            size_t off = 0;
            for (int q = 0; q < 3; q++) {
                const size_t n = pr[q].size() * (size_t)m->vocab;
                batched[path].push_back(vector<float>(all.begin() + off, all.begin() + off + n));
                off += n;
            }
            /* one decode step: alone vs together */
            for (int q = 0; q < 3; q++)
                alone[path].push_back(run_seqs(s, m, {{q + 1}}, {(int)pr[q].size()}, {q * 8}, max_blocks));
            all = run_seqs(s, m, {{1}, {2}, {3}}, {(int)pr[0].size(), (int)pr[1].size(), (int)pr[2].size()},
                           {32, 40, 48}, max_blocks);
            for (int q = 0; q < 3; q++)
                batched[path].push_back(vector<float>(all.begin() + q * m->vocab, all.begin() + (q + 1) * m->vocab));
            /* the same decode step again: a graph replay (auto path) must give the same */
            for (int rep = 0; rep < 2; rep++) {
                vector<float> again = run_seqs(s, m, {{1}, {2}, {3}},
                                               {(int)pr[0].size(), (int)pr[1].size(), (int)pr[2].size()},
                                               {32, 40, 48}, max_blocks);
                vector<double> r0(all.begin(), all.end());
                char what[128];
                snprintf(what, sizeof what, "forward %s %s decode step replayed (%s)",
                         int4 ? "int4" : "fp16",
                         path == 0 ? "auto" : path == 1 ? "gemv" : path == 2 ? "mma" : "dequant",
                         path == 0 && int4 ? "graph" : "eager");
                /* split-K atomics may reorder fp32 sums: last-bit differences only */
                compare(what, again.data(), r0.data(), 3, m->vocab, 1e-5);
            }
            cu_state_destroy(s);
        }
        const char *pn[] = {"auto", "gemv", "mma", "dequant"};
        for (int path = 0; path <= 3; path++)
            for (size_t i = 0; i < alone[path].size(); i++) {
                vector<double> ref(alone[path][i].begin(), alone[path][i].end());
                const int rows = (int)(ref.size() / m->vocab);
                char what[128];
                snprintf(what, sizeof what, "forward %s %s batched==alone piece %zu (%d rows)",
                         int4 ? "int4" : "fp16", pn[path], i, rows);
                compare(what, batched[path][i].data(), ref.data(), rows, m->vocab, 1e-2);
                if (path > 0) {
                    vector<double> r0(alone[0][i].begin(), alone[0][i].end());
                    snprintf(what, sizeof what, "forward %s path %s == auto piece %zu", int4 ? "int4" : "fp16",
                             pn[path], i);
                    compare(what, alone[path][i].data(), r0.data(), rows, m->vocab, 1e-2);
                }
            }
        cu_synth_free(m);
    }
}

/* ---- one-token steps as one kernel (cuda_mega.cuh) == the ordinary kernels --------------- */

/* A prompt of `prompt` tokens (prefill, the ordinary kernels in both), then
 * `steps` one-token steps through the persistent kernel (units: its cap of
 * attention units per KV head, 0 none) and through the ordinary kernels:
 * logits within 1e-2 of each other at every step. grid > 0: a grid larger
 * than the card holds; the first step must fail with a clear error and the
 * later ones fall back to the ordinary kernels. */
static void run_mega(const cu_synth_config &c, int prompt, int steps, int units, int grid)
{
    cu_model *m;
    OK(cu_synth_create(&c, 11, &m, ERRP));
    const int bs = 16, max_blocks = (c.max_ctx + bs - 1) / bs;
    cu_state *s[2];
    for (int on = 0; on <= 1; on++) {
        const int was = cu_mega_set(on);
        cu_mega_set_test(units, grid);
        cu_options o = {512, 0, 0, 0, 1};
        OK(cu_state_create(m, &o, &s[on], ERRP));
        OK(cu_state_kv_init(s[on], bs, max_blocks + 1, ERRP));
        cu_mega_set(was);
        cu_mega_set_test(0, 0);
    }
    const char *why = "";
    char what[160];
    snprintf(what, sizeof what, "mega %s: kernel on (and off in the reference state)", c.name);
    const bool on = cu_state_mega(s[1], &why), off = !cu_state_mega(s[0], NULL);
    printf("%-4s %s%s%s\n", on && off ? "ok" : "FAIL", what, on ? "" : ": ", on ? "" : why);
    if (!(on && off))
        g_fail = 1;
    vector<int> toks(prompt);
    for (int i = 0; i < prompt; i++)
        toks[i] = (7 + 13 * i) % c.vocab;
    for (int k = 0; k < 2 && on; k++)
        for (int p0 = 0; p0 < prompt; p0 += 256) {
            const int n = prompt - p0 < 256 ? prompt - p0 : 256;
            run_seqs(s[k], m, {vector<int>(toks.begin() + p0, toks.begin() + p0 + n)}, {p0}, {0},
                     max_blocks);
        }
    for (int j = 0; j < steps && on; j++) {
        const int pos = prompt + j, tok = (3 + 5 * j) % c.vocab;
        vector<float> ref, got;
        OK(try_seqs(s[0], m, {{tok}}, {pos}, {0}, max_blocks, ref, ERRP));
        lm_err e2 = {0, ""};
        const int rc = try_seqs(s[1], m, {{tok}}, {pos}, {0}, max_blocks, got, &e2);
        if (grid > 0 && j == 0) {
            /* the barriers time out: the step fails with a message, nothing hangs */
            const bool good = rc == -EIO && strstr(e2.msg, "grid barrier") &&
                              !cu_state_mega(s[1], NULL);
            snprintf(what, sizeof what, "mega %s: a grid of %d blocks fails the step", c.name, grid);
            printf("%-4s %s (%d: %s)\n", good ? "ok" : "FAIL", what, rc, e2.msg);
            if (!good)
                g_fail = 1;
            /* the failed step wrote this position's K/V halfway: write it again */
            OK(try_seqs(s[1], m, {{tok}}, {pos}, {0}, max_blocks, got, ERRP));
        } else if (rc) {
            printf("FAIL mega %s step at %d: %s\n", c.name, pos, e2.msg);
            g_fail = 1;
            break;
        }
        vector<double> r(ref.begin(), ref.end());
        snprintf(what, sizeof what, "mega %s one-token step at position %d%s", c.name, pos,
                 grid > 0 ? " (fallen back)" : "");
        compare(what, got.data(), r.data(), 1, m->vocab, 1e-2);
    }
    cu_state_destroy(s[0]);
    cu_state_destroy(s[1]);
    cu_synth_free(m);
}

void test_mega()
{
    int sms = 0, dev = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    const cu_synth_config &q2 = g_q2, &q3 = g_q3, &mx = g_mx;
    run_mega(q2, 0, 3, 0, 0);    /* from position 0: one step a unit, no merge */
    run_mega(q2, 300, 3, 0, 0);  /* 10 units a KV head, merged by the last */
    run_mega(q3, 700, 3, 0, 0);  /* 22 units a KV head */
    run_mega(q3, 700, 2, 3, 0);  /* 3 units of 8 steps */
    run_mega(q3, 700, 2, 1, 0);  /* one unit a KV head: warps loop, no merge */
    run_mega(mx, 33, 3, 0, 0);   /* the new position alone in its 32-step */
    run_mega(mx, 1500, 2, 0, 0);
    run_mega(q2, 40, 2, 0, 4 * sms); /* not all blocks resident: the barrier's timeout */
}
