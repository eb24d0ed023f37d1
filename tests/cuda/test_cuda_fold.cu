/*
 * test_cuda_fold.cu: the one-token folds (LIGHTMOE_CUDA_FOLD, _MERGE_O,
 * _DOWN_PF, _FOLD_ROUTE, _ROUTE_O) against the CPU twins and, through the forward pass, against
 * the ordinary launches (part of test_cuda_kernels: `fold`, `foldk`).
 */
#include "tests/cuda/cuda_test_util.cuh"

/* ---- the one-token gemv's folds (the forward's LIGHTMOE_CUDA_FOLD) ---------------- */

/* A = fp16(rmsnorm(x) * nw), made by every block from fp32 x: against the
 * CPU's norm (double) and product. */
static void run_gemv_norm(int n, int k, int g)
{
    qmat m = make_qmat(n, k, g, 1, false);
    dq d = upload(m);
    vector<float> x(k), nw(k), a(k);
    for (auto &v : x)
        v = 3.0f * urand();
    for (auto &v : nw)
        v = 1.0f + 0.5f * urand();
    const float eps = 1e-6f;
    double ss = 0;
    for (float v : x)
        ss += (double)v * v;
    const float inv = (float)(1.0 / sqrt(ss / k + eps));
    for (int j = 0; j < k; j++)
        a[j] = round16(nw[j] * (x[j] * inv));
    float *dx = dev(x), *dn = dev(nw), *out;
    CK(cudaMalloc(&out, (size_t)n * 4));
    CK(cudaMemset(out, 0xff, (size_t)n * 4)); /* NaN poison */
    cu_gemm_rows r;
    memset(&r, 0, sizeof(r));
    r.n_rows = 1;
    r.x_f32 = dx;
    r.x_norm = dn;
    r.x_eps = eps;
    OK(cu_int4_matmul(&d.w, &r, nullptr, k, out, n, CU_OUT_F32, CU_GEMM_GEMV, 0, ERRP));
    vector<float> got = host(out, (size_t)n);
    vector<double> ref;
    ref_int4(m, a, k, 1, {0}, {}, CU_OUT_F32, {}, ref);
    char what[160];
    snprintf(what, sizeof what, "int4 gemv n=%d k=%d g=%d T=1 normalising its input", n, k, g);
    compare(what, got.data(), ref.data(), 1, n, 5e-3);
    cudaFree(out);
    cudaFree(dx);
    cudaFree(dn);
    release(d);
}

/* Y[out_row(i)] += scale(i) * (W A_i), atomically; entries 0 and 1 share
 * an output row (a token's experts do). */
static void run_gemv_add(int n, int k, int g, int T, bool rows, bool scaled)
{
    qmat m = make_qmat(n, k, g, 1, false);
    dq d = upload(m);
    vector<float> x = rand_act((size_t)T * k, 2.0f);
    __half *dx = dev_half(x);
    const int R = T + 2;
    vector<int32_t> orow(T);
    vector<float> sc(T), init((size_t)R * n);
    for (int i = 0; i < T; i++) {
        orow[i] = i == 1 ? orow[0] : (2 * i + 1) % R;
        sc[i] = 0.5f + 0.5f * urand();
    }
    for (auto &v : init)
        v = urand();
    float *out = dev(init), *dsc = dev(sc);
    int32_t *dor = dev(orow);
    cu_gemm_rows r;
    memset(&r, 0, sizeof(r));
    r.n_rows = T;
    r.out_rows = rows ? dor : nullptr;
    r.row_scale = scaled ? dsc : nullptr;
    OK(cu_int4_matmul(&d.w, &r, dx, k, out, n, CU_OUT_F32_ADD, CU_GEMM_GEMV, 0, ERRP));
    vector<int> arow(T);
    for (int i = 0; i < T; i++)
        arow[i] = i;
    vector<double> y, ref(init.begin(), init.end());
    ref_int4(m, x, k, T, arow, {}, CU_OUT_F32, {}, y);
    for (int i = 0; i < T; i++)
        for (int c = 0; c < n; c++)
            ref[(size_t)(rows ? orow[i] : i) * n + c] += (scaled ? sc[i] : 1.0) * y[(size_t)i * n + c];
    vector<float> got = host(out, (size_t)R * n);
    char what[160];
    snprintf(what, sizeof what, "int4 gemv n=%d k=%d g=%d T=%d atomic add%s%s", n, k, g, T,
             rows ? ", rows mapped" : "", scaled ? ", scaled" : "");
    compare(what, got.data(), ref.data(), R, n, 5e-3);
    cudaFree(out);
    cudaFree(dsc);
    cudaFree(dor);
    cudaFree(dx);
    release(d);
}

