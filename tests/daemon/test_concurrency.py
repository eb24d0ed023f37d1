"""64 concurrent streaming clients all complete with the outputs each gets
alone (greedy, so batching must not change a single token), mixed with
unary calls on shared channels."""
import threading
import time

import lmtest
from lmtest import Api, Daemon

A = lmtest.parse_args()


def run_64_streams(name, rpc, sample_threads=None):
    # The answer cache is off: the 64 streams must run in the engine, batched.
    extra = ["--sample-threads", str(sample_threads)] if sample_threads else []
    with Daemon(name, ["--max-batch", "32", "--cache-url", "off"] + rpc + extra) as d:
        prompts = [f"Client {i} says: the experts route token {i * 7 % 13}" for i in range(64)]
        max_tokens = [8 + (i % 5) * 4 for i in range(64)]
        api = Api(d.channel())
        # Reference: each request alone, unary (one row a step: never shared).
        alone = [api.complete(prompt=p, max_tokens=m, temperature=0)
                 for p, m in zip(prompts, max_tokens)]
        channels = [d.channel() for _ in range(8)]   # 8 connections, 8 streams each
        out = [None] * 64
        errors = []
        go = threading.Event()

        def client(i):
            try:
                go.wait()
                a = Api(channels[i % 8])
                text, ids, last = a.generate_all(prompt=prompts[i], max_tokens=max_tokens[i],
                                                 temperature=0, request_id=f"c{i}")
                out[i] = (text, ids, last)
            except Exception as e:  # noqa
                errors.append((i, repr(e)))

        ts = [threading.Thread(target=client, args=(i,)) for i in range(64)]
        for t in ts:
            t.start()
        go.set()
        for t in ts:
            t.join(timeout=lmtest.WAIT * 3)
        assert not errors, errors
        for i in range(64):
            text, ids, last = out[i]
            assert ids == list(alone[i].token_ids), (i, ids, list(alone[i].token_ids))
            assert text == alone[i].text, (i, text, alone[i].text)
            assert last.finish_reason == alone[i].finish_reason
            assert last.usage.completion_tokens == len(ids)
        m = d.metrics()
        assert 'lightmoe_requests_total{method="Generate",code="OK"} 64' in m, m
        # Batches of more than one sequence did happen.
        big = [l for l in m.splitlines() if l.startswith('lightmoe_batch_size_bucket{le="1"}')]
        count = [l for l in m.splitlines() if l.startswith("lightmoe_batch_size_count")]
        assert big and count and float(count[0].split()[-1]) > float(big[0].split()[-1]), m
        if sample_threads:
            # the batched steps' picks were shared among the sampling threads
            assert d.metric("lightmoe_sample_threads") == sample_threads, m
            assert d.metric("lightmoe_sample_shared_steps_total") > 0, m


def test_64_streams():
    run_64_streams("conc", ["--rpc-threads", "2"])  # one completion queue (the default)


def test_64_streams_queue_per_thread():
    # rpc_queues 0: a completion queue per thread; calls stay on the queue
    # that accepted them, answers come from the engine thread.
    run_64_streams("concq", ["--rpc-threads", "3", "--rpc-queues", "0"])


def test_64_streams_sampling_threads():
    # the batched steps' host picks on 2 threads: the same outputs as alone
    run_64_streams("concs", ["--rpc-threads", "2"], sample_threads=2)


lmtest.run_tests([test_64_streams, test_64_streams_queue_per_thread,
                  test_64_streams_sampling_threads])
