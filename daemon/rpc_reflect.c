/*
 * rpc_reflect.c: gRPC server reflection, v1 and v1alpha (the same messages
 * under two package names, so one handler serves both paths).
 *
 * The descriptors come from the descriptor set that protoc-c wrote at build
 * time (proto/CMakeLists.txt, embedded as lightmoe_descset[]). It is split
 * once into its files (FileSet is wire-compatible with FileDescriptorSet)
 * and each file's symbols are indexed, so that list_services,
 * file_by_filename and file_containing_symbol answer with the serialized
 * FileDescriptorProtos of the file and its transitive dependencies, which
 * is what grpcurl and Postman need to call the service without the .proto.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "daemon/log.h"
#include "daemon/rpc_internal.h"
#include "grpc/reflection/v1/reflection.pb-c.h"
#include "lightmoe/internal/descriptor_min.pb-c.h"

extern const unsigned char lightmoe_descset[];
extern const size_t lightmoe_descset_len;

#define MAX_FILES 16
#define MAX_SYMBOLS 512

typedef struct file_ent {
    ProtobufCBinaryData raw;        /* the serialized FileDescriptorProto */
    Lightmoe__Internal__FileDesc *desc;
} file_ent;

typedef struct symbol {
    char *name;                     /* fully qualified, no leading dot */
    int file;
} symbol;

static pthread_once_t once = PTHREAD_ONCE_INIT;
static Lightmoe__Internal__FileSet *fileset;
static file_ent files[MAX_FILES];
static int n_files;
static symbol symbols[MAX_SYMBOLS];
static int n_symbols;
static char *services[MAX_FILES * 4];
static int n_services;

static void add_symbol(const char *pkg, const char *prefix, const char *name, int file)
{
    if (n_symbols >= MAX_SYMBOLS)
        return;
    char buf[512];
    if (prefix)
        snprintf(buf, sizeof buf, "%s.%s", prefix, name);
    else if (pkg && pkg[0])
        snprintf(buf, sizeof buf, "%s.%s", pkg, name);
    else
        snprintf(buf, sizeof buf, "%s", name);
    symbols[n_symbols].name = strdup(buf);
    symbols[n_symbols].file = file;
    n_symbols++;
}

static void add_message(const char *pkg, const char *prefix, Lightmoe__Internal__MessageDesc *m,
                        int file)
{
    add_symbol(pkg, prefix, m->name, file);
    const char *full = symbols[n_symbols - 1].name;
    for (size_t i = 0; i < m->n_enum_type; i++)
        add_symbol(pkg, full, m->enum_type[i]->name, file);
    for (size_t i = 0; i < m->n_nested_type; i++)
        add_message(pkg, full, m->nested_type[i], file);
}

static void index_descriptors(void)
{
    fileset = lightmoe__internal__file_set__unpack(NULL, lightmoe_descset_len, lightmoe_descset);
    if (!fileset) {
        log_error("BUG: the embedded descriptor set does not parse: reflection is empty");
        return;
    }
    for (size_t i = 0; i < fileset->n_file && n_files < MAX_FILES; i++) {
        file_ent *f = &files[n_files];
        f->raw = fileset->file[i];
        f->desc = lightmoe__internal__file_desc__unpack(NULL, f->raw.len, f->raw.data);
        if (!f->desc)
            continue;
        const char *pkg = f->desc->package;
        for (size_t k = 0; k < f->desc->n_message_type; k++)
            add_message(pkg, NULL, f->desc->message_type[k], n_files);
        for (size_t k = 0; k < f->desc->n_enum_type; k++)
            add_symbol(pkg, NULL, f->desc->enum_type[k]->name, n_files);
        for (size_t k = 0; k < f->desc->n_service; k++) {
            Lightmoe__Internal__ServiceDesc *s = f->desc->service[k];
            add_symbol(pkg, NULL, s->name, n_files);
            const char *full = symbols[n_symbols - 1].name;
            services[n_services++] = strdup(full);
            for (size_t j = 0; j < s->n_method; j++)
                add_symbol(pkg, full, s->method[j]->name, n_files);
        }
        n_files++;
    }
}

static int find_file(const char *name)
{
    for (int i = 0; i < n_files; i++)
        if (!strcmp(files[i].desc->name, name))
            return i;
    return -1;
}

/* The file and its transitive dependencies, each once, the file first. */
static void collect(int f, int *seen, int *order, int *n)
{
    if (seen[f])
        return;
    seen[f] = 1;
    order[(*n)++] = f;
    for (size_t i = 0; i < files[f].desc->n_dependency; i++) {
        int d = find_file(files[f].desc->dependency[i]);
        if (d >= 0)
            collect(d, seen, order, n);
    }
}

