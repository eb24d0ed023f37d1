/*
 * test_cuda_kernels.cu: every CUDA kernel of the engine against a plain CPU
 * twin (double accumulation), on random inputs of awkward sizes.
 *
 *   test_cuda_kernels int4|stage|mma8|moe|norm|attn|attn1|attnmma|attndmma|forward|mega|fold|foldk
 *
 * Each check prints its observed error and bound; any failure exits 1. With
 * no usable GPU the program prints why and exits 77 (ctest SKIP).
 *
 * Error measure: rel = ||gpu - ref||_2 / ||ref||_2, over the whole output
 * and per row (row bound 1e-2, as `verify --device cuda` uses).
 */
#include "tests/cuda/cuda_test_util.cuh"

static const char *path_name(cu_gemm_path p)
{
    return p == CU_GEMM_GEMV ? "gemv" : p == CU_GEMM_MMA ? "mma" : p == CU_GEMM_MMA8 ? "mma8" : "auto";
}

static void run_dense(int n, int k, int g, int T, bool perm, cu_gemm_path path, cu_out_mode mode)
{
    qmat m = make_qmat(n, k, g, 1, perm);
    dq d = upload(m);
    vector<float> x = rand_act((size_t)T * k, 2.0f);
    __half *dx = dev_half(x);
    const int cols = mode == CU_OUT_SILU_F16 ? n / 2 : n;
    vector<double> init((size_t)T * cols);
    vector<float> initf(init.size());
    for (size_t i = 0; i < init.size(); i++)
        init[i] = initf[i] = urand();
    void *out;
    CK(cudaMalloc(&out, (size_t)T * cols * 4));
    if (mode == CU_OUT_F32_ACC)
        CK(cudaMemcpy(out, initf.data(), initf.size() * 4, cudaMemcpyHostToDevice));
    else
        CK(cudaMemset(out, 0xff, (size_t)T * cols * 4)); /* NaN poison */
    const __half *a = dx;
    __half *xg = nullptr;
    if (perm) {
        CK(cudaMalloc(&xg, (size_t)T * k * 2));
        OK(cu_gather_rows(dx, k, nullptr, T, k, d.perm, nullptr, xg, 0, ERRP));
        a = xg;
    }
    cu_gemm_rows r;
    memset(&r, 0, sizeof(r));
    r.n_rows = T;
    OK(cu_int4_matmul(&d.w, &r, a, k, out, cols, mode, path, 0, ERRP));
    vector<float> got((size_t)T * cols);
    if (mode == CU_OUT_SILU_F16) {
        vector<uint16_t> hb = host((const uint16_t *)out, (size_t)T * cols);
        for (size_t i = 0; i < got.size(); i++)
            got[i] = h2f(hb[i]);
    } else {
        got = host((const float *)out, got.size());
    }
    vector<int> arow(T);
    for (int i = 0; i < T; i++)
        arow[i] = i;
    vector<double> ref;
    ref_int4(m, x, k, T, arow, {}, mode, init, ref);
    char what[160];
    snprintf(what, sizeof what, "int4 %s n=%d k=%d g=%d T=%d%s %s", path_name(path), n, k, g, T,
             perm ? " perm" : "",
             mode == CU_OUT_SILU_F16 ? "silu" : mode == CU_OUT_F32_ACC ? "acc" : "f32");
    compare(what, got.data(), ref.data(), T, cols, 5e-3);
    cudaFree(out);
    cudaFree(dx);
    cudaFree(xg);
    release(d);
}

/* Grouped gate_up (SiLU) then down, then combine, against the CPU. */
static void run_grouped(int H, int I, int g, int E, int k, int T, cu_gemm_path path)
{
    qmat gu = make_qmat(2 * I, H, g, E, false), dn = make_qmat(H, I, g, E, false);
    dq dgu = upload(gu), ddn = upload(dn);
    vector<float> x = rand_act((size_t)T * H, 2.0f);
    __half *dx = dev_half(x);
    vector<int32_t> ids((size_t)T * k);
    vector<float> wts((size_t)T * k);
    for (int t = 0; t < T; t++) {
        vector<int> p(E);
        for (int e = 0; e < E; e++)
            p[e] = e;
        for (int j = 0; j < k; j++) {
            std::swap(p[j], p[j + rnd() % (E - j)]);
            ids[t * k + j] = p[j];
            wts[t * k + j] = 0.5f + 0.5f * urand();
        }
    }
    plan_dev pd = make_plan(T, k, E);
    int32_t *dids = dev(ids);
    float *dw = dev(wts);
    const int tile = cu_int4_tile_for(T, (T * k + E - 1) / E, path);
    OK(cu_moe_group(dids, dw, T, k, E, tile, &pd.p, 0, ERRP));
    cu_gemm_rows r = grouped_rows(pd.p, T * k, E, tile);
    r.a_rows = pd.p.ent_token;
    __half *h;
    float *y, *resid;
    CK(cudaMalloc(&h, (size_t)T * k * I * 2));
    CK(cudaMalloc(&y, (size_t)T * k * H * 4));
    CK(cudaMemset(y, 0xff, (size_t)T * k * H * 4));
    OK(cu_int4_matmul(&dgu.w, &r, dx, H, h, I, CU_OUT_SILU_F16, path, 0, ERRP));
    r.a_rows = nullptr;
    OK(cu_int4_matmul(&ddn.w, &r, h, I, y, H, CU_OUT_F32, path, 0, ERRP));
    {
        /* the forward's order once more, down reading its work list (made
         * three launches back) and loading weights before its wait: the
         * same bits */
        __half *h2;
        float *y2;
        CK(cudaMalloc(&h2, (size_t)T * k * I * 2));
        CK(cudaMalloc(&y2, (size_t)T * k * H * 4));
        CK(cudaMemset(y2, 0xff, (size_t)T * k * H * 4));
        r.a_rows = pd.p.ent_token;
        OK(cu_int4_matmul(&dgu.w, &r, dx, H, h2, I, CU_OUT_SILU_F16, path, 0, ERRP));
        r.a_rows = nullptr;
        r.plan_ready = 1;
        OK(cu_int4_matmul(&ddn.w, &r, h2, I, y2, H, CU_OUT_F32, path, 0, ERRP));
        r.plan_ready = 0;
        vector<float> ya = host(y, (size_t)T * k * H), yb = host(y2, (size_t)T * k * H);
        const bool same = !memcmp(ya.data(), yb.data(), ya.size() * 4);
        printf("%-4s grouped %s down, work list read before the wait: bit-identical T=%d\n",
               same ? "ok" : "FAIL", path_name(path), T);
        if (!same)
            g_fail = 1;
        cudaFree(h2);
        cudaFree(y2);
    }
    vector<float> resid0 = rand_act((size_t)T * H, 1.0f);
    resid = dev(resid0);
    OK(cu_moe_combine(resid, H, T, k, y, pd.p.pos, pd.p.ent_weight, nullptr, nullptr, 0, ERRP));

    vector<int32_t> et = host(pd.p.ent_token, T * k), ee = host(pd.p.ent_expert, T * k),
                    pos = host(pd.p.pos, T * k), off = host(pd.p.offsets, E + 1);
    /* the plan itself: entries sorted by expert, pos inverse of the scatter */
    bool plan_ok = off[E] == T * k;
    for (int i = 0; i < T * k && plan_ok; i++) {
        plan_ok &= et[pos[i]] == i / k && ee[pos[i]] == ids[i];
        plan_ok &= pos[i] >= off[ids[i]] && pos[i] < off[ids[i] + 1];
    }
    printf("%-4s moe plan T=%d k=%d E=%d tile=%d\n", plan_ok ? "ok" : "FAIL", T, k, E, tile);
    if (!plan_ok)
        g_fail = 1;

    vector<uint16_t> hb = host((const uint16_t *)h, (size_t)T * k * I);
    vector<float> hgot(hb.size());
    for (size_t i = 0; i < hb.size(); i++)
        hgot[i] = h2f(hb[i]);
    vector<int> arow(et.begin(), et.end()), ent(ee.begin(), ee.end());
    vector<double> href, yref;
    ref_int4(gu, x, H, T * k, arow, ent, CU_OUT_SILU_F16, {}, href);
    char what[160];
    snprintf(what, sizeof what, "grouped %s gate_up+silu H=%d I=%d E=%d k=%d T=%d",
             path_name(path), H, I, E, k, T);
    compare(what, hgot.data(), href.data(), T * k, I, 5e-3);
    /* down from the GPU's h (so each stage is checked alone) */
    vector<int> ident(T * k);
    for (int i = 0; i < T * k; i++)
        ident[i] = i;
    ref_int4(dn, hgot, I, T * k, ident, ent, CU_OUT_F32, {}, yref);
    vector<float> ygot = host(y, (size_t)T * k * H);
    snprintf(what, sizeof what, "grouped %s down H=%d I=%d E=%d k=%d T=%d",
             path_name(path), H, I, E, k, T);
    compare(what, ygot.data(), yref.data(), T * k, H, 5e-3);
    vector<double> cref((size_t)T * H);
    for (int t = 0; t < T; t++)
        for (int c = 0; c < H; c++) {
            double v = resid0[(size_t)t * H + c];
            for (int j = 0; j < k; j++)
                v += (double)wts[t * k + j] * ygot[(size_t)pos[t * k + j] * H + c];
            cref[(size_t)t * H + c] = v;
        }
    vector<float> cgot = host(resid, (size_t)T * H);
    snprintf(what, sizeof what, "moe combine T=%d", T);
    compare(what, cgot.data(), cref.data(), T, H, 1e-6);
    /* the fold: down adds weight * product into the residual row of its
     * token, atomically, list read before the wait (as the forward does);
     * the same sums as the combine in another order */
    float *resid2 = dev(resid0);
    r.out_rows = pd.p.ent_token;
    r.row_scale = pd.p.ent_weight;
    r.plan_ready = 1;
    lm_err ea = {0, ""};
    const int rca = cu_int4_matmul(&ddn.w, &r, h, I, resid2, H, CU_OUT_F32_ADD, path, 0, &ea);
    if (tile <= 8) {
        OK(rca);
        vector<float> agot = host(resid2, (size_t)T * H);
        snprintf(what, sizeof what, "grouped %s down adding into the residual T=%d",
                 path_name(path), T);
        compare(what, agot.data(), cref.data(), T, H, 1e-6);
    } else {
        snprintf(what, sizeof what, "grouped atomic add at tile %d", tile);
        expect_einval(what, rca, ea);
    }
    r.out_rows = nullptr;
    r.row_scale = nullptr;
    r.plan_ready = 0;
    cudaFree(resid2);
    cudaFree(h);
    cudaFree(y);
    cudaFree(resid);
    cudaFree(dx);
    cudaFree(dids);
    cudaFree(dw);
    free_plan(pd);
    release(dgu);
    release(ddn);
}

