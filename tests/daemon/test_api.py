"""lightmoe.v1.LightMoE on a fixture model: results equal `lightmoe
generate`, streaming equals unary, chat messages, Tokenize/GetModelInfo,
every error code with an actionable message, deadlines, cancellation
(the sequence leaves the batch and the metrics show it), and the gRPC
interop cases that apply to a server."""
import subprocess
import threading
import time

import grpc

import lmtest
from lmtest import Api, Daemon, expect_error

A = lmtest.parse_args()
pb = lmtest.pb
D = None
api = None

PROMPTS = ["Hello, world! The mixture of experts", "混合专家系统的动态路由", "def f(x):"]


def cli_generate(prompt, max_tokens, extra=()):
    p = subprocess.run([A.lightmoe, "generate", "--model", A.model, "--prompt", prompt,
                        "--max-tokens", str(max_tokens), "--temperature", "0", *extra],
                       capture_output=True, timeout=600)
    assert p.returncode == 0, p.stderr.decode()
    return p.stdout.decode()


def test_equals_cli_generate():
    for prompt in PROMPTS:
        want = cli_generate(prompt, 12)
        r = api.complete(prompt=prompt, max_tokens=12, temperature=0)
        assert r.text == want.rstrip("\n") or r.text == want, (prompt, r.text, want)
        text, ids, last = api.generate_all(prompt=prompt, max_tokens=12, temperature=0)
        assert text == r.text and ids == list(r.token_ids)
        assert last.finish_reason == r.finish_reason and last.finish_reason in ("stop", "length")
        assert last.usage.completion_tokens == len(ids)
        assert last.usage.prompt_tokens == r.usage.prompt_tokens > 0
        assert last.timing.time_to_first_token > 0 and last.timing.total >= \
            last.timing.time_to_first_token


def test_streaming_shape():
    msgs = list(api.generate(prompt=PROMPTS[0], max_tokens=10, temperature=0,
                             request_id="stream-shape-1"))
    assert len(msgs) >= 1
    for m in msgs[:-1]:
        assert m.finish_reason == "" and not m.HasField("usage")
        assert m.request_id == "stream-shape-1"
    assert msgs[-1].finish_reason and msgs[-1].HasField("usage")
    assert "req=stream-shape-1" in D.text()


def test_sampling_is_seeded():
    kw = dict(prompt=PROMPTS[2], max_tokens=10, temperature=0.9, top_p=0.95, top_k=40, seed=1234)
    a, b = api.complete(**kw), api.complete(**kw)
    assert a.text == b.text and list(a.token_ids) == list(b.token_ids)
    s, ids, _ = api.generate_all(**kw)
    assert ids == list(a.token_ids)
    # host sampling: its threads and time are exported
    assert D.metric("lightmoe_sample_threads") >= 1
    assert D.metric("lightmoe_sample_seconds_total") > 0


def test_chat_messages_and_tokenize():
    msgs = [pb.ChatMessage(role="system", content="You are terse."),
            pb.ChatMessage(role="user", content="Say hi.")]
    t = api.tokenize(messages=msgs)
    assert "<|im_start|>system" in t.rendered and t.rendered.endswith("<|im_start|>assistant\n")
    r = api.complete(messages=msgs, max_tokens=5, temperature=0)
    assert r.usage.prompt_tokens == len(t.token_ids)
    t2 = api.tokenize(text=PROMPTS[0])
    r2 = api.complete(prompt=PROMPTS[0], max_tokens=1, temperature=0)
    assert r2.usage.prompt_tokens == len(t2.token_ids)
    info = api.info()
    assert info.architecture == "qwen2_moe" and info.context_length == 4096
    assert info.vocab_size > 0 and info.build_version and info.devices
    assert info.tensor_parallel_size == 1


def test_stop_strings_and_logprobs():
    full = api.complete(prompt=PROMPTS[0], max_tokens=16, temperature=0).text
    if len(full) > 4:
        stop = full[2:4]
        r = api.complete(prompt=PROMPTS[0], max_tokens=16, temperature=0, stop=[stop])
        assert r.finish_reason == "stop" and stop not in r.text and full.startswith(r.text)
    r = api.complete(prompt=PROMPTS[0], max_tokens=4, temperature=0, logprobs=3)
    assert len(r.logprobs) == len(r.token_ids)
    for lp in r.logprobs:
        assert len(lp.top) == 3 and lp.logprob <= 0


