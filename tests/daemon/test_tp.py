"""Tensor parallelism through the daemon (issue 8): `lightmoed --tp 2` on
the CPU backend (host communicator) answers exactly what tp = 1 answers,
GetModelInfo reports the layout, and impossible layouts are refused at
start with a message that says why."""
import os
import subprocess

import lmtest
from lmtest import Api, Daemon

A = lmtest.parse_args()
pb = lmtest.pb

PROMPTS = ["Hello, world! The mixture of experts", "def f(x):"]


def answers(d):
    api = Api(d.channel())
    info = api.info()
    return info, [api.complete(prompt=p, max_tokens=12, temperature=0) for p in PROMPTS]


def test_tp2_equals_tp1():
    with Daemon("tp1", ["--cache-url", "off"]) as d:
        info1, r1 = answers(d)
    with Daemon("tp2", ["--tp", "2", "--cache-url", "off"]) as d:
        info2, r2 = answers(d)
    assert info1.tensor_parallel_size == 1, info1
    assert info2.tensor_parallel_size == 2, info2
    for a, b in zip(r1, r2):
        assert list(a.token_ids) == list(b.token_ids), (a.text, b.text)
        assert a.text == b.text and a.finish_reason == b.finish_reason


def refused(args, contains, model=None):
    p = subprocess.run([A.lightmoed, "--model", model or A.model, "--listen", "127.0.0.1:0",
                        "--metrics-listen", "", *args], capture_output=True, timeout=120)
    err = p.stderr.decode()
    assert p.returncode != 0, err
    assert contains in err, err


def test_impossible_layouts():
    # 4 attention heads / 2 KV heads cannot be split 3 ways.
    refused(["--tp", "3"], "tp=3: 4 attention heads do not divide evenly")
    # GPTQ groups (32) must stay whole: expert width 160 split in two is 80.
    gptq = os.path.join(os.path.dirname(A.model.rstrip("/")), "qwen2moe-tiny-gptq")
    refused(["--tp", "2"], "would cut a GPTQ group of 32", model=gptq)
    # One device id per rank.
    refused(["--tp", "2", "--devices", "0"], "devices: 1 device ids given for tensor_parallel = 2")
    refused(["--devices", "zero"], "devices: 'zero' is not a comma-separated list")


lmtest.run_tests([test_tp2_equals_tp1, test_impossible_layouts])