/* Dequantisation to fp16 (the prefill-through-cuBLAS path): bit-exact
 * against round16(scale * (q - zero)) (q - zero is exact, one rounding). */
static void run_dequant(int n, int k, int g)
{
    qmat m = make_qmat(n, k, g, 1, false);
    dq d = upload(m);
    __half *out;
    CK(cudaMalloc(&out, (size_t)n * k * 2));
    CK(cudaMemset(out, 0xff, (size_t)n * k * 2));
    OK(cu_int4_dequant(&d.w, out, 0, ERRP));
    vector<uint16_t> got = host((const uint16_t *)out, (size_t)n * k);
    size_t bad = 0;
    for (int r = 0; r < n; r++)
        for (int j = 0; j < k; j++)
            bad += got[(size_t)r * k + j] != f2h(m.w(0, r, j));
    printf("%-4s int4 dequant n=%d k=%d g=%d bit-exact (%zu mismatches)\n", bad ? "FAIL" : "ok", n,
           k, g, bad);
    if (bad)
        g_fail = 1;
    cudaFree(out);
    release(d);
}

/* The few-token tensor-core kernel (cu_int4_mma8): forced (items of 8 rows,
 * 1 to 300 rows; K of 1 to 130 chunks, not all multiples of its 4-chunk
 * units), then taken by the automatic path (the default for 5-16 rows),
 * dense and grouped (which rows count selects it: test_paths). */
static void test_int4_mma8()
{
    printf("     few-token mma kernel (items of 8 rows)\n");
    struct { int n, k, g; } sh[] = {{96, 160, 32}, {300, 288, 96}, {1000, 2080, 32},
                                    {2048, 768, 128}, {40, 32, 32}, {72, 4160, 32}};
    for (auto s : sh)
        for (int T : {1, 3, 8, 17})
            run_dense(s.n, s.k, s.g, T, false, CU_GEMM_MMA8, CU_OUT_F32);
    for (int T : {5, 300}) {
        run_dense(300, 288, 32, T, true, CU_GEMM_MMA8, CU_OUT_F32);
        run_dense(322, 160, 32, T, false, CU_GEMM_MMA8, CU_OUT_SILU_F16);
        run_dense(130, 1024, 128, T, false, CU_GEMM_MMA8, CU_OUT_F32_ACC);
    }
    for (int T : {1, 3, 17, 64})
        run_grouped(256, 160, 32, 6, 2, T, CU_GEMM_MMA8);
    const int was = cu_int4_set_mma8(1);
    printf("     ... taken by the automatic path for 5-16 rows (the default)\n");
    run_dense(1000, 2080, 32, 6, false, CU_GEMM_AUTO, CU_OUT_F32);
    run_dense(5120, 2048, 128, 8, false, CU_GEMM_AUTO, CU_OUT_F32);
    run_dense(2048, 4096, 128, 16, false, CU_GEMM_AUTO, CU_OUT_F32);
    run_grouped(2048, 768, 128, 128, 8, 8, CU_GEMM_AUTO);   /* qwen3's experts at batch 8 */
    run_grouped(2048, 1408, 128, 60, 4, 16, CU_GEMM_AUTO);  /* qwen1.5's at batch 16 */
    run_grouped(512, 192, 64, 16, 4, 8, CU_GEMM_AUTO);
    cu_int4_set_mma8(was);
}

/* A token's rows from the one-token grouped gemv (staged and with its
 * weights in registers) against the same rows from the gemv of T tokens
 * (tile 2-4): the same arithmetic in the same order where both take the
 * same lanes a row (exact: the same bits), else differing only in the
 * order of fp32 additions (bounds far below the CPU's 5e-3). A kernel that
 * rounds otherwise (as the staged kernel once did, ~1e-3) fails here
 * before `lightmoe verify --batch` meets a near-tie that the difference
 * flips between a request alone and batched. */
static void gemv_tile_agree(int H, int I, int g, int E, int k, int T, bool exact)
{
    qmat gu = make_qmat(2 * I, H, g, E, false), dn = make_qmat(H, I, g, E, false);
    dq dgu = upload(gu), ddn = upload(dn);
    vector<float> x = rand_act((size_t)T * H, 2.0f);
    __half *dx = dev_half(x);
    const vector<int32_t> ids = rand_choices(T, k, E);
    const vector<float> ones((size_t)T * k, 1.f);
    plan_dev pd = make_plan(T, k, E);
    int32_t *dids = dev(ids);
    float *dw = dev(ones);
    const int tile = cu_int4_tile_for(T, (T * k + E - 1) / E, CU_GEMM_GEMV);
    OK(cu_moe_group(dids, dw, T, k, E, tile, &pd.p, 0, ERRP));
    cu_gemm_rows r = grouped_rows(pd.p, T * k, E, tile);
    r.a_rows = pd.p.ent_token;
    __half *hb;
    float *yb;
    CK(cudaMalloc(&hb, (size_t)T * k * I * 2));
    CK(cudaMalloc(&yb, (size_t)T * k * H * 4));
    OK(cu_int4_matmul(&dgu.w, &r, dx, H, hb, I, CU_OUT_SILU_F16, CU_GEMM_GEMV, 0, ERRP));
    r.a_rows = nullptr;
    OK(cu_int4_matmul(&ddn.w, &r, hb, I, yb, H, CU_OUT_F32, CU_GEMM_GEMV, 0, ERRP));
    const vector<int32_t> pos = host(pd.p.pos, (size_t)T * k);
    const vector<uint16_t> hbh = host((const uint16_t *)hb, (size_t)T * k * I);
    const vector<float> ybh = host(yb, (size_t)T * k * H);
    /* the batched rows in token order, as the references */
    vector<double> href((size_t)T * k * I), yref((size_t)T * k * H);
    for (int i = 0; i < T * k; i++) {
        for (int c = 0; c < I; c++)
            href[(size_t)i * I + c] = h2f(hbh[(size_t)pos[i] * I + c]);
        for (int c = 0; c < H; c++)
            yref[(size_t)i * H + c] = ybh[(size_t)pos[i] * H + c];
    }
    for (int st = 1; st >= 0; st--) {
        const int was = cu_int4_gemv_set_stage(st);
        const long n0 = cu_int4_gemv_staged_launches();
        vector<float> hg((size_t)T * k * I), yg((size_t)T * k * H);
        for (int t = 0; t < T; t++) {
            plan_dev p1 = make_plan(1, k, E);
            int32_t *ids1 = dev(vector<int32_t>(ids.begin() + t * k, ids.begin() + (t + 1) * k));
            OK(cu_moe_group(ids1, dw, 1, k, E, 1, &p1.p, 0, ERRP));
            cu_gemm_rows r1 = grouped_rows(p1.p, k, E, 1);
            r1.a_rows = p1.p.ent_token;
            __half *h1, *hin;
            float *y1;
            CK(cudaMalloc(&h1, (size_t)k * I * 2));
            CK(cudaMalloc(&y1, (size_t)k * H * 4));
            OK(cu_int4_matmul(&dgu.w, &r1, dx + (size_t)t * H, H, h1, I, CU_OUT_SILU_F16,
                              CU_GEMM_GEMV, 0, ERRP));
            /* down from the batched run's h rows of this token (each
             * product compared alone), in this plan's order */
            const vector<int32_t> pos1 = host(p1.p.pos, (size_t)k);
            vector<uint16_t> hin_h((size_t)k * I);
            for (int j = 0; j < k; j++)
                memcpy(&hin_h[(size_t)pos1[j] * I], &hbh[(size_t)pos[t * k + j] * I], (size_t)I * 2);
            hin = (__half *)dev(hin_h);
            r1.a_rows = nullptr;
            OK(cu_int4_matmul(&ddn.w, &r1, hin, I, y1, H, CU_OUT_F32, CU_GEMM_GEMV, 0, ERRP));
            const vector<uint16_t> h1h = host((const uint16_t *)h1, (size_t)k * I);
            const vector<float> y1h = host(y1, (size_t)k * H);
            for (int j = 0; j < k; j++) {
                const size_t i = (size_t)t * k + j;
                for (int c = 0; c < I; c++)
                    hg[i * I + c] = h2f(h1h[(size_t)pos1[j] * I + c]);
                memcpy(&yg[i * H], &y1h[(size_t)pos1[j] * H], (size_t)H * 4);
            }
            cudaFree(h1);
            cudaFree(hin);
            cudaFree(y1);
            cudaFree(ids1);
            free_plan(p1);
        }
        const long staged = cu_int4_gemv_staged_launches() - n0;
        cu_int4_gemv_set_stage(was);
        char what[160];
        snprintf(what, sizeof what, "gemv H=%d I=%d T=%d gate_up+silu, 1 token (%s) vs tile %d",
                 H, I, T, st ? "staged" : "registers", tile);
        compare(what, hg.data(), href.data(), T * k, I, exact ? 0 : 1e-4);
        snprintf(what, sizeof what, "gemv H=%d I=%d T=%d down, 1 token (%s) vs tile %d", H, I, T,
                 st ? "staged" : "registers", tile);
        compare(what, yg.data(), yref.data(), T * k, H, exact ? 0 : 1e-5);
        const bool ran = staged == (st ? 2 * T : 0);
        printf("%-4s gemv H=%d I=%d T=%d: %ld one-token launches staged, %d expected\n",
               ran ? "ok" : "FAIL", H, I, T, staged, st ? 2 * T : 0);
        if (!ran)
            g_fail = 1;
    }
    cudaFree(hb);
    cudaFree(yb);
    cudaFree(dids);
    cudaFree(dw);
    cudaFree(dx);
    free_plan(pd);
    release(dgu);
    release(ddn);
}