/* The merge of nsplit partial results per (token, head) and o_proj in one
 * launch: x[t] += W_o fp16(merged[t]), against the CPU (double). Split 1
 * of each row is empty (max -inf) when nsplit > 2. */
static const char *g_merge_tag = "";
/* Random partial results of nsplit splits for T tokens' nq heads (split 1
 * empty when nsplit > 2), and their merge on the CPU rounded to fp16. */
static void make_parts(int T, int nq, int hd, int nsplit, vector<float> &part,
                       vector<float> &merged)
{
    const size_t prow = (size_t)T * nq;
    part.assign(prow * nsplit * (hd + 2), 0.f);
    merged.assign(prow * hd, 0.f);
    for (size_t r = 0; r < prow; r++) {
        double M = -INFINITY;
        for (int sp = 0; sp < nsplit; sp++) {
            float *p = &part[(r * nsplit + sp) * (hd + 2)];
            for (int dd = 0; dd < hd; dd++)
                p[dd] = 4.0f * urand();
            const bool empty = nsplit > 2 && sp == 1;
            p[hd] = empty ? -INFINITY : 2.0f * urand();
            p[hd + 1] = empty ? 0.f : 1.0f + 3.0f * (urand() + 1.0f);
            if (!empty)
                M = std::max(M, (double)p[hd]);
        }
        double L = 0;
        vector<double> acc(hd, 0.0);
        for (int sp = 0; sp < nsplit; sp++) {
            const float *p = &part[(r * nsplit + sp) * (hd + 2)];
            if (p[hd] == -INFINITY)
                continue;
            const double w = exp(p[hd] - M);
            L += w * p[hd + 1];
            for (int dd = 0; dd < hd; dd++)
                acc[dd] += w * p[dd];
        }
        for (int dd = 0; dd < hd; dd++)
            merged[r * hd + dd] = round16((float)(acc[dd] / L));
    }
}

static void run_merge_o(int nq, int hd, int nsplit, int n, int g, int T)
{
    const int K = nq * hd;
    qmat m = make_qmat(n, K, g, 1, false);
    dq d = upload(m);
    vector<float> part, merged, x0((size_t)T * n);
    make_parts(T, nq, hd, nsplit, part, merged);
    for (auto &v : x0)
        v = urand();
    vector<double> y, ref(x0.begin(), x0.end());
    vector<int> arow(T);
    for (int t = 0; t < T; t++)
        arow[t] = t;
    ref_int4(m, merged, K, T, arow, {}, CU_OUT_F32, {}, y);
    for (size_t i = 0; i < ref.size(); i++)
        ref[i] += y[i];
    float *dpart = dev(part), *dx = dev(x0);
    cu_attn_shape sh = {nq, nq, hd};
    OK(cu_attn_merge_o(&sh, T, nsplit, dpart, &d.w, dx, n, 0, ERRP));
    vector<float> got = host(dx, x0.size());
    char what[160];
    snprintf(what, sizeof what, "attention merge + o_proj%s nq=%d hd=%d splits=%d n=%d g=%d T=%d",
             g_merge_tag, nq, hd, nsplit, n, g, T);
    compare(what, got.data(), ref.data(), T, n, 5e-3);
    cudaFree(dpart);
    cudaFree(dx);
    release(d);
}

/* The router through o_proj (cu_route_o): the matrix (wr * nw) W_o, the
 * merge + o_proj launch adding o into its own buffer and the router's sums
 * into nc copies, then the norm + route launch: x + o, the norm, the
 * logits, the choices and the plan, against the CPU (double); both
 * buffers back at zero after. */