def test_invalid_argument():
    IA = grpc.StatusCode.INVALID_ARGUMENT
    expect_error(lambda: api.complete(), IA, "empty request")
    expect_error(lambda: api.complete(prompt=""), IA, "empty request")
    expect_error(lambda: api.complete(prompt="a", messages=[pb.ChatMessage(role="user",
                                                                         content="b")]),
                 IA, "not both")
    expect_error(lambda: api.complete(messages=[pb.ChatMessage(role="wizard", content="b")]),
                 IA, "messages[0].role 'wizard' is unknown")
    expect_error(lambda: api.complete(prompt="a", max_tokens=-5), IA, "max_tokens must be at "
                 "least 1 (got -5)")
    expect_error(lambda: api.complete(prompt="a", max_tokens=0), IA, "max_tokens")
    expect_error(lambda: api.complete(prompt="a", max_tokens=100000), IA, "max_tokens_limit")
    expect_error(lambda: api.complete(prompt="a", temperature=-1), IA, "temperature")
    expect_error(lambda: api.complete(prompt="a", top_p=1.5), IA, "top_p")
    expect_error(lambda: api.complete(prompt="a", logprobs=21), IA, "logprobs")
    expect_error(lambda: api.complete(prompt="a", stop=[""]), IA, "stop[0]")
    expect_error(lambda: api.complete(prompt="a", stop=["s"] * 17), IA, "stop strings")
    # Prompt past the context (4096 tokens) and past max_prompt_tokens (2000 here).
    k = units_for(4100)
    expect_error(lambda: api.complete(prompt=UNIT * k), IA, "context length")
    k = units_for(2001)
    expect_error(lambda: api.complete(prompt=UNIT * k), IA, "max_prompt_tokens")
    expect_error(lambda: list(api.generate(prompt="")), IA, "empty request")


UNIT = " hello"


def n_tokens(k):
    return len(api.tokenize(text=UNIT * k).token_ids)


