#!/usr/bin/env python3
"""Read a kernel timeline written by bench_cuda (LIGHTMOE_CUDA_TRACE_OUT, a
build with -DLIGHTMOE_CUDA_TRACE=ON) and print where a step's time goes.

    bench/cuda_trace.py TRACE.txt [--src ENGINE_DIR] [--launches]

A line of the trace is one block: "grid file line block smid t0 tw t1",
ns from the step's first block; tw is when the block's first
cu_pdl_wait() returned (-1: it did not wait). Blocks are grouped into
launches by grid id and the launches ordered by their first block's start.
For each launch:
  start   its first block's start,
  release its first block's return from the wait (the earlier launch done),
  end     its last block's exit,
  gap     release - the previous launch's end (what the dependency costs),
  after   end - release (what runs after the wait: the chain to shorten),
  early   release - start (how long its first blocks waited, loads in flight).
Kernel names come from the sources under --src at their recorded lines:
read a trace against the tree it was built from. The launches of a layer repeat; the summary averages each position of the
repeating pattern over the layers (the pattern starts at the attention).
"""
import argparse
import collections
import os
import re
import statistics


def fnv(s):
    h = 2166136261
    for ch in s.encode():
        h = ((h ^ ch) * 16777619) & 0xFFFFFFFF
    return h


def kernel_names(src):
    """(file hash, line) -> kernel name, from the source: the nearest
    __global__ declaration at or above the line."""
    names = {}
    for fn in os.listdir(src):
        if not fn.endswith('.cu'):
            continue
        lines = open(os.path.join(src, fn)).read().split('\n')
        names[fnv(fn)] = (fn, lines)
    return names


def name_of(names, fh, line):
    if fh not in names:
        return '%08x:%d' % (fh, line)
    fn, lines = names[fh]
    for i in range(min(line, len(lines)) - 1, -1, -1):
        if '__global__' in lines[i]:
            for j in range(i, min(i + 6, len(lines))):
                m = re.search(r'\b(k_\w+)\s*\(', lines[j])
                if m:
                    return m.group(1)
            break
    return '%s:%d' % (fn, line)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('trace')
    ap.add_argument('--src', default=os.path.join(os.path.dirname(__file__), '..', 'engine'))
    ap.add_argument('--launches', action='store_true', help='print every launch')
    a = ap.parse_args()
    names = kernel_names(a.src)
    by_grid = collections.defaultdict(list)
    with open(a.trace) as f:
        next(f)
        for ln in f:
            v = ln.split()
            g, fh, line, blk, sm, t0, tw, t1 = v[:8]
            marks = tuple(int(m) for m in v[8:12])
            by_grid[int(g)].append((int(fh), int(line), int(blk), int(sm), int(t0), int(tw),
                                    int(t1), marks))
    launches = []
    for g, recs in by_grid.items():
        fh, line = recs[0][0], recs[0][1]
        t0 = [r[4] for r in recs]
        tw = [r[5] for r in recs if r[5] >= 0]
        t1 = [r[6] for r in recs]
        release = min(tw) if tw else min(t0)
        # each cu_trace_mark point: the median over the blocks that reached it,
        # and the end: the median block, all relative to the release
        marks = []
        for i in range(4):
            v = sorted(r[4] + r[7][i] - release for r in recs if len(r[7]) > i and r[7][i] > 0)
            marks.append(v[len(v) // 2] if v else None)
        ends = sorted(r[6] - release for r in recs)
        launches.append(dict(name=name_of(names, fh, line), line=line, n=len(recs),
                             start=min(t0), release=release, end=max(t1), marks=marks,
                             end50=ends[len(ends) // 2]))
    launches.sort(key=lambda L: L['start'])
    prev_end = None
    for L in launches:
        L['gap'] = L['release'] - prev_end if prev_end is not None else 0
        L['after'] = L['end'] - L['release']
        L['early'] = L['release'] - L['start']
        L['e2e'] = L['gap'] + L['after']  # from the previous launch's end to this one's
        prev_end = L['end']
    total = launches[-1]['end'] - launches[0]['start']
    print('%s: %d launches, %d blocks, %.1f us from the first block to the last' %
          (a.trace, len(launches), sum(L['n'] for L in launches), total / 1e3))
    if a.launches:
        print('%5s %-22s %5s %9s %9s %9s %7s %7s %7s' %
              ('#', 'kernel', 'blks', 'start', 'release', 'end', 'gap', 'after', 'early'))
        for i, L in enumerate(launches):
            print('%5d %-22s %5d %9.2f %9.2f %9.2f %7.2f %7.2f %7.2f' %
                  (i, '%s:%d' % (L['name'], L['line']), L['n'], L['start'] / 1e3,
                   L['release'] / 1e3, L['end'] / 1e3, L['gap'] / 1e3, L['after'] / 1e3,
                   L['early'] / 1e3))
    # the repeating pattern: from one attention launch to the next
    att = [i for i, L in enumerate(launches) if L['name'] in ('k_attn', 'k_attn_dec_mma')]
    if len(att) < 3:
        return
    period = att[1] - att[0]
    if any(att[i + 1] - att[i] != period for i in range(len(att) - 1)):
        print('launches between attention launches vary: %s' %
              sorted(set(att[i + 1] - att[i] for i in range(len(att) - 1))))
        return
    layers = len(att) - 1
    print('a layer: %d launches, %d layers from attention to attention; mean (median) us' %
          (period, layers))
    print('%-24s %5s %13s %13s %13s %13s' % ('kernel', 'blks', 'gap', 'after', 'early',
                                               'end-to-end'))
    tot = collections.Counter()
    for k in range(period):
        rows = [launches[att[li] + k] for li in range(layers)]
        cols = []
        for key in ('gap', 'after', 'early', 'e2e'):
            v = [r[key] / 1e3 for r in rows]
            cols += [statistics.mean(v), statistics.median(v)]
            tot[key] += cols[-2]
        print('%-24s %5d %6.2f (%5.2f) %6.2f (%5.2f) %6.2f (%5.2f) %6.2f (%5.2f)' %
              (('%s:%d' % (rows[0]['name'], rows[0]['line']), rows[0]['n']) + tuple(cols)))
    print('%-24s %5s %6.2f %15.2f %15.2f %15.2f' % ('layer', '', tot['gap'], tot['after'],
                                                   tot['early'], tot['e2e']))
    print('cu_trace_mark points and the median block\'s end, us after the release (median '
          'block, mean over the layers):')
    for k in range(period):
        rows = [launches[att[li] + k] for li in range(layers)]
        cols = []
        for i in range(4):
            v = [r['marks'][i] / 1e3 for r in rows if r['marks'][i] is not None]
            cols.append('%6.2f' % statistics.mean(v) if v else '     -')
        print('%-24s %s | end50 %6.2f' % ('%s:%d' % (rows[0]['name'], rows[0]['line']),
                                          ' '.join(cols),
                                          statistics.mean(r['end50'] / 1e3 for r in rows)))


if __name__ == '__main__':
    main()
