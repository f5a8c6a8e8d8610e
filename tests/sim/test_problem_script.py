"""The simulator as a solver of known problems (evolve's tests and benchmark): scripted answers,
copying a group's answers, prompt logprobs over ``/generate`` through the project's SGLang client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scheduler.backends.base import GenerateRequest
from scheduler.backends.sglang import SGLangBackend
from scheduler.sim.engine import SimRequest
from scheduler.sim.script import ProblemScript, hashed_prompt_logprobs, problem_script
from scheduler.sim.server import load_script
from scheduler.sim.tokenizer import SimTokenizer
from tests.servers import SimServerProcess
from tests.sim.test_server import sim_server

Q = "Tom has 3 apples and buys 4 more. How many apples does he have?"


def _request(text: str, seed: int | None = None) -> SimRequest:
    return SimRequest(rid="r", input_ids=SimTokenizer().encode(text), max_new_tokens=64, seed=seed, prompt_text=text)


def test_accuracy_decides_right_answers_and_replies_are_reproducible():
    right = ProblemScript({Q: "7"}, accuracy=1.0)
    wrong = ProblemScript({Q: "7"}, accuracy=0.0)
    text = f"{Q}\n\nPut the final answer in \\boxed{{}}."
    assert right.answer(text, 1) == "7"
    assert wrong.answer(text, 1) not in ("7", None)
    replies = {"".join(right.plan(_request(text, s)).pieces) for s in range(3)}
    assert all(r.endswith("\\boxed{7}.") for r in replies)
    assert "".join(wrong.plan(_request(text, 5)).pieces) == "".join(wrong.plan(_request(text, 5)).pieces)
    assert right.answer("an unknown question", 1) is None
    # a share of about ``accuracy`` over many seeds
    half = ProblemScript({Q: "7"}, accuracy=0.5, seed=3)
    share = sum(half.answer(text, s) == "7" for s in range(2000)) / 2000
    assert 0.45 < share < 0.55


def test_a_wrong_model_copies_the_group_it_is_shown():
    wrong = ProblemScript({Q: "7"}, accuracy=0.0)
    prompt = f"Problem:\n{Q}\n\nCandidate solution 1:\n... \\boxed{{9}}.\n\nCandidate solution 2:\n\\boxed{{9}}"
    assert {wrong.answer(prompt, s) for s in range(20)} == {"9"}


def test_prompt_confidence_follows_the_last_stated_answer():
    s = ProblemScript({Q: "7"}, accuracy=1.0, confidence_correct=3.0, confidence_wrong=1.0, by_answer={"8": 0.25})
    pieces = SimTokenizer().split(f"{Q} candidate: so \\boxed{{7}}.")
    rows = s.prompt_logprobs(pieces, 20)
    assert len(rows) == len(pieces) - 1 and all(len(r) == 20 for r in rows)
    assert rows[0][0][0] == pieces[1]
    assert -sum(lp for _, lp in rows[0]) / 20 == pytest.approx(3.0)
    assert [lp for _, lp in rows[0]] == sorted((lp for _, lp in rows[0]), reverse=True)
    assert s.prompt_confidence(f"{Q} so \\boxed{{5}}") == 1.0
    assert s.prompt_confidence(f"{Q} so \\boxed{{8}}") == 0.25
    noisy = ProblemScript({Q: "7"}, accuracy=1.0, confidence_noise=0.4)
    assert 1.8 <= noisy.prompt_confidence(f"{Q} \\boxed{{7}}") <= 2.2
    assert len(hashed_prompt_logprobs(pieces, 3)[0]) == 3


def test_json_form(tmp_path: Path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"kind": "problems", "accuracy": 0.9, "problems": [{"question": Q, "answer": 7}],
                                "by_answer": {"7": 4}}))
    script = load_script(str(path))
    assert isinstance(script, ProblemScript) and script.problems == {Q: "7"} and script.by_answer == {"7": 4.0}
    assert problem_script({"problems": [], "accuracy": 0}).accuracy == 0.0


async def test_prompt_logprobs_over_generate_through_the_sglang_client():
    script = ProblemScript({Q: "7"}, accuracy=1.0, confidence_correct=2.5)
    async with sim_server(speed=100, script=script) as client:
        backend = SGLangBackend(str(client.base_url))
        try:
            prompt = f"<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\nIt is \\boxed{{7}}."
            gen = await backend.generate(GenerateRequest(prompt=prompt, max_tokens=1, prompt_logprobs=True,
                                                         prompt_top_logprobs=20))
            pieces = SimTokenizer().split(prompt)
            assert gen.prompt_logprobs is not None and len(gen.prompt_logprobs) == len(pieces) - 1
            assert "".join(e.token for e in gen.prompt_logprobs) == prompt[len(pieces[0]):]
            assert all(len(e.top) == 20 for e in gen.prompt_logprobs)
            assert -sum(v for _, v in gen.prompt_logprobs[-1].top) / 20 == pytest.approx(2.5)
            assert gen.usage.prompt_tokens == len(pieces) and gen.usage.completion_tokens == 1
            chat = await backend.generate(GenerateRequest(messages=[{"role": "user", "content": Q}], seed=1))
            assert chat.text.endswith("\\boxed{7}.")
            plain = await backend.generate(GenerateRequest(prompt="no logprobs asked", max_tokens=2))
            assert plain.prompt_logprobs is None
        finally:
            await backend.close()


@pytest.mark.slow
def test_server_flag_loads_a_problem_script(tmp_path: Path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"kind": "problems", "accuracy": 1.0, "problems": [{"question": Q, "answer": "7"}]}))
    sim = SimServerProcess("--speed", "100", "--script", str(path)).start()
    try:
        import httpx

        r = httpx.post(f"{sim.url}/generate", json={"text": Q, "sampling_params": {"max_new_tokens": 40}}).json()
        assert r["text"].endswith("\\boxed{7}.")
    finally:
        sim.kill()
