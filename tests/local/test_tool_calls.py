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
from scheduler.local.tool_calls import ToolCallParser, forced_prefix, normalize_messages
from tests.servers import free_port

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
    p = ToolCallParser(forced_prefix({"type": "function", "function": {"name": "get_weather"}}, [WEATHER]))
    assert p.feed('{"city": "Par') == ""  # cut by max_tokens: no close tag, invalid JSON
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


def test_forced_prefixes_and_message_normalization():
    assert forced_prefix("auto", [WEATHER]) == "" and forced_prefix("none", [WEATHER]) == ""
    assert '"get_weather"' in forced_prefix("required", [WEATHER])
    assert forced_prefix("required", [WEATHER, CLOCK]).endswith('{"name": "')
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