/* The one-token grouped gemv with its weights staged through shared memory
 * (LIGHTMOE_CUDA_GEMV_STAGE): against the CPU through run_grouped (gate_up,
 * down, down before its wait, down adding into the residual), the launch
 * counter showing the staged kernel ran, and the same bits as the kernel
 * holding its weights in registers (gate_up + SiLU and down). */
static void gemv_stage_bits(int H, int I, int g, int E, int k)
{
    qmat gu = make_qmat(2 * I, H, g, E, false), dn = make_qmat(H, I, g, E, false);
    dq dgu = upload(gu), ddn = upload(dn);
    vector<float> x = rand_act((size_t)H, 2.0f);
    __half *dx = dev_half(x);
    const vector<int32_t> ids = rand_choices(1, k, E);
    const vector<float> wts(k, 1.f);
    plan_dev pd = make_plan(1, k, E);
    int32_t *dids = dev(ids);
    float *dw = dev(wts);
    OK(cu_moe_group(dids, dw, 1, k, E, 1, &pd.p, 0, ERRP));
    cu_gemm_rows r = grouped_rows(pd.p, k, E, 1);
    /* per setting: gate_up + SiLU; down plain, reading its list before its
     * wait, and accumulating into rows of ones (all from the register
     * kernel's h, so that each product is compared alone) */
    __half *h[2];
    float *y[2][3];
    long staged[2];
    const vector<float> ones((size_t)k * H, 1.f);
    for (int st = 0; st < 2; st++) {
        CK(cudaMalloc(&h[st], (size_t)k * I * 2));
        for (int v = 0; v < 3; v++) {
            CK(cudaMalloc(&y[st][v], (size_t)k * H * 4));
            CK(cudaMemset(y[st][v], 0xff, (size_t)k * H * 4));
        }
        CK(cudaMemcpy(y[st][2], ones.data(), ones.size() * 4, cudaMemcpyHostToDevice));
        const int was = cu_int4_gemv_set_stage(st);
        const long n0 = cu_int4_gemv_staged_launches();
        r.a_rows = pd.p.ent_token;
        OK(cu_int4_matmul(&dgu.w, &r, dx, H, h[st], I, CU_OUT_SILU_F16, CU_GEMM_GEMV, 0, ERRP));
        r.a_rows = nullptr;
        OK(cu_int4_matmul(&ddn.w, &r, h[0], I, y[st][0], H, CU_OUT_F32, CU_GEMM_GEMV, 0, ERRP));
        r.plan_ready = 1;
        OK(cu_int4_matmul(&ddn.w, &r, h[0], I, y[st][1], H, CU_OUT_F32, CU_GEMM_GEMV, 0, ERRP));
        r.plan_ready = 0;
        OK(cu_int4_matmul(&ddn.w, &r, h[0], I, y[st][2], H, CU_OUT_F32_ACC, CU_GEMM_GEMV, 0,
                          ERRP));
        staged[st] = cu_int4_gemv_staged_launches() - n0;
        cu_int4_gemv_set_stage(was);
    }
    vector<uint16_t> h0 = host((const uint16_t *)h[0], (size_t)k * I),
                     h1 = host((const uint16_t *)h[1], (size_t)k * I);
    bool same = h0 == h1;
    for (int v = 0; v < 3; v++) {
        vector<float> y0 = host(y[0][v], (size_t)k * H), y1 = host(y[1][v], (size_t)k * H);
        same &= !memcmp(y0.data(), y1.data(), y0.size() * 4);
    }
    const bool ran = staged[0] == 0 && staged[1] == 4;
    printf("%-4s staged gemv H=%d I=%d E=%d k=%d: gate_up, down, down before its wait and down "
           "accumulating bit-identical to the register kernel (%s; %ld and %ld launches staged, "
           "0 and 4 expected)\n", same && ran ? "ok" : "FAIL", H, I, E, k,
           same ? "same bits" : "BITS DIFFER", staged[0], staged[1]);
    if (!same || !ran)
        g_fail = 1;
    for (int st = 0; st < 2; st++) {
        cudaFree(h[st]);
        for (int v = 0; v < 3; v++)
            cudaFree(y[st][v]);
    }
    cudaFree(dx);
    cudaFree(dids);
    cudaFree(dw);
    free_plan(pd);
    release(dgu);
    release(ddn);
}

static void test_gemv_stage()
{
    printf("     one-token grouped gemv, weights staged through shared memory\n");
    /* the staged kernel serves two chunks a lane: teams as the defaults make
     * them, whatever the environment says (LIGHTMOE_CUDA_GEMV_ILP / _T64) */
    cu_int4_gemv_set_ilp(2);
    const int t64_was = cu_int4_gemv_set_t64(1);
    const int was = cu_int4_gemv_set_stage(1);
    const long n0 = cu_int4_gemv_staged_launches();
    run_grouped(2048, 768, 128, 16, 8, 1, CU_GEMM_GEMV);  /* qwen3's matrices: K 2048 and 768 */
    run_grouped(2048, 1408, 128, 8, 4, 1, CU_GEMM_GEMV);  /* qwen1.5's: down K 1408 */
    run_grouped(224, 96, 32, 7, 3, 1, CU_GEMM_GEMV);       /* 7 and 3 chunks, 224 rows */
    run_grouped(256, 160, 32, 6, 2, 1, CU_GEMM_AUTO);
    const long n1 = cu_int4_gemv_staged_launches();
    /* down K 4096 (128 chunks): staged with teams of 64 lanes (two chunks a
     * lane); with teams of 32 (four a lane), in registers */
    run_grouped(256, 4096, 128, 6, 2, 1, CU_GEMM_GEMV);
    const long n2 = cu_int4_gemv_staged_launches();
    cu_int4_gemv_set_t64(0);
    run_grouped(256, 4096, 128, 6, 2, 1, CU_GEMM_GEMV);
    const long n3 = cu_int4_gemv_staged_launches();
    cu_int4_gemv_set_t64(1);
    /* 4 runs x (gate_up, down, gate_up and down again, down adding) */
    const bool ran = n1 - n0 == 20 && n2 - n1 == 5 && n3 - n2 == 2;
    printf("%-4s staged gemv taken by the launches it serves (%ld of 20; K 4096's down in teams of "
           "64: %ld of 5), not by K 4096's down in teams of 32 (%ld: its two gate_up launches)\n",
           ran ? "ok" : "FAIL", n1 - n0, n2 - n1, n3 - n2);
    if (!ran)
        g_fail = 1;
    cu_int4_gemv_set_stage(was);
    gemv_stage_bits(2048, 768, 128, 16, 8);
    gemv_stage_bits(2048, 1408, 128, 8, 4);
    gemv_stage_bits(224, 96, 32, 7, 3);
    gemv_stage_bits(256, 4096, 128, 6, 2); /* down in teams of 64 */
    /* one token's rows as in a batch of 2-4 (a request alone and batched) */
    gemv_tile_agree(2048, 768, 128, 16, 8, 3, true);
    gemv_tile_agree(2048, 1408, 128, 8, 4, 2, true);
    gemv_tile_agree(256, 160, 32, 8, 2, 3, true); /* the tiny fixtures' experts */
    gemv_tile_agree(224, 96, 32, 7, 3, 4, true);
    gemv_tile_agree(256, 4096, 128, 6, 2, 4, false); /* down: teams of 64 alone, of 32 batched */
    cu_int4_gemv_set_t64(t64_was);
    cu_int4_gemv_set_ilp(-1); /* back to the environment's or the build's default */
}

