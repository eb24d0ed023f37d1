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
            preexec_fn=_die_with_parent)
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
        for _ in range(50):
            if d.metric("lightmoe_active_streams") == 0:
                break
            time.sleep(0.1)
        assert d.metric("lightmoe_active_streams") == 0, "a parked request was left behind"
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
        for _ in range(50):
            if d.metric("lightmoe_active_streams") == 0:
                break
            time.sleep(0.1)
        assert d.metric("lightmoe_active_streams") == 0, "a resumed request was left behind"


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
                      test_redis_killed_and_restarted, test_redis_slow, test_redis_down_at_start])