static void run_route_o(int nq, int hd, int nsplit, int H, int g, int E, int k, bool shared,
                        int renorm, int nc, int x_ready)
{
    const int K = nq * hd, er = E + (shared ? 1 : 0);
    const float eps = 1e-6f;
    qmat m = make_qmat(H, K, g, 1, false);
    dq d = upload(m);
    vector<float> part, merged, x0(H), wr((size_t)er * H), nw(H);
    make_parts(1, nq, hd, nsplit, part, merged);
    for (auto &v : x0)
        v = 2.0f * urand();
    for (auto &v : wr)
        v = 0.5f * urand();
    for (auto &v : nw)
        v = 1.0f + 0.3f * urand();
    vector<double> o;
    ref_int4(m, merged, K, 1, {0}, {}, CU_OUT_F32, {}, o);
    vector<double> xr(H), xnr(H), lr(er);
    double ss = 0;
    for (int j = 0; j < H; j++) {
        xr[j] = x0[j] + o[j];
        ss += xr[j] * xr[j];
    }
    const double inv = 1 / sqrt(ss / H + eps);
    for (int j = 0; j < H; j++)
        xnr[j] = round16((float)(nw[j] * xr[j] * inv));
    for (int e = 0; e < er; e++) {
        double a = 0;
        for (int j = 0; j < H; j++)
            a += (double)wr[(size_t)e * H + j] * nw[j] * xr[j];
        lr[e] = a * inv;
    }
    float *dwr = dev(wr), *dnw = dev(nw), *dx = dev(x0), *dpart = dev(part), *dm, *dout, *du;
    __half *tmp;
    CK(cudaMalloc(&dm, (size_t)er * K * 4));
    CK(cudaMalloc(&tmp, (size_t)H * K * 2));
    CK(cudaMalloc(&dout, (size_t)H * 4));
    CK(cudaMalloc(&du, (size_t)nc * er * 4));
    CK(cudaMemset(dout, 0, (size_t)H * 4));
    CK(cudaMemset(du, 0, (size_t)nc * er * 4));
    char what[200];
    OK(cu_route_o_matrix(&d.w, dwr, dnw, er, dm, tmp, 0, ERRP));
    { /* 16 of its columns against the CPU */
        vector<float> mg = host(dm, (size_t)er * K), got(16 * er);
        vector<double> ref(16 * er);
        for (int c = 0; c < 16; c++) {
            const int i = (int)(rnd() % K);
            for (int e = 0; e < er; e++) {
                double a = 0;
                for (int j = 0; j < H; j++)
                    a += (double)wr[(size_t)e * H + j] * nw[j] * m.w(0, j, i);
                ref[(size_t)c * er + e] = a;
                got[(size_t)c * er + e] = mg[(size_t)e * K + i];
            }
        }
        snprintf(what, sizeof what, "router through o_proj: matrix %d x %d (H %d, 16 columns)", er,
                 K, H);
        compare(what, got.data(), ref.data(), 16, er, 2e-3);
    }
    cu_attn_shape sh = {nq, nq, hd};
    const cu_route_o ro = {dm, dwr, dnw, dx, du, er, nc, x_ready};
    OK(cu_attn_merge_o_route(&sh, nsplit, dpart, &d.w, dout, &ro, 0, ERRP));
    {
        vector<float> og = host(dout, (size_t)H), ug = host(du, (size_t)nc * er), us(er, 0.f);
        for (int c = 0; c < nc; c++)
            for (int e = 0; e < er; e++)
                us[e] += ug[(size_t)c * er + e];
        vector<double> ur(er);
        for (int e = 0; e < er; e++)
            ur[e] = lr[e] / inv;
        snprintf(what, sizeof what, "merge + o_proj into its buffer nq=%d hd=%d splits=%d H=%d%s",
                 nq, hd, nsplit, H, x_ready ? "" : " (x after the wait)");
        compare(what, og.data(), o.data(), 1, H, 5e-3);
        snprintf(what, sizeof what, "merge + o_proj: the router's sums, %d rows, %d copies", er,
                 nc);
        compare(what, us.data(), ur.data(), 1, er, 2e-3);
    }
    int32_t *ids;
    float *wts, *sg, *lg;
    __half *xn;
    CK(cudaMalloc(&ids, k * 4));
    CK(cudaMalloc(&wts, k * 4));
    CK(cudaMalloc(&sg, 4));
    CK(cudaMalloc(&lg, er * 4));
    CK(cudaMalloc(&xn, (size_t)H * 2));
    plan_dev pd = make_plan(1, k, E);
    const cu_moe_plan &p = pd.p;
    OK(cu_moe_norm_route(dx, dout, H, dnw, eps, du, nc, er, lg, xn, E, k, renorm, shared, 1, ids,
                         wts, sg, &p, 0, ERRP));
    vector<float> xg = host(dx, (size_t)H), lgg = host(lg, (size_t)er), xnf(H);
    vector<uint16_t> xnh = host((const uint16_t *)xn, (size_t)H);
    for (int j = 0; j < H; j++)
        xnf[j] = h2f(xnh[j]);
    snprintf(what, sizeof what, "norm + route: x + o (H=%d)", H);
    compare(what, xg.data(), xr.data(), 1, H, 5e-3);
    snprintf(what, sizeof what, "norm + route: the experts' input, fp16 (H=%d)", H);
    compare(what, xnf.data(), xnr.data(), 1, H, 5e-3);
    snprintf(what, sizeof what, "norm + route: the logits (E=%d%s)", E, shared ? " + shared" : "");
    compare(what, lgg.data(), lr.data(), 1, er, 2e-3);
    /* the choices from the logits it made (the routing's own tests are in moe) */
    vector<int> rid;
    vector<double> rp;
    ref_route(lgg.data(), E, k, renorm, rid, rp);
    vector<int32_t> gid = host(ids, (size_t)k), off = host(p.offsets, (size_t)E + 1);
    vector<float> gw = host(wts, (size_t)k);
    vector<int32_t> ee = host(p.ent_expert, (size_t)k);
    size_t bad = 0;
    for (int j = 0; j < k; j++)
        bad += gid[j] != rid[j] || fabs(gw[j] - rp[j]) > 1e-5 * (1 + fabs(rp[j]));
    for (int e = 0; e <= E; e++) {
        int c = 0;
        for (int j = 0; j < k; j++)
            c += rid[j] < e;
        bad += off[e] != c;
    }
    for (int j = 1; j < k; j++)
        bad += ee[j - 1] > ee[j];
    bad += host(p.n_items, 1)[0] != k; /* tile 1: an item an entry */
    if (shared)
        bad += fabs(host(sg, 1)[0] - 1 / (1 + exp(-(double)lgg[E]))) > 1e-5;
    vector<float> o_after = host(dout, (size_t)H), u_after = host(du, (size_t)nc * er);
    size_t left = 0;
    for (float v : o_after)
        left += v != 0.f;
    for (float v : u_after)
        left += v != 0.f;
    printf("%-4s norm + route: choices, weights, plan%s (%zu wrong); sums' buffers back at zero "
           "(%zu not)\n", bad || left ? "FAIL" : "ok", shared ? ", shared gate" : "", bad, left);
    if (bad || left)
        g_fail = 1;
    /* refusals, before anything runs */
    lm_err e1 = {0, ""};
    cu_route_o big = ro;
    big.rows = CU_ROUTE_O_ROWS_PER_SLICE * ((H + 127) / 128) + 1;
    expect_einval("merge + o_proj with more router rows than its blocks take",
                  cu_attn_merge_o_route(&sh, nsplit, dpart, &d.w, dout, &big, 0, &e1), e1);
    lm_err e2 = {0, ""};
    expect_einval("norm + route with logit rows other than the experts (+ shared gate)",
                  cu_moe_norm_route(dx, dout, H, dnw, eps, du, nc, er + 1, lg, xn, E, k, renorm,
                                    shared, 1, ids, wts, sg, &p, 0, &e2), e2);

    void *fr[] = {dwr, dnw, dx, dpart, dm, tmp, dout, du, ids, wts, sg, lg, xn};
    for (void *q : fr)
        cudaFree(q);
    free_plan(pd);
    release(d);
}