static void test_int4()
{
    for (auto s : {std::array<int, 3>{300, 288, 96}, {1000, 2080, 32}, {17, 4096, 128}, {1, 32, 32}})
        run_dequant(s[0], s[1], s[2]);
    {
        lm_err e_ = {0, ""};
        cu_int4_weights bad = {10, 48, 32, 1, nullptr, nullptr, nullptr};
        const bool refused = cu_int4_dequant(&bad, nullptr, 0, &e_) == -EINVAL;
        printf("%-4s int4 dequant refuses k %% 32 != 0 (%s)\n", refused ? "ok" : "FAIL", e_.msg);
        if (!refused)
            g_fail = 1;
    }
    /* the one-token gemv loading 4 chunks a lane per step (LIGHTMOE_CUDA_GEMV_ILP):
     * every product, then grouped only; K from 1 to 130 chunks */
    for (int ilp : {4, 5}) {
        cu_int4_gemv_set_ilp(ilp);
        printf("     gemv with 4 chunks a lane (%s)\n", ilp == 4 ? "all" : "grouped only");
        struct { int n, k, g; } sh4[] = {{96, 160, 32}, {300, 288, 96}, {1000, 2080, 32},
                                         {2048, 768, 128}, {72, 4160, 32}, {40, 32, 32}};
        for (auto s : sh4)
            run_dense(s.n, s.k, s.g, 1, false, CU_GEMM_GEMV, CU_OUT_F32);
        run_dense(300, 288, 32, 1, true, CU_GEMM_GEMV, CU_OUT_F32);
        run_dense(322, 160, 32, 1, false, CU_GEMM_GEMV, CU_OUT_SILU_F16);
        run_dense(130, 1024, 128, 1, false, CU_GEMM_GEMV, CU_OUT_F32_ACC);
        for (int T : {1, 3})
            run_grouped(256, 160, 32, 6, 2, T, CU_GEMM_GEMV);
        run_grouped(512, 192, 64, 16, 4, 1, CU_GEMM_AUTO);
        run_grouped(2048, 768, 128, 16, 8, 1, CU_GEMM_AUTO);
    }
    cu_int4_gemv_set_ilp(-1); /* back to the default */
    /* one token, K >= 4096: teams of 64 lanes (two warps), then of 32 */
    for (int t64 = 1; t64 >= 0; t64--) {
        const int was = cu_int4_gemv_set_t64(t64);
        printf("     one-token gemv, K >= 4096, teams of %d lanes\n", t64 ? 64 : 32);
        struct { int n, k, g; } shl[] = {{75, 4096, 128}, {1001, 4160, 32}, {8, 8192, 128}};
        for (auto s : shl)
            run_dense(s.n, s.k, s.g, 1, false, CU_GEMM_GEMV, CU_OUT_F32);
        run_dense(300, 4096, 32, 1, true, CU_GEMM_GEMV, CU_OUT_F32);
        run_dense(322, 4096, 128, 1, false, CU_GEMM_GEMV, CU_OUT_SILU_F16);
        run_dense(130, 4128, 32, 1, false, CU_GEMM_GEMV, CU_OUT_F32_ACC);
        run_grouped(256, 4096, 128, 6, 2, 1, CU_GEMM_GEMV); /* down: K = 4096 */
        cu_int4_gemv_set_t64(was);
    }
    const int Ts[] = {1, 3, 17, 64, 300};
    struct { int n, k, g; } shapes[] = {{96, 160, 32}, {300, 288, 96}, {1000, 2080, 32}, {2048, 768, 128}};
    for (auto s : shapes)
        for (int T : Ts)
            for (int p = 1; p <= 2; p++)
                run_dense(s.n, s.k, s.g, T, false, (cu_gemm_path)p, CU_OUT_F32);
    for (int T : {1, 17, 300})
        for (int p = 1; p <= 2; p++) {
            run_dense(300, 288, 32, T, true, (cu_gemm_path)p, CU_OUT_F32);
            run_dense(322, 160, 32, T, false, (cu_gemm_path)p, CU_OUT_SILU_F16);
            run_dense(130, 1024, 128, T, false, (cu_gemm_path)p, CU_OUT_F32_ACC);
        }
    for (int T : Ts)
        for (int p = 1; p <= 2; p++)
            run_grouped(256, 160, 32, 6, 2, T, (cu_gemm_path)p);
    run_grouped(512, 192, 64, 16, 4, 64, CU_GEMM_AUTO);
    run_grouped(512, 192, 64, 16, 4, 8, CU_GEMM_AUTO);
    test_int4_mma8();
    test_gemv_stage();
}

/* ---- MoE routing ------------------------------------------------------------------ */

static void test_moe()
{
    for (int renorm = 0; renorm <= 1; renorm++)
        for (int T : {1, 3, 17, 300}) {
            const int E = renorm ? 60 : 128, k = renorm ? 4 : 8, ld = E + 1;
            vector<float> lg((size_t)T * ld);
            for (auto &v : lg)
                v = 3.0f * urand();
            float *dl = dev(lg), *dw, *dsg;
            int32_t *di;
            CK(cudaMalloc(&di, T * k * 4));
            CK(cudaMalloc(&dw, T * k * 4));
            CK(cudaMalloc(&dsg, T * 4));
            OK(cu_moe_route(dl, ld, T, E, k, renorm, 1, di, dw, dsg, 0, ERRP));
            vector<int32_t> ids = host(di, T * k);
            vector<float> w = host(dw, T * k), sg = host(dsg, T);
            bool ok = true;
            double werr = 0;
            for (int t = 0; t < T; t++) {
                const float *l = &lg[(size_t)t * ld];
                vector<int> order;
                vector<double> p;
                ref_route(l, E, k, renorm, order, p);
                for (int j = 0; j < k; j++) {
                    ok &= ids[t * k + j] == order[j];
                    werr = std::max(werr, fabs(p[j] - w[t * k + j]) / p[j]);
                }
                werr = std::max(werr, fabs(1.0 / (1.0 + exp(-(double)l[E])) - (double)sg[t]));
            }
            ok &= werr < 1e-5;
            printf("%-4s moe route T=%d E=%d k=%d renorm=%d (weights max rel err %.1e)\n",
                   ok ? "ok" : "FAIL", T, E, k, renorm, werr);
            if (!ok)
                g_fail = 1;
            cudaFree(dl);
            cudaFree(di);
            cudaFree(dw);
            cudaFree(dsg);
        }
}

/* Router (fp32 logits, optionally with the MLP input norm fused) against
 * the CPU in double: bound 1e-5 relative (fp32 sums of H products); the
 * fused fp16 rows xn as rmsnorm's fp16 output, 1e-3. */
static void run_router(int T, int H, int rows, bool fused)
{
    vector<float> x((size_t)T * H), nw(H), w((size_t)rows * H);
    for (auto &v : x)
        v = 4.0f * urand();
    for (auto &v : nw)
        v = 1.0f + 0.3f * urand();
    for (auto &v : w)
        v = 0.05f * urand();
    float *dx = dev(x), *dnw = dev(nw), *dw = dev(w), *out;
    __half *xn;
    CK(cudaMalloc(&out, (size_t)T * rows * 4));
    CK(cudaMalloc(&xn, (size_t)T * H * 2));
    CK(cudaMemset(out, 0xff, (size_t)T * rows * 4));
    CK(cudaMemset(xn, 0xff, (size_t)T * H * 2));
    if (fused)
        OK(cu_router_norm(dx, T, H, dnw, 1e-6f, dw, rows, out, xn, 0, ERRP));
    else
        OK(cu_router_logits(dx, T, H, dw, rows, out, 0, ERRP));
    vector<double> lref((size_t)T * rows), nref((size_t)T * H);
    for (int t = 0; t < T; t++) {
        const float *xr = &x[(size_t)t * H];
        double ss = 0;
        for (int c = 0; c < H; c++)
            ss += (double)xr[c] * xr[c];
        const double inv = fused ? 1 / sqrt(ss / H + 1e-6) : 1.0;
        for (int c = 0; c < H; c++)
            nref[(size_t)t * H + c] = (fused ? nw[c] : 1.0f) * xr[c] * inv;
        for (int r = 0; r < rows; r++) {
            double acc = 0;
            for (int c = 0; c < H; c++)
                acc += (double)w[(size_t)r * H + c] * nref[(size_t)t * H + c];
            lref[(size_t)t * rows + r] = acc;
        }
    }
    vector<float> got = host(out, (size_t)T * rows);
    char what[128];
    snprintf(what, sizeof what, "router%s T=%d H=%d rows=%d", fused ? "+norm" : "", T, H, rows);
    compare(what, got.data(), lref.data(), T, rows, 1e-5);
    if (fused) {
        vector<uint16_t> gh = host((const uint16_t *)xn, (size_t)T * H);
        vector<float> ghf(gh.size());
        for (size_t i = 0; i < gh.size(); i++)
            ghf[i] = h2f(gh[i]);
        snprintf(what, sizeof what, "router+norm fp16 rows T=%d H=%d", T, H);
        compare(what, ghf.data(), nref.data(), T, H, 1e-3);
    }
    cudaFree(dx); cudaFree(dnw); cudaFree(dw); cudaFree(out); cudaFree(xn);
}

/* Routing + grouping in one launch against the CPU's top-k and the
 * plan's invariants (entries sorted by expert, pos the inverse of the
 * scatter, weights those of the slots, items covering each expert). */
static void run_route_group(int T, int E, int k, int renorm)
{
    const int ld = E + 1;
    vector<float> lg((size_t)T * ld);
    for (auto &v : lg)
        v = 3.0f * urand();
    const int tile = cu_int4_tile_for(T, (T * k + E - 1) / E, CU_GEMM_AUTO);
    plan_dev pd = make_plan(T, k, E);
    float *dl = dev(lg), *dw, *dsg;
    int32_t *di;
    CK(cudaMalloc(&di, T * k * 4));
    CK(cudaMalloc(&dw, T * k * 4));
    CK(cudaMalloc(&dsg, T * 4));
    OK(cu_moe_route_group(dl, ld, T, E, k, renorm, 1, tile, di, dw, dsg, &pd.p, 0, ERRP));
    vector<int32_t> et = host(pd.p.ent_token, T * k), ee = host(pd.p.ent_expert, T * k),
                    pos = host(pd.p.pos, T * k), off = host(pd.p.offsets, E + 1);
    vector<float> ew = host(pd.p.ent_weight, T * k);
    const int ni = host(pd.p.n_items, 1)[0];
    vector<int2> items = host(pd.p.items, ni > 0 ? ni : 1);
    bool ok = off[0] == 0 && off[E] == T * k;
    double werr = 0;
    for (int t = 0; t < T && ok; t++) {
        vector<int> order;
        vector<double> p;
        ref_route(&lg[(size_t)t * ld], E, k, renorm, order, p);
        for (int j = 0; j < k; j++) {
            const int i = t * k + j, at = pos[i];
            ok &= at >= 0 && at < T * k && et[at] == t && ee[at] == order[j];
            ok &= at >= off[order[j]] && at < off[order[j] + 1];
            werr = std::max(werr, fabs(p[j] - ew[at]) / p[j]);
        }
    }
    int want = 0;
    for (int e = 0; e < E && ok; e++) {
        const int c = off[e + 1] - off[e];
        ok &= c >= 0;
        for (int q = 0; q * tile < c; q++, want++)
            ok &= want < ni && items[want].x == e && items[want].y == off[e] + q * tile;
    }
    ok &= want == ni && ni <= cu_moe_max_items(T * k, E, tile) && werr < 1e-5;
    printf("%-4s moe route+group T=%d E=%d k=%d tile=%d renorm=%d (%d items, weights max rel err %.1e)\n",
           ok ? "ok" : "FAIL", T, E, k, tile, renorm, ni, werr);
    if (!ok)
        g_fail = 1;
    cudaFree(dl); cudaFree(di); cudaFree(dw); cudaFree(dsg);
    free_plan(pd);
}

