"""Multi-turn tool-calling rollouts through the real engine and the real tool service: token-exact trajectories,
the learner's logprobs aligned with the sampler's, deadlines, a failed conversation, and the leak audit."""

import datetime as dt
import time

import numpy as np
import pytest
from fastapi import FastAPI

from learner.learner import Learner
from rollout import prompts, tool_calls
from rollout.task import QuestionSampler
from rollout.worker import RolloutWorker
from tests.conftest import make_cfg
from tools.service import run_app_in_thread, serve_in_thread

pytestmark = pytest.mark.e2e


class Probe(RolloutWorker):
    """A rollout worker that also hands out its conversations whole, and can be told to fail one."""

    def conversations(self, instances, n):
        return [{"prompt": c.prompt, "ids": c.ids, "mask": c.mask, "logprobs": c.logprobs, "end": c.end,
                 "messages": c.messages, "question": c.instance.question} for c in self._converse(instances, n)]

    def set_rollout(self, **overrides):
        """The worker's rollout settings (its deadlines) and the conversation loop's, changed together."""
        self.cfg.rollout = self._rollout.cfg = self.cfg.rollout.model_copy(update=overrides)

    def fail_first_tool_turn(self):
        original = type(self._rollout)._tool_results
        state = {"failed": False}

        def failing(rollout, c):
            if not state["failed"]:
                state["failed"] = True
                raise RuntimeError("planted failure")
            return original(rollout, c)

        self._rollout._tool_results = failing.__get__(self._rollout)


@pytest.fixture(scope="module")
def cfg(tiny_model, tool_world_files):
    return make_cfg(tiny_model, "task.families=[tool_world]", "task.tools=[wiki]", "rollout.max_new_tokens=32",
                    "rollout.max_trajectory_tokens=192", "rollout.max_turns=3", "rollout.group_size=4",
                    f"tools.wiki.snapshot={tool_world_files / 'wiki.parquet'}", "tools.wiki.offline=true",
                    f"tools.wiki.tokenizer={tiny_model}")


@pytest.fixture(scope="module")
def service(cfg, tmp_path_factory):
    tools = cfg.tools.model_copy(deep=True)
    tools.wiki.cache = str(tmp_path_factory.mktemp("cache") / "wiki.sqlite")
    running = serve_in_thread(tools)
    yield running.url
    running.stop()


@pytest.fixture(scope="module")
def probe(ray_local, cfg, service):
    w = ray_local.remote(Probe).options(num_cpus=0.5).remote(cfg.rollout_job(), 0, "1", tool_url=service)
    ray_local.get(w.ready.remote(), timeout=300)
    yield w
    ray_local.kill(w)


def _instances(cfg, step, n):
    return QuestionSampler(cfg.task, seed=0).step(step, n)


def test_trajectories_are_token_exact_against_a_fresh_render(ray_local, probe, cfg):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    schemas = tool_calls.schemas(["wiki"])
    convs = ray_local.get(probe.conversations.remote(_instances(cfg, 0, 16), 2), timeout=600)
    newline = tok("\n", add_special_tokens=False).input_ids
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    compared = exact = 0
    for c in convs:
        assert len(c["ids"]) == len(c["mask"]) == len(c["logprobs"])
        lp, mask = np.array(c["logprobs"]), np.array(c["mask"])
        assert (lp[mask == 1] <= 0).all() and (lp[mask == 0] == 0).all()
        if c["end"] != "answer" or len(c["messages"]) < 3:
            continue
        # every assistant turn that a tool result follows ends in <|im_end|>, and the tool tokens start with the
        # template's "\n" after it (dropped at every such boundary in verl #6501)
        runs = np.flatnonzero(np.diff(mask) != 0) + 1
        for b in runs:
            if mask[b - 1] == 1 and mask[b] == 0:
                assert c["ids"][b - 1] == end_of_turn and c["ids"][b:b + len(newline)] == newline
        user = prompts.user_message(c["question"], False, True)
        fresh = tok.apply_chat_template([{"role": "user", "content": user}, *c["messages"]], tools=schemas,
                                        tokenize=False)
        # the model stops at its last <|im_end|>; the template adds a "\n" after it
        assert fresh.endswith("<|im_end|>\n")
        assert tok.decode(c["prompt"] + c["ids"]) == fresh[:-1]
        compared += 1
        # token for token wherever the model's own turns are the tokenizer's spelling of their text
        ids = tok(fresh, add_special_tokens=False).input_ids
        turns = [c["ids"][s:e] for s, e in zip([0, *runs], [*runs, len(mask)]) if mask[s] == 1]
        if all(tok(tok.decode(t), add_special_tokens=False).input_ids == t for t in turns):
            assert ids == c["prompt"] + c["ids"] + newline
            exact += 1
    assert compared >= 5 and exact >= compared // 2, (compared, exact)


