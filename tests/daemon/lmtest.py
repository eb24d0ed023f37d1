"""lmtest: shared harness of the daemon tests.

Starts the real lightmoed on a free port (port 0, read back from its log),
waits for it to be ready, and gives gRPC stubs built from the message classes
that `protoc --python_out` generated in the build tree (no generated code in
git). Uses Debian's python3-grpcio (a client nobody here wrote).

Timeouts are generous: the tests must pass on a loaded 2-core machine and
under AddressSanitizer; nothing asserts on speed.
"""
import argparse
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc

ARGS = None
WAIT = float(os.environ.get("LIGHTMOE_TEST_WAIT", "120"))  # seconds for slow starts


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parse_args():
    global ARGS, pb, health_pb, refl_pb, refl_alpha_pb
    p = argparse.ArgumentParser()
    p.add_argument("--lightmoed", required=True)
    p.add_argument("--lightmoe", required=True)
    p.add_argument("--py-proto", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--source", required=True)
    p.add_argument("--workdir", required=True)
    ARGS = p.parse_args()
    os.makedirs(ARGS.workdir, exist_ok=True)
    d = ARGS.py_proto
    pb = _load("lightmoe_pb2", f"{d}/lightmoe/v1/lightmoe_pb2.py")
    health_pb = _load("health_pb2", f"{d}/grpc/health/v1/health_pb2.py")
    refl_pb = _load("reflection_pb2", f"{d}/grpc/reflection/v1/reflection_pb2.py")
    refl_alpha_pb = _load("reflection_alpha_pb2", f"{d}/grpc/reflection/v1alpha/reflection_pb2.py")
    return ARGS


pb = health_pb = refl_pb = refl_alpha_pb = None


class Daemon:
    """One lightmoed process. Its stderr goes to a log file and is scanned
    for the bound ports and the ready line."""

    def __init__(self, name, extra=(), env=None, ready=True, model=None, listen="127.0.0.1:0",
                 metrics=True, config=None, log_level="debug"):
        self.name = name
        self.log_path = os.path.join(ARGS.workdir, f"{name}.log")
        args = [ARGS.lightmoed, "--model", model or ARGS.model, "--listen", listen,
                "--metrics-listen", "127.0.0.1:0" if metrics else "",
                "--config", config or os.path.join(ARGS.workdir, "empty.conf"), "--threads", "2",
                "--kv-cache-mb", "64"]
        if log_level:
            args += ["--log-level", log_level]
        if not config:
            open(os.path.join(ARGS.workdir, "empty.conf"), "w").close()
        args += list(extra)
        self.log = open(self.log_path, "w")
        e = dict(os.environ)
        e.pop("NOTIFY_SOCKET", None)
        e.pop("WATCHDOG_USEC", None)
        if env:
            e.update(env)
        if e.get("WATCHDOG_PID") == "self":
            # sd_watchdog_enabled checks WATCHDOG_PID against getpid(): let a
            # shell put its own pid there and exec the daemon in its place.
            del e["WATCHDOG_PID"]
            args = ["/bin/sh", "-c", 'WATCHDOG_PID=$$ exec "$0" "$@"', *args]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=self.log, env=e)
        self.port = self.metrics_port = None
        self.addr = None
        self._wait_for(r"gRPC listening on .* \(port (\d+)\)", self._set_port)
        if metrics:
            self._wait_for(r"metrics listening on .* \(port (\d+)\)", self._set_mport)
        if ready:
            self.wait_ready()

    def _set_port(self, m):
        self.port = int(m.group(1))
        self.addr = f"127.0.0.1:{self.port}"

    def _set_mport(self, m):
        self.metrics_port = int(m.group(1))

    def text(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def _wait_for(self, pattern, fn=None, timeout=WAIT):
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = re.search(pattern, self.text())
            if m:
                if fn:
                    fn(m)
                return m
            if self.proc.poll() is not None:
                raise AssertionError(f"lightmoed exited ({self.proc.returncode}) before "
                                     f"/{pattern}/:\n{self.text()[-4000:]}")
            time.sleep(0.05)
        raise AssertionError(f"timeout waiting for /{pattern}/ in {self.log_path}:\n"
                             f"{self.text()[-4000:]}")

    def wait_ready(self):
        self._wait_for(r"ready: serving")

    def wait_log(self, pattern, timeout=WAIT):
        return self._wait_for(pattern, None, timeout)

    def channel(self, **kw):
        return grpc.insecure_channel(self.addr, **kw)

    def metrics(self):
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                    timeout=30) as r:
            return r.read().decode()

    def metric(self, name):
        """Value of an unlabelled metric or a full 'name{labels}' key; 0 if absent."""
        for line in self.metrics().splitlines():
            if line.startswith("#"):
                continue
            k, _, v = line.rpartition(" ")
            if k == name:
                return float(v)
        return 0.0

    def signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self, expect_rc=0, timeout=WAIT):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # Show where it hangs before killing it.
            try:
                bt = subprocess.run(["gdb", "-p", str(self.proc.pid), "-batch", "-ex",
                                     "thread apply all bt 15"], capture_output=True, text=True,
                                    timeout=120).stdout
                sys.stderr.write(f"--- lightmoed threads (hung at stop) ---\n{bt}\n")
            except Exception:
                pass
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"lightmoed did not exit after SIGTERM:\n{self.text()[-4000:]}")
        self.log.close()
        if expect_rc is not None and rc != expect_rc:
            raise AssertionError(f"lightmoed exited with {rc}, expected {expect_rc}:\n"
                                 f"{self.text()[-6000:]}")
        return rc

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.stop()
        else:
            self.kill()
            sys.stderr.write(f"--- {self.name} log ---\n{self.text()[-6000:]}\n")