static const char *kind_name(int kind)
{
    return kind == 0 ? "random" : kind == 1 ? "tied, +-0" : kind == 2 ? "with -inf, NaN"
           : kind == 3 ? "NaN but 2" : "all NaN";
}

/* The warp kernel of route+group (at most 32 entries) against the block
 * kernel, bit for bit: the same ids, weights, shared gates, offsets and
 * work items, and every slot's entry (token, expert, weight) where pos
 * says (the block kernel may order an expert's entries otherwise). Logits
 * of `kind` 0: random; 1: few levels (ties, -0 and +0); 2: with -inf and
 * NaN (a token of all NaN at t = 1); 3: NaN but experts 0 and 1; 4: all
 * NaN. One token also runs the rank kernel, which must match the warp
 * kernel in every output bit. */
static void run_route_group_same(int T, int E, int k, int renorm, int kind, int tile)
{
    const int ld = E + 1, n = T * k;
    if (n > 32) { /* both runs would take the block kernel: nothing compared */
        printf("FAIL moe route+group same: T=%d k=%d is not a warp-kernel case\n", T, k);
        g_fail = 1;
        return;
    }
    vector<float> lg((size_t)T * ld);
    for (size_t i = 0; i < lg.size(); i++) {
        float v = 3.0f * urand();
        if (kind == 1) v = (rnd() & 7) == 0 ? ((rnd() & 1) ? 0.0f : -0.0f) : floorf(v * 2.0f) * 0.5f;
        if (kind == 2 && (rnd() & 3) == 0) v = (rnd() & 1) ? -INFINITY : NAN;
        if (kind == 2 && i / ld == 1 && (int)(i % ld) < E) v = NAN;
        if (kind == 3 && (int)(i % ld) >= 2 && (int)(i % ld) < E) v = NAN; /* 2 numbers a token */
        if (kind == 4 && (int)(i % ld) < E) v = NAN;                        /* no number */
        lg[i] = v;
    }
    float *dl = dev(lg);
    struct out {
        vector<int32_t> ids, off, et, ee, pos;
        vector<float> w, sg, ew;
        vector<int2> items;
        int ni;
    } o[3];
    /* v 0: the block kernel; 1: the warp kernel; 2 (one token): the rank kernel */
    const int nv = T == 1 ? 3 : 2;
    for (int v = 0; v < nv; v++) {
        const int warp = v > 0;
        const int was = cu_moe_set_route_warp(warp), rank_was = cu_moe_set_route_rank(v == 2);
        plan_dev pd = make_plan(T, k, E);
        float *dw, *dsg;
        int32_t *di;
        CK(cudaMalloc(&di, n * 4));
        CK(cudaMalloc(&dw, n * 4));
        CK(cudaMalloc(&dsg, T * 4));
        CK(cudaMemset(pd.p.items, 0xff, (n + E) * 8));
        OK(cu_moe_route_group(dl, ld, T, E, k, renorm, 1, tile, di, dw, dsg, &pd.p, 0, ERRP));
        cu_moe_set_route_warp(was);
        cu_moe_set_route_rank(rank_was);
        out &r = o[v];
        r.ids = host(di, n);
        r.w = host(dw, n);
        r.sg = host(dsg, T);
        r.off = host(pd.p.offsets, E + 1);
        r.et = host(pd.p.ent_token, n);
        r.ee = host(pd.p.ent_expert, n);
        r.ew = host(pd.p.ent_weight, n);
        r.pos = host(pd.p.pos, n);
        r.ni = host(pd.p.n_items, 1)[0];
        r.items = host(pd.p.items, n + E);
        cudaFree(di); cudaFree(dw); cudaFree(dsg);
        free_plan(pd);
    }
    bool ok = !memcmp(o[0].ids.data(), o[1].ids.data(), n * 4) &&
              !memcmp(o[0].w.data(), o[1].w.data(), n * 4) &&
              !memcmp(o[0].sg.data(), o[1].sg.data(), T * 4) && o[0].off == o[1].off &&
              o[0].ni == o[1].ni && o[0].ni >= 0 && o[0].ni <= n + E;
    for (int i = 0; ok && i < o[0].ni; i++)
        ok = o[0].items[i].x == o[1].items[i].x && o[0].items[i].y == o[1].items[i].y;
    for (int v = 0; v < 2 && ok; v++)
        for (int i = 0; ok && i < n; i++) {
            const int at = o[v].pos[i];
            ok = at >= 0 && at < n && o[v].et[at] == i / k && o[v].ee[at] == o[v].ids[i] &&
                 !memcmp(&o[v].ew[at], &o[v].w[i], 4);
        }
    /* the warp kernel keeps slot order inside an expert */
    for (int i = 1; ok && i < n; i++)
        ok = o[1].ee[i - 1] < o[1].ee[i] ||
             (o[1].ee[i - 1] == o[1].ee[i] && o[1].et[i - 1] <= o[1].et[i]);
    printf("%-4s moe route+group, warp kernel = block kernel bit for bit: T=%d E=%d k=%d tile=%d "
           "renorm=%d logits %s (%d items)\n", ok ? "ok" : "FAIL", T, E, k, tile, renorm,
           kind_name(kind), o[1].ni);
    if (!ok)
        g_fail = 1;
    if (nv == 3) { /* the rank kernel = the warp kernel, every output to the bit */
        const out &a = o[1], &b = o[2];
        bool same = a.ids == b.ids && !memcmp(a.w.data(), b.w.data(), n * 4) &&
                    !memcmp(a.sg.data(), b.sg.data(), T * 4) && a.off == b.off && a.et == b.et &&
                    a.ee == b.ee && !memcmp(a.ew.data(), b.ew.data(), n * 4) && a.pos == b.pos &&
                    a.ni == b.ni;
        for (int i = 0; same && i < a.ni; i++)
            same = a.items[i].x == b.items[i].x && a.items[i].y == b.items[i].y;
        printf("%-4s moe route+group, rank kernel = warp kernel bit for bit: E=%d k=%d tile=%d "
               "renorm=%d logits %s\n", same ? "ok" : "FAIL", E, k, tile, renorm,
               kind_name(kind));
        if (!same)
            g_fail = 1;
    }
    cudaFree(dl);
}

static void test_router()
{
    for (int T : {1, 3, 16})
        for (int fused = 0; fused <= 1; fused++) {
            run_router(T, 2048, 129, fused);
            run_router(T, 260, 61, fused);
        }
    lm_err e = {0, ""};
    const int rc = cu_router_norm(nullptr, 17, 2048, nullptr, 0.f, nullptr, 8, nullptr, nullptr, 0, &e);
    printf("%-4s router refuses 17 tokens: %s\n", rc == -EINVAL ? "ok" : "FAIL", e.msg);
    if (rc != -EINVAL)
        g_fail = 1;
    for (int T : {1, 3, 17, 64}) {
        run_route_group(T, 128, 8, 0);
        run_route_group(T, 60, 4, 1);
    }
    run_route_group(5, 1000, 8, 1);
    for (int warp = 0; warp <= 2; warp++) { /* all three kernels against the CPU (2: rank) */
        const int was = cu_moe_set_route_warp(warp > 0), rank_was = cu_moe_set_route_rank(warp == 2);
        for (int T : {1, 2, 4}) {
            run_route_group(T, 128, 8, 0);
            run_route_group(T, 8, 2, 1);
        }
        run_route_group(1, 1000, 8, 1);
        run_route_group(32, 60, 1, 1);
        cu_moe_set_route_warp(was);
        cu_moe_set_route_rank(rank_was);
    }
    for (int kind = 0; kind < 3; kind++) {
        run_route_group_same(1, 128, 8, 0, kind, 8);
        run_route_group_same(4, 128, 8, 1, kind, 8);
        run_route_group_same(3, 60, 4, 1, kind, 1);
        run_route_group_same(2, 8, 2, 1, kind, 2);
        run_route_group_same(16, 8, 2, 0, kind, 3);
        run_route_group_same(2, 1000, 8, 0, kind, 8);
        run_route_group_same(1, 33, 4, 1, kind, 16);
        run_route_group_same(8, 300, 4, 1, kind, 4);
        /* one token: the rank kernel too */
        run_route_group_same(1, 60, 4, 1, kind, 1);
        run_route_group_same(1, 1000, 8, 1, kind, 8);
        run_route_group_same(1, 8, 2, 0, kind, 2);
        run_route_group_same(1, 300, 6, 0, kind, 3);
        run_route_group_same(1, 32, 32, 1, kind, 1);
        run_route_group_same(1, 2, 1, 0, kind, 1);
    }
    for (int kind = 3; kind <= 4; kind++) { /* fewer numbers than choices */
        run_route_group_same(1, 128, 8, 1, kind, 8);
        run_route_group_same(1, 60, 4, 0, kind, 1);
    }
}

/* ---- RMSNorm, embedding ---------------------------------------------------------- */

