"""The exact-answer cache through the real lightmoed (issue 6).

In-process cache (the default): the second identical greedy request is a
hit (cached = true, same text and ids) and does no engine work (the
scheduler's counters in /metrics do not move); Generate replays a hit as the
same chunks; other parameters, sampled requests and the cache modes behave
as documented; InvalidateCache drops entries.

Redis (real redis-server on a free port): hits; Redis killed in the middle
of 200 requests -> every request succeeds with the right answer, health
stays SERVING, one log line for the change; Redis restarted -> hits again;
Redis paused (SIGSTOP) -> requests still meet their deadlines from the
engine.

Redis lookups are asynchronous (a reader thread pipelines the GETs of
parked requests): 64 prompts x 4 requests at once on 2 RPC threads, all
hits and right; Redis paused with lookups outstanding -> health, Tokenize
and ModelInfo answer meanwhile, and every request is answered by the
engine; Redis killed with lookups in the pipeline -> no client error;
a client cancelling while its GET is outstanding ends at once and its
follower computes.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "daemon"))
import grpc  # noqa: E402

import lmtest  # noqa: E402
from lmtest import Api, Daemon, expect_error  # noqa: E402

A = lmtest.parse_args()
pb = lmtest.pb

ENGINE_COUNTERS = ("lightmoe_engine_steps_total", "lightmoe_generated_tokens_total")


def greedy(prompt, **kw):
    kw.setdefault("max_tokens", 8)
    return dict(prompt=prompt, temperature=0.0, **kw)


def engine_work(d):
    """The engine's counters once they have settled (a step's counters are
    published just after its last token reached the client)."""
    prev = None
    for _ in range(50):
        cur = tuple(d.metric(n) for n in ENGINE_COUNTERS)
        if cur == prev:
            return cur
        prev = cur
        time.sleep(0.1)
    return prev


def wait_idle(d):
    """No stream left open: every parked or resumed request has ended."""
    for _ in range(50):
        if d.metric("lightmoe_active_streams") == 0:
            break
        time.sleep(0.1)
    assert d.metric("lightmoe_active_streams") == 0, "a parked or resumed request was left behind"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def _die_with_parent():
    # PR_SET_PDEATHSIG = 1: a redis-server never outlives a killed test.
    import ctypes
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


class Redis:
    """A redis-server in a temp folder, on a fixed port (so it can restart)."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="lmredis-", dir=A.workdir)
        self.port = free_port()
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
             "--save", "", "--appendonly", "no", "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            # A session of its own: when the test's process group becomes
            # orphaned while Redis is SIGSTOPped, the kernel sends it SIGCONT
            # (see tests/cache/redis_harness.c).
            start_new_session=True, preexec_fn=_die_with_parent)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def command(self, *words):
        """One command over a plain socket; the first reply line."""
        msg = f"*{len(words)}\r\n" + "".join(f"${len(w)}\r\n{w}\r\n" for w in words)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(msg.encode())
            return s.recv(4096).split(b"\r\n")[0].decode()

    def dbsize(self):
        return int(self.command("DBSIZE")[1:])

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()

    def close(self):
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"


