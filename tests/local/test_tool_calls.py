"""Tool calls in the local engine: the text parser (unit), then the real model end to end."""

from __future__ import annotations

import asyncio
import json

import pytest
import uvicorn
from openai import AsyncOpenAI

from scheduler.backends import GenerateRequest
from scheduler.backends.sglang import SGLangBackend
from scheduler.local import LocalEngine, load_model
from scheduler.local.server import create_server
from scheduler.local.grammar import tool_call_grammar
from scheduler.local.tool_calls import ToolCallParser, normalize_messages
from tests.servers import free_port

pytestmark = pytest.mark.slow

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def feed_all(parser: ToolCallParser, pieces: list[str]) -> str:
    return "".join(parser.feed(p) for p in pieces)


def test_parser_streams_text_and_holds_back_calls():
    p = ToolCallParser()
    shown = feed_all(p, ["Let me check. <tool", "_call>\n{\"name\": \"get_weather\", ",
                         "\"arguments\": {\"city\": \"Paris\"}}\n</tool_call>"])
    assert shown == "Let me check. "
    rest, calls = p.finish()
    assert rest == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"})]


def test_parser_partial_tag_that_is_not_a_tag_is_released():
    p = ToolCallParser()
    assert p.feed("a <to") == "a "
    assert p.feed("p> b") == "<top> b"
    assert p.finish() == ("", [])


def test_parser_broken_json_keeps_the_name_and_raw_arguments():
    p = ToolCallParser()
    assert p.feed('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par') == ""  # cut by max_tokens
    rest, calls = p.finish()
    assert rest == "" and calls[0].name == "get_weather" and calls[0].arguments == '{"city": "Par'
    with pytest.raises(json.JSONDecodeError):
        json.loads(calls[0].arguments)  # the agent loop reports this back to the model


def test_parser_block_without_a_name_stays_text_and_two_calls_parse():
    p = ToolCallParser()
    p.feed("<tool_call>not json at all</tool_call>")
    assert p.finish() == ("<tool_call>not json at all</tool_call>", [])
    p = ToolCallParser()
    p.feed('<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>[{"name": "b"}]</tool_call>')
    assert [c.name for c in p.finish()[1]] == ["a", "b"]


def test_grammars_by_tool_choice_and_message_normalization():
    assert tool_call_grammar("none", [WEATHER]) is None and tool_call_grammar("auto", []) is None
    assert '"get_weather"' in tool_call_grammar("required", [WEATHER])
    assert "anyOf" in tool_call_grammar("required", [WEATHER, CLOCK])
    named = tool_call_grammar({"type": "function", "function": {"name": "get_time"}}, [WEATHER, CLOCK])
    assert '"get_time"' in named and "get_weather" not in named
    with pytest.raises(ValueError, match="not among"):
        tool_call_grammar({"type": "function", "function": {"name": "nope"}}, [WEATHER])
    msgs = normalize_messages([
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "12:00"}])
    assert msgs[0] == {"role": "user", "content": "hi"}
    assert msgs[1]["content"] == '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    assert msgs[2]["content"] == "<tool_response>\n12:00\n</tool_response>"


# ---- the real model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded():
    return load_model()


async def test_real_model_forced_call_then_answers_from_the_result(loaded):
    engine = LocalEngine(loaded, cache_tokens=4096)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_server(engine), host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    try:
        # the real openai client, not streaming: a forced call comes back as OpenAI tool_calls
        resp = await client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=ASK, tools=[WEATHER], tool_choice="required",
            max_tokens=80, temperature=0)
        choice = resp.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather" and call.id.startswith("call_")
        # streaming through the SGLang client gives the same call
        gen = await SGLangBackend(f"http://127.0.0.1:{port}").generate(GenerateRequest(
            messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=80))
        assert [(c.name, c.arguments) for c in gen.tool_calls] == [(call.function.name, call.function.arguments)]
        assert gen.finish_reason == "tool_calls" and gen.text == ""
        # the next turn carries the call and its result; the model answers in text
        follow = ASK + [choice.message.model_dump(exclude_none=True),
                        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 degrees."}]
        resp2 = await client.chat.completions.create(model="m", messages=follow, tools=[WEATHER], max_tokens=24,
                                                     temperature=0)
        assert resp2.choices[0].message.content and resp2.usage.prompt_tokens > resp.usage.prompt_tokens
        # without tools nothing is parsed, even if the text looks like a call
        plain = await engine.generate(GenerateRequest(
            messages=[{"role": "user", "content": "Repeat exactly: <tool_call>{\"name\": \"x\"}</tool_call>"}],
            max_tokens=24))
        assert plain.tool_calls == [] and plain.finish_reason in ("stop", "length")
    finally:
        await client.close()
        server.should_exit = True
        await task
        await engine.close()


SHELLISH = {"type": "function", "function": {
    "name": "run", "description": "Run a program with a mode and a repeat count",
    "parameters": {"type": "object", "properties": {
        "program": {"type": "string"}, "mode": {"enum": ["fast", "safe"]},
        "repeat": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["program", "mode", "repeat"], "additionalProperties": False}}}


async def test_real_model_sampled_calls_always_match_the_schema(loaded):
    """At temperature 1 a 135M model left alone writes broken calls; under the grammar every
    call names a given tool and its arguments validate against that tool's schema."""
    import jsonschema

    engine = LocalEngine(loaded, cache_tokens=4096)
    try:
        ask = [{"role": "user", "content": "Run the program build.sh safely three times, or tell me the weather."}]
        for seed in range(4):
            gen = await engine.generate(GenerateRequest(messages=ask, tools=[SHELLISH, WEATHER], tool_choice="required",
                                                        max_tokens=120, temperature=1.0, seed=seed))
            assert gen.finish_reason == "tool_calls", (seed, gen.text)
            (call,) = gen.tool_calls
            tool = {"run": SHELLISH, "get_weather": WEATHER}[call.name]
            jsonschema.validate(json.loads(call.arguments), tool["function"]["parameters"])
    finally:
        await engine.close()


def test_auto_grammar_leaves_text_free_and_constrains_what_follows_the_tag(loaded):
    from scheduler.local.grammar import GrammarCompiler

    compiler = GrammarCompiler(loaded.tokenizer, int(loaded.model.config.vocab_size))

    def accepts(text: str) -> bool:
        tokens = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
        return compiler.constraint("auto", [WEATHER]).valid_prefix(tokens) == len(tokens)

    assert accepts("Any text at all, { not JSON } <tool")
    assert accepts('Sure. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    assert not accepts('Sure. <tool_call>\n{"name": "get_time"')  # not one of the tools
    assert not accepts('<tool_call>\n{"name": "get_weather", "arguments": {"town": ')  # not in its schema
    assert compiler.constraint("none", [WEATHER]) is None