static void test_norm()
{
    for (int H : {256, 2048, 2080}) {
        const int T = 17, n = 5;
        vector<float> x((size_t)T * H), w(H);
        for (auto &v : x)
            v = 4.0f * urand();
        for (auto &v : w)
            v = 1.0f + 0.3f * urand();
        vector<int32_t> rows = {16, 0, 3, 3, 9};
        float *dx = dev(x), *dwt = dev(w), *of;
        int32_t *dr = dev(rows);
        __half *oh;
        CK(cudaMalloc(&of, (size_t)n * H * 4));
        CK(cudaMalloc(&oh, (size_t)n * H * 2));
        OK(cu_rmsnorm(dx, H, dr, n, dwt, 1e-6f, oh, of, 0, ERRP));
        vector<double> ref((size_t)n * H);
        for (int i = 0; i < n; i++) {
            const float *xr = &x[(size_t)rows[i] * H];
            double ss = 0;
            for (int c = 0; c < H; c++)
                ss += (double)xr[c] * xr[c];
            const double inv = 1 / sqrt(ss / H + 1e-6);
            for (int c = 0; c < H; c++)
                ref[(size_t)i * H + c] = w[c] * xr[c] * inv;
        }
        vector<float> gf = host(of, (size_t)n * H);
        vector<uint16_t> gh = host((const uint16_t *)oh, (size_t)n * H);
        vector<float> ghf(gh.size());
        for (size_t i = 0; i < gh.size(); i++)
            ghf[i] = h2f(gh[i]);
        char what[128];
        snprintf(what, sizeof what, "rmsnorm fp32 H=%d rows=%d", H, n);
        compare(what, gf.data(), ref.data(), n, H, 1e-6);
        snprintf(what, sizeof what, "rmsnorm fp16 H=%d rows=%d", H, n);
        compare(what, ghf.data(), ref.data(), n, H, 1e-3);
        /* embedding gather */
        const int V = 37;
        vector<float> emb = rand_act((size_t)V * H, 1.0f);
        __half *de = dev_half(emb);
        vector<int32_t> tok = {36, 0, 5, 5, 17};
        int32_t *dt = dev(tok);
        OK(cu_embed(de, H, dt, n, of, 0, ERRP));
        vector<double> eref((size_t)n * H);
        for (int i = 0; i < n; i++)
            for (int c = 0; c < H; c++)
                eref[(size_t)i * H + c] = emb[(size_t)tok[i] * H + c];
        gf = host(of, (size_t)n * H);
        snprintf(what, sizeof what, "embed H=%d", H);
        compare(what, gf.data(), eref.data(), n, H, 0);
        cudaFree(dx); cudaFree(dwt); cudaFree(of); cudaFree(oh); cudaFree(dr); cudaFree(de); cudaFree(dt);
    }
}

/* ---- q/k/v post-processing and paged attention --------------------------------------- */

static const char *g_attn_tag = ""; /* the prefill tiles' kernel the labels name */
static bool g_dmma_case = false;     /* test_attn_dmma: decode asked on the tensor cores */

