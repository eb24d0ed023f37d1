#!/usr/bin/env python3
"""`lightmoe generate` end to end on a reference fixture (stdlib only).

    test_cmd_generate.py LIGHTMOE FIXTURE_DIR

- each reference prompt (text via --prompt, chat via --chat FILE) decoded
  greedily gives the reference greedy ids (--ids) and exit status 0;
- the same seed gives the same text, twice;
- --stop cuts the streamed text at the stop string and reports it;
- bad arguments exit with status 2 and a message.
"""
import json
import os
import struct
import subprocess
import sys
import tempfile

failures = 0


def check(cond, msg):
    global failures
    if not cond:
        failures += 1
        print("FAIL:", msg, file=sys.stderr)


def read_safetensors_ids(path):
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    out = {}
    for name, t in header.items():
        if name == "__metadata__" or t["dtype"] != "I32":
            continue
        a, b = t["data_offsets"]
        raw = data[8 + n + a:8 + n + b]
        out[name] = list(struct.unpack("<%di" % (len(raw) // 4), raw))
    return out


def run(lightmoe, args, timeout=120):
    p = subprocess.run([lightmoe, "generate"] + args, capture_output=True, timeout=timeout)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def ids_of(stderr):
    for line in stderr.splitlines():
        if line.startswith("ids:"):
            return [int(x) for x in line[4:].split()]
    return None


def main():
    lightmoe, fixture = sys.argv[1], sys.argv[2]
    ref = json.load(open(os.path.join(fixture, "reference.json")))
    tensors = read_safetensors_ids(os.path.join(fixture, "reference.safetensors"))
    tmp = tempfile.mkdtemp(prefix="lightmoe_gen_")
    first_text = None
    for i, p in enumerate(ref["prompts"]):
        want = tensors["p%d.greedy_ids" % i]
        args = ["--model", fixture, "--max-tokens", str(len(want)), "--ignore-eos", "--ids",
                "--threads", "2"]
        if isinstance(p["prompt"], str):
            args += ["--prompt", p["prompt"]]
        else:
            path = os.path.join(tmp, "chat%d.json" % i)
            json.dump(p["prompt"], open(path, "w"))
            args += ["--chat", path]
        rc, out, err = run(lightmoe, args)
        check(rc == 0, "prompt %d: exit %d: %s" % (i, rc, err))
        check(ids_of(err) == want, "prompt %d: ids %s, reference %s" % (i, ids_of(err), want))
        check("[finish: length; %d prompt + %d completion tokens" % (p["n_prompt"], len(want))
              in err, "prompt %d: summary line: %s" % (i, err))
        if i == 0:
            first_text = out[:-1] if out.endswith("\n") else out

    # same seed, same text
    base = ["--model", fixture, "--prompt", ref["prompts"][0]["prompt"], "--max-tokens", "24",
            "--ignore-eos", "--temperature", "1.5", "--top-k", "50", "--seed", "11",
            "--threads", "2"]
    r1 = run(lightmoe, base)
    r2 = run(lightmoe, base)
    check(r1[0] == 0 and r1[1] == r2[1] and len(r1[1]) > 1, "same seed, different text")

    # a stop string inside the greedy text
    if first_text and len(first_text) >= 8:
        stop = first_text[4:7]
        cut = first_text[:first_text.find(stop)]
        rc, out, err = run(lightmoe, ["--model", fixture, "--prompt", ref["prompts"][0]["prompt"],
                                      "--max-tokens", "16", "--ignore-eos", "--stop", stop,
                                      "--threads", "2"])
        check(rc == 0 and out == cut + "\n", "stop %r: got %r want %r" % (stop, out, cut))
        check("[finish: stop (stop string %s)" % json.dumps(stop, ensure_ascii=False) in err,
              "stop summary: %s" % err)

    # bad arguments
    chat_bad = os.path.join(tmp, "bad.json")
    open(chat_bad, "w").write("{\"messages\": 3}")
    for args, msg in [
        (["--prompt", "x"], "--model"),
        (["--model", fixture], "exactly one of"),
        (["--model", fixture, "--prompt", "x", "--chat", chat_bad], "exactly one of"),
        (["--model", fixture, "--prompt", "x", "--temperature", "-1"], "--temperature"),
        (["--model", fixture, "--prompt", "x", "--top-p", "0"], "--top-p"),
        (["--model", fixture, "--prompt", "x", "--device", "tpu"], "--device"),
        (["--model", fixture, "--chat", chat_bad], "non-empty JSON array"),
        (["--model", os.path.join(tmp, "nope"), "--prompt", "x"], "config.json"),
        (["--model", fixture, "--prompt", "x", "--stop", ""], "stop string 0 is empty"),
        (["--model", fixture, "--prompt", "x", "--bogus"], "usage"),
    ]:
        rc, out, err = run(lightmoe, args)
        check(rc == 2 and msg in err, "args %s: exit %d, stderr %r lacks %r" % (args, rc, err, msg))
    if failures:
        print("%d check(s) failed" % failures, file=sys.stderr)
        sys.exit(1)
    print("cmd_generate: all checks passed")


if __name__ == "__main__":
    main()
