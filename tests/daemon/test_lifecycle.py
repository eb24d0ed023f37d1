"""Operated like a systemd service, with this test playing systemd's part:
it binds a datagram NOTIFY_SOCKET, sets WATCHDOG_USEC/WATCHDOG_PID and
checks the READY/STATUS/EXTEND_TIMEOUT_USEC/WATCHDOG/STOPPING/RELOADING
sequence; health goes NOT_SERVING -> SERVING -> NOT_SERVING across load and
drain; a stalled engine loop (debug hook) stops the watchdog pings; SIGTERM
during 16 streams: each one finishes or ends with a clear status; SIGHUP
changes the log level and the token file."""
import os
import signal
import socket
import threading
import time

import grpc

import lmtest
from lmtest import Api, Daemon, expect_error

A = lmtest.parse_args()
W = A.workdir


class Notify:
    """The NOTIFY_SOCKET end: records (time, message) pairs."""

    def __init__(self, name):
        self.path = os.path.join(W, f"{name}.notify")
        if os.path.exists(self.path):
            os.unlink(self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.msgs = []
        self.lock = threading.Lock()
        self.stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while not self.stop:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            for line in data.decode().split("\n"):
                if line:
                    with self.lock:
                        self.msgs.append((time.time(), line))

    def lines(self):
        with self.lock:
            return [m for _, m in self.msgs]

    def times(self, msg):
        with self.lock:
            return [t for t, m in self.msgs if m == msg]

    def wait(self, msg, timeout=lmtest.WAIT):
        t0 = time.time()
        while time.time() - t0 < timeout:
            if msg in self.lines():
                return
            time.sleep(0.05)
        raise AssertionError(f"no {msg} from the daemon; got {self.lines()}")

    def close(self):
        self.stop = True
        self.t.join()
        self.sock.close()

    def env(self, watchdog_usec=None):
        e = {"NOTIFY_SOCKET": self.path}
        if watchdog_usec:
            e["WATCHDOG_USEC"] = str(watchdog_usec)
            e["WATCHDOG_PID"] = "self"
        return e


def test_notify_sequence_and_health():
    n = Notify("seq")
    d = Daemon("seq", ["--debug-hooks", "yes", "--debug-load-delay-ms", "1500"],
               env=n.env(watchdog_usec=2_000_000), ready=False)
    try:
        api = Api(d.channel())
        watch = api.watch()
        seen = [next(watch).status]
        assert seen == [lmtest.NOT_SERVING]
        assert api.check().status == lmtest.NOT_SERVING
        n.wait("READY=1")
        assert next(watch).status == lmtest.SERVING
        assert api.check().status == lmtest.SERVING
        lines = n.lines()
        ready = lines.index("READY=1")
        before = lines[:ready]
        assert "STATUS=starting" in before, lines
        assert any(l.startswith("STATUS=loading") for l in before), lines
        assert any(l.startswith("EXTEND_TIMEOUT_USEC=") for l in before), lines
        assert any(l.startswith("STATUS=loading: warming up") for l in before), lines
        assert lines[ready + 1:ready + 2] == ["STATUS=serving"], lines
        # The watchdog pings at half of WATCHDOG_USEC (2 s) from the engine loop.
        time.sleep(3.5)
        pings = n.times("WATCHDOG=1")
        assert len(pings) >= 2, n.lines()
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        assert min(gaps) > 0.5, gaps   # rate-limited to about 1 s, not every step
        # Drain: STOPPING=1, NOT_SERVING on the Watch stream, which then ends.
        d.signal(signal.SIGTERM)
        assert next(watch).status == lmtest.NOT_SERVING
        for _ in watch:
            pass
        n.wait("STOPPING=1")
        assert d.stop() == 0
    finally:
        d.kill()
        n.close()


def test_stalled_engine_stops_pings():
    n = Notify("stall")
    d = Daemon("stall", ["--debug-hooks", "yes"], env=n.env(watchdog_usec=1_000_000))
    try:
        n.wait("WATCHDOG=1")
        time.sleep(1.2)
        assert len(n.times("WATCHDOG=1")) >= 2
        d.signal(signal.SIGUSR1)
        d.wait_log("engine loop STALLED")
        time.sleep(0.6)   # a ping already under way may still arrive
        t_stall = time.time()
        time.sleep(3.0)   # three whole intervals
        late = [t for t in n.times("WATCHDOG=1") if t > t_stall]
        assert late == [], f"pings while stalled: {late}"
        d.signal(signal.SIGUSR2)
        d.wait_log("engine loop resumed")
        t_resume = time.time()
        time.sleep(2.0)
        assert [t for t in n.times("WATCHDOG=1") if t > t_resume], "pings did not resume"
        assert d.stop() == 0
    finally:
        d.kill()
        n.close()


def test_sigterm_during_16_streams():
    n = Notify("drain")
    # 30 ms per engine step: the short streams (8 tokens) finish well within
    # the 10 s grace period, the long ones (1000 tokens, 30 s or more) cannot
    # and must end with a clear UNAVAILABLE.
    d = Daemon("drain", ["--debug-hooks", "yes", "--debug-step-delay-ms", "30",
                         "--drain-grace-seconds", "10"], env=n.env())
    results = [None] * 16
    started = threading.Barrier(17)

    def client(i):
        api = Api(d.channel())
        max_tokens = 8 if i % 2 == 0 else 1000
        text, last, err = [], None, None
        try:
            it = api.generate(prompt=f"Stream {i}: the mixture of experts", max_tokens=max_tokens,
                              temperature=0)
            first = next(it)
            text.append(first.text)
            last = first
            started.wait()
            for r in it:
                text.append(r.text)
                last = r
        except grpc.RpcError as e:
            err = (e.code(), e.details())
        except threading.BrokenBarrierError:
            err = ("barrier", "")
        results[i] = (max_tokens, last, err)

    try:
        ts = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for t in ts:
            t.start()
        started.wait(timeout=lmtest.WAIT)  # all 16 have their first message
        t_term = time.time()
        d.signal(signal.SIGTERM)
        d.wait_log("draining")
        # New work is refused while draining.
        expect_error(lambda: Api(d.channel()).complete(prompt="late", max_tokens=2),
                     grpc.StatusCode.UNAVAILABLE)
        for t in ts:
            t.join(timeout=lmtest.WAIT)
        assert d.stop() == 0
        n.wait("STOPPING=1")
        finished = cancelled = 0
        for i, (mt, last, err) in enumerate(results):
            if err is None:
                assert last is not None and last.finish_reason in ("stop", "length"), (i, last)
                finished += 1
            else:
                code, details = err
                assert code == grpc.StatusCode.UNAVAILABLE, (i, err)
                assert "shutting down" in details and "grace period" in details, (i, err)
                cancelled += 1
        # Every stream is accounted for: finished, or ended with the clear
        # status. The long ones cannot have finished; at least one short one
        # did (8 steps in 10 s).
        assert finished + cancelled == 16 and cancelled >= 1 and finished >= 1, results
        print(f"    drain: {finished} streams finished, {cancelled} cancelled", flush=True)
        assert "drain: grace period over, cancelling" in d.text()
    finally:
        d.kill()
        n.close()


def test_sighup_reload():
    n = Notify("hup")
    conf = os.path.join(W, "hup.conf")
    tokens = os.path.join(W, "hup.tokens")
    with open(tokens, "w") as f:
        f.write("first-token\n")
    with open(conf, "w") as f:
        f.write(f"log_level = debug\nauth_token_file = {tokens}\nmax_queue = 10\n")
    d = Daemon("hup", [], env=n.env(), config=conf, log_level=None)
    try:
        ch = d.channel()
        Api(ch, token="first-token").complete(prompt="a", max_tokens=2, request_id="before-hup")
        d.wait_log(r"debug req=before-hup finish=")  # a debug line
        with open(tokens, "w") as f:
            f.write("second-token\n")
        with open(conf, "w") as f:
            f.write(f"log_level = warn\nauth_token_file = {tokens}\nmax_queue = 20\n"
                    "max_tokens_limit = 100\ndefault_max_tokens = 16\n")
        before = len(n.lines())
        d.signal(signal.SIGHUP)
        t0 = time.time()
        while "READY=1" not in n.lines()[before:]:
            assert time.time() - t0 < 60, n.lines()
            time.sleep(0.05)
        tail = n.lines()[before:]
        assert tail.index("RELOADING=1") < tail.index("READY=1"), tail
        log = d.text()
        assert "reload: log_level: 'debug' -> 'warn'" in log
        assert "reload: max_queue: changed to '20' but needs a restart; keeping '10'" in log
        assert "reload: max_tokens_limit: '4096' -> '100'" in log
        expect_error(lambda: Api(ch, token="first-token").complete(prompt="a", max_tokens=2),
                     grpc.StatusCode.UNAUTHENTICATED)
        api2 = Api(ch, token="second-token")
        api2.complete(prompt="a", max_tokens=2, request_id="after-hup")
        expect_error(lambda: api2.complete(prompt="a", max_tokens=101),
                     grpc.StatusCode.INVALID_ARGUMENT, "max_tokens_limit = 100")
        # warn level: neither the debug nor the info line of that request.
        assert "req=after-hup" not in d.text()
        # A broken file on reload keeps everything as it was.
        with open(conf, "w") as f:
            f.write("log_level = loud\n")
        d.signal(signal.SIGHUP)
        d.wait_log("reload failed, keeping the running configuration")
        api2.complete(prompt="a", max_tokens=2)
        assert d.stop() == 0
    finally:
        d.kill()
        n.close()


lmtest.run_tests([test_notify_sequence_and_health, test_stalled_engine_stops_pings,
                  test_sigterm_during_16_streams, test_sighup_reload])