static void run_attn(int nq, int nkv, int hd, const vector<int> &prior, const vector<int> &len,
                     int force_split)
{
    const int bs = 16, nb = 0;
    (void)nb;
    const int nseq = (int)len.size(), G = nq / nkv, nh = nq + 2 * nkv;
    int T = 0, maxctx = 0;
    vector<int> start(nseq + 1, 0);
    for (int s = 0; s < nseq; s++) {
        start[s + 1] = start[s] + len[s];
        maxctx = std::max(maxctx, prior[s] + len[s]);
    }
    T = start[nseq];
    const int max_blocks = (maxctx + bs - 1) / bs;
    const int n_blocks = nseq * max_blocks + 3;
    /* block table: a random permutation of the blocks */
    vector<int32_t> perm(n_blocks);
    for (int i = 0; i < n_blocks; i++)
        perm[i] = i;
    for (int i = n_blocks - 1; i > 0; i--)
        std::swap(perm[i], perm[rnd() % (i + 1)]);
    vector<int32_t> bt((size_t)nseq * max_blocks);
    for (size_t i = 0; i < bt.size(); i++)
        bt[i] = perm[i];
    const size_t slot_elems = (size_t)nkv * hd;
    vector<uint16_t> kc((size_t)n_blocks * bs * slot_elems, f2h(0.f)), vc(kc.size(), f2h(0.f));
    auto slot = [&](int s, int p) { return (size_t)bt[(size_t)s * max_blocks + p / bs] * bs + p % bs; };
    for (int s = 0; s < nseq; s++)
        for (int p = 0; p < prior[s]; p++)
            for (size_t i = 0; i < slot_elems; i++) {
                kc[slot(s, p) * slot_elems + i] = f2h(urand());
                vc[slot(s, p) * slot_elems + i] = f2h(urand());
            }
    const vector<uint16_t> kc0 = kc, vc0 = vc; /* before this step's k, v */
    vector<float> qkv((size_t)T * nh * hd), bias((size_t)nh * hd), qn(hd), kn(hd), invf(hd / 2);
    for (auto &v : qkv) v = 2.0f * urand();
    for (auto &v : bias) v = 0.2f * urand();
    for (auto &v : qn) v = 1.0f + 0.2f * urand();
    for (auto &v : kn) v = 1.0f + 0.2f * urand();
    for (int i = 0; i < hd / 2; i++)
        invf[i] = (float)(1.0 / pow(10000.0, 2.0 * i / hd));
    vector<int32_t> tseq(T), tpos(T);
    for (int s = 0; s < nseq; s++)
        for (int t = start[s]; t < start[s + 1]; t++) {
            tseq[t] = s;
            tpos[t] = prior[s] + t - start[s];
        }
    bool decode = true;
    for (int l : len)
        decode &= l == 1;
    const int bq = decode ? 1 : std::max(1, 64 / G);
    vector<int2> tiles;
    for (int s = 0; s < nseq; s++)
        for (int t = start[s]; t < start[s + 1]; t += bq)
            tiles.push_back(make_int2(t, std::min(bq, start[s + 1] - t)));
    cu_attn_batch b;
    b.T = T;
    b.tok_seq = dev(tseq);
    b.tok_pos = dev(tpos);
    b.block_table = dev(bt);
    b.max_blocks = max_blocks;
    b.block_size = bs;
    b.tiles = dev(tiles);
    b.n_tiles = (int)tiles.size();
    b.bq = bq;
    b.nsplit = force_split;
    b.counters = nullptr;
    b.early = 0;
    cu_attn_shape sh = {nq, nkv, hd};
    uint16_t *dk = dev(kc), *dv = dev(vc);
    float *dqkv = dev(qkv), *dq, *part;
    CK(cudaMalloc(&dq, (size_t)T * nq * hd * 4));
    CK(cudaMemset(dq, 0xff, (size_t)T * nq * hd * 4));
    cu_qkv_params qp = {dev(bias), dev(qn), dev(kn), 1e-6f, dev(invf)};
    OK(cu_qkv_post(&sh, dqkv, &qp, &b, (__half *)dk, (__half *)dv, dq, 0, ERRP));
    /* CPU twin of the post-processing */
    vector<double> qref((size_t)T * nq * hd);
    for (int t = 0; t < T; t++)
        for (int hh = 0; hh < nh; hh++) {
            vector<double> v(hd);
            for (int i = 0; i < hd; i++)
                v[i] = (double)qkv[((size_t)t * nh + hh) * hd + i] + bias[hh * hd + i];
            if (hh < nq + nkv) {
                const vector<float> &nw = hh < nq ? qn : kn;
                double ss = 0;
                for (double x : v) ss += x * x;
                const double inv = 1 / sqrt(ss / hd + 1e-6);
                for (int i = 0; i < hd; i++) v[i] = nw[i] * v[i] * inv;
                vector<double> o(hd);
                for (int i = 0; i < hd / 2; i++) {
                    const double a = (double)(float)((float)tpos[t] * invf[i]);
                    o[i] = v[i] * cos(a) - v[i + hd / 2] * sin(a);
                    o[i + hd / 2] = v[i + hd / 2] * cos(a) + v[i] * sin(a);
                }
                v = o;
            }
            if (hh < nq) {
                for (int i = 0; i < hd; i++) qref[((size_t)t * nq + hh) * hd + i] = v[i];
            } else {
                vector<uint16_t> &c = hh < nq + nkv ? kc : vc;
                const int kh = hh < nq + nkv ? hh - nq : hh - nq - nkv;
                for (int i = 0; i < hd; i++)
                    c[(slot(tseq[t], tpos[t]) * nkv + kh) * hd + i] = f2h((float)v[i]);
            }
        }
    char what[160];
    snprintf(what, sizeof what, "qkv post (bias, qk-norm, rope) nq=%d nkv=%d hd=%d T=%d", nq, nkv, hd, T);
    vector<float> qgot = host(dq, (size_t)T * nq * hd);
    compare(what, qgot.data(), qref.data(), T * nq, hd, 1e-5);
    vector<uint16_t> kg = host(dk, kc.size()), vg = host(dv, vc.size());
    size_t kv_bad = 0;
    for (size_t i = 0; i < kc.size(); i++)
        kv_bad += fabsf(h2f(kg[i]) - h2f(kc[i])) > 2e-3f * (1 + fabsf(h2f(kc[i]))) ||
                  fabsf(h2f(vg[i]) - h2f(vc[i])) > 2e-3f * (1 + fabsf(h2f(vc[i])));
    printf("%-4s kv cache slots written (%zu mismatches)\n", kv_bad ? "FAIL" : "ok", kv_bad);
    if (kv_bad)
        g_fail = 1;

    /* attention */
    const float *dqin = dq;
    vector<float> qin = qgot;
    CK(cudaMalloc(&part, cu_attn_scratch_floats(&sh, b.n_tiles, bq, b.nsplit) * 4));
    __half *out;
    CK(cudaMalloc(&out, (size_t)T * nq * hd * 2));
    CK(cudaMemset(out, 0xff, (size_t)T * nq * hd * 2));
    OK(cu_attn(&sh, dqin, (__half *)dk, (__half *)dv, &b, part, out, 0, ERRP));
    vector<double> aref((size_t)T * nq * hd, 0);
    for (int t = 0; t < T; t++)
        for (int h = 0; h < nq; h++) {
            const int kh = h / G, ctx = tpos[t] + 1;
            vector<double> sc(ctx);
            double mx = -1e300;
            for (int p = 0; p < ctx; p++) {
                double s = 0;
                const size_t ko = (slot(tseq[t], p) * nkv + kh) * hd;
                for (int i = 0; i < hd; i++)
                    s += (double)qin[((size_t)t * nq + h) * hd + i] * h2f(kg[ko + i]);
                sc[p] = s / sqrt((double)hd);
                mx = std::max(mx, sc[p]);
            }
            double den = 0;
            for (int p = 0; p < ctx; p++) den += (sc[p] = exp(sc[p] - mx));
            for (int p = 0; p < ctx; p++) {
                const size_t vo = (slot(tseq[t], p) * nkv + kh) * hd;
                for (int i = 0; i < hd; i++)
                    aref[((size_t)t * nq + h) * hd + i] += sc[p] / den * h2f(vg[vo + i]);
            }
        }
    vector<uint16_t> ao = host((const uint16_t *)out, (size_t)T * nq * hd);
    vector<float> agot(ao.size());
    for (size_t i = 0; i < ao.size(); i++)
        agot[i] = h2f(ao[i]);
    snprintf(what, sizeof what, "attention%s nq=%d nkv=%d hd=%d T=%d ctx<=%d bq=%d split=%d",
             g_attn_tag, nq, nkv, hd, T, maxctx, bq, force_split);
    compare(what, agot.data(), aref.data(), T * nq, hd, 3e-3);
    /* the same, the splits merged by the attention's last block (counters);
     * twice: the counters must be back at zero after a launch */
    CK(cudaMalloc(&b.counters, (size_t)b.n_tiles * nkv * 4));
    CK(cudaMemset(b.counters, 0, (size_t)b.n_tiles * nkv * 4));
    const bool own_ok = force_split <= CU_ATTN_MAX_SPLIT_OWN;
    if (!own_ok) { /* the attention blocks merge at most CU_ATTN_MAX_SPLIT_OWN splits */
        lm_err e_ = {0, ""};
        const bool refused =
            cu_attn(&sh, dqin, (__half *)dk, (__half *)dv, &b, part, out, 0, &e_) == -EINVAL;
        printf("%-4s attention own merge refuses %d splits (%s)\n", refused ? "ok" : "FAIL",
               force_split, e_.msg);
        if (!refused)
            g_fail = 1;
    }
    for (int rep = 0; rep < 2 && own_ok; rep++) {
        CK(cudaMemset(out, 0xff, (size_t)T * nq * hd * 2));
        OK(cu_attn(&sh, dqin, (__half *)dk, (__half *)dv, &b, part, out, 0, ERRP));
        ao = host((const uint16_t *)out, (size_t)T * nq * hd);
        for (size_t i = 0; i < ao.size(); i++)
            agot[i] = h2f(ao[i]);
        /* k_attn_mma leaves the counters alone: the merge kernel merges */
        const bool mma = g_attn_tag[0] && !decode && (hd == 64 || hd == 128);
        snprintf(what, sizeof what, "attention%s %s nq=%d nkv=%d hd=%d T=%d split=%d #%d",
                 g_attn_tag, mma ? "with counters" : "own merge", nq, nkv, hd, T, force_split,
                 rep);
        compare(what, agot.data(), aref.data(), T * nq, hd, 3e-3);
    }
    vector<int32_t> cnt = host(b.counters, (size_t)b.n_tiles * nkv);
    size_t left = 0;
    for (int32_t c : cnt)
        left += c != 0;
    printf("%-4s attention split counters back at zero (%zu not)\n", left ? "FAIL" : "ok", left);
    if (left)
        g_fail = 1;
    /* decode: the post-processing inside the attention kernel (cu_attn_qkv),
     * from the caches as they were before this step; separate merge and own;
     * with the first step's loads before the dependency wait (early), the
     * new positions' slots hold NaN before the launch: the kernel must take
     * the new k, v from its registers, never from those loads */
    for (int run = 0; decode && run < 2 * (1 + (int)own_ok); run++) {
        const int own = run / 2, early = run % 2;
        vector<uint16_t> kc1 = kc0, vc1 = vc0;
        if (early)
            for (int t = 0; t < T; t++)
                for (size_t i = 0; i < slot_elems; i++) {
                    kc1[slot(tseq[t], tpos[t]) * slot_elems + i] = 0x7e00;
                    vc1[slot(tseq[t], tpos[t]) * slot_elems + i] = 0x7e00;
                }
        uint16_t *dk2 = dev(kc1), *dv2 = dev(vc1);
        cu_attn_batch b2 = b;
        b2.early = early;
        if (!own)
            b2.counters = nullptr;
        CK(cudaMemset(out, 0xff, (size_t)T * nq * hd * 2));
        OK(cu_attn_qkv(&sh, dqkv, &qp, (__half *)dk2, (__half *)dv2, &b2, part, out, 0, ERRP));
        ao = host((const uint16_t *)out, (size_t)T * nq * hd);
        for (size_t i = 0; i < ao.size(); i++)
            agot[i] = h2f(ao[i]);
        /* the tensor-core kernel takes decode with the merge kernel at hd 64
         * and 128, G <= 16; with counters (own merge) k_attn does */
        const bool dm = g_dmma_case && !own && (hd == 64 || hd == 128) && G <= 16;
        snprintf(what, sizeof what, "attention+qkv post%s nq=%d nkv=%d hd=%d T=%d split=%d %s%s",
                 dm ? " (dmma)" : g_dmma_case ? " (dmma asked: k_attn)" : "", nq, nkv, hd, T,
                 force_split, own ? "own merge" : "merge kernel", early ? ", early loads" : "");
        compare(what, agot.data(), aref.data(), T * nq, hd, 3e-3);
        if (g_dmma_case && !own) { /* which kernel ran: k_attn's output differs in its bits */
            uint16_t *dk3 = dev(kc1), *dv3 = dev(vc1);
            __half *out3;
            CK(cudaMalloc(&out3, (size_t)T * nq * hd * 2));
            const int was = cu_attn_set_dmma(0);
            OK(cu_attn_qkv(&sh, dqkv, &qp, (__half *)dk3, (__half *)dv3, &b2, part, out3, 0, ERRP));
            cu_attn_set_dmma(was);
            const vector<uint16_t> a3 = host((const uint16_t *)out3, (size_t)T * nq * hd);
            const bool differs = memcmp(a3.data(), ao.data(), a3.size() * 2) != 0;
            printf("%-4s attention+qkv post nq=%d nkv=%d hd=%d split=%d: %s k_attn's bits\n",
                   differs == dm ? "ok" : "FAIL", nq, nkv, hd, force_split,
                   differs ? "differs from" : "the same as");
            if (differs != dm)
                g_fail = 1;
            cudaFree(dk3);
            cudaFree(dv3);
            cudaFree(out3);
        }
        vector<uint16_t> k2 = host(dk2, kc.size()), v2 = host(dv2, vc.size());
        size_t bad2 = 0;
        for (size_t i = 0; i < kc.size(); i++)
            bad2 += fabsf(h2f(k2[i]) - h2f(kc[i])) > 2e-3f * (1 + fabsf(h2f(kc[i]))) ||
                    fabsf(h2f(v2[i]) - h2f(vc[i])) > 2e-3f * (1 + fabsf(h2f(vc[i])));
        printf("%-4s attention+qkv post kv cache slots written (%zu mismatches)\n",
               bad2 ? "FAIL" : "ok", bad2);
        if (bad2)
            g_fail = 1;
        cudaFree(dk2);
        cudaFree(dv2);
    }
    if (!decode) { /* refused: tiles of several tokens */
        lm_err e_ = {0, ""};
        const bool refused = cu_attn_qkv(&sh, dqkv, &qp, (__half *)dk, (__half *)dv, &b, part, out, 0, &e_) == -EINVAL;
        printf("%-4s attention+qkv post refuses prefill tiles (%s)\n", refused ? "ok" : "FAIL", e_.msg);
        if (!refused)
            g_fail = 1;
    }
    cudaFree(b.counters);
    cudaFree(out); cudaFree(part); cudaFree(dq); cudaFree(dqkv); cudaFree(dk); cudaFree(dv);
    cudaFree((void *)b.tok_seq); cudaFree((void *)b.tok_pos); cudaFree((void *)b.block_table);
    cudaFree((void *)b.tiles);
    cudaFree((void *)qp.bias); cudaFree((void *)qp.q_norm); cudaFree((void *)qp.k_norm); cudaFree((void *)qp.inv_freq);
}

static void test_attn()
{
    const vector<int> prior = {0, 5, 40, 0, 100}, len = {1, 3, 17, 64, 300};
    for (int split : {1, 3})
        run_attn(8, 2, 64, prior, len, split);
    run_attn(4, 4, 128, prior, len, 1);
    run_attn(32, 4, 128, {7, 0}, {17, 33}, 2);
    /* decode: one token per sequence, long contexts, flash-decoding splits */
    for (int split : {1, 8, 32}) {
        run_attn(32, 4, 128, {1000, 2500, 0, 63}, {1, 1, 1, 1}, split);
        run_attn(16, 16, 128, {1000, 31}, {1, 1}, split);
    }
    /* long contexts at decode: more splits than a warp has lanes */
    for (int split : {33, 100, 256})
        run_attn(32, 4, 128, {9000, 2500, 0, 63}, {1, 1, 1, 1}, split);
    run_attn(4, 1, 64, {300, 0, 17}, {1, 1, 1}, 4);
    run_attn(8, 2, 256, {40, 3}, {5, 1}, 2);
    /* decode tiles of 5-8 rows (8-warp blocks by default) at every head size */
    run_attn(48, 8, 64, {700, 31, 0}, {1, 1, 1}, 4); /* G 6 */
    run_attn(16, 2, 256, {900, 5}, {1, 1}, 3);       /* G 8 at hd 256 */
    run_attn(16, 2, 256, {300, 5}, {1, 1}, 1);
    run_attn(8, 4, 128, {40, 3}, {5, 7}, 2);          /* G 2: tiles of up to 14 rows */
    /* 9 sequences x 4 KV heads x 9 splits: past the 8-warp blocks' 320 */
    run_attn(32, 4, 128, {100, 0, 31, 32, 33, 500, 7, 64, 200}, vector<int>(9, 1), 9);
}

