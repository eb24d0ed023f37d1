#!/usr/bin/env python3
"""Write tests/jinja/expected.json: renderings computed ONCE with jinja2 in
the environment transformers' apply_chat_template uses (see README.md).

    python3 -m venv /tmp/jvenv && /tmp/jvenv/bin/pip install jinja2
    /tmp/jvenv/bin/python tests/jinja/gen_expected.py

The C tests only read expected.json; they never need jinja2.
"""
import json
import os
import sys

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

HERE = os.path.dirname(os.path.abspath(__file__))


def make_env():
    # transformers.utils.chat_template_utils._compile_jinja_template
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                          separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


U = lambda c: {"role": "user", "content": c}
A = lambda c: {"role": "assistant", "content": c}
S = lambda c: {"role": "system", "content": c}

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather in a city, in °C",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "City name"},
        "days": {"type": "integer"}}, "required": ["city"]}}}]

CONVS = {
    "single": [U("Hello!")],
    "system": [S("You are terse."), U("What is INT4?")],
    "multi": [U("hi"), A("Hello! How can I help?"), U("Tell me a joke")],
    "unicode": [U("你好,请介绍一下混合专家模型。 ünïcödé \"quotes\" & <tags>")],
    "spaces": [S("  padded system  \n"), U("  padded user\n\n"), A(" reply "), U("next")],
}

THINK = [U("What is 2+2?"),
         A("<think>\nSimple arithmetic.\n</think>\n\n4"),
         U("And 3+3?")]
