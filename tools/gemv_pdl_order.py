#!/usr/bin/env python3
"""Check, in the SASS of engine/cuda_int4_gemv.cu, that the one-token gemv
kernels load nothing but their weights before the dependency wait.

A kernel that starts before the previous one is done (programmatic
dependent launch) may read only what that kernel does not write (its
weights) before griddepcontrol.wait (SASS: ACQBULK). ptxas may move an
ld.global.nc (__ldg, or a load through const __restrict__) of A above the
wait: it takes such data as unchanging while the kernel runs. This was
seen once (review of branch gemv-unpack, 2026-12-07).

Usage (cuobjdump is not in the CUDA toolkit of the dev and CI machines;
the pip package nvidia-cuda-cuobjdump has one):
  nvcc -O3 -DNDEBUG -DLIGHTMOE_HAVE_CUDA=1 -D_GNU_SOURCE \\
      --generate-code=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr \\
      -std=c++17 -I. -c engine/cuda_int4_gemv.cu -o /tmp/g.o
  cuobjdump -sass /tmp/g.o > /tmp/g.sass
  tools/gemv_pdl_order.py /tmp/g.sass

For each k_int4_gemv<1, TPR, MODE, NCH, NORM 0, STAGE> it counts the
16-byte global loads between the kernel's first wait (the early exit of
blocks without work) and its second (the one after the first chunks'
loads): the register kernels may have 4 x NCH there (their weights), the
staged ones none (their weights go by cp.async). Exit status 1 if any
kernel has more, if a kernel's two waits are not found, or if the dump
holds no such kernel at all (a check that read nothing must not pass).
"""
import re
import sys

bad = 0
seen = 0
text = open(sys.argv[1]).read()
for f in re.split(r"\n\s+Function : ", text):
    g = re.search(r"k_int4_gemvILi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)ELb(\d)ELb(\d)E", f.split("\n")[0])
    if not g or g.group(1) != "1" or g.group(5) == "1":
        continue
    ins = [m.group(1) for m in (re.match(r"\s*/\*[0-9a-f]{4}\*/\s*(.*?);", l) for l in f.split("\n")) if m]
    waits = [i for i, s in enumerate(ins) if "ACQBULK" in s]
    name = "MT=%s TPR=%s MODE=%s NCH=%s NORM=%s STAGE=%s" % g.groups()
    seen += 1
    if len(waits) < 2:
        print("BAD  %s: %d waits, 2 expected" % (name, len(waits)))
        bad = 1
        continue
    n = sum(bool(re.search(r"\bLDG\.E\.(?:\w+\.)*128\b", s)) for s in ins[waits[0] + 1:waits[1]])
    allowed = 0 if g.group(6) == "1" else 4 * int(g.group(4))
    ok = n <= allowed
    bad |= not ok
    print("%-4s %s: %d 16-byte loads before the wait (weights: %d)" % ("ok" if ok else "BAD", name, n, allowed))
if not seen:
    print("BAD  no one-token k_int4_gemv kernel in %s" % sys.argv[1])
sys.exit(1 if bad or not seen else 0)