/* Decode tiles on the tensor cores (cu_attn_set_dmma; off by default): every
 * decode case above (with the merge kernel; with counters k_attn merges),
 * G 16 at hd 64 and 128, splits whose steps run on 1, 2-3 and all 4 warps
 * (and warps that loop), empty splits, and hd 256, which must still go to
 * k_attn. */
static void test_attn_dmma()
{
    const int was = cu_attn_set_dmma(1);
    g_dmma_case = true;
    for (int split : {1, 8, 32}) {
        run_attn(32, 4, 128, {1000, 2500, 0, 63}, {1, 1, 1, 1}, split);
        run_attn(16, 16, 128, {1000, 31}, {1, 1}, split);
    }
    for (int split : {33, 256})
        run_attn(32, 4, 128, {9000, 2500, 0, 63}, {1, 1, 1, 1}, split);
    run_attn(4, 1, 64, {300, 0, 17}, {1, 1, 1}, 4);
    run_attn(48, 8, 64, {700, 31, 0}, {1, 1, 1}, 4); /* G 6 */
    run_attn(16, 1, 128, {700, 3, 130, 95}, {1, 1, 1, 1}, 3); /* G 16 */
    run_attn(32, 2, 64, {150, 64}, {1, 1}, 2);                /* G 16 at hd 64 */
    run_attn(16, 2, 256, {900, 5}, {1, 1}, 3);                /* not taken: k_attn */
    run_attn(32, 4, 128, {100, 0, 31, 32, 33, 500, 7, 64, 200}, vector<int>(9, 1), 9);
    g_dmma_case = false;
    cu_attn_set_dmma(was);
}

/* Prefill tiles on the tensor cores (cu_attn_set_mma, the default): the
 * same CPU twin and bound; 64-position steps cut by the context, the
 * splits and the causal edge at every offset; G = 1, 4 and 8; hd 64 and
 * 128, and hd 256, which must still go to k_attn. */
static void test_attn_mma()
{
    const int was = cu_attn_set_mma(1);
    g_attn_tag = " (mma)";
    const vector<int> prior = {0, 5, 40, 0, 100}, len = {1, 3, 17, 64, 300};
    for (int split : {1, 3})
        run_attn(8, 2, 64, prior, len, split);
    for (int split : {1, 5})
        run_attn(4, 4, 128, prior, len, split);
    run_attn(32, 4, 128, {7, 0}, {17, 33}, 2);
    run_attn(32, 4, 128, {0, 130}, {400, 70}, 1);
    run_attn(16, 16, 128, {60}, {200}, 3);
    run_attn(8, 2, 256, {40, 3}, {5, 1}, 2); /* not taken: k_attn */
    g_attn_tag = "";
    cu_attn_set_mma(was);
}

/* Which INT4 kernel each row count gets (cu_int4_tile_for, host only: runs
 * without a GPU, so CI checks it): the gemv for 1-4 rows, the few-token
 * kernel (tile 8) for 5-16 on the automatic path unless switched off, the
 * many-row tiles by the average from 17 on; forced paths; and the launcher
 * refusals that need no device. */
static void test_paths()
{
    struct { int max_rows, avg, path, mma8, want; } cases[] = {
        {1, 1, CU_GEMM_AUTO, 1, 1},     {2, 2, CU_GEMM_AUTO, 1, 2},
        {4, 1, CU_GEMM_AUTO, 1, 4},     {5, 5, CU_GEMM_AUTO, 1, 8},
        {16, 1, CU_GEMM_AUTO, 1, 8},    {16, 16, CU_GEMM_AUTO, 1, 8},
        {17, 17, CU_GEMM_AUTO, 1, 32},  {32, 2, CU_GEMM_AUTO, 1, 16},
        {300, 40, CU_GEMM_AUTO, 1, 64}, {5, 5, CU_GEMM_AUTO, 0, 16},
        {8, 8, CU_GEMM_AUTO, 0, 16},    {3, 3, CU_GEMM_GEMV, 1, 4},
        {8, 8, CU_GEMM_GEMV, 1, 8},     {5, 5, CU_GEMM_MMA, 1, 16},
        {1, 1, CU_GEMM_MMA8, 0, 8},     {300, 300, CU_GEMM_MMA8, 1, 8},
    };
    const int was = cu_int4_set_mma8(1);
    for (auto c : cases) {
        cu_int4_set_mma8(c.mma8);
        const int got = cu_int4_tile_for(c.max_rows, c.avg, (cu_gemm_path)c.path);
        printf("%-4s int4 tile for %d rows (average %d), path %s%s: %d (want %d)\n",
               got == c.want ? "ok" : "FAIL", c.max_rows, c.avg, path_name((cu_gemm_path)c.path),
               c.mma8 ? "" : ", mma8 off", got, c.want);
        if (got != c.want)
            g_fail = 1;
    }
    cu_int4_set_mma8(was);
    cu_int4_weights w = {64, 256, 32, 1, nullptr, nullptr, nullptr};
    cu_gemm_rows r;
    memset(&r, 0, sizeof(r));
    r.n_rows = 4;
    r.x_f32 = reinterpret_cast<const float *>(&w); /* never read: refused first */
    lm_err e1 = {0, ""};
    bool refused = cu_int4_mma8(&w, &r, nullptr, 256, nullptr, 64, CU_OUT_F32, 0, &e1) == -EINVAL;
    printf("%-4s int4 mma8 refuses the normalising input (%s)\n", refused ? "ok" : "FAIL", e1.msg);
    if (!refused)
        g_fail = 1;
    r.x_f32 = nullptr;
    r.items = reinterpret_cast<const int2 *>(&w); /* never read: refused first */
    r.tile = 16;
    lm_err e3 = {0, ""};
    refused = cu_int4_mma8(&w, &r, nullptr, 256, nullptr, 64, CU_OUT_F32, 0, &e3) == -EINVAL;
    printf("%-4s int4 mma8 refuses work items of 16 (%s)\n", refused ? "ok" : "FAIL", e3.msg);
    if (!refused)
        g_fail = 1;
    r.items = nullptr;
    w.k = 48; /* not a multiple of 32 */
    lm_err e2 = {0, ""};
    refused = cu_int4_mma8(&w, &r, nullptr, 48, nullptr, 64, CU_OUT_F32, 0, &e2) == -EINVAL &&
              strstr(e2.msg, "int4 mma8: bad shape");
    printf("%-4s int4 mma8 refuses k 48 (%s)\n", refused ? "ok" : "FAIL", e2.msg);
    if (!refused)
        g_fail = 1;
}

int main(int argc, char **argv)
{
    const char *what = argc > 1 ? argv[1] : "all";
    if (!strcmp(what, "paths")) { /* host only: no device needed */
        test_paths();
        printf("%s\n", g_fail ? "FAILED" : "all passed");
        return g_fail;
    }
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
        printf("SKIP: no CUDA device (%s); GPU tests run on the GPU machine\n",
               e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
        return 77;
    }
    const bool all = !strcmp(what, "all");
    if (all) test_paths();
    if (all || !strcmp(what, "int4")) test_int4();
    if (!strcmp(what, "stage")) /* the staged one-token gemv alone */
        test_gemv_stage();
    if (!strcmp(what, "mma8")) /* the few-token kernel alone (sanitizers' time) */
        test_int4_mma8();
    if (all || !strcmp(what, "moe")) {
        test_moe();
        test_router();
    }
    if (all || !strcmp(what, "norm")) test_norm();
    if (!strcmp(what, "attn1")) /* the default attention only (racecheck's time) */
        test_attn();
    if (all || !strcmp(what, "attn")) {
        /* k_attn for every tile (prefill tiles: LIGHTMOE_CUDA_ATTN_MMA=0,
         * decode tiles: LIGHTMOE_CUDA_ATTN_DMMA=0) */
        const int mma = cu_attn_set_mma(0), dmma = cu_attn_set_dmma(0);
        test_attn(); /* the K/V loads of the next step in flight (default) */
        printf("-- attention again, each step loaded after the last (LIGHTMOE_CUDA_ATTN_PIPE=0)\n");
        const int was = cu_attn_set_pipe(0);
        test_attn();
        cu_attn_set_pipe(was);
        printf("-- attention again, tiles of 5-16 rows in 4-warp blocks (LIGHTMOE_CUDA_ATTN_W8=0)\n");
        const int w8 = cu_attn_set_w8(0);
        test_attn();
        cu_attn_set_w8(w8);
        cu_attn_set_mma(mma);
        cu_attn_set_dmma(dmma);
    }
    if (all || !strcmp(what, "attn") || !strcmp(what, "attnmma")) test_attn_mma();
    if (all || !strcmp(what, "attn") || !strcmp(what, "attndmma")) test_attn_dmma();
    if (all || !strcmp(what, "forward")) test_forward();
    if (all || !strcmp(what, "mega")) test_mega();
    if (all || !strcmp(what, "fold")) test_fold();
    if (all || !strcmp(what, "sample")) test_sample(true);
    if (!strcmp(what, "samplek")) /* small rows only (the sanitizers' time) */
        test_sample(false);
    if (!strcmp(what, "foldk")) /* the kernels alone (racecheck's time) */
        test_fold_kernels();
    printf("%s\n", g_fail ? "FAILED" : "all passed");
    return g_fail;
}