def test_learner_logprobs_match_the_sampler_on_multi_turn_batches(ray_local, probe, cfg):
    """Masks and logprobs line up: the learner, on the same weights, recomputes the sampler's logprob of every
    model token (and the tool tokens, mask 0, are not trained on)."""
    batch = ray_local.get(probe.generate.remote(_instances(cfg, 1, 8)), timeout=600)
    assert batch.tool_calls.sum() > 0 and (batch.turns > 1).any()
    # a group's samples ask the same page: those answers are shared, asking the service nothing (no lookup of its)
    stats = batch.tool_stats
    assert 0 < stats["tool_shared_answers"] and stats["tool_shared_answers"] + stats.get("cache_lookups", 0) <= \
        batch.tool_calls.sum()
    learner = ray_local.remote(Learner).options(num_cpus=0.5).remote(cfg.learner_job(), 0, 1, "127.0.0.1", None,
                                                                      None)
    lp = ray_local.get(learner.sequence_logprobs.remote(batch), timeout=300)
    ray_local.kill(learner)
    m = batch.loss_mask.astype(bool)
    assert np.abs(lp[m] - batch.sampler_logprobs[m]).max() < 1e-4
    inside = np.zeros_like(m)  # tool tokens sit inside completions, after the prompt
    for i in range(batch.num_sequences):
        s = batch.sequence(i)
        inside[s.start + batch.prompt_lens[i]:s.stop] = True
    assert (inside & ~m).any() and (batch.sampler_logprobs[inside & ~m] == 0).all()


def test_a_straggler_ends_at_its_deadline_without_holding_the_batch(ray_local, probe, cfg, service):
    slow = FastAPI()

    @slow.get("/revision")
    def revision(title: str, as_of: str):
        time.sleep(4)
        return {"error": {"code": "missing", "message": "too late anyway"}}

    running = run_app_in_thread(slow)
    try:
        ray_local.get(probe.set_tool_url.remote(running.url), timeout=30)
        ray_local.get(probe.set_rollout.remote(trajectory_timeout_s=1.5), timeout=30)
        t0 = time.monotonic()
        convs = ray_local.get(probe.conversations.remote(_instances(cfg, 2, 8), 2), timeout=120)
        took = time.monotonic() - t0
    finally:
        ray_local.get([probe.set_tool_url.remote(service),
                       probe.set_rollout.remote(trajectory_timeout_s=cfg.rollout.trajectory_timeout_s)], timeout=30)
        running.stop()
    ends = [c["end"] for c in convs]
    assert "deadline" in ends and took < 1.5 + 10, (ends, took)
    # whoever did not call answered or ran out of tokens; nobody who called got past the deadline
    assert all(e == "deadline" for c, e in zip(convs, ends) if any(m["role"] == "tool" for m in c["messages"]))


def test_one_failed_conversation_never_fails_the_step(ray_local, cfg, service, tiny_model):
    w = ray_local.remote(Probe).options(num_cpus=0.5).remote(cfg.rollout_job(), 1, "0", tool_url=service)
    try:
        ray_local.get(w.fail_first_tool_turn.remote(), timeout=300)
        batch = ray_local.get(w.generate.remote(_instances(cfg, 3, 8)), timeout=600)
    finally:
        ray_local.kill(w)
    assert batch.tool_stats["dropped_failed"] == 1
    assert batch.num_sequences == 8 * cfg.rollout.group_size - 1


def test_the_audit_counts_a_planted_leak_and_nothing_of_it_reaches_a_trajectory(ray_local, probe, cfg, service):
    from transformers import AutoTokenizer

    liar = FastAPI()

    @liar.get("/revision")
    def revision(title: str, as_of: str):
        later = dt.date.fromisoformat(as_of) + dt.timedelta(days=30)
        return {"title": title, "revid": 1, "timestamp": f"{later.isoformat()}T00:00:00Z",
                "text": "LEAKED FROM THE FUTURE", "cache": "hit"}

    running = run_app_in_thread(liar)
    try:
        ray_local.get(probe.set_tool_url.remote(running.url), timeout=30)
        lied = ray_local.get(probe.generate.remote(_instances(cfg, 4, 8)), timeout=600)
    finally:
        running.stop()
    ray_local.get(probe.set_tool_url.remote(service), timeout=30)
    honest = ray_local.get(probe.generate.remote(_instances(cfg, 5, 8)), timeout=600)
    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    assert lied.leak_violations.sum() > 0 and lied.tool_stats["tool_errors_leak"] == lied.leak_violations.sum()
    assert "FUTURE" not in tok.decode(lied.tokens)
    assert honest.tool_calls.sum() > 0 and honest.leak_violations.sum() == 0
