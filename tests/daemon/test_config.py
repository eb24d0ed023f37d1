"""Configuration: --check-config on the shipped example, errors that name
the line for unknown keys and bad values, flags over the file, --help lists
every key and the example documents every key."""
import os
import re
import subprocess

import lmtest

A = lmtest.parse_args()
EXAMPLE = os.path.join(A.source, "deploy", "lightmoed.conf")


def run(*args):
    p = subprocess.run([A.lightmoed, *args], capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout, p.stderr


def write(name, text):
    path = os.path.join(A.workdir, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def test_example_checks():
    rc, out, err = run("--check-config", "--config", EXAMPLE, "--model", A.model)
    assert rc == 0, err
    assert "configuration OK" in err
    assert f"model = {A.model}" in out
    assert "listen = 127.0.0.1:50051" in out


def test_every_key_documented():
    rc, out, _ = run("--help")
    assert rc == 0
    flags = re.findall(r"^  --([a-z0-9-]+) ", out, re.M)
    keys = [f.replace("-", "_") for f in flags if f not in ("config", "check-config")]
    assert len(keys) > 20, keys
    with open(EXAMPLE) as f:
        example = f.read()
    for k in keys:
        assert re.search(rf"^{k} =", example, re.M), f"key {k} not in deploy/lightmoed.conf"
    for k in ("model", "listen", "metrics_listen", "device"):
        assert k in keys


def test_errors_name_the_line():
    p = write("unknown.conf", "# comment\n\nlisten = 127.0.0.1:1\nno_such_key = 3\n")
    rc, _, err = run("--check-config", "--config", p, "--model", A.model)
    assert rc == 1 and f"{p}:4: unknown key 'no_such_key'" in err, err
    p = write("bad.conf", "max_queue = -3\n")
    rc, _, err = run("--check-config", "--config", p, "--model", A.model)
    assert rc == 1 and f"{p}:1: max_queue: '-3' is not an integer" in err, err
    p = write("bad2.conf", "device = tpu\n")
    rc, _, err = run("--check-config", "--config", p, "--model", A.model)
    assert rc == 1 and f"{p}:1: device: 'tpu' is not one of cpu|cuda" in err, err
    p = write("bad3.conf", "this is not a key value line\n")
    rc, _, err = run("--check-config", "--config", p, "--model", A.model)
    assert rc == 1 and f"{p}:1: expected 'key = value'" in err, err
    p = write("bad4.conf", "drain_grace_seconds = soon\n")
    rc, _, err = run("--check-config", "--config", p, "--model", A.model)
    assert rc == 1 and "drain_grace_seconds: 'soon' is not a number" in err, err
    p = write("bad5.conf", "debug_hooks = maybe\n")
    rc, _, err = run("--check-config", "--config", p, "--model", A.model)
    assert rc == 1 and "debug_hooks: 'maybe' is not yes or no" in err, err
    p = write("bad6.conf", "sample_threads = 257\n")
    rc, _, err = run("--check-config", "--config", p, "--model", A.model)
    assert rc == 1 and f"{p}:1: sample_threads: '257' is not an integer in [0, 256]" in err, err


def test_flags_and_cross_checks():
    p = write("flags.conf", 'max_queue = 7\nlisten = "127.0.0.1:5"\n')
    rc, out, err = run("--check-config", "--config", p, "--model", A.model, "--max-queue", "9",
                       "--listen=unix:/tmp/x.sock", "--sample-threads", "3")
    assert rc == 0, err
    assert "max_queue = 9" in out and "listen = unix:/tmp/x.sock" in out
    assert "sample_threads = 3" in out, out
    rc, _, err = run("--check-config", "--config", p, "--model", A.model, "--bogus", "1")
    assert rc == 1 and "--bogus: unknown key 'bogus'" in err, err
    rc, _, err = run("--check-config", "--config", os.path.join(A.workdir, "missing.conf"),
                     "--model", A.model)
    assert rc == 1 and "missing.conf: cannot open" in err, err
    rc, _, err = run("--check-config", "--config", p)
    assert rc == 1 and "model: no model folder" in err, err
    rc, _, err = run("--check-config", "--config", p, "--model", "/nonexistent")
    assert rc == 1 and "/nonexistent/config.json" in err, err
    rc, _, err = run("--check-config", "--config", p, "--model", A.model, "--tls-cert", "/x")
    assert rc == 1 and "tls_cert and tls_key" in err, err
    rc, _, err = run("--check-config", "--config", p, "--model", A.model, "--tls-client-ca",
                     "/x")
    assert rc == 1 and "mutual TLS needs tls_cert" in err, err
    rc, _, err = run("--check-config", "--config", p, "--model", A.model,
                     "--default-max-tokens", "100", "--max-tokens-limit", "10")
    assert rc == 1 and "exceeds max_tokens_limit" in err, err
    rc, _, err = run("--check-config", "--model", A.model, "--debug-load-delay-ms", "5")
    assert rc == 1 and "need debug_hooks" in err, err
    rc, _, err = run("--model")
    assert rc == 2 and "needs a value" in err, err
    rc, _, err = run("stray")
    assert rc == 2 and "unexpected argument" in err, err


def test_bind_failure_is_clear():
    # A port that is taken: the daemon exits 1 with a message naming it.
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    port = s.getsockname()[1]
    rc, _, err = run("--model", A.model, "--listen", f"127.0.0.1:{port}", "--metrics-listen", "",
                     "--config", write("empty.conf", ""))
    s.close()
    assert rc == 1 and f"cannot bind '127.0.0.1:{port}'" in err, err


def test_load_failure_exits_1():
    # A folder whose config.json passes --check-config but is no model: the
    # daemon binds, reports NOT_SERVING, then exits 1 saying why.
    bad = os.path.join(A.workdir, "badmodel")
    os.makedirs(bad, exist_ok=True)
    with open(os.path.join(bad, "config.json"), "w") as f:
        f.write('{"model_type": "qwen2_moe"}')
    rc, _, err = run("--model", bad, "--listen", "127.0.0.1:0", "--metrics-listen", "",
                     "--config", write("empty.conf", ""), "--cache-url", "off")
    assert rc == 1 and "cannot load the model" in err, err
    # With the answer cache on, its model fingerprint refuses the folder first.
    rc, _, err = run("--model", bad, "--listen", "127.0.0.1:0", "--metrics-listen", "",
                     "--config", write("empty.conf", ""))
    assert rc == 1 and "no *.safetensors" in err, err


lmtest.run_tests([test_load_failure_exits_1, test_example_checks, test_every_key_documented, test_errors_name_the_line,
                  test_flags_and_cross_checks, test_bind_failure_is_clear])