/* The experts' products of one token routing it themselves (cu_gemm_rows
 * route): gate_up (entry j = the j-th choice, A's one row read by every
 * entry, the shared gate written) and down (routed before its wait, scaled
 * by the choice's weight, every entry adding into x's one row), against the
 * CPU's routing (stable sort: ties to the lowest id) and products. */
static void run_gemv_route(int H, int I, int g, int E, int k, int renorm)
{
    qmat gu = make_qmat(2 * I, H, g, E, false), dn = make_qmat(H, I, g, E, false);
    dq dgu = upload(gu), ddn = upload(dn);
    vector<float> lg(E + 1), x = rand_act(H, 2.0f), x0(H);
    for (auto &v : lg)
        v = 3.0f * urand();
    lg[E / 2] = lg[E / 3]; /* a tie */
    for (auto &v : x0)
        v = urand();
    vector<int> ent, zero(k, 0), rows(k);
    vector<double> p;
    ref_route(lg.data(), E, k, renorm, ent, p);
    for (int j = 0; j < k; j++)
        rows[j] = j;
    float *dl = dev(lg), *dsg, *dx0 = dev(x0);
    __half *dx = dev_half(x), *h;
    CK(cudaMalloc(&dsg, 4));
    CK(cudaMemset(dsg, 0xff, 4));
    CK(cudaMalloc(&h, (size_t)k * I * 2));
    cu_gemm_rows r;
    memset(&r, 0, sizeof(r));
    r.n_rows = k;
    r.route = dl;
    r.route_e = E;
    r.route_k = k;
    r.route_renorm = renorm;
    r.route_shared = 1;
    r.route_sg = dsg;
    OK(cu_int4_matmul(&dgu.w, &r, dx, 0, h, I, CU_OUT_SILU_F16, CU_GEMM_GEMV, 0, ERRP));
    vector<double> ref;
    ref_int4(gu, x, H, k, zero, ent, CU_OUT_SILU_F16, {}, ref);
    vector<uint16_t> hb = host((const uint16_t *)h, (size_t)k * I);
    vector<float> hf(hb.size());
    for (size_t i = 0; i < hb.size(); i++)
        hf[i] = h2f(hb[i]);
    char what[200];
    snprintf(what, sizeof what, "int4 gemv routing its token: gate_up H=%d I=%d g=%d E=%d k=%d renorm=%d",
             H, I, g, E, k, renorm);
    compare(what, hf.data(), ref.data(), k, I, 5e-3);
    const double sg = host(dsg, 1)[0], sg_ref = 1.0 / (1.0 + exp(-(double)lg[E]));
    const bool sg_ok = fabs(sg - sg_ref) < 1e-5;
    printf("%-4s int4 gemv routing its token: the shared gate %.6f (cpu %.6f)\n",
           sg_ok ? "ok" : "FAIL", sg, sg_ref);
    if (!sg_ok)
        g_fail = 1;
    vector<double> y, yref(x0.begin(), x0.end());
    ref_int4(dn, hf, I, k, rows, ent, CU_OUT_F32, {}, y);
    for (int j = 0; j < k; j++)
        for (int c = 0; c < H; c++)
            yref[c] += p[j] * y[(size_t)j * H + c];
    for (int ready = 0; ready <= 1; ready++) {
        CK(cudaMemcpy(dx0, x0.data(), (size_t)H * 4, cudaMemcpyHostToDevice));
        r.route_sg = nullptr;
        r.route_scale = 1;
        r.route_ready = ready;
        OK(cu_int4_matmul(&ddn.w, &r, h, I, dx0, 0, CU_OUT_F32_ADD, CU_GEMM_GEMV, 0, ERRP));
        vector<float> got = host(dx0, (size_t)H);
        snprintf(what, sizeof what, "int4 gemv routing its token: down into x, routed %s the wait, "
                 "H=%d I=%d E=%d k=%d", ready ? "before" : "after", H, I, E, k);
        compare(what, got.data(), yref.data(), 1, H, 5e-3);
    }
    cudaFree(dl);
    cudaFree(dsg);
    cudaFree(dx0);
    cudaFree(dx);
    cudaFree(h);
    release(dgu);
    release(ddn);
}

