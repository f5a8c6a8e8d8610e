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


# --- the harder model: per-problem difficulty, shared distractors, a belief-based confidence ---

QUESTIONS = {f"Problem {i}: how many marbles are left in bag {i}?": str(10 + 3 * i) for i in range(40)}
HARD = {"difficulty_sd": 1.5, "distractor": 0.5, "copy": 0.5}


def _bare(question: str) -> str:
    return f"{question}\n\nPut the final answer in \\boxed{{}}."


def _share_right(script: ProblemScript, question: str, calls: int = 300) -> float:
    truth = script.problems[question]
    return sum(script.answer(_bare(question), s) == truth for s in range(calls)) / calls


def test_defaults_keep_the_original_behaviour():
    """Without the new parameters a reply is the original formula's, call for call."""
    from scheduler.sim.script import _hash

    def original(seed: int, accuracy: float, text: str, rseed: int) -> str:
        if _hash(seed, text, rseed) / 2**64 < accuracy:
            return "7"
        group = [a.strip() for a in __import__("re").findall(r"\\boxed\{([^{}]*)\}", text[text.find(Q) + len(Q):])
                 if a.strip()]
        if group:
            return group[_hash(seed, text, rseed, "copy") % len(group)]
        return str(7 + (-3, -2, -1, 1, 2, 3, 10)[_hash(seed, text, rseed, "wrong") % 7])

    script = ProblemScript({Q: "7"}, accuracy=0.4, seed=5)
    for text in (_bare(Q), f"{Q}\nCandidate 1: \\boxed{{9}}\nCandidate 2: \\boxed{{7}}"):
        assert [script.answer(text, s) for s in range(200)] == [original(5, 0.4, text, s) for s in range(200)]
    assert script.prompt_confidence(f"{Q} \\boxed{{7}}") == 2.0 and script.prompt_confidence(f"{Q} \\boxed{{8}}") == 1.0


def test_same_seed_same_answers_and_the_seed_matters():
    a, b = (ProblemScript(QUESTIONS, 0.6, seed=3, **HARD) for _ in range(2))
    other = ProblemScript(QUESTIONS, 0.6, seed=4, **HARD)
    texts = [_bare(q) for q in QUESTIONS]
    answers = [[a.answer(t, s) for s in range(20)] for t in texts]
    assert answers == [[b.answer(t, s) for s in range(20)] for t in texts]
    assert answers != [[other.answer(t, s) for s in range(20)] for t in texts]
    assert a.difficulties == other.difficulties and a.distractors == other.distractors  # the problems' own


def test_harder_problems_are_wrong_more_often_for_both_models():
    strong = ProblemScript(QUESTIONS, 0.8, seed=1, **HARD)
    weak = ProblemScript(QUESTIONS, 0.45, seed=2, **HARD)
    by_difficulty = sorted(QUESTIONS, key=strong.difficulties.__getitem__)
    easy, hard = by_difficulty[:10], by_difficulty[-10:]
    for model in (strong, weak):
        shares = {q: _share_right(model, q) for q in QUESTIONS}
        assert sum(shares[q] for q in easy) / 10 > sum(shares[q] for q in hard) / 10 + 0.3
        # ``accuracy`` is still the share of right answers, over problems
        assert abs(sum(shares.values()) / len(shares) - model.accuracy) < 0.1
    # the same problems are hard for both: per problem, the weak model is right less often, in the same order
    assert all(strong.p_right(q) > weak.p_right(q) for q in QUESTIONS)
    ranks = [weak.p_right(q) for q in by_difficulty]
    assert ranks == sorted(ranks, reverse=True)
    # an explicit difficulty overrides the latent
    fixed = ProblemScript({Q: "7"}, 0.5, difficulties={Q: 3.0}, seed=1)
    assert fixed.skill == pytest.approx(0.0) and _share_right(fixed, Q, 1000) < 0.1


