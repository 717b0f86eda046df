"""Hostile chat templates (issue 17, item 2): rendering bounded in time and memory (format
widths, repetition, concatenation, replace/join/expandtabs, range, lipsum, recursion), the same
from a worker thread, and a refused model template giving way to a built-in format with one
notice."""

from __future__ import annotations

import resource
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamachat.runtime.tokenizer.chat_template import BUILTIN_FORMATS, ChatTemplate
from llamachat.runtime.errors import UserError

HI = [{"role": "user", "content": "hi"}]
CHATML_HI = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"

HOSTILE = {
    "lipsum": "{{ lipsum(1000000) }}",
    "percent-width": "{{ '%999999999s' % 'a' }}",
    "percent-star-width": "{{ '%*s' % (999999999, 'a') }}",
    "percent-precision": "{{ '%.999999999f' % 1.0 }}",
    "format-width": "{{ '{:>999999999}'.format('a') }}",
    "format-nested-width": "{{ '{:>{}}'.format('a', 999999999) }}",
    "format-map-width": "{{ '{x:>999999999}'.format_map({'x': 1}) }}",
    "format-filter-width": "{{ '%999999999s' | format('a') }}",
    "tilde-doubling": "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}",
    "plus-doubling": "{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s | length }}",
    "list-doubling": "{% set ns = namespace(s=[1]) %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s | length }}",
    "repetition": "{{ 'x' * 1000000000 }}",
    "replace-empty": "{{ ('x' * 1000000).replace('', 'yyyyyyyy') }}",
    "replace-filter": "{{ ('x' * 1000000) | replace('x', 'yyyyyyyyyy') }}",
    "expandtabs": "{{ ('\t' * 100000).expandtabs(1000) }}",
    "join-method": "{{ ('x' * 100000).join(['a'] * 100000) }}",
    "join-filter": "{{ (['a'] * 100000) | join('x' * 100000) }}",
    "tojson-indent": "{{ messages | tojson(indent=1000000000) }}",
    "ljust": "{{ 'a'.ljust(999999999) }}",
    "wordwrap": "{{ 'a b' | wordwrap(1000000000) }}",
    "map-center": "{{ ['a'] | map('center', 999999999) | list }}",
    "range": "{{ range(10 ** 9) | list | length }}",
    "nested-loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "deep-source": "{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}",
    "huge-source": "{# " + "x" * (2 << 20) + " #}",
    "not-jinja": "{% for %}",
}


def _render_bounded(source: str, fallback: bool):
    ct = ChatTemplate.for_model({"tokenizer.chat_template": source, "general.name": "Evil"}, None, fallback=fallback)
    return ct, ct.render(HI)


@pytest.fixture
def short_time_limit(monkeypatch):
    monkeypatch.setattr(ChatTemplate, "time_limit", 1.0)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_template_is_refused_in_bounded_time_and_memory(case, short_time_limit):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    with pytest.raises(UserError) as err:
        _render_bounded(HOSTILE[case], fallback=False)
    assert time.monotonic() - t0 < 5
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200  # a refused render never builds the giant string (ru_maxrss is in KiB)
    message = str(err.value)
    assert message.startswith("the chat template of Evil ") and "\n" not in message and len(message) < 400


@pytest.mark.parametrize("case", ["lipsum", "format-width", "tilde-doubling", "nested-loops", "recursion", "not-jinja", "huge-source"])
def test_refused_template_falls_back_to_a_builtin_format_with_one_notice(case, short_time_limit):
    ct, text = _render_bounded(HOSTILE[case], fallback=True)
    assert text == CHATML_HI and ct.name == "chatml"
    notice = ct.take_notice()
    assert notice.startswith("the chat template of Evil ") and notice.endswith("using the built-in 'chatml' format instead")
    assert ct.take_notice() is None  # one notice
    assert ct.render(HI) == CHATML_HI and ct.take_notice() is None