void test_fold_kernels()
{
    run_gemv_route(2048, 768, 128, 128, 8, 1); /* qwen3-30b-a3b's experts */
    run_gemv_route(2048, 1408, 128, 60, 4, 0); /* qwen1.5-moe-a2.7b's */
    run_gemv_route(288, 4096, 32, 8, 2, 1);    /* down K 4096: teams of 64 */
    cu_int4_gemv_set_ilp(5);                   /* 4 chunks a lane, routed products too */
    run_gemv_route(1024, 512, 64, 40, 6, 0);
    cu_int4_gemv_set_ilp(-1);
    run_gemv_route(256, 160, 32, 1000, 32, 1);

    for (int pf = 0; pf <= 1; pf++) { /* and the splits' values loaded with (max, sum) */
        const int was = cu_attn_set_merge_pf(pf);
        g_merge_tag = pf ? " (MERGE_PF)" : "";
        run_merge_o(32, 128, 16, 2048, 128, 1);
        run_merge_o(4, 64, 1, 300, 32, 1);
        run_merge_o(2, 256, 3, 130, 64, 2);
        run_merge_o(16, 128, 40, 1000, 32, 3);
        run_merge_o(8, 64, 2, 256, 128, 1);
        run_merge_o(4, 256, 20, 512, 128, 1); /* 16 preloaded, 4 after */
        run_merge_o(8, 128, 32, 700, 64, 2);  /* all 32 preloaded */
        g_merge_tag = "";
        cu_attn_set_merge_pf(was);
    }
    for (int pf = 0; pf <= 1; pf++) { /* the router through o_proj, both merges */
        const int was = cu_attn_set_merge_pf(pf);
        run_route_o(32, 128, 17, 2048, 128, 128, 8, false, 1, 4, 1); /* qwen3-30b-a3b */
        run_route_o(16, 128, 9, 2048, 128, 60, 4, true, 0, 4, 1);    /* qwen1.5-moe-a2.7b */
        run_route_o(8, 128, 3, 384, 32, 8, 2, false, 1, 1, 1);       /* jh 48, one copy */
        run_route_o(4, 64, 1, 256, 64, 9, 3, true, 1, 3, 1);         /* 10 rows over 2 slices */
        run_route_o(4, 128, 2, 512, 64, 8, 2, true, 1, 2, 1); /* 9 rows over 4 slices: one has none */
        run_route_o(4, 256, 3, 512, 128, 16, 4, false, 1, 4, 1); /* hd 256 */
        run_route_o(32, 128, 17, 2048, 128, 128, 8, false, 1, 4, 0); /* x after the wait */
        cu_attn_set_merge_pf(was);
    }
    { /* the router through o_proj: 300 outputs over 8 heads (not a whole share) */
        qmat m = make_qmat(300, 8 * 64, 32, 1, false);
        dq d = upload(m);
        float *buf;
        CK(cudaMalloc(&buf, 4096 * 4));
        const cu_route_o ro = {buf, buf, buf, buf, buf, 8, 1, 1};
        cu_attn_shape sh = {8, 8, 64};
        lm_err e1 = {0, ""};
        expect_einval("merge + o_proj with the router, hidden 300 over 8 heads",
                      cu_attn_merge_o_route(&sh, 2, buf, &d.w, buf, &ro, 0, &e1), e1);
        cudaFree(buf);
        release(d);
    }
    {
        qmat m = make_qmat(64, 4 * 128, 32, 1, false);
        dq d = upload(m);
        cu_attn_shape sh = {4, 4, 64}; /* 256 inputs, not 512 */
        lm_err e1 = {0, ""};
        expect_einval("merge + o_proj with weights of another width",
                      cu_attn_merge_o(&sh, 1, 2, nullptr, &d.w, nullptr, 64, 0, &e1), e1);
        release(d);
    }
    for (int t64 = 1; t64 >= 0; t64--) {
        const int was = cu_int4_gemv_set_t64(t64);
        struct { int n, k, g; } sh[] = {{300, 288, 96}, {1000, 2080, 32}, {5120, 2048, 128},
                                        {75, 4096, 128}, {130, 8192, 64}, {9, 256, 32}};
        for (auto c : sh)
            if (t64 || c.k >= 4096)
                run_gemv_norm(c.n, c.k, c.g);
        cu_int4_gemv_set_t64(was);
    }
    cu_int4_gemv_set_ilp(4);
    run_gemv_norm(1000, 2080, 32);
    run_gemv_norm(96, 768, 128);
    cu_int4_gemv_set_ilp(-1);
    for (int T : {1, 3})
        for (int v = 0; v < 4; v++)
            run_gemv_add(T == 1 ? 2048 : 300, T == 1 ? 768 : 288, 32, T, v & 1, v & 2);
    run_gemv_add(75, 4096, 128, 1, false, true);
    /* what the folds cannot do is refused, with a message */
    qmat m = make_qmat(64, 256, 32, 1, false);
    dq d = upload(m);
    vector<float> x(3 * 256, 1.0f), nw(256, 1.0f);
    float *dx = dev(x), *dn = dev(nw), *out;
    CK(cudaMalloc(&out, 3 * 64 * 4));
    __half *dh = dev_half(vector<float>(17 * 256, 0.5f));
    cu_gemm_rows r;
    memset(&r, 0, sizeof(r));
    r.n_rows = 3;
    r.x_f32 = dx;
    r.x_norm = dn;
    lm_err e1 = {0, ""}, e2 = {0, ""}, e3 = {0, ""}, e4 = {0, ""}, e5 = {0, ""};
    expect_einval("normalising input at 3 tokens",
                  cu_int4_matmul(&d.w, &r, nullptr, 256, out, 64, CU_OUT_F32, CU_GEMM_GEMV, 0, &e1), e1);
    r.n_rows = 1;
    expect_einval("normalising input with the fused SiLU",
                  cu_int4_matmul(&d.w, &r, nullptr, 256, out, 32, CU_OUT_SILU_F16, CU_GEMM_GEMV, 0, &e2), e2);
    expect_einval("normalising input on the mma path",
                  cu_int4_matmul(&d.w, &r, nullptr, 256, out, 64, CU_OUT_F32, CU_GEMM_MMA, 0, &e3), e3);
    qmat m2 = make_qmat(64, 160, 32, 1, false);
    dq d2 = upload(m2);
    expect_einval("normalising input of K 160",
                  cu_int4_matmul(&d2.w, &r, nullptr, 160, out, 64, CU_OUT_F32, CU_GEMM_GEMV, 0, &e4), e4);
    memset(&r, 0, sizeof(r));
    r.n_rows = 17;
    expect_einval("atomic add on the mma path (17 rows)",
                  cu_int4_matmul(&d.w, &r, dh, 256, out, 64, CU_OUT_F32_ADD, CU_GEMM_AUTO, 0, &e5), e5);
    lm_err e6 = {0, ""}, e7 = {0, ""}, e8 = {0, ""};
    memset(&r, 0, sizeof(r));
    r.route = dx; /* never read: refused first */
    r.route_e = 8;
    r.route_k = 2;
    r.n_rows = 3;
    expect_einval("routing in the product with 3 entries for k 2",
                  cu_int4_matmul(&d.w, &r, dh, 256, out, 64, CU_OUT_F32, CU_GEMM_GEMV, 0, &e6), e6);
    r.n_rows = 2;
    expect_einval("routing in the product on the mma path",
                  cu_int4_matmul(&d.w, &r, dh, 256, out, 64, CU_OUT_F32, CU_GEMM_MMA, 0, &e7), e7);
    r.route_k = r.n_rows = 33;
    r.route_e = 64;
    expect_einval("routing in the product with k 33",
                  cu_int4_matmul(&d.w, &r, dh, 256, out, 64, CU_OUT_F32, CU_GEMM_GEMV, 0, &e8), e8);
    cudaFree(dx);
    cudaFree(dn);
    cudaFree(out);
    cudaFree(dh);
    release(d);
    release(d2);
}

