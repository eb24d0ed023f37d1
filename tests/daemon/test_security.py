"""Security: TLS, mutual TLS and bearer tokens accept the right clients and
refuse the others. Certificates are made with openssl in the test's work
folder. A client that got past the transport and auth reaches the method;
that is visible because health answers and Complete produces text."""
import os
import subprocess

import grpc

import lmtest
from lmtest import Api, Daemon, expect_error

A = lmtest.parse_args()
W = A.workdir


def sh(*args):
    subprocess.run(args, check=True, capture_output=True, cwd=W, timeout=120)


def make_ca(name):
    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
       "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.pem")


def make_cert(name, ca, server):
    sh("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
       "-keyout", f"{name}.key", "-out", f"{name}.csr")
    ext = os.path.join(W, f"{name}.ext")
    with open(ext, "w") as f:
        if server:
            f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
        else:
            f.write("extendedKeyUsage=clientAuth\n")
    sh("openssl", "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
       "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", f"{name}.pem")


def read(name):
    with open(os.path.join(W, name), "rb") as f:
        return f.read()


def setup():
    make_ca("ca")
    make_ca("rogue-ca")
    make_cert("server", "ca", True)
    make_cert("client", "ca", False)
    make_cert("rogue-client", "rogue-ca", False)


def tls_channel(d, ca="ca", cert=None):
    creds = grpc.ssl_channel_credentials(
        root_certificates=read(f"{ca}.pem"),
        private_key=read(f"{cert}.key") if cert else None,
        certificate_chain=read(f"{cert}.pem") if cert else None)
    return grpc.secure_channel(f"localhost:{d.port}", creds)


def works(api):
    r = api.complete(prompt="Hello", max_tokens=3, temperature=0, timeout=120)
    assert r.usage.completion_tokens >= 1
    return True


def refused(api, code=grpc.StatusCode.UNAVAILABLE):
    expect_error(lambda: api.check(timeout=20), code)


def test_tls():
    with Daemon("tls", ["--tls-cert", f"{W}/server.pem", "--tls-key", f"{W}/server.key"]) as d:
        assert works(Api(tls_channel(d)))
        # Plaintext client and a client trusting another CA are refused.
        refused(Api(d.channel()))
        refused(Api(tls_channel(d, ca="rogue-ca")))


def test_mtls():
    with Daemon("mtls", ["--tls-cert", f"{W}/server.pem", "--tls-key", f"{W}/server.key",
                         "--tls-client-ca", f"{W}/ca.pem"]) as d:
        assert works(Api(tls_channel(d, cert="client")))
        refused(Api(tls_channel(d)))                       # no client certificate
        refused(Api(tls_channel(d, cert="rogue-client")))  # signed by another CA
        refused(Api(d.channel()))


def test_tokens():
    tokens = os.path.join(W, "tokens")
    with open(tokens, "w") as f:
        f.write("# service tokens\nalpha-token-1\n\n  beta-token-2  \n")
    with Daemon("tokens", ["--auth-token-file", tokens]) as d:
        ch = d.channel()
        assert works(Api(ch, token="alpha-token-1"))
        assert works(Api(ch, token="beta-token-2"))
        for bad in (None, "wrong", "alpha-token-", "alpha-token-12"):
            expect_error(lambda: Api(ch, token=bad).complete(prompt="Hello", max_tokens=2),
                         grpc.StatusCode.UNAUTHENTICATED,
                         "bearer token" if bad is None else "not accepted")
        raw = ch.unary_unary("/lightmoe.v1.LightMoE/GetModelInfo")
        expect_error(lambda: raw(b"", metadata=[("authorization", "Basic abc")], timeout=60),
                     grpc.StatusCode.UNAUTHENTICATED, "Bearer")
        # Health needs no token (probes carry no secrets); reflection does.
        assert Api(ch).check().status == lmtest.SERVING
        refl = ch.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
        expect_error(lambda: list(refl(iter([]), timeout=60)), grpc.StatusCode.UNAUTHENTICATED)
        assert 'code="UNAUTHENTICATED"' in d.metrics()


def test_tokens_with_tls():
    tokens = os.path.join(W, "tokens2")
    with open(tokens, "w") as f:
        f.write("gamma\n")
    with Daemon("tls-tokens", ["--tls-cert", f"{W}/server.pem", "--tls-key", f"{W}/server.key",
                               "--auth-token-file", tokens]) as d:
        assert works(Api(tls_channel(d), token="gamma"))
        expect_error(lambda: Api(tls_channel(d), token="delta").complete(prompt="x"),
                     grpc.StatusCode.UNAUTHENTICATED)


def test_unix_socket():
    path = os.path.join(W, "lightmoed.sock")
    with Daemon("unix", listen=f"unix:{path}") as d:
        assert works(Api(grpc.insecure_channel(f"unix:{path}")))


setup()
lmtest.run_tests([test_tls, test_mtls, test_tokens, test_tokens_with_tls, test_unix_socket])