def test_memory_hit_no_engine_work():
    with Daemon("mem") as d:
        api = Api(d.channel())
        first = api.complete(**greedy("The capital of France is"))
        assert not first.cached
        assert first.finish_reason in ("stop", "length")
        before = engine_work(d)
        second = api.complete(**greedy("The capital of France is"))
        assert second.cached, "second identical greedy request was not a hit"
        assert second.text == first.text and list(second.token_ids) == list(first.token_ids)
        assert second.finish_reason == first.finish_reason
        assert second.usage.completion_tokens == first.usage.completion_tokens
        assert engine_work(d) == before, "a hit made the engine work"
        assert d.metric("lightmoe_cache_hits_total") >= 1
        # Generate: a hit is streamed too (the server replays the original
        # pieces; the RPC layer may merge pieces queued behind a send), with
        # the same text, ids and finish reason.
        chunks1 = [r for r in api.generate(**greedy("Once upon a time", max_tokens=12))]
        before = engine_work(d)
        chunks2 = [r for r in api.generate(**greedy("Once upon a time", max_tokens=12))]
        assert engine_work(d) == before, "a streamed hit made the engine work"
        assert not any(r.cached for r in chunks1)
        assert chunks2[-1].cached
        assert "".join(r.text for r in chunks2) == "".join(r.text for r in chunks1)
        assert sum((list(r.token_ids) for r in chunks2), []) == \
            sum((list(r.token_ids) for r in chunks1), [])
        assert chunks2[-1].finish_reason == chunks1[-1].finish_reason
        assert chunks2[-1].usage.completion_tokens == chunks1[-1].usage.completion_tokens
        # Unary answer of a streamed generation: same text.
        u = api.complete(**greedy("Once upon a time", max_tokens=12))
        assert u.cached and u.text == "".join(r.text for r in chunks1)


def test_single_flight():
    """Identical requests in flight together: the engine generates once."""
    with Daemon("flight", ["--rpc-threads", "17"]) as d:
        api = Api(d.channel())
        before = engine_work(d)
        out, errors = [], []
        barrier = threading.Barrier(16)

        def one():
            try:
                barrier.wait()
                out.append(api.complete(timeout=120, **greedy("All at once", max_tokens=24)))
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

        th = [threading.Thread(target=one) for _ in range(16)]
        for t in th:
            t.start()
        for t in th:
            t.join()
        assert not errors, errors[:3]
        assert len({r.text for r in out}) == 1
        assert sum(not r.cached for r in out) == 1, [r.cached for r in out]
        after = engine_work(d)
        gen = after[1] - before[1]
        assert gen == out[0].usage.completion_tokens, (gen, out[0].usage.completion_tokens)


def test_single_flight_keeps_serving():
    """Identical slow requests never take every RPC thread: with 2 threads
    and 4 identical requests waiting on one leader, health checks and other
    prompts are still answered at once, and every identical request gets the
    same, correct answer."""
    with Daemon("flightlive", ["--rpc-threads", "2", "--debug-hooks", "yes",
                               "--debug-step-delay-ms", "100"]) as d:
        api = Api(d.channel())
        out, errors = [], []

        def one():
            try:
                out.append(api.complete(timeout=300, **greedy("Slow and identical",
                                                              max_tokens=120)))
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

        th = [threading.Thread(target=one) for _ in range(4)]
        for t in th:
            t.start()
        time.sleep(1.0)  # the leader generates (up to 120 steps of >= 100 ms)
        # Before the fix every RPC thread waited on the leader: this check
        # timed out. Now it is answered while the identical ones still wait.
        assert api.check(timeout=5).status == 1  # SERVING
        other = api.complete(timeout=10, **greedy("A different prompt", max_tokens=2))
        assert other.usage.completion_tokens >= 1
        still_waiting = len(out) == 0
        for t in th:
            t.join()
        assert not errors, errors[:3]
        assert len({r.text for r in out}) == 1, [r.text for r in out]
        # Meaningful only if the leader was still generating during the checks.
        assert still_waiting or out[0].usage.completion_tokens < 60, \
            "the leader finished before the checks: the test did not test anything"