/* ---- the folds through the forward pass: LIGHTMOE_CUDA_FOLD=1 against =0 ---------------- */

static const char *const g_fold_env[] = {"LIGHTMOE_CUDA_FOLD", "LIGHTMOE_CUDA_MERGE_O",
                                         "LIGHTMOE_CUDA_DOWN_PF", "LIGHTMOE_CUDA_FOLD_ROUTE",
                                         "LIGHTMOE_CUDA_ROUTE_O"};
constexpr int N_FOLD_ENV = 5;
/* on: bit i turns g_fold_env[i] on in the second state (all off in the first);
 * dmma: the second state's steps run their decode attention on the tensor
 * cores (cu_attn_set_dmma, a process-wide switch set around each call) */
static void run_fold(const cu_synth_config &c, int prompt, int steps, int on_bits,
                     bool dmma = false)
{
    cu_model *m;
    OK(cu_synth_create(&c, 5, &m, ERRP));
    const int bs = 16, max_blocks = (prompt + steps + bs) / bs + 1;
    cu_state *s[2];
    char keep[N_FOLD_ENV][8];
    bool had[N_FOLD_ENV];
    for (int i = 0; i < N_FOLD_ENV; i++) {
        const char *was = getenv(g_fold_env[i]);
        had[i] = was != nullptr;
        snprintf(keep[i], sizeof keep[i], "%s", was ? was : "");
    }
    for (int on = 0; on <= 1; on++) {
        for (int i = 0; i < N_FOLD_ENV; i++)
            setenv(g_fold_env[i], on && (on_bits >> i & 1) ? "1" : "0", 1);
        cu_options o = {512, 0, 0, 0, 1};
        OK(cu_state_create(m, &o, &s[on], ERRP));
        OK(cu_state_kv_init(s[on], bs, max_blocks + 1, ERRP));
    }
    for (int i = 0; i < N_FOLD_ENV; i++) {
        if (had[i])
            setenv(g_fold_env[i], keep[i], 1);
        else
            unsetenv(g_fold_env[i]);
    }
    char tag[80] = "";
    for (int i = 0; i < N_FOLD_ENV; i++)
        if (on_bits >> i & 1)
            snprintf(tag + strlen(tag), sizeof tag - strlen(tag), "%s%s", tag[0] ? "+" : "",
                     g_fold_env[i] + 14);
    if (dmma)
        snprintf(tag + strlen(tag), sizeof tag - strlen(tag), "%sATTN_DMMA", tag[0] ? "+" : "");
    const int dmma_was = cu_attn_set_dmma(0);
    vector<int> toks(prompt);
    for (int i = 0; i < prompt; i++)
        toks[i] = (7 + 13 * i) % c.vocab;
    for (int k = 0; k < 2; k++)
        if (prompt)
            run_seqs(s[k], m, {toks}, {0}, {0}, max_blocks);
    double worst = 0;
    for (int j = 0; j < steps; j++) {
        const int pos = prompt + j, tok = (3 + 5 * j) % c.vocab;
        cu_attn_set_dmma(0);
        vector<float> ref = run_seqs(s[0], m, {{tok}}, {pos}, {0}, max_blocks);
        cu_attn_set_dmma(dmma);
        vector<float> got = run_seqs(s[1], m, {{tok}}, {pos}, {0}, max_blocks);
        cu_attn_set_dmma(0);
        vector<double> r(ref.begin(), ref.end());
        char what[160];
        snprintf(what, sizeof what, "fold %s %s one-token step at position %d", tag, c.name, pos);
        compare(what, got.data(), r.data(), 1, m->vocab, 1e-2);
        double num = 0, den = 0;
        for (size_t i = 0; i < ref.size(); i++) {
            num += (got[i] - r[i]) * (got[i] - r[i]);
            den += r[i] * r[i];
        }
        worst = std::max(worst, sqrt(num / den));
    }
    const long f0 = cu_state_folds(s[0]), f1 = cu_state_folds(s[1]);
    const long r0 = cu_state_routed(s[0]), r1 = cu_state_routed(s[1]);
    const long o0 = cu_state_routed_o(s[0]), o1 = cu_state_routed_o(s[1]);
    /* the prefetch alone folds nothing; routing in the products needs the
     * fold; the router through o_proj needs the merge + o_proj launch, and
     * the products routing themselves take precedence */
    const bool routes = (on_bits & 9) == 9;
    const bool via_o = (on_bits & 18) == 18 && !routes;
    const bool used = f0 == 0 && r0 == 0 && o0 == 0 &&
                      (f1 > 0 || on_bits == 4 || on_bits == 8 || on_bits == 16) &&
                      (r1 > 0) == routes && (o1 > 0) == via_o;
    printf("%-4s fold %s %s: %ld folded launches on, %ld off; %ld blocks routed by their products, "
           "%ld through o_proj (worst step rel %.1e)\n", used ? "ok" : "FAIL", tag, c.name, f1,
           f0, r1, o1, worst);
    if (!used)
        g_fail = 1;
    cu_attn_set_dmma(dmma_was);
    cu_state_destroy(s[0]);
    cu_state_destroy(s[1]);
    cu_synth_free(m);
}

void test_fold()
{
    test_fold_kernels();
    for (int bits : {1, 2, 4, 7, 8, 9, 15, 16, 18, 19, 23, 31}) {
        run_fold(g_q2, 0, 3, bits);
        run_fold(g_q2, 40, 4, bits);
        run_fold(g_q3, 300, 4, bits);
        run_fold(g_mx, 33, 4, bits);
    }
    /* the decode attention on the tensor cores feeding merge + o_proj (and
     * the router through it), as a one-token step runs it */
    for (int bits : {2, 3, 19}) {
        run_fold(g_q2, 40, 4, bits, true);
        run_fold(g_q3, 300, 4, bits, true);
        run_fold(g_mx, 33, 4, bits, true);
    }
}