static void reply(rpc_call *c, Grpc__Reflection__V1__ServerReflectionRequest *req)
{
    Grpc__Reflection__V1__ServerReflectionResponse resp =
        GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__INIT;
    Grpc__Reflection__V1__FileDescriptorResponse fdr =
        GRPC__REFLECTION__V1__FILE_DESCRIPTOR_RESPONSE__INIT;
    Grpc__Reflection__V1__ListServiceResponse lsr =
        GRPC__REFLECTION__V1__LIST_SERVICE_RESPONSE__INIT;
    Grpc__Reflection__V1__ErrorResponse er = GRPC__REFLECTION__V1__ERROR_RESPONSE__INIT;
    Grpc__Reflection__V1__ServiceResponse svc[MAX_FILES * 4];
    Grpc__Reflection__V1__ServiceResponse *svcp[MAX_FILES * 4];
    ProtobufCBinaryData blobs[MAX_FILES];
    char msg[600];
    resp.valid_host = req->host;
    resp.original_request = req;

    int file = -1;
    const char *what = NULL;
    switch (req->message_request_case) {
    case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_LIST_SERVICES:
        for (int i = 0; i < n_services; i++) {
            grpc__reflection__v1__service_response__init(&svc[i]);
            svc[i].name = services[i];
            svcp[i] = &svc[i];
        }
        lsr.n_service = (size_t)n_services;
        lsr.service = svcp;
        resp.message_response_case =
            GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_LIST_SERVICES_RESPONSE;
        resp.list_services_response = &lsr;
        break;
    case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_BY_FILENAME:
        file = find_file(req->file_by_filename);
        what = req->file_by_filename;
        break;
    case GRPC__REFLECTION__V1__SERVER_REFLECTION_REQUEST__MESSAGE_REQUEST_FILE_CONTAINING_SYMBOL: {
        const char *sym = req->file_containing_symbol;
        if (sym[0] == '.')
            sym++;
        for (int i = 0; i < n_symbols; i++)
            if (!strcmp(symbols[i].name, sym))
                file = symbols[i].file;
        what = req->file_containing_symbol;
        break;
    }
    default:
        what = "extensions";
        break;
    }
    if (what) {
        if (file >= 0) {
            int seen[MAX_FILES] = {0}, order[MAX_FILES], n = 0;
            collect(file, seen, order, &n);
            for (int i = 0; i < n; i++)
                blobs[i] = files[order[i]].raw;
            fdr.n_file_descriptor_proto = (size_t)n;
            fdr.file_descriptor_proto = blobs;
            resp.message_response_case =
                GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_FILE_DESCRIPTOR_RESPONSE;
            resp.file_descriptor_response = &fdr;
        } else {
            snprintf(msg, sizeof msg, "%.500s: not found (this server defines no extensions)",
                     what);
            er.error_code = GRPC_STATUS_NOT_FOUND;
            er.error_message = msg;
            resp.message_response_case =
                GRPC__REFLECTION__V1__SERVER_REFLECTION_RESPONSE__MESSAGE_RESPONSE_ERROR_RESPONSE;
            resp.error_response = &er;
        }
    }
    rpc_send(c, &resp.base);
}

static void on_recv(rpc_call *c, grpc_byte_buffer *b)
{
    if (!b) { /* the client half-closed (or went away) */
        rpc_finish(c, GRPC_STATUS_OK, NULL);
        return;
    }
    grpc_byte_buffer_reader rd;
    grpc_slice s = grpc_empty_slice();
    if (grpc_byte_buffer_reader_init(&rd, b)) {
        s = grpc_byte_buffer_reader_readall(&rd);
        grpc_byte_buffer_reader_destroy(&rd);
    }
    grpc_byte_buffer_destroy(b);
    Grpc__Reflection__V1__ServerReflectionRequest *req =
        grpc__reflection__v1__server_reflection_request__unpack(NULL, GRPC_SLICE_LENGTH(s),
                                                                GRPC_SLICE_START_PTR(s));
    grpc_slice_unref(s);
    if (!req) {
        rpc_finish(c, GRPC_STATUS_INVALID_ARGUMENT, "not a ServerReflectionRequest message");
        return;
    }
    reply(c, req);
    grpc__reflection__v1__server_reflection_request__free_unpacked(req, NULL);
    rpc_recv(c);
}

static void on_cancel(rpc_call *c)
{
    rpc_finish(c, GRPC_STATUS_CANCELLED, "reflection stream cancelled");
}

static void reflection(rpc_call *c)
{
    pthread_once(&once, index_descriptors);
    c->on_recv = on_recv;
    c->on_cancel = on_cancel;
    rpc_recv(c);
}

const rpc_method rpc_reflect_methods[] = {
    {"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", "Reflection", 0, 1, reflection,
     NULL},
    {"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "Reflection", 0, 1,
     reflection, NULL},
};
const int rpc_reflect_n_methods = 2;
