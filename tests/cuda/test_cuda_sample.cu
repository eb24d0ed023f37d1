/*
 * test_cuda_sample.cu: sampling on the GPU (engine/cuda_sample.cuh)
 * against its CPU twin, sample_apply_penalties + sample_pick_drawn
 * (engine/sample.h): the same token, the same top-logprob ids and the same
 * logits row afterwards (penalties and temperature in place), bit for bit;
 * logprobs within 2e-5 (the log-sum-exp's sums differ in order). Rows of
 * awkward widths (1, 7, 1003, a stride past the width) and qwen's 151936;
 * 1 to 300 rows (more rows than blocks); every filter alone and together,
 * penalties, extreme draws; NaN, +inf and all -inf rows. Then the same
 * through cu_forward with backend_batch.picks on a synthetic model.
 */
#include <errno.h>

#include "engine/cuda_sample.cuh"
#include "engine/sample.h"
#include "tests/cuda/cuda_test_util.cuh"

namespace {

struct pick_case {
    sample_params p;
    uint64_t draw;
    vector<sample_penalty> pen;
};

uint64_t rnd64()
{
    return ((uint64_t)rnd() << 32) | rnd();
}

/* a row of one of five shapes: uniform, many ties, flat, peaked with -inf, wide */
void make_row(float *l, int V, int shape)
{
    for (int t = 0; t < V; t++) {
        const float u = 0.5f * (urand() + 1.0f);
        if (shape == 0)
            l[t] = 20.0f * u - 10.0f;
        else if (shape == 1)
            l[t] = (float)(int)(u * 6.0f);
        else if (shape == 2)
            l[t] = 0.01f * u;
        else if (shape == 3)
            l[t] = u < 0.1f && t != V / 2 ? -INFINITY : 30.0f * u * u * u;
        else
            l[t] = 3.0f * (urand() + urand() + urand()) + (rnd() % 997 == 0 ? 12.0f : 0.0f);
        if (shape == 1 && rnd() % 5 == 0)
            l[t] = -l[t]; /* -0 among the ties */
    }
}

pick_case make_case(int V, int i)
{
    pick_case c;
    sample_params_default(&c.p);
    const float temps[] = {0.0f, 0.7f, 1.0f, 1.6f};
    c.p.temperature = i % 23 == 9 ? 1e-6f : temps[i % 4]; /* below SAMPLE_MIN_TEMPERATURE: greedy */
    const int ks[] = {0, 1, 5, 40, 1000};
    c.p.top_k = ks[(i / 4) % 5];
    const float ps[] = {1.0f, 0.9f, 0.5f, 1.0f, 1e-30f};
    c.p.top_p = ps[(i / 3) % 5];
    c.p.min_p = (i / 7) % 3 == 1 ? 0.05f : (i / 7) % 3 == 2 ? 0.2f : 0.0f;
    const int lps[] = {0, 1, 5, SAMPLE_MAX_LOGPROBS};
    c.p.logprobs = lps[(i / 2) % 4];
    c.draw = i % 13 == 5 ? ~0ull : i % 13 == 6 ? 0 : rnd64();
    if (i % 3 == 1) {
        c.p.repetition_penalty = 1.3f;
        c.p.frequency_penalty = 0.4f;
        c.p.presence_penalty = -0.2f;
    } else if (i % 5 == 2) {
        c.p.presence_penalty = 0.7f;
    }
    if (sample_has_penalties(&c.p)) {
        vector<int32_t> ids(40);
        for (auto &t : ids)
            t = (int32_t)(rnd() % (uint32_t)V);
        vector<char> scratch(sample_scratch_bytes(V));
        c.pen.resize(std::min<size_t>(V, ids.size()));
        c.pen.resize(sample_penalty_list(&c.p, ids.data(), 25, ids.data() + 25, 15, V,
                                         scratch.data(), c.pen.data()));
    }
    return c;
}

/* rows of width V at stride ldl: the GPU's picks and rows against the CPU's */
void run_rows(int V, int ldl, int n, int shape0, int poison)
{
    vector<float> rows((size_t)n * ldl, 0.0f);
    vector<pick_case> cases;
    for (int r = 0; r < n; r++) {
        make_row(rows.data() + (size_t)r * ldl, V, (shape0 + r) % 5);
        cases.push_back(make_case(V, r * 7 + shape0));
        if (poison && r % 4 == 1) { /* NaN, +inf, every logit -inf, a logit near FLT_MAX */
            float *l = rows.data() + (size_t)r * ldl;
            const int kind = (r / 4) % 4;
            if (kind == 3) { /* finite, but infinite after the temperature */
                l[rnd() % V] = 3e38f;
                cases[r].p.temperature = 0.5f;
            } else if (kind == 2) {
                for (int t = 0; t < V; t++)
                    l[t] = -INFINITY;
            } else {
                l[rnd() % V] = kind ? INFINITY : NAN;
                l[rnd() % V] = kind ? NAN : INFINITY;
            }
        }
    }
    /* the CPU twin */
    vector<sample_result> want(n);
    vector<int> want_rc(n), want_bad(n, -2);
    vector<float> after(rows);
    vector<char> scratch(sample_scratch_bytes(V));
    for (int r = 0; r < n; r++) {
        float *l = after.data() + (size_t)r * ldl;
        sample_apply_penalties(l, &cases[r].p, cases[r].pen.data(), (int32_t)cases[r].pen.size());
        int bad = -1, arg = 0;
        for (int t = 0; t < V && bad < 0; t++)
            if (l[t] != l[t] || l[t] == INFINITY)
                bad = t;
        for (int t = 1; t < V; t++)
            if (l[t] > l[arg])
                arg = t;
        if (bad < 0 && l[arg] > -INFINITY) /* refused after the temperature: the maximum */
            bad = arg;
        lm_err e = {0, ""};
        want_rc[r] = sample_pick_drawn(l, V, &cases[r].p, cases[r].draw, scratch.data(), &want[r], &e);
        if (want_rc[r])
            want_bad[r] = bad;
    }
    /* the GPU */
    vector<cu_pick> picks(n);
    vector<sample_penalty> pen;
    for (int r = 0; r < n; r++) {
        backend_pick bp = {&cases[r].p, cases[r].draw, (int32_t)pen.size(),
                           (int32_t)cases[r].pen.size()};
        pen.insert(pen.end(), cases[r].pen.begin(), cases[r].pen.end());
        cu_pick_from(&bp, &picks[r]);
    }
    if (pen.empty())
        pen.push_back({0, 0});
    float *d_rows = dev(rows), *d_e;
    cu_pick *d_picks = dev(picks);
    sample_penalty *d_pen = dev(pen);
    backend_pick_out *d_out;
    CK(cudaMalloc(&d_e, (size_t)std::min(n, CU_SAMPLE_BLOCKS) * V * sizeof(float)));
    CK(cudaMalloc(&d_out, (size_t)n * sizeof(backend_pick_out)));
    CK(cudaMemset(d_out, 0xA5, (size_t)n * sizeof(backend_pick_out)));
    OK(cu_sample(d_rows, ldl, V, n, d_picks, d_pen, d_e, d_out, 0, ERRP));
    const vector<backend_pick_out> got = host(d_out, n);
    const vector<float> got_rows = host(d_rows, rows.size());
    int tok_bad = 0, top_bad = 0, row_bad = 0, err_bad = 0, n_err = 0, n_hot = 0;
    double lp_worst = 0;
    for (int r = 0; r < n; r++) {
        const float *a = after.data() + (size_t)r * ldl, *b = got_rows.data() + (size_t)r * ldl;
        if (memcmp(a, b, sizeof(float) * V)) {
            if (row_bad++ < 3)
                printf("     row %d: the logits after the pick differ\n", r);
        }
        if (want_rc[r]) {
            n_err++;
            if (got[r].status != -EINVAL || got[r].bad_token != want_bad[r]) {
                if (err_bad++ < 3)
                    printf("     row %d: CPU refused (bad token %d), GPU status %d bad token %d\n",
                           r, want_bad[r], got[r].status, got[r].bad_token);
            }
            continue;
        }
        n_hot += cases[r].p.temperature > 0;
        if (got[r].status != 0 || got[r].r.token != want[r].token) {
            if (tok_bad++ < 3)
                printf("     row %d (T %g top_k %d top_p %g min_p %g): CPU token %d, GPU %d "
                       "(status %d)\n", r, (double)cases[r].p.temperature, cases[r].p.top_k,
                       (double)cases[r].p.top_p, (double)cases[r].p.min_p, want[r].token,
                       got[r].r.token, got[r].status);
            continue;
        }
        /* equal (also -inf), else the difference; a NaN on either side fails */
        auto diff = [](double a, double b) { return a == b ? 0.0 : fabs(a - b); };
        auto worst = [&](double d) {
            if (!(d <= lp_worst))
                lp_worst = d;
        };
        worst(diff(got[r].r.logprob, want[r].logprob));
        bool same = got[r].r.n_top == want[r].n_top;
        for (int i = 0; same && i < want[r].n_top; i++) {
            same = got[r].r.top_ids[i] == want[r].top_ids[i];
            worst(diff(got[r].r.top_logprobs[i], want[r].top_logprobs[i]));
        }
        if (!same && top_bad++ < 3)
            printf("     row %d: top logprob ids differ (n %d / %d)\n", r, got[r].r.n_top,
                   want[r].n_top);
    }
    const bool pass = !tok_bad && !top_bad && !row_bad && !err_bad && lp_worst <= 2e-5; /* NaN: false */
    printf("%-4s sample V %6d stride %6d rows %3d (%3d drawn, %2d refused): tokens %s, top ids "
           "%s, rows %s, logprob diff %.1e (bound 2e-5)\n",
           pass ? "ok" : "FAIL", V, ldl, n, n_hot, n_err, tok_bad ? "DIFFER" : "equal",
           top_bad ? "DIFFER" : "equal", row_bad ? "DIFFER" : "equal", lp_worst);
    if (!pass)
        g_fail = 1;
    cudaFree(d_rows);
    cudaFree(d_e);
    cudaFree(d_picks);
    cudaFree(d_pen);
    cudaFree(d_out);
}

/* through cu_forward: a decode step's logits to the host and sampled
 * there, then the same step with picks (the step is deterministic: two
 * logits runs must agree bit for bit first) */
void run_forward_picks()
{
    cu_model *m;
    OK(cu_synth_create(&g_q2, 11, &m, ERRP));
    setenv("LIGHTMOE_CUDA_SAMPLE", "1", 1); /* off by default (docs/OPERATIONS.md) */
    cu_options o = {64, 0, 0, 0, 1};
    cu_state *s;
    OK(cu_state_create(m, &o, &s, ERRP));
    OK(cu_state_kv_init(s, 16, 64, ERRP));
    const int V = m->vocab, n = 5;
    /* prompts of 9 tokens in blocks 0, 4, 8, ...; then one decode step of all */
    vector<vector<int>> pr;
    for (int q = 0; q < n; q++) {
        vector<int> p;
        for (int i = 0; i < 9; i++)
            p.push_back((q * 37 + i * 11) % V);
        pr.push_back(p);
        run_seqs(s, m, {p}, {0}, {q * 4}, 4);
    }
    vector<vector<int>> step;
    vector<int> prior, blk;
    for (int q = 0; q < n; q++) {
        step.push_back({(q * 5 + 1) % V});
        prior.push_back(9);
        blk.push_back(q * 4);
    }
    const vector<float> l1 = run_seqs(s, m, step, prior, blk, 4);
    const vector<float> l2 = run_seqs(s, m, step, prior, blk, 4);
    bool det = !memcmp(l1.data(), l2.data(), l1.size() * sizeof(float));
    /* the CPU's picks from the host logits */
    vector<pick_case> cases;
    vector<sample_result> want(n);
    vector<char> scratch(sample_scratch_bytes(V));
    vector<sample_penalty> pen;
    vector<backend_pick> picks(n);
    for (int q = 0; q < n; q++) {
        cases.push_back(make_case(V, 3 * q + 1));
        cases[q].p.logprobs = 5;
    }
    for (int q = 0; q < n; q++) {
        vector<float> row(l1.begin() + (size_t)q * V, l1.begin() + (size_t)(q + 1) * V);
        sample_apply_penalties(row.data(), &cases[q].p, cases[q].pen.data(),
                               (int32_t)cases[q].pen.size());
        OK(sample_pick_drawn(row.data(), V, &cases[q].p, cases[q].draw, scratch.data(), &want[q],
                             ERRP));
        picks[q] = {&cases[q].p, cases[q].draw, (int32_t)pen.size(), (int32_t)cases[q].pen.size()};
        pen.insert(pen.end(), cases[q].pen.begin(), cases[q].pen.end());
    }
    /* the same step, picked on the device */
    vector<int32_t> tokens, seq_start = {0}, rows, bt;
    for (int q = 0; q < n; q++) {
        tokens.push_back(step[q][0]);
        seq_start.push_back(q + 1);
        rows.push_back(q);
        for (int j = 0; j < 4; j++)
            bt.push_back(blk[q] + j);
    }
    vector<backend_pick_out> out(n);
    backend_batch b = {};
    b.n_seqs = n;
    b.n_tokens = n;
    b.tokens = tokens.data();
    b.seq_start = seq_start.data();
    b.start_pos = prior.data();
    b.block_table = bt.data();
    b.max_blocks = 4;
    b.n_logits = n;
    b.logit_rows = rows.data();
    b.logits = NULL;
    b.picks = picks.data();
    b.penalties = pen.data();
    b.n_penalties = (int32_t)pen.size();
    b.picks_out = out.data();
    OK(cu_forward(s, &b, ERRP));
    int same = 0;
    for (int q = 0; q < n; q++)
        same += out[q].status == 0 && out[q].r.token == want[q].token &&
                out[q].r.n_top == want[q].n_top &&
                !memcmp(out[q].r.top_ids, want[q].top_ids, sizeof(int32_t) * want[q].n_top);
    const bool pass = det && same == n;
    printf("%-4s sample through cu_forward (%s, %d rows): %d picks equal the host's%s\n",
           pass ? "ok" : "FAIL", g_q2.name, n, same, det ? "" : " (LOGITS NOT DETERMINISTIC)");
    if (!pass)
        g_fail = 1;
    /* a penalty entry outside the vocabulary, too many entries: refused */
    vector<sample_penalty> badpen = pen;
    badpen.push_back({V, 1});
    picks[0].n_pen = (int32_t)badpen.size();
    picks[0].pen_begin = 0;
    b.penalties = badpen.data();
    b.n_penalties = (int32_t)badpen.size();
    lm_err e = {0, ""};
    expect_einval("sampling with a penalty id outside the vocabulary", cu_forward(s, &b, &e), e);
    badpen = pen;
    badpen.push_back(badpen.empty() ? sample_penalty{3, 1} : badpen[0]);
    badpen.push_back(badpen.back());
    picks[0].n_pen = (int32_t)badpen.size();
    b.penalties = badpen.data();
    b.n_penalties = (int32_t)badpen.size();
    e = {0, ""};
    expect_einval("sampling with a penalty id listed twice in a row", cu_forward(s, &b, &e), e);
    b.n_penalties = CU_SAMPLE_MAX_PENALTIES + 1;
    e = {0, ""};
    expect_einval("sampling with more penalty entries than the state holds", cu_forward(s, &b, &e), e);
    cu_state_destroy(s);
    /* with the switch off, a state does not sample: picks are refused */
    unsetenv("LIGHTMOE_CUDA_SAMPLE");
    OK(cu_state_create(m, &o, &s, ERRP));
    OK(cu_state_kv_init(s, 16, 64, ERRP));
    b.n_penalties = (int32_t)pen.size();
    b.penalties = pen.data();
    picks[0].n_pen = (int32_t)cases[0].pen.size();
    e = {0, ""};
    const bool off = cu_state_sample_cap(s) == 0;
    expect_einval(off ? "sampling with LIGHTMOE_CUDA_SAMPLE unset" : "SWITCH IGNORED", cu_forward(s, &b, &e), e);
    if (!off)
        g_fail = 1;
    cu_state_destroy(s);
    cu_synth_free(m);
}

} // namespace

void test_sample(bool full)
{
    run_rows(1, 1, 3, 0, 0);
    run_rows(7, 7, 17, 1, 1);
    run_rows(1003, 1003, 64, 2, 1);
    run_rows(1003, 1008, 9, 3, 0); /* a stride past the width: the scalar path */
    if (!full) { /* the sanitizers' share */
        run_rows(4096, 4096, 130, 4, 1);
        return;
    }
    run_rows(4096, 4096, 300, 4, 1); /* more rows than blocks */
    run_rows(4096, 4100, 20, 1, 1);  /* 16-byte loads at a stride past the width */
    run_rows(151936, 151936, 40, 0, 1);
    run_rows(151936, 151936, 40, 3, 0);
    lm_err e = {0, ""};
    expect_einval("cu_sample with a stride below the width",
                  cu_sample((float *)16, 5, 10, 1, (const cu_pick *)16, NULL, (float *)16,
                            (backend_pick_out *)16, 0, &e),
                  e);
    run_forward_picks();
}