def test_single_flight_parked():
    """Followers hold no thread (issue 6): with 2 RPC threads, 50 identical
    requests wait for one leader while health checks and other prompts are
    answered; the engine generates once and all 51 get the same answer.
    Followers whose deadline passes while they wait end with
    DEADLINE_EXCEEDED, followers whose client cancels end at once; none of
    them runs the engine, and nothing is left behind (active streams back
    to 0; the ASan build checks for leaks at exit)."""
    with Daemon("flightpark", ["--rpc-threads", "2", "--debug-hooks", "yes",
                               "--debug-step-delay-ms", "50"]) as d:
        api = Api(d.channel())
        before = engine_work(d)
        req = pb.GenerateRequest(**greedy("Slow and identical", max_tokens=120))
        leader = api._complete.future(req, timeout=300)
        time.sleep(0.5)  # the leader is in the engine (up to 120 steps of >= 50 ms)
        followers = [api._complete.future(req, timeout=300) for _ in range(50)]
        short = [api._complete.future(req, timeout=0.6) for _ in range(5)]
        gone = [api._complete.future(req, timeout=300) for _ in range(5)]
        time.sleep(0.3)
        for f in gone:
            f.cancel()
        # Every RPC thread is free while 60 requests wait.
        assert api.check(timeout=5).status == 1  # SERVING
        other = api.complete(timeout=20, **greedy("A different prompt", max_tokens=2))
        for f in short:
            expect_error(f.result, grpc.StatusCode.DEADLINE_EXCEEDED)
        still_waiting = not leader.done()
        first = leader.result()
        out = [f.result() for f in followers]
        for f in gone:
            assert f.cancelled() or f.exception() is not None
        assert not first.cached
        assert all(r.cached for r in out), [r.cached for r in out]
        assert {r.text for r in out} == {first.text}
        assert all(list(r.token_ids) == list(first.token_ids) for r in out)
        after = engine_work(d)
        gen = after[1] - before[1]
        assert gen == first.usage.completion_tokens + other.usage.completion_tokens, \
            (gen, first.usage.completion_tokens, other.usage.completion_tokens)
        assert d.metric("lightmoe_cache_single_flight_waits_total") >= 60
        wait_idle(d)
        # Meaningful only if the leader was still generating during the checks.
        assert still_waiting or first.usage.completion_tokens < 60, \
            "the leader finished before the checks: the test did not test anything"


def test_single_flight_leader_cancelled():
    """The leader's client cancels while followers are parked: each follower
    is resumed without an answer and computes by itself (issue 6's
    semantics), on 2 RPC threads; all of them succeed with the answer the
    model gives alone, and nothing is left in progress."""
    with Daemon("flightcancel", ["--rpc-threads", "2", "--debug-hooks", "yes",
                                 "--debug-step-delay-ms", "50"]) as d:
        api = Api(d.channel())
        req = pb.GenerateRequest(**greedy("The leader goes away", max_tokens=40))
        leader = api._complete.future(req, timeout=300)
        time.sleep(0.5)  # the leader is in the engine
        followers = [api._complete.future(req, timeout=300) for _ in range(8)]
        time.sleep(0.3)
        leader.cancel()
        out = [f.result() for f in followers]
        assert leader.cancelled() or leader.exception() is not None
        # They computed (a leader that had finished would have served hits:
        # then the test would test nothing).
        assert not any(r.cached for r in out), [r.cached for r in out]
        alone = api.complete(**greedy("The leader goes away", max_tokens=40,
                                      cache_mode=pb.CACHE_MODE_BYPASS))
        assert {r.text for r in out} == {alone.text}, [r.text for r in out]
        assert all(list(r.token_ids) == list(alone.token_ids) for r in out)
        wait_idle(d)


