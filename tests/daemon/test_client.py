"""`lightmoe complete` and `lightmoe chat` against a running daemon print
what the API returns (streamed and unary), and report server errors."""
import os
import subprocess

import lmtest
from lmtest import Api, Daemon

A = lmtest.parse_args()


def lm(*args, stdin=None):
    p = subprocess.run([A.lightmoe, *args], input=stdin, capture_output=True, timeout=600)
    return p.returncode, p.stdout.decode(), p.stderr.decode()


def test_complete_and_chat():
    tokens = os.path.join(A.workdir, "tokens")
    with open(tokens, "w") as f:
        f.write("cli-token\n")
    with Daemon("client", ["--auth-token-file", tokens]) as d:
        api = Api(d.channel(), token="cli-token")
        want = api.complete(prompt="Hello, world!", max_tokens=10, temperature=0).text
        for mode in ([], ["--no-stream"]):
            rc, out, err = lm("complete", "--server", d.addr, "--token", "cli-token",
                              "--max-tokens", "10", "--temperature", "0", "--verbose", *mode,
                              "Hello, world!")
            assert rc == 0, err
            assert out == want, (out, want)
            assert "completion_tokens=" in err
        rc, out, err = lm("complete", "--server", d.addr, "--token-file", tokens, "--max-tokens",
                          "10", "--temperature", "0", "-", stdin=b"Hello, world!")
        assert rc == 0 and out == want, err
        rc, out, err = lm("complete", "--server", d.addr, "--token", "nope", "hi")
        assert rc == 1 and "bearer token not accepted" in err, err
        rc, out, err = lm("complete", "--server", d.addr, "--token", "cli-token",
                          "--max-tokens", "-3", "hi")
        assert rc == 1 and "max_tokens" in err, err
        # chat: two turns; the second sees the first answer in its history.
        from lmtest import pb
        first = api.complete(messages=[pb.ChatMessage(role="user", content="Hi there")],
                             max_tokens=6, temperature=0).text
        second = api.complete(messages=[pb.ChatMessage(role="user", content="Hi there"),
                                        pb.ChatMessage(role="assistant", content=first),
                                        pb.ChatMessage(role="user", content="And then?")],
                              max_tokens=6, temperature=0).text
        rc, out, err = lm("chat", "--server", d.addr, "--token", "cli-token", "--max-tokens", "6",
                          "--temperature", "0", stdin=b"Hi there\nAnd then?\n")
        assert rc == 0, err
        assert out == first + "\n" + second + "\n", (out, first, second)
    rc, out, err = lm("complete", "--server", "127.0.0.1:1", "--timeout", "5", "hi")
    assert rc == 1 and err, err


lmtest.run_tests([test_complete_and_chat])