THINK_LAST = [U("What is 2+2?"), A("<think>\nadd\n</think>\n\n4")]
REASONING = [U("q1"), {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
             U("q2")]
TOOL_CONV = [S("You can call tools."), U("Weather in Paris?"),
             {"role": "assistant", "content": "",
              "tool_calls": [{"type": "function", "id": "call12345",
                              "function": {"name": "get_weather",
                                           "arguments": {"city": "Paris", "days": 2}}}]},
             {"role": "tool", "content": "{\"temp\": 21}", "tool_call_id": "call12345"},
             U("Thanks")]

TOOL_CONV2 = [U("Weather in Paris?"), TOOL_CONV[2], TOOL_CONV[3], A("It is 21 °C."), U("Thanks")]

TEMPLATES = {
    "qwen2.5": "Qwen-Qwen2.5-7B-Instruct.jinja",
    "qwen3": "Qwen-Qwen3-0.6B.jinja",
    "mixtral": "mistralai-Mixtral-8x7B-Instruct-v0.1.jinja",
    "mistral-nemo": "mistralai-Mistral-Nemo-Instruct-2407.jinja",
    "llama3.3": "meta-llama-Llama-3.3-70B-Instruct.jinja",
}
SPECIAL = {
    "qwen2.5": {"eos_token": "<|im_end|>"},
    "qwen3": {"eos_token": "<|im_end|>"},
    "mixtral": {"bos_token": "<s>", "eos_token": "</s>"},
    "mistral-nemo": {"bos_token": "<s>", "eos_token": "</s>"},
    "llama3.3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
}


def published_cases():
    cases = []
    for key, fname in TEMPLATES.items():
        for cname, msgs in CONVS.items():
            for agp in (True, False):
                cases.append({"name": f"{key}/{cname}/agp={int(agp)}", "template_file": fname,
                              "vars": dict(messages=msgs, add_generation_prompt=agp,
                                           **SPECIAL[key])})
        # assistant last (a prefill) and an alternation error
        cases.append({"name": f"{key}/assistant-last", "template_file": fname,
                      "vars": dict(messages=[U("a"), A("b")], add_generation_prompt=False,
                                   **SPECIAL[key])})
        cases.append({"name": f"{key}/two-users", "template_file": fname,
                      "vars": dict(messages=[U("a"), U("b")], add_generation_prompt=True,
                                   **SPECIAL[key])})
        cases.append({"name": f"{key}/tools2", "template_file": fname,
                      "vars": dict(messages=TOOL_CONV2, tools=TOOLS, add_generation_prompt=True,
                                   **SPECIAL[key])})
        cases.append({"name": f"{key}/tools", "template_file": fname,
                      "vars": dict(messages=TOOL_CONV, tools=TOOLS, add_generation_prompt=True,
                                   **SPECIAL[key])})
    for name, msgs in (("think-history", THINK), ("think-last", THINK_LAST),
                       ("reasoning-field", REASONING)):
        for extra in ({}, {"enable_thinking": False}, {"enable_thinking": True}):
            tag = "default" if not extra else f"enable_thinking={extra['enable_thinking']}"
            cases.append({"name": f"qwen3/{name}/{tag}", "template_file": TEMPLATES["qwen3"],
                          "vars": dict(messages=msgs, add_generation_prompt=True,
                                       **SPECIAL["qwen3"], **extra)})
    cases.append({"name": "llama3.3/tools-in-system", "template_file": TEMPLATES["llama3.3"],
                  "vars": dict(messages=TOOL_CONV, tools=TOOLS, tools_in_user_message=False,
                               date_string="01 Jan 2025", add_generation_prompt=True,
                               **SPECIAL["llama3.3"])})
    cases.append({"name": "llama3.3/builtin-tools", "template_file": TEMPLATES["llama3.3"],
                  "vars": dict(messages=[U("search it")], builtin_tools=["brave_search",
                               "code_interpreter", "wolfram_alpha"],
                               add_generation_prompt=True, **SPECIAL["llama3.3"])})
    cases.append({"name": "mistral-nemo/system-tools", "template_file": TEMPLATES["mistral-nemo"],
                  "vars": dict(messages=[S("sys"), U("one"), A("two"), U("three")], tools=TOOLS,
                               add_generation_prompt=True, **SPECIAL["mistral-nemo"])})
    return cases


# Inline templates exercising the language feature by feature.
FEATURES = [
    ("literals", "{{ 1 }} {{ -2 }} {{ 1.5 }} {{ 2.0 }} {{ 1e3 }} {{ 0.1 + 0.2 }} {{ 'a' }} "
                 "{{ \"b\" }} {{ true }} {{ false }} {{ none }} {{ True }} {{ [1, 'x', none] }} "
                 "{{ {'k': 1, 'j': [true]} }} {{ (1, 2) }} {{ (1,) }} {{ () }} {{ 1e-5 }} "
                 "{{ 123456789012345678 }} {{ 1e16 }} {{ 12345.678 }}", {}),
    ("arith", "{{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ -7 % 3 }} {{ 7 / 2 }} {{ 2 ** 10 }} "
              "{{ 2 ** -1 }} {{ 1 + 2 * 3 - 4 }} {{ (1 + 2) * 3 }} {{ 7.5 // 2 }} {{ -7.5 % 2 }} "
              "{{ 'ab' * 3 }} {{ [1] * 2 }} {{ 'a' ~ 1 ~ none ~ true }} {{ [1] + [2] }}", {}),
    ("compare", "{{ 1 < 2 < 3 }} {{ 1 < 2 > 3 }} {{ 'a' < 'b' }} {{ 1 == 1.0 }} {{ 1 == true }} "
                "{{ 'x' in 'xyz' }} {{ 'q' not in 'xyz' }} {{ 2 in [1, 2] }} {{ 'k' in {'k': 1} }} "
                "{{ [1, 2] == [1, 2] }} {{ {'a': 1} == {'a': 1} }} {{ none == none }} "
                "{{ 1 != 2 }} {{ 'b' >= 'a' }}", {}),
    ("logic", "{{ 0 or 'x' }} {{ 1 and 'y' }} {{ '' and 'z' }} {{ not 1 }} {{ not none }} "
              "{{ 'a' if 1 else 'b' }} {{ 'a' if 0 else 'b' }} [{{ 'a' if 0 }}] "
              "{{ not x is defined }} {{ x is not defined and y is undefined }}", {}),
    ("undefined", "[{{ missing }}] [{{ missing|default('dflt') }}] [{{ ''|default('e', true) }}] "
                  "[{{ d.nokey }}] [{{ d['nokey'] }}] [{{ l[10] }}] {{ missing is defined }} "
                  "{{ d.nokey is defined }} {{ none is none }} {{ d is mapping }} "
                  "{{ l is iterable }} {{ 's' is string }} {{ 1 is number }} "
                  "{{ d.k is string }} {{ [] is sequence }} {{ missing|length }}",
     {"d": {"k": "v"}, "l": [1]}),
    ("strings", "{{ s.upper() }}|{{ s.lower() }}|{{ s.strip() }}|{{ s.lstrip() }}|"
                "{{ s.rstrip() }}|{{ s.strip(' H!') }}|{{ s.split() }}|{{ s.split('l') }}|"
                "{{ s.split('l', 1) }}|{{ s.rsplit('l', 1) }}|{{ s.replace('l', 'L') }}|"
                "{{ s.startswith('  He') }}|{{ s.endswith(('x', '! ')) }}|{{ s.find('o') }}|"
                "{{ s.count('l') }}|{{ s.title() }}|{{ s.capitalize() }}|{{ '-'.join(['a','b']) }}|"
                "{{ '{} and {}'.format(1, 'two') }}|{{ '{x}!'.format(x=3) }}|{{ s|trim }}|"
                "{{ s|length }}|{{ 'é日本'|length }}|{{ 'a\\nb'.splitlines() }}|"
                "{{ '12'.isdigit() }}|{{ 'ab'.isalpha() }}|{{ 'AB'.isupper() }}",
     {"s": "  Hello World!! "}),
    ("slices", "{{ l[1:] }} {{ l[:-1] }} {{ l[::-1] }} {{ l[::2] }} {{ l[-2:] }} {{ l[5:] }} "
               "{{ l[1:3] }} {{ s[::-1] }} {{ s[1:3] }} {{ s[-1] }} {{ s[:-1] }} {{ l[-1] }} "
               "{{ 'héllo'[1:4] }} {{ l[10:0:-3] }} {{ l[:] }} {{ t[1:] }}",
     {"l": [0, 1, 2, 3, 4], "s": "abcdé", "t": [9, 8, 7]}),
    ("filters", "{{ l|join(', ') }}|{{ l|first }}|{{ l|last }}|{{ l|length }}|{{ l|reverse|list }}|"
                "{{ l|sort }}|{{ l|sort(reverse=true) }}|{{ l|unique|list }}|{{ l|max }}|{{ l|min }}|"
                "{{ l|sum }}|{{ 'AbC'|lower }}|{{ 'abc'|upper }}|{{ 'x y'|title }}|"
                "{{ 'hello'|capitalize }}|{{ '  t  '|trim }}|{{ 'xxhixx'|trim('x') }}|"
                "{{ 'aaa'|replace('a', 'b', 2) }}|{{ 3.7|int }}|{{ '42'|int }}|{{ 'x'|int }}|"
                "{{ '2.5'|float }}|{{ -3|abs }}|{{ 2.567|round(2) }}|{{ 2.5|round }}|"
                "{{ 7|string }}|{{ none|string }}|{{ [1, 'a']|string }}|{{ 'a<b>&\"'|e }}|"
                "{{ d|items|list }}|{{ d|dictsort }}|{{ 'a b  c'|wordcount }}|"
                "{{ l|map('string')|join }}|{{ 'abc'|list }}|{{ 'abc'|reverse }}",
     {"l": [3, 1, 2, 3], "d": {"b": 2, "a": 1}}),
    ("select", "{{ ms|selectattr('role', 'equalto', 'user')|map(attribute='content')|list }}|"
               "{{ ms|rejectattr('role', 'equalto', 'user')|list|length }}|"
               "{{ ms|selectattr('extra')|list|length }}|{{ [1, 2, 3, 4]|select('odd')|list }}|"
               "{{ [1, 2, 3, 4]|reject('even')|list }}|"
               "{{ ['a', 'code', 'b']|reject('equalto', 'code')|join(',') }}|"
               "{{ ms|map(attribute='role')|join('/') }}|{{ ms|sort(attribute='content')|"
               "map(attribute='content')|join(',') }}|{{ [1, 2]|select('in', [2])|list }}",
     {"ms": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "a",
             "extra": 1}, {"role": "user", "content": "c"}]}),
    ("tojson", "{{ v|tojson }}\n{{ v|tojson(indent=2) }}\n{{ v|tojson(sort_keys=true) }}\n"
               "{{ v|tojson(separators=(',', ':')) }}\n{{ 'é\"\\n'|tojson }}\n"
               "{{ 'é'|tojson(ensure_ascii=true) }}\n{{ [] | tojson(indent=4) }}\n"
               "{{ {} | tojson }}\n{{ 1.0|tojson }}\n{{ none|tojson }}",
     {"v": {"z": 1, "a": [1.5, True, None, "x\u00e9\U0001F600"], "n": {"k": {}}}}),
    ("loops", "{% for x in l %}{{ loop.index }}{{ loop.index0 }}{{ loop.first }}{{ loop.last }}"
              "{{ loop.length }}{{ loop.revindex }}[{{ loop.previtem }}]{{ loop.cycle('a', 'b') }}"
              ",{% endfor %}|{% for x in l if x > 1 %}{{ x }}{{ loop.length }}{% endfor %}|"
              "{% for x in [] %}no{% else %}empty{% endfor %}|"
              "{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}|"
              "{% for k in d %}{{ k }}{% endfor %}|{% for a, b in [[1, 2], [3, 4]] %}{{ a + b }}"
              "{% endfor %}|{% for x in l %}{% if x == 2 %}{% continue %}{% endif %}"
              "{% if x == 3 %}{% break %}{% endif %}{{ x }}{% endfor %}|"
              "{% for c in 'héj' %}{{ c }}.{% endfor %}|{% for i in range(3) %}{{ i }}{% endfor %}"
              "{% for i in range(1, 10, 4) %}{{ i }}{% endfor %}{% for i in range(3, 0, -1) %}"
              "{{ i }}{% endfor %}",
     {"l": [1, 2, 3], "d": {"x": 1, "y": 2}}),
    ("scoping", "{% set x = 1 %}{% for i in [1, 2] %}{% set x = x + i %}{{ x }}{% endfor %}"
                "{{ x }}|{% set ns = namespace(total=0, items=[]) %}{% for i in [1, 2, 3] %}"
                "{% set ns.total = ns.total + i %}{% endfor %}{{ ns.total }}|{% if true %}"
                "{% set y = 5 %}{% endif %}{{ y }}|{% set a, b = 1, 2 %}{{ a }}{{ b }}|"
                "{% set blk %}inner {{ x }}{% endset %}[{{ blk }}]|{% set up | upper %}shout"
                "{% endset %}{{ up }}|{% set ns2 = namespace() %}{% set ns2.v = 'nv' %}{{ ns2.v }}",
     {}),
    ("macros", "{% macro greet(name, punct='!') %}Hi {{ name }}{{ punct }}{% endmacro %}"
               "{{ greet('A') }} {{ greet('B', '?') }} {{ greet(name='C', punct='.') }}"
               "{% macro fact(n) %}{% if n <= 1 %}1{% else %}{{ n * fact(n - 1)|int }}"
               "{% endif %}{% endmacro %} {{ fact(5) }}", {}),
    ("whitespace", "a\n  {% if true %}\n    b\n  {% endif %}\nc\n{%- if true %} d {% endif -%}\n"
                   "  e  \n{{- ' f ' -}}\n  g {# comment #}\n  {# own line #}\nh {%+ if true %}"
                   "i{% endif %}\n{% raw %}{{ raw }}{% endraw %}\n  {{ 'v' }}\n", {}),
    ("whitespace2", "{% for m in l %}\n  - {{ m }}\n{% endfor %}\n{%- for m in l -%}\n"
                    "  [{{ m }}]\n{%- endfor %}\nend\n", {"l": ["x", "y"]}),
    ("percent-format", "{{ '%s-%d|%5s|%-4s|%.2f|%r|%%'|format('a', 3, 'x', 'y', 2.5, 'q') }} "
                       "{{ 'x=%s' % 5 }} {{ '%s+%s' % (1, 'b') }} {{ '%x' % 255 }}", {}),
    ("filterblock", "{% filter upper %}abc {{ 'd' }}{% endfilter %}", {}),
    ("dictmethods", "{{ d.get('a') }} {{ d.get('zz') }} {{ d.get('zz', 'dflt') }} "
                    "{{ d.keys()|list }} {{ d.values()|list }} {{ d['b'] }} {{ d.b.c }} "
                    "{{ d['b']['c'] }} {{ 'a' in d }} {{ d|length }}",
     {"d": {"a": 1, "b": {"c": "deep"}}}),
    ("str-of-values", "{{ d }} {{ l }} {{ 'it''s' }} {{ [\"it's\"] }} {{ ['a\\nb'] }} {{ 3.14 }}",
     {"d": {"k": [1, 2.5, None, True, "s"]}, "l": ["x", {"y": "z"}]}),
    ("trailing-newline", "line\n", {}),
    ("is-tests", "{{ 3 is odd }} {{ 4 is even }} {{ 9 is divisibleby 3 }} {{ 9 is divisibleby(4) }} "
                 "{{ 'ab' is lower }} {{ 'AB' is upper }} {{ 1 is eq 1 }} {{ 2 is gt 1 }} "
                 "{{ x is none }} {{ x is sameas none }} {{ true is true }} {{ 1 is integer }} "
                 "{{ 1.0 is float }} {{ 'a' is in 'abc' }} {{ f is boolean }}",
     {"x": None, "f": False}),
]


def feature_cases():
    return [{"name": f"feature/{n}", "template": t, "vars": v} for n, t, v in FEATURES]


def main():
    env = make_env()
    out = []
    for case in published_cases() + feature_cases():
        if "template_file" in case:
            src = open(os.path.join(HERE, "templates", case["template_file"]),
                       encoding="utf-8").read()
        else:
            src = case["template"]
        # apply_chat_template always passes tools and documents (None when absent)
        if "template_file" in case:
            case["vars"].setdefault("tools", None)
            case["vars"].setdefault("documents", None)
        try:
            case["expected"] = env.from_string(src).render(**case["vars"])
        except jinja2.exceptions.TemplateError as e:
            case["error"] = str(e)
        out.append(case)
    path = os.path.join(HERE, "expected.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"generator": "jinja2 " + jinja2.__version__ +
                   " ImmutableSandboxedEnvironment(trim_blocks, lstrip_blocks, loopcontrols)"
                   " + transformers tojson/raise_exception", "cases": out},
                  f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"{len(out)} cases -> {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