class Api:
    """Stubs for every method, without generated service code."""

    def __init__(self, channel, token=None):
        self.ch = channel
        self.md = [("authorization", f"Bearer {token}")] if token else None
        u = lambda path, req, resp: channel.unary_unary(
            path, request_serializer=req.SerializeToString, response_deserializer=resp.FromString)
        s = lambda path, req, resp: channel.unary_stream(
            path, request_serializer=req.SerializeToString, response_deserializer=resp.FromString)
        self._complete = u("/lightmoe.v1.LightMoE/Complete", pb.GenerateRequest, pb.GenerateResponse)
        self._generate = s("/lightmoe.v1.LightMoE/Generate", pb.GenerateRequest, pb.GenerateResponse)
        self._tokenize = u("/lightmoe.v1.LightMoE/Tokenize", pb.TokenizeRequest, pb.TokenizeResponse)
        self._info = u("/lightmoe.v1.LightMoE/GetModelInfo", pb.GetModelInfoRequest, pb.ModelInfo)
        self._inval = u("/lightmoe.v1.LightMoE/InvalidateCache", pb.InvalidateCacheRequest,
                        pb.InvalidateCacheResponse)
        self._check = u("/grpc.health.v1.Health/Check", health_pb.HealthCheckRequest,
                        health_pb.HealthCheckResponse)
        self._watch = s("/grpc.health.v1.Health/Watch", health_pb.HealthCheckRequest,
                        health_pb.HealthCheckResponse)

    def complete(self, timeout=WAIT, **kw):
        return self._complete(pb.GenerateRequest(**kw), timeout=timeout, metadata=self.md)

    def generate(self, timeout=WAIT, **kw):
        return self._generate(pb.GenerateRequest(**kw), timeout=timeout, metadata=self.md)

    def generate_all(self, timeout=WAIT, **kw):
        """(concatenated text, token ids, last message)"""
        text, ids, last = [], [], None
        for r in self.generate(timeout=timeout, **kw):
            text.append(r.text)
            ids.extend(r.token_ids)
            last = r
        return "".join(text), ids, last

    def tokenize(self, timeout=WAIT, **kw):
        return self._tokenize(pb.TokenizeRequest(**kw), timeout=timeout, metadata=self.md)

    def info(self, timeout=WAIT):
        return self._info(pb.GetModelInfoRequest(), timeout=timeout, metadata=self.md)

    def check(self, service="", timeout=WAIT):
        return self._check(health_pb.HealthCheckRequest(service=service), timeout=timeout)

    def watch(self, service="", timeout=WAIT):
        return self._watch(health_pb.HealthCheckRequest(service=service), timeout=timeout)


def expect_error(fn, code, contains=None):
    """Call fn, which must fail with grpc status `code`; return the details."""
    try:
        fn()
    except grpc.RpcError as e:
        assert e.code() == code, f"expected {code}, got {e.code()}: {e.details()}"
        if contains:
            assert contains in (e.details() or ""), \
                f"expected '{contains}' in the message, got: {e.details()}"
        return e.details()
    raise AssertionError(f"expected {code}, the call succeeded")


SERVING = 1
NOT_SERVING = 2


def run_tests(tests):
    """Run test functions in order; print each; exit 1 on the first failure."""
    names = sys.argv[1:]  # unused: argparse consumed them
    failed = 0
    for t in tests:
        t0 = time.time()
        try:
            t()
            print(f"ok   {t.__name__} ({time.time() - t0:.1f}s)", flush=True)
        except Exception:
            import traceback
            print(f"FAIL {t.__name__}", flush=True)
            traceback.print_exc()
            failed += 1
    if failed:
        print(f"{failed} test(s) failed")
        sys.exit(1)
