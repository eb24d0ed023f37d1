/*
 * backend_tp.c: tensor-parallel CPU backend (placeholder until the sharded
 * implementation lands: refuses tp > 1 with a clear message).
 */
#include "engine/backend_cpu.h"

int backend_tp_cpu_create(const model *m, int tp, const backend_cpu_options *opt, backend **ret,
                          lm_err *err)
{
    *ret = NULL;
    return lm_err_set(err, -ENOTSUP, "tensor parallelism (tp=%d) on the CPU is not implemented yet",
                      tp);
}
