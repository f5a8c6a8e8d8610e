"""Tool calls written in text, for models without native tool calling."""

from agents.text_tools import parse_text_calls, tools_prompt
from tools.builtins import builtin_registry


def test_tagged_call_is_parsed():
    calls = parse_text_calls('Let me look.\n<tool_call>\n{"name": "list_files", "arguments": {"path": "."}}\n</tool_call>')
    assert [(c.name, c.arguments) for c in calls] == [("list_files", '{"path": "."}')]


def test_unclosed_tag_and_parameters_key_are_accepted():
    calls = parse_text_calls('<tool_call>{"name": "shell", "parameters": {"command": "ls"}}')
    assert [(c.name, c.arguments) for c in calls] == [("shell", '{"command": "ls"}')]


def test_fenced_json_block_is_a_call_only_with_a_name():
    text = 'Here:\n```json\n{"name": "final_answer", "arguments": {"answer": "4"}}\n```\n```json\n{"x": 1}\n```'
    assert [c.name for c in parse_text_calls(text)] == ["final_answer"]


def test_malformed_tagged_call_is_kept_for_the_registry_to_report():
    calls = parse_text_calls('<tool_call>{"name": "shell", "arguments": {"command": "ls"</tool_call>')
    assert calls[0].name == "shell" and calls[0].arguments.startswith('{"name"')


def test_plain_text_has_no_calls():
    assert parse_text_calls("The answer is 4.") == []


def test_prompt_lists_every_tool_with_its_schema():
    text = tools_prompt(builtin_registry().specs())
    assert "<tool_call>" in text
    for name in ("python", "shell", "read_file", "write_file", "list_files", "str_replace", "final_answer"):
        assert f"- {name}:" in text