def test_parameters_and_policy():
    with Daemon("policy") as d:
        api = Api(d.channel())
        p = "Parameters never share"
        assert not api.complete(**greedy(p)).cached
        assert api.complete(**greedy(p)).cached
        assert not api.complete(**greedy(p, max_tokens=7)).cached
        assert not api.complete(**greedy(p, repetition_penalty=1.3)).cached
        assert not api.complete(**greedy(p, stop=["\n"])).cached
        # Sampled without a seed: never cached. With a seed: cached.
        assert not api.complete(prompt=p, max_tokens=8).cached
        assert not api.complete(prompt=p, max_tokens=8).cached
        s1 = api.complete(prompt=p, max_tokens=8, temperature=0.9, seed=7)
        s2 = api.complete(prompt=p, max_tokens=8, temperature=0.9, seed=7)
        assert not s1.cached and s2.cached and s1.text == s2.text
        assert not api.complete(prompt=p, max_tokens=8, temperature=0.9, seed=8).cached
        # Modes.
        q = "Modes of the cache"
        assert not api.complete(**greedy(q, cache_mode=pb.CACHE_MODE_BYPASS)).cached
        assert not api.complete(**greedy(q, cache_mode=pb.CACHE_MODE_NO_STORE)).cached
        assert not api.complete(**greedy(q)).cached  # nothing was stored so far
        assert api.complete(**greedy(q, cache_mode=pb.CACHE_MODE_NO_STORE)).cached
        before = engine_work(d)
        assert not api.complete(**greedy(q, cache_mode=pb.CACHE_MODE_REFRESH)).cached
        assert engine_work(d) != before, "refresh must recompute"
        assert not api.complete(**greedy(q, cache_mode=pb.CACHE_MODE_BYPASS)).cached
        assert api.complete(**greedy(q)).cached
        # Logprobs are part of the key and come back from the cache.
        l1 = api.complete(**greedy(p, logprobs=3))
        l2 = api.complete(**greedy(p, logprobs=3))
        assert not l1.cached and l2.cached and l1.text == l2.text
        assert len(l1.logprobs) == len(l1.token_ids) > 0
        assert [(x.token_id, x.logprob, [(t.token_id, t.logprob) for t in x.top])
                for x in l2.logprobs] == \
            [(x.token_id, x.logprob, [(t.token_id, t.logprob) for t in x.top])
             for x in l1.logprobs]
        assert not api.complete(**greedy(p, logprobs=2)).cached
        g = [r for r in api.generate(**greedy(p, logprobs=3))]
        assert g[-1].cached and sum(len(r.logprobs) for r in g) == len(l1.token_ids)
        # Chat messages are cached by their rendered tokens.
        m = [pb.ChatMessage(role="user", content="hello there")]
        assert not api.complete(messages=m, temperature=0.0, max_tokens=6).cached
        assert api.complete(messages=m, temperature=0.0, max_tokens=6).cached


def test_invalidate():
    with Daemon("inval") as d:
        api = Api(d.channel())
        for p in ("alpha one", "alpha two", "beta"):
            api.complete(**greedy(p))
            assert api.complete(**greedy(p)).cached
        r = api._inval(pb.InvalidateCacheRequest(request=pb.GenerateRequest(**greedy("beta"))),
                       timeout=30)
        assert r.removed == 1
        assert not api.complete(**greedy("beta")).cached
        assert api.complete(**greedy("alpha one")).cached
        # By prompt prefix (token ids of "alpha").
        ids = list(api.tokenize(text="alpha one").token_ids)
        pre = list(api.tokenize(text="alpha two").token_ids)
        n = 0
        while n < min(len(ids), len(pre)) and ids[n] == pre[n]:
            n += 1
        assert n >= 1
        common = ids[:n]
        r = api._inval(pb.InvalidateCacheRequest(prefix_token_ids=common), timeout=30)
        assert r.removed == 2, r
        assert not api.complete(**greedy("alpha one")).cached
        assert api.complete(**greedy("beta")).cached
        r = api._inval(pb.InvalidateCacheRequest(all=True), timeout=30)
        assert r.removed == 2, r  # beta and alpha one (stored again above)
        assert not api.complete(**greedy("beta")).cached


def redis_daemon(name, r, *extra):
    return Daemon(name, ["--cache-url", r.url, "--cache-timeout-ms", "50", *extra])


