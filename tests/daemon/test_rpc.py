"""Server plumbing that needs no generation: health while loading, server
reflection (v1 and v1alpha, with a tiny reflection client), unknown methods,
the message-size limit, UNAVAILABLE while loading, metrics endpoint, and the
drain of a daemon that never finished loading."""
import signal
import time

import grpc

import lmtest
from lmtest import Api, Daemon, expect_error

A = lmtest.parse_args()
pb = lmtest.pb


def loading_daemon(name, *extra):
    # debug_load_delay_ms keeps the daemon in its loading state.
    return Daemon(name, ["--debug-hooks", "yes", "--debug-load-delay-ms", "600000", *extra],
                  ready=False)


def reflect(ch, requests, alpha=False):
    mod = lmtest.refl_alpha_pb if alpha else lmtest.refl_pb
    pkg = "grpc.reflection.v1alpha" if alpha else "grpc.reflection.v1"
    call = ch.stream_stream(f"/{pkg}.ServerReflection/ServerReflectionInfo",
                            request_serializer=mod.ServerReflectionRequest.SerializeToString,
                            response_deserializer=mod.ServerReflectionResponse.FromString)
    return list(call(iter([mod.ServerReflectionRequest(**r) for r in requests]), timeout=60))


def file_names(resp):
    from google.protobuf import descriptor_pb2
    out = []
    for raw in resp.file_descriptor_response.file_descriptor_proto:
        fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
        out.append(fd)
    return out


def test_loading_state():
    with loading_daemon("loading") as d:
        api = Api(d.channel())
        assert api.check().status == lmtest.NOT_SERVING
        assert api.check("lightmoe.v1.LightMoE").status == lmtest.NOT_SERVING
        expect_error(lambda: api.check("no.such.Service"), grpc.StatusCode.NOT_FOUND, "no.such")
        # Watch: the current status at once.
        w = api.watch()
        assert next(w).status == lmtest.NOT_SERVING
        w.cancel()
        ws = api.watch("no.such.Service")
        assert next(ws).status == lmtest.health_pb.HealthCheckResponse.SERVICE_UNKNOWN
        ws.cancel()
        expect_error(lambda: api.complete(prompt="hi"), grpc.StatusCode.UNAVAILABLE, "loading")
        expect_error(lambda: list(api.generate(prompt="hi")), grpc.StatusCode.UNAVAILABLE,
                     "loading")
        expect_error(lambda: api.info(), grpc.StatusCode.UNAVAILABLE)
        assert "lightmoe_serving 0" in d.metrics()
    # SIGTERM while loading: clean exit 0 (checked by the context manager).


def test_reflection():
    with loading_daemon("reflection") as d:
        ch = d.channel()
        for alpha in (False, True):
            r = reflect(ch, [{"list_services": ""}], alpha)
            names = {s.name for s in r[0].list_services_response.service}
            assert "lightmoe.v1.LightMoE" in names, names
            assert "grpc.health.v1.Health" in names, names
            r = reflect(ch, [{"file_containing_symbol": "lightmoe.v1.LightMoE"},
                             {"file_containing_symbol": "lightmoe.v1.GenerateRequest"},
                             {"file_containing_symbol": ".lightmoe.v1.LightMoE.Generate"},
                             {"file_by_filename": "grpc/health/v1/health.proto"},
                             {"file_containing_symbol": "grpc.health.v1.HealthCheckResponse.ServingStatus"},
                             {"file_by_filename": "no/such.proto"},
                             {"file_containing_symbol": "no.Such"}], alpha)
            assert len(r) == 7
            for i in range(3):
                fds = file_names(r[i])
                assert fds[0].name == "lightmoe/v1/lightmoe.proto", fds[0].name
                svc = fds[0].service[0]
                assert svc.name == "LightMoE"
                methods = {m.name: m for m in svc.method}
                assert set(methods) >= {"Generate", "Complete", "Tokenize", "GetModelInfo",
                                        "InvalidateCache"}
                assert methods["Generate"].server_streaming
                msgs = {m.name: m for m in fds[0].message_type}
                fields = {f.name for f in msgs["GenerateRequest"].field}
                assert fields >= {"prompt", "messages", "max_tokens", "temperature", "top_p",
                                  "top_k", "min_p", "repetition_penalty", "presence_penalty",
                                  "frequency_penalty", "seed", "stop", "logprobs", "request_id",
                                  "cache_mode", "cache_ttl_seconds"}, fields
                assert r[i].original_request.file_containing_symbol
            assert file_names(r[3])[0].package == "grpc.health.v1"
            assert file_names(r[4])[0].name == "grpc/health/v1/health.proto"
            for k in (5, 6):
                assert r[k].WhichOneof("message_response") == "error_response"
                assert r[k].error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
        # An empty stream (client half-closes at once) ends OK.
        assert reflect(ch, []) == []


def test_unknown_method_and_limits():
    with loading_daemon("unknown", "--max-message-bytes", "1048576") as d:
        ch = d.channel()
        t0 = time.time()
        expect_error(lambda: ch.unary_unary("/no.Such/Method")(b"", timeout=60),
                     grpc.StatusCode.UNIMPLEMENTED, "/no.Such/Method")
        expect_error(lambda: ch.unary_unary("/lightmoe.v1.LightMoE/Nope")(b"x", timeout=60),
                     grpc.StatusCode.UNIMPLEMENTED)
        # "at once": far from the 60 s deadline, whatever the machine load.
        assert time.time() - t0 < 30
        api = Api(ch)
        big = "x" * (10 << 20)
        expect_error(lambda: api.complete(prompt=big, timeout=60),
                     grpc.StatusCode.RESOURCE_EXHAUSTED)
        # Just under the limit is received (and refused only for the loading state).
        expect_error(lambda: api.complete(prompt="y" * (1 << 19), timeout=60),
                     grpc.StatusCode.UNAVAILABLE)
        # A malformed message is INVALID_ARGUMENT, not INTERNAL.
        raw = ch.unary_unary("/lightmoe.v1.LightMoE/Complete")
        expect_error(lambda: raw(b"\xff\xff\xff", timeout=60), grpc.StatusCode.INVALID_ARGUMENT,
                     "GenerateRequest")
        # The server is still healthy after all that.
        assert api.check().status == lmtest.NOT_SERVING
        m = d.metrics()
        assert 'lightmoe_requests_total{method="unknown",code="UNIMPLEMENTED"} 2' in m, m


lmtest.run_tests([test_loading_state, test_reflection, test_unknown_method_and_limits])
