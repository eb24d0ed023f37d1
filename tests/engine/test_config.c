/*
 * test_config.c: config.json parsing for the three architectures, both
 * spellings of the renamed fields, and a clear refusal of everything the
 * engine does not implement.
 */
#include "engine/config.h"
#include "tests/engine/check.h"

#include <stdio.h>

#define QWEN2                                                                                \
    "\"model_type\":\"qwen2_moe\",\"vocab_size\":1536,\"hidden_size\":256,"                 \
    "\"num_hidden_layers\":3,\"num_attention_heads\":4,\"num_key_value_heads\":2,"          \
    "\"intermediate_size\":512,\"moe_intermediate_size\":160,"                              \
    "\"shared_expert_intermediate_size\":384,\"num_experts\":8,\"num_experts_per_tok\":2,"  \
    "\"rms_norm_eps\":1e-6,\"hidden_act\":\"silu\""

static int parse(const char *json, const char *gen, model_config *c, lm_err *err)
{
    return config_parse(json, gen, "config.json", c, err);
}

int main(int argc, char **argv)
{
    lm_err err = {0};
    model_config c;
    CHECK(parse("{" QWEN2 ",\"rope_theta\":5000.0,\"eos_token_id\":7}",
                "{\"eos_token_id\":[3,4]}", &c, &err) == 0);
    CHECK(c.arch == MODEL_ARCH_QWEN2_MOE && c.head_dim == 64 && c.rope_theta == 5000.f);
    CHECK(c.qkv_bias == 1 && c.shared_intermediate == 384 && c.n_eos == 2 && c.eos_ids[1] == 4);
    CHECK(c.layer_moe[0] && c.layer_moe[2] && !c.norm_topk_prob);
    CHECK(parse("{" QWEN2 ",\"rope_parameters\":{\"rope_type\":\"default\",\"rope_theta\":1e6},"
                "\"decoder_sparse_step\":2,\"mlp_only_layers\":[2],\"qkv_bias\":false}",
                NULL, &c, &err) == 0);
    CHECK(c.rope_theta == 1e6f && !c.layer_moe[0] && c.layer_moe[1] && !c.layer_moe[2]);
    CHECK(!c.qkv_bias);

    /* qwen3_moe: num_local_experts spelling, explicit head_dim, attention_bias. */
    CHECK(parse("{\"model_type\":\"qwen3_moe\",\"vocab_size\":4096,\"hidden_size\":256,"
                "\"num_hidden_layers\":6,\"num_attention_heads\":4,\"num_key_value_heads\":2,"
                "\"head_dim\":64,\"intermediate_size\":768,\"moe_intermediate_size\":192,"
                "\"num_local_experts\":16,\"num_experts_per_tok\":4,\"norm_topk_prob\":true,"
                "\"attention_bias\":false,\"sliding_window\":null,\"use_sliding_window\":false}",
                NULL, &c, &err) == 0);
    CHECK(c.arch == MODEL_ARCH_QWEN3_MOE && c.n_experts == 16 && c.qk_norm && c.norm_topk_prob);
    CHECK(c.head_dim == 64 && c.shared_intermediate == 0 && !c.qkv_bias);

    /* mixtral: head_dim null, renormalised routing, GPTQ block. */
    CHECK(parse("{\"model_type\":\"mixtral\",\"vocab_size\":1280,\"hidden_size\":256,"
                "\"num_hidden_layers\":3,\"num_attention_heads\":4,\"num_key_value_heads\":1,"
                "\"head_dim\":null,\"intermediate_size\":160,\"num_local_experts\":6,"
                "\"num_experts_per_tok\":2,\"sliding_window\":null,\"tie_word_embeddings\":true,"
                "\"quantization_config\":{\"quant_method\":\"gptq\",\"bits\":4,\"group_size\":32,"
                "\"sym\":false,\"desc_act\":true,\"checkpoint_format\":\"gptq\"}}",
                NULL, &c, &err) == 0);
    CHECK(c.arch == MODEL_ARCH_MIXTRAL && c.head_dim == 64 && c.norm_topk_prob &&
          c.moe_intermediate == 160 && c.tie_embeddings);
    CHECK(c.quant.gptq && c.quant.group_size == 32 && !c.quant.sym && c.quant.desc_act);

    /* Refusals. */
    CHECK_ERR(parse("{\"model_type\":\"llama\"}", NULL, &c, &err), err, -ENOTSUP,
              "model_type 'llama'");
    CHECK_ERR(parse("{\"vocab_size\":3}", NULL, &c, &err), err, -EINVAL, "'model_type'");
    CHECK_ERR(parse("{\"model_type\":\"qwen2_moe\",\"vocab_size\":10}", NULL, &c, &err), err,
              -EINVAL, "'hidden_size'");
    CHECK_ERR(parse("{" QWEN2 ",\"rope_scaling\":{\"type\":\"yarn\",\"factor\":4}}", NULL, &c,
                    &err),
              err, -ENOTSUP, "'yarn'");
    CHECK_ERR(parse("{" QWEN2 ",\"rope_parameters\":{\"rope_type\":\"llama3\"}}", NULL, &c, &err),
              err, -ENOTSUP, "'llama3'");
    CHECK_ERR(parse("{" QWEN2 ",\"use_sliding_window\":true,\"sliding_window\":4096}", NULL, &c,
                    &err),
              err, -ENOTSUP, "sliding_window");
    CHECK_ERR(parse("{" QWEN2 ",\"hidden_act\":\"gelu\"}", NULL, &c, &err), err, -ENOTSUP,
              "'gelu'");
    CHECK_ERR(parse("{" QWEN2 ",\"quantization_config\":{\"quant_method\":\"awq\"}}", NULL, &c,
                    &err),
              err, -ENOTSUP, "'awq'");
    CHECK_ERR(parse("{" QWEN2 ",\"quantization_config\":{\"quant_method\":\"gptq\",\"bits\":8}}",
                    NULL, &c, &err),
              err, -ENOTSUP, "bits=8");
    CHECK_ERR(parse("{" QWEN2 ",\"num_key_value_heads\":3}", NULL, &c, &err), err, -EINVAL,
              "num_key_value_heads 3");
    CHECK_ERR(parse("{" QWEN2 ",\"num_experts_per_tok\":9}", NULL, &c, &err), err, -EINVAL,
              "num_experts_per_tok 9");
    CHECK_ERR(parse("{ nope", NULL, &c, &err), err, -EINVAL, "not a JSON object");

    /* The fixtures' configs load. */
    const char *fx = argc > 1 ? argv[1] : NULL;
    if (fx) {
        const char *names[] = {"qwen2moe-tiny", "qwen2moe-tiny-gptq", "mixtral-tiny",
                               "trained-moe"};
        for (int i = 0; i < 4; i++) {
            char p[1024];
            snprintf(p, sizeof p, "%s/%s", fx, names[i]);
            int rc = config_load(p, &c, &err);
            if (rc)
                fprintf(stderr, "%s: %s\n", p, err.msg);
            CHECK(rc == 0);
        }
        CHECK(config_load(fx, &c, &err) == -ENOENT);
    }
    CHECK_DONE();
}