def test_redis_hit():
    r = Redis()
    try:
        with redis_daemon("redis_hit", r) as d:
            api = Api(d.channel())
            a = api.complete(**greedy("Redis stores this"))
            before = engine_work(d)
            b = api.complete(**greedy("Redis stores this"))
            assert b.cached and b.text == a.text and engine_work(d) == before
            # cache_readers = 0 (default): one reader per 8 CPUs, 1 to 4
            auto = max(1, min(4, (os.cpu_count() or 1) // 8))
            assert f"readers: {auto}," in d.text(), d.text()
        # A second daemon on the same model and Redis: hits at once.
        with redis_daemon("redis_hit2", r) as d:
            b = Api(d.channel()).complete(**greedy("Redis stores this"))
            assert b.cached and b.text == a.text
    finally:
        r.close()


PROMPTS = [f"Question number {i} about the weather" for i in range(10)]


def reference_answers(api):
    return {p: api.complete(**greedy(p, cache_mode=pb.CACHE_MODE_BYPASS)).text for p in PROMPTS}


def load(api, n_threads, per_thread, ref, errors, hits, on_progress=None):
    done = [0]
    lock = threading.Lock()

    def worker(t):
        for i in range(per_thread):
            p = PROMPTS[(t * 7 + i) % len(PROMPTS)]
            try:
                resp = api.complete(timeout=120, **greedy(p))
                if resp.text != ref[p]:
                    errors.append(f"wrong answer for {p!r}: {resp.text!r} != {ref[p]!r}")
                if resp.cached:
                    with lock:
                        hits[0] += 1
            except grpc.RpcError as e:
                errors.append(f"{e.code()}: {e.details()}")
            with lock:
                done[0] += 1
                if on_progress:
                    on_progress(done[0])

    th = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    for t in th:
        t.start()
    for t in th:
        t.join()


def test_redis_killed_and_restarted():
    r = Redis()
    try:
        with redis_daemon("redis_kill", r, "--log-level", "info") as d:
            api = Api(d.channel())
            ref = reference_answers(api)
            errors, hits = [], [0]
            killed = threading.Event()

            def progress(n):
                if n == 100 and not killed.is_set():
                    r.kill()
                    killed.set()

            load(api, 8, 25, ref, errors, hits, progress)
            assert killed.is_set()
            assert not errors, errors[:5]
            assert api.check().status == lmtest.SERVING
            log = d.text()
            assert log.count("cache: backend unavailable") == 1, log[-3000:]
            # Restart (empty): after the back-off (at most 5 s), the daemon
            # reconnects, says so once, stores into Redis and hits from it.
            r.start()
            assert r.dbsize() == 0
            deadline = time.time() + 30
            while time.time() < deadline and "backend available again" not in d.text():
                api.complete(**greedy(PROMPTS[0]))
                time.sleep(0.1)
            d.wait_log(r"cache: backend available again", timeout=1)
            p = "Asked after the restart"
            assert not api.complete(**greedy(p)).cached
            deadline = time.time() + 10
            while r.dbsize() == 0 and time.time() < deadline:  # the store is asynchronous
                time.sleep(0.05)
            assert r.dbsize() >= 1, "nothing was stored in the restarted Redis"
            hit = api.complete(**greedy(p))
            assert hit.cached and hit.text == api.complete(
                **greedy(p, cache_mode=pb.CACHE_MODE_BYPASS)).text
            log = d.text()
            assert log.count("cache: backend unavailable") == 1, log[-3000:]
            assert log.count("cache: backend available again") == 1, log[-3000:]
    finally:
        r.close()


def test_redis_slow():
    r = Redis()
    try:
        with redis_daemon("redis_slow", r) as d:
            api = Api(d.channel())
            ref = reference_answers(api)
            t0 = time.time()
            api.complete(**greedy(PROMPTS[1], cache_mode=pb.CACHE_MODE_BYPASS))
            engine_s = time.time() - t0
            os.kill(r.proc.pid, signal.SIGSTOP)
            try:
                # Deadline: the engine's time plus a margin far below Redis' pause.
                budget = max(2.0, 4 * engine_s + 1.0)
                for p in PROMPTS[:5]:
                    t0 = time.time()
                    resp = api.complete(timeout=budget, **greedy(p))
                    assert resp.text == ref[p] and not resp.cached
                    assert time.time() - t0 < budget
                assert api.check().status == lmtest.SERVING
            finally:
                os.kill(r.proc.pid, signal.SIGCONT)
            assert d.metric("lightmoe_cache_errors_total") >= 1
    finally:
        r.close()


def test_redis_down_at_start():
    port = free_port()
    with Daemon("redis_down", ["--cache-url", f"redis://127.0.0.1:{port}/0"]) as d:
        api = Api(d.channel())
        a = api.complete(**greedy("No Redis here"))
        assert not a.cached
        for _ in range(5):
            # Answered by the model (or, when it arrives while the previous
            # identical request's result is still being handed over, by the
            # single flight): never an error, always the same answer.
            b = api.complete(**greedy("No Redis here"))
            assert b.text == a.text and list(b.token_ids) == list(a.token_ids)
        assert api.check().status == lmtest.SERVING
        d.wait_log("cache: backend unavailable", timeout=5)
        assert d.metric("lightmoe_cache_up") == 0
        assert d.metric('lightmoe_cache_lookups_total{result="hit"}') == 0


def async_daemon(name, r, timeout_ms=50, *extra, readers=1):
    d = Daemon(name, ["--cache-url", r.url, "--cache-timeout-ms", str(timeout_ms),
                      "--rpc-threads", "2", "--cache-readers", str(readers), *extra])
    d.readers = readers
    return d


def reader_lookups(d):
    """Lookups sent by each reader thread (the daemon's metrics)."""
    return [d.metric(f'lightmoe_cache_reader_lookups_total{{reader="{i}"}}')
            for i in range(d.readers)]


def check_readers(d, before):
    """Every reader took part since `before` (lookups are dealt in turn)."""
    assert f"readers: {d.readers}," in d.text(), "cache_readers not applied"
    after = reader_lookups(d)
    assert all(a > b for a, b in zip(after, before)), (before, after)


def redis_async_many_hits(readers):
    r = Redis()
    try:
        with async_daemon(f"redis_many{readers}", r, readers=readers) as d:
            api = Api(d.channel())
            prompts = [f"Pipelined prompt number {i}" for i in range(64)]
            ref = {}
            for p in prompts:
                resp = api.complete(**greedy(p, max_tokens=4))
                assert not resp.cached
                ref[p] = (resp.text, list(resp.token_ids))
            deadline = time.time() + 10
            while r.dbsize() < 64 and time.time() < deadline:  # stores are asynchronous
                time.sleep(0.05)
            assert r.dbsize() == 64
            hits0 = d.metric('lightmoe_cache_lookups_total{result="hit"}')
            waits0 = d.metric("lightmoe_cache_single_flight_waits_total")
            per_reader = reader_lookups(d)
            before = engine_work(d)
            futs = [(p, api._complete.future(pb.GenerateRequest(**greedy(p, max_tokens=4)),
                                             timeout=120))
                    for _ in range(4) for p in prompts]
            for p, f in futs:
                resp = f.result()
                assert resp.cached, p
                assert (resp.text, list(resp.token_ids)) == ref[p], p
            assert engine_work(d) == before
            # Each answered by its own GET or, when an identical request's GET
            # was outstanding, parked behind it and handed its hit.
            hits = d.metric('lightmoe_cache_lookups_total{result="hit"}') - hits0
            waits = d.metric("lightmoe_cache_single_flight_waits_total") - waits0
            assert hits >= 64 and hits + waits == 256, (hits, waits)
            check_readers(d, per_reader)
            ns = api.complete(**greedy(prompts[3], max_tokens=4, cache_mode=pb.CACHE_MODE_NO_STORE))
            assert ns.cached and ns.text == ref[prompts[3]][0]
            ns = api.complete(**greedy("Never stored", max_tokens=4,
                                       cache_mode=pb.CACHE_MODE_NO_STORE))
            assert not ns.cached
            time.sleep(0.3)
            assert r.dbsize() == 64
            assert d.metric("lightmoe_cache_errors_total") == 0
            wait_idle(d)
    finally:
        r.close()


def test_redis_async_many_hits():
    """64 distinct prompts stored through the asynchronous path (misses),
    then 256 requests (each prompt 4 times) in flight at once on 2 RPC
    threads: every one a hit with the stored answer, no engine work; a
    no_store lookup hits too, and misses without storing. With one reader
    thread and with three (each must have sent lookups)."""
    redis_async_many_hits(1)
    redis_async_many_hits(3)


def test_redis_paused_rpc_threads_free():
    """Redis stopped (SIGSTOP) with 12 lookups outstanding (timeout 3 s):
    the 2 RPC threads stay free (a health check, Tokenize and ModelInfo are
    answered while every lookup still waits), then each request is answered
    by the engine, right, within its deadline; health stays SERVING."""
    r = Redis()
    try:
        with async_daemon("redis_paused", r, 3000, readers=3) as d:
            api = Api(d.channel())
            prompts = [f"Paused Redis prompt {i}" for i in range(12)]
            ref = {p: api.complete(**greedy(p, cache_mode=pb.CACHE_MODE_BYPASS)).text
                   for p in prompts}
            t0 = time.time()
            api.complete(**greedy(prompts[0], cache_mode=pb.CACHE_MODE_BYPASS))
            engine_s = time.time() - t0
            api.complete(**greedy("Warm the pool"))
            budget = 3.0 + max(3.0, 4 * engine_s + 2.0)
            per_reader = reader_lookups(d)
            os.kill(r.proc.pid, signal.SIGSTOP)
            try:
                futs = [(p, api._complete.future(pb.GenerateRequest(**greedy(p)), timeout=budget))
                        for p in prompts]
                time.sleep(0.2)
                # 1.5 s: half the Redis timeout. Blocking lookups would hold
                # both RPC threads for 3 s.
                assert api.check(timeout=1.5).status == lmtest.SERVING
                assert len(api.tokenize(timeout=1.5, text="hello there").token_ids) > 0
                api.info(timeout=1.5)
                pending = sum(not f.done() for _, f in futs)
                for p, f in futs:
                    resp = f.result()
                    assert resp.text == ref[p] and not resp.cached, p
            finally:
                os.kill(r.proc.pid, signal.SIGCONT)
            assert pending == len(prompts), \
                f"only {pending} lookups were outstanding during the checks: tested nothing"
            check_readers(d, per_reader)
            assert api.check().status == lmtest.SERVING
            assert d.metric("lightmoe_cache_timeouts_total") >= 1
            wait_idle(d)
    finally:
        r.close()


def test_redis_killed_in_pipeline():
    """Redis stopped with 16 lookups (8 stored prompts, 8 new) in the
    pipelines of 3 readers, then killed: no client sees an error, each gets
    the model's answer; one log line for the change; health SERVING."""
    r = Redis()
    try:
        with async_daemon("redis_pipekill", r, 3000, "--log-level", "info", readers=3) as d:
            api = Api(d.channel())
            prompts = [f"Killed pipeline prompt {i}" for i in range(16)]
            ref = {p: api.complete(**greedy(p, cache_mode=pb.CACHE_MODE_BYPASS)).text
                   for p in prompts}
            for p in prompts[:8]:
                api.complete(**greedy(p))
            deadline = time.time() + 10
            while r.dbsize() < 8 and time.time() < deadline:
                time.sleep(0.05)
            per_reader = reader_lookups(d)
            os.kill(r.proc.pid, signal.SIGSTOP)
            futs = [(p, api._complete.future(pb.GenerateRequest(**greedy(p)), timeout=60))
                    for p in prompts]
            time.sleep(0.3)
            pending = sum(not f.done() for _, f in futs)
            os.kill(r.proc.pid, signal.SIGKILL)
            r.proc.wait()
            for p, f in futs:
                resp = f.result()
                assert resp.text == ref[p] and not resp.cached, p
            assert pending == len(prompts), f"only {pending} lookups were outstanding"
            check_readers(d, per_reader)
            assert api.check().status == lmtest.SERVING
            d.wait_log("cache: backend unavailable", timeout=5)
            assert d.text().count("cache: backend unavailable") == 1
            assert d.metric("lightmoe_cache_errors_total") >= 1
            wait_idle(d)
    finally:
        r.close()


def test_redis_cancel_outstanding():
    """A client cancels while its GET is outstanding (Redis stopped, timeout
    3 s): it ends at once (no request left in progress long before the
    lookup's bound), its parked follower computes by itself and is right;
    the ASan build checks for leaks at exit. Two readers: the leader's and
    the lone request's lookups wait in different ones."""
    r = Redis()
    try:
        with async_daemon("redis_cancel", r, 3000, readers=2) as d:
            api = Api(d.channel())
            p = "Cancelled while Redis is asked"
            ref = api.complete(**greedy(p, cache_mode=pb.CACHE_MODE_BYPASS))
            api.complete(**greedy("Warm the pool"))
            os.kill(r.proc.pid, signal.SIGSTOP)
            try:
                req = pb.GenerateRequest(**greedy(p))
                lead = api._complete.future(req, timeout=60)
                time.sleep(0.2)
                follower = api._complete.future(req, timeout=60)
                lone = api._complete.future(pb.GenerateRequest(**greedy(p + " alone")), timeout=60)
                time.sleep(0.2)
                assert not lead.done() and not follower.done() and not lone.done()
                timeouts0 = d.metric("lightmoe_cache_timeouts_total")
                lead.cancel()
                lone.cancel()
                t0 = time.time()
                while d.metric("lightmoe_active_streams") > 1 and time.time() - t0 < 10:
                    time.sleep(0.02)
                # Both cancelled ones ended (the follower computes: at most it
                # is left) before their GETs' 3 s bound ran out.
                assert d.metric("lightmoe_active_streams") <= 1
                assert d.metric("lightmoe_cache_timeouts_total") == timeouts0, \
                    "a cancelled request waited for its Redis lookup"
                resp = follower.result()
                assert resp.text == ref.text and not resp.cached
                assert lead.cancelled() and lone.cancelled()
            finally:
                os.kill(r.proc.pid, signal.SIGCONT)
            wait_idle(d)
    finally:
        r.close()


def test_bad_cache_url():
    for bad, want in (("redis://h:0", "port"), ("memcached://x", "expected")):
        p = subprocess.run([A.lightmoed, "--model", A.model, "--cache-url", bad, "--check-config",
                            "--config", os.path.join(A.workdir, "empty.conf")],
                           capture_output=True, text=True, timeout=60)
        assert p.returncode != 0 and want in p.stderr, (p.returncode, p.stderr)


if __name__ == "__main__":
    open(os.path.join(A.workdir, "empty.conf"), "w").close()
    lmtest.run_tests([test_bad_cache_url, test_memory_hit_no_engine_work, test_single_flight,
                      test_single_flight_keeps_serving, test_single_flight_parked,
                      test_single_flight_leader_cancelled,
                      test_parameters_and_policy, test_invalidate, test_redis_hit,
                      test_redis_killed_and_restarted, test_redis_slow, test_redis_down_at_start,
                      test_redis_async_many_hits, test_redis_paused_rpc_threads_free,
                      test_redis_killed_in_pipeline, test_redis_cancel_outstanding])