def units_for(n):
    """Smallest k with n_tokens(k) >= n (token counts grow with k)."""
    per = n_tokens(100) / 100.0
    lo, hi = max(1, int(n / per) - 8), int(n / per) + 8
    while n_tokens(lo) >= n:
        lo = max(1, lo // 2)
    while n_tokens(hi) < n:
        hi *= 2
    while lo < hi:
        mid = (lo + hi) // 2
        if n_tokens(mid) >= n:
            hi = mid
        else:
            lo = mid + 1
    return lo


def test_edges_of_limits():
    # A prompt of at most max_prompt_tokens (2000) is accepted, one unit more is not.
    k = units_for(2001) - 1
    n = n_tokens(k)
    assert n <= 2000
    r = api.complete(prompt=UNIT * k, max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens == n
    expect_error(lambda: api.complete(prompt=UNIT * (k + 1), max_tokens=1),
                 grpc.StatusCode.INVALID_ARGUMENT, "max_prompt_tokens")
    r = api.complete(prompt="a", max_tokens=64, temperature=0)   # = max_tokens_limit
    assert r.usage.completion_tokens <= 64
    expect_error(lambda: api.complete(prompt="a", max_tokens=65), grpc.StatusCode.INVALID_ARGUMENT,
                 "max_tokens 65 exceeds the server limit (max_tokens_limit = 64)")


def test_deadline_1ms():
    expect_error(lambda: api.complete(prompt=PROMPTS[0], max_tokens=64, timeout=0.001),
                 grpc.StatusCode.DEADLINE_EXCEEDED)
    expect_error(lambda: list(api.generate(prompt=PROMPTS[0], max_tokens=64, timeout=0.001)),
                 grpc.StatusCode.DEADLINE_EXCEEDED)
    # The server is fine afterwards and nothing is left running.
    assert api.complete(prompt="a", max_tokens=2, temperature=0).usage.completion_tokens >= 1
    wait_idle()


def wait_idle(timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if D.metric("lightmoe_running_sequences") == 0 and \
                D.metric("lightmoe_active_streams") == 0:
            return
        time.sleep(0.1)
    raise AssertionError("sequences still running:\n" + D.metrics())


def test_cancel_mid_stream():
    # A second daemon whose engine sleeps 50 ms after every step (debug
    # hook): 300 tokens take 15 s or more, so the stream is certainly
    # mid-way when it is cancelled, however loaded the machine is.
    with Daemon("cancel", ["--cache-url", "off", "--debug-hooks", "yes",
                           "--debug-step-delay-ms", "50"]) as d:
        capi = Api(d.channel())
        it = capi.generate(prompt=PROMPTS[0], max_tokens=300, temperature=0,
                           request_id="cancel-me")
        first = next(it)
        assert first.finish_reason == ""
        t0 = time.time()
        while d.metric("lightmoe_running_sequences") != 1:  # stats follow each step
            assert time.time() - t0 < 60, d.metrics()
            time.sleep(0.05)
        it.cancel()
        t0 = time.time()
        while (d.metric("lightmoe_running_sequences") != 0 or
               d.metric('lightmoe_requests_total{method="Generate",code="CANCELLED"}') < 1):
            assert time.time() - t0 < 60, d.metrics()
            time.sleep(0.1)
        assert d.metric("lightmoe_sequences_cancelled_total") >= 1
        assert d.metric("lightmoe_active_streams") == 0
        assert d.metric("lightmoe_generated_tokens_total") < 300
        d.wait_log(r"req=cancel-me client cancelled")


def test_resource_exhausted():
    # max_concurrent_streams = 4 here: hold 4 streams with the engine stalled.
    import signal
    D.signal(signal.SIGUSR1)
    D.wait_log("engine loop STALLED")
    its = [api.generate(prompt=PROMPTS[0], max_tokens=50, temperature=0) for _ in range(4)]
    t0 = time.time()
    while D.metric("lightmoe_active_streams") < 4:
        assert time.time() - t0 < 60
        time.sleep(0.05)
    expect_error(lambda: api.complete(prompt="a", max_tokens=2), grpc.StatusCode.RESOURCE_EXHAUSTED,
                 "max_concurrent_streams")
    for it in its:
        it.cancel()
    D.signal(signal.SIGUSR2)
    wait_idle()


def test_interop_cases():
    # empty_unary: an empty request message is a clear INVALID_ARGUMENT.
    expect_error(lambda: api.complete(), grpc.StatusCode.INVALID_ARGUMENT)
    # large_unary: a request near the message limit round-trips its status.
    big = "z" * (3 << 20)
    expect_error(lambda: api.complete(prompt=big), grpc.StatusCode.INVALID_ARGUMENT)
    # status_code_and_message: code and message travel (checked above); unknown
    # method/service: UNIMPLEMENTED.
    expect_error(lambda: D.channel().unary_unary("/lightmoe.v1.LightMoE/Nope")(b"", timeout=60),
                 grpc.StatusCode.UNIMPLEMENTED)
    # cancel_after_begin: cancel before any response.
    fut = api._complete.future(pb.GenerateRequest(prompt=PROMPTS[0], max_tokens=40),
                               timeout=120)
    fut.cancel()
    # cancel_after_first_response.
    it = api.generate(prompt=PROMPTS[1], max_tokens=40, temperature=0)
    next(it)
    it.cancel()
    # timeout_on_sleeping_server: the engine sleeps (stalled) past the deadline.
    import signal
    D.signal(signal.SIGUSR1)
    D.wait_log("engine loop STALLED")
    expect_error(lambda: api.complete(prompt=PROMPTS[0], max_tokens=10, timeout=1.0),
                 grpc.StatusCode.DEADLINE_EXCEEDED)
    D.signal(signal.SIGUSR2)
    wait_idle()
    # server_streaming with many small messages, then the channel is still good.
    text, ids, last = api.generate_all(prompt=PROMPTS[2], max_tokens=30, temperature=0)
    assert last.usage.completion_tokens == len(ids)


def main():
    global D, api
    # The answer cache is off here: these tests are about the engine path
    # (tests/daemon_cache covers the cache).
    with Daemon("api", ["--cache-url", "off", "--max-tokens-limit", "64", "--default-max-tokens", "16",
                        "--max-prompt-tokens", "2000", "--max-concurrent-streams", "4",
                        "--debug-hooks", "yes"]) as d:
        D = d
        api = Api(d.channel())
        lmtest.run_tests([test_equals_cli_generate, test_streaming_shape, test_sampling_is_seeded,
                          test_chat_messages_and_tokenize, test_stop_strings_and_logprobs,
                          test_invalid_argument, test_edges_of_limits, test_deadline_1ms,
                          test_cancel_mid_stream, test_resource_exhausted, test_interop_cases])


main()