def test_a_template_refusing_the_conversation_is_not_replaced():
    ct = ChatTemplate.for_model({"tokenizer.chat_template": "{{ raise_exception('x' * 1000000) }}"}, None, model_name="M", fallback=True)
    with pytest.raises(UserError) as err:
        ct.render(HI)
    assert "refused the conversation: xxx" in str(err.value) and "(1000000 characters)" in str(err.value)
    assert len(str(err.value)) < 400


def test_bounds_hold_in_a_worker_thread(short_time_limit):
    results = {}

    def work(name):
        try:
            _render_bounded(HOSTILE[name], fallback=False)
            results[name] = "rendered"
        except UserError as err:
            results[name] = str(err)

    threads = [threading.Thread(target=work, args=(name,)) for name in ("nested-loops", "tilde-doubling", "lipsum")]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert time.monotonic() - t0 < 10 and not any(t.is_alive() for t in threads)
    assert "took longer than 1 s" in results["nested-loops"]
    assert "unsafe" in results["tilde-doubling"] and "unsafe" in results["lipsum"]
    # the main thread's renders are not affected by the workers' deadlines
    assert ChatTemplate.builtin("chatml").render(HI) == CHATML_HI


def test_ordinary_templates_still_render():
    src = ("{% for m in messages %}{{ '<|' ~ m['role'] ~ '|>' + m['content'] | replace('a', 'b') }}"
           "{{ '%-6s|%3d' % ('x', 7) }}{{ '{:>5}'.format('y') }}{{ ['p', 'q'] | join(', ') }}{{ lipsum(1, false, 3, 5) | length > 0 }}{% endfor %}")
    out = ChatTemplate.for_model({"tokenizer.chat_template": src}, None, model_name="M").render([{"role": "user", "content": "banana"}])
    assert out == "<|user|>bbnbnbx     |  7    yp, qTrue"


# ---- fuzz: templates made of pieces of Jinja with hostile numbers --------------------------

_number = st.one_of(st.integers(min_value=-5, max_value=50), st.sampled_from([10 ** 6, 10 ** 7, 10 ** 9, 2 ** 31, 10 ** 18]))
_expr = st.one_of(
    _number.map(lambda n: f"'ab' * {n}"),
    _number.map(lambda n: f"'%{n}s' % 'x'"),
    _number.map(lambda n: f"'{{:>{n}}}'.format('x')"),
    _number.map(lambda n: f"'x'.center({n})"),
    _number.map(lambda n: f"'x' | indent({n}, true)"),
    _number.map(lambda n: f"lipsum({n})"),
    _number.map(lambda n: f"range({n}) | list | length"),
    _number.map(lambda n: f"('a\\t' * 50).expandtabs({n})"),
    _number.map(lambda n: f"messages | tojson(indent={n})"),
    st.sampled_from(["messages[0]['content']", "bos_token ~ eos_token", "raise_exception('no')", "undefined_name.attr",
                     "messages[5]", "1 / 0", "'{0.__class__}'.format(1)", "messages.pop()"]),
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(exprs=st.lists(_expr, min_size=1, max_size=3), loop=st.integers(min_value=0, max_value=2))
def test_fuzz_templates(exprs, loop, monkeypatch):
    monkeypatch.setattr(ChatTemplate, "time_limit", 0.3)  # CI time: the bound, not its size, is under test
    body = "".join("{{ " + e + " }}" for e in exprs)
    source = "{% for i in range(" + str(10 ** loop) + ") %}" + body + "{% endfor %}" if loop else body
    t0 = time.monotonic()
    try:
        ct = ChatTemplate.for_model({"tokenizer.chat_template": source}, None, model_name="F", fallback=True)
        text = ct.render(HI)
    except UserError as err:
        assert "refused the conversation" in str(err) and len(str(err)) < 400
        return
    finally:
        assert time.monotonic() - t0 < 3
    assert len(text) <= ChatTemplate.min_output_limit + 4 * 2
    if ct.name != "model":
        assert ct.name in BUILTIN_FORMATS and ct.take_notice().startswith("the chat template of F ")