def test_wrong_answers_concentrate_on_the_shared_distractor():
    strong = ProblemScript(QUESTIONS, 0.8, seed=1, **HARD)
    weak = ProblemScript(QUESTIONS, 0.45, seed=2, **HARD)
    for model in (strong, weak):
        wrong = [(q, a) for q in QUESTIONS for s in range(50)
                 if (a := model.answer(_bare(q), s)) != QUESTIONS[q]]
        on_distractor = sum(a == model.distractors[q] for q, a in wrong) / len(wrong)
        assert 0.4 < on_distractor < 0.6  # ``distractor`` = 0.5; the rest spread over 7 slips
        assert all(model.distractors[q] != QUESTIONS[q] for q in QUESTIONS)
    # so a majority vote on a hard problem converges on the distractor, for both models
    hardest = max(QUESTIONS, key=strong.difficulties.__getitem__)
    assert strong.p_right(hardest) < 0.3
    for model in (strong, weak):
        votes = [model.answer(_bare(hardest), s) for s in range(64)]
        assert max(set(votes), key=votes.count) == model.distractors[hardest]
    # with ``copy`` < 1, a wrong model shown a group sometimes makes its own mistake instead
    shown = f"{_bare(Q)}\nCandidate 1: \\boxed{{9}}\nCandidate 2: \\boxed{{9}}"
    half = ProblemScript({Q: "7"}, 0.0, copy=0.5, distractor=1.0, distractors={Q: "14"})
    answers = [half.answer(shown, s) for s in range(400)]
    assert set(answers) == {"9", "14"} and 0.4 < answers.count("9") / 400 < 0.6


def test_belief_confidence_is_informative_but_not_an_oracle():
    strong = ProblemScript(QUESTIONS, 0.8, seed=1, **HARD)
    weak = ProblemScript(QUESTIONS, 0.45, seed=2, **HARD, confidence_from="belief", confidence_correct=2.2,
                         confidence_wrong=1.4, confidence_noise=1.2)
    scored = []  # the weak scorer on the strong model's candidates, as routing uses it
    for q in QUESTIONS:
        for s in range(30):
            answer = strong.answer(_bare(q), s)
            text = f"{_bare(q)}<|im_start|>assistant\nreasoning {s} so the answer is \\boxed{{{answer}}}."
            scored.append((weak.prompt_confidence(text), answer == QUESTIONS[q]))
    right = [c for c, ok in scored if ok]
    wrong = [c for c, ok in scored if not ok]
    assert sum(right) / len(right) > sum(wrong) / len(wrong) + 0.1
    pairs = sum((r > w) + 0.5 * (r == w) for r in right for w in wrong) / (len(right) * len(wrong))
    assert 0.6 < pairs < 0.95  # AUROC: better than chance, far from separating
    assert min(right) < max(wrong)
    # not an oracle: on the hardest problem the model believes the distractor more than the truth
    quiet = ProblemScript(QUESTIONS, 0.45, **HARD, confidence_from="belief")
    hardest = max(QUESTIONS, key=quiet.difficulties.__getitem__)
    truth, lure = QUESTIONS[hardest], quiet.distractors[hardest]
    assert quiet.prompt_confidence(f"{hardest} \\boxed{{{lure}}}") > quiet.prompt_confidence(
        f"{hardest} \\boxed{{{truth}}}")
    # on an easy one the truth scores highest
    easiest = min(QUESTIONS, key=quiet.difficulties.__getitem__)
    assert quiet.prompt_confidence(f"{easiest} \\boxed{{{QUESTIONS[easiest]}}}") > quiet.prompt_confidence(
        f"{easiest} \\boxed{{{quiet.distractors[easiest]}}}")


def test_json_form_of_the_harder_model(tmp_path: Path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({
        "kind": "problems", "accuracy": 0.45, "difficulty_sd": 1.5, "difficulty_seed": 9, "distractor": 0.5,
        "copy": 0.25, "confidence_from": "belief",
        "problems": [{"question": Q, "answer": 7, "difficulty": 0.5, "distractor": 12},
                     {"question": "Q2?", "answer": 3}]}))
    script = load_script(str(path))
    assert isinstance(script, ProblemScript)
    assert script.difficulties[Q] == 0.5 and script.distractors[Q] == "12" and script.distractors["Q2?"] != "3"
    assert (script.difficulty_sd, script.difficulty_seed, script.distractor, script.copy) == (1.5, 9, 0.5, 0.25)
    assert script.confidence_from == "belief" and script.skill is not None
    with pytest.raises(ValueError):
        problem_script({"problems": [], "accuracy": 0.5, "copy": 2})
