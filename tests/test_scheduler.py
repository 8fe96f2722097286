"""The generation scheduler (iteration-level batching) driven step by step in-process, on
a tiny randomly initialised model of the recipe (``test_engine``'s): requests join and
leave the running batch at token boundaries; every row gets its own settings; a seeded
request gives the same text alone and inside a busy mixed batch; a stop string takes its
row out at the stop while the others go on; greedy completions and the penalties equal
transformers' ``generate`` (``generation.generate``) on the same prompt alone."""

from __future__ import annotations

import dataclasses
import math
import threading
import time

import pytest
import torch

from slmfactory.serving.engine import Deadline, load
from slmfactory.serving.generation import Sampling, generate
from slmfactory.serving.scheduler import Cancelled, Scheduler
from tests.test_engine import TEXT, folder, ids_of, loaded, token_stop  # noqa: F401  (fixtures)

GREEDY = Sampling(max_tokens=12, temperature=0.0)
SEEDED = Sampling(max_tokens=16, temperature=1.0, top_p=0.9, seed=1)


def drive(sched: Scheduler, jobs, limit: int = 500) -> int:
    """Steps until every job is answered; how many steps it took."""
    steps = 0
    while not all(j.future.done() for j in jobs):
        assert sched.step() is not None
        steps += 1
        assert steps < limit
    return steps


def alone(loaded, prompt, s):
    sched = Scheduler(start=False, seed=0)
    job = sched.submit(loaded, prompt, s)
    drive(sched, [job])
    return job.future.result()


def prompts_of(loaded):
    ids = ids_of(loaded, TEXT)
    return [ids_of(loaded, "The licensee shall"), ids[:25], ids[:3], ids[5:14]]


def test_greedy_rows_joining_at_different_steps_equal_generate_alone(loaded):
    """Prompts of 3 to 25 tokens with different max_tokens join a running batch at
    different steps (left padding, their own positions and KV cache): each completion is
    ``generate``'s for that prompt alone, and each leaves after its own last token."""
    p = prompts_of(loaded)
    settings = [GREEDY, dataclasses.replace(GREEDY, max_tokens=5), dataclasses.replace(GREEDY, max_tokens=9),
                dataclasses.replace(GREEDY, max_tokens=1)]
    sched = Scheduler(start=False)
    jobs = [sched.submit(loaded, p[0], settings[0])]
    sched.step()
    sched.step()
    jobs.append(sched.submit(loaded, p[1], settings[1]))
    jobs.append(sched.submit(loaded, p[2], settings[2]))
    sched.step()
    assert len(sched.batches[id(loaded)]) == 3  # both joined at this step
    jobs.append(sched.submit(loaded, p[3], settings[3]))
    sched.step()
    assert jobs[3].future.done() and len(sched.batches[id(loaded)]) == 3  # max_tokens 1: in and out in one step
    drive(sched, jobs)
    for job, prompt, s in zip(jobs, p, settings):
        assert job.future.result() == generate(loaded, [prompt], s)[0]
    assert max(j.most for j in jobs) == 4


def test_each_row_keeps_its_own_penalties_and_bias_as_generate_does(loaded):
    """Four rows in one batch, each with one setting of its own: each equals ``generate``
    with that setting alone (transformers' processors, and ours for presence/frequency)."""
    prompt = ids_of(loaded, "The licensee shall")
    greedy = generate(loaded, [prompt], GREEDY)[0][0]["ids"]
    settings = [dataclasses.replace(GREEDY, repetition_penalty=3.0),
                dataclasses.replace(GREEDY, presence_penalty=2.0),
                dataclasses.replace(GREEDY, frequency_penalty=1.5),
                dataclasses.replace(GREEDY, logit_bias=((greedy[2], -50.0), (7, 4.0)))]
    sched = Scheduler(start=False)
    jobs = [sched.submit(loaded, prompt, s) for s in settings]
    plain = sched.submit(loaded, prompt, GREEDY)
    drive(sched, jobs + [plain])
    assert plain.future.result()[0]["ids"] == greedy
    for job, s in zip(jobs, settings):
        assert job.future.result() == generate(loaded, [prompt], s)[0], s
    assert jobs[3].future.result()[0]["ids"] != greedy  # the bias changed the completion


def test_a_seeded_request_gives_the_same_text_alone_and_in_a_busy_mixed_batch(loaded):
    p = prompts_of(loaded)
    want = alone(loaded, p[0], SEEDED)
    assert alone(loaded, p[0], SEEDED) == want  # reproducible alone
    assert alone(loaded, p[0], dataclasses.replace(SEEDED, seed=2)) != want  # the seed decides it
    sched = Scheduler(start=False)
    others = [sched.submit(loaded, p[1], Sampling(max_tokens=20, temperature=0.8)),
              sched.submit(loaded, p[2], Sampling(max_tokens=6, temperature=1.2, top_k=5, seed=9)),
              sched.submit(loaded, p[3], dataclasses.replace(GREEDY, frequency_penalty=0.5)),
              sched.submit(loaded, p[0], Sampling(max_tokens=18, temperature=1.0, top_p=0.5, n=2))]
    sched.step()
    sched.step()
    seeded = sched.submit(loaded, p[0], SEEDED)  # joins mid-run, beside five rows
    late = sched.submit(loaded, p[1], dataclasses.replace(SEEDED, n=2, seed=4))
    drive(sched, others + [seeded, late])
    assert seeded.future.result() == want
    assert seeded.most >= 4  # it shared steps with the others
    assert late.future.result() == alone(loaded, p[1], dataclasses.replace(SEEDED, n=2, seed=4))


def test_a_stop_string_takes_its_row_out_at_the_stop_while_the_others_go_on(loaded):
    p = prompts_of(loaded)
    (full,) = alone(loaded, p[0], SEEDED)  # seeded sampling: varied text, the same every time
    stop = token_stop(loaded.tokenizer, full["ids"])
    assert stop, full
    # The stop string first appears with token i: the row leaves at step i + 1.
    i = next(k for k in range(len(full["ids"])) if stop in loaded.tokenizer.decode(full["ids"][:k + 1]))
    sched = Scheduler(start=False)
    stopped = sched.submit(loaded, p[0], dataclasses.replace(SEEDED, stop=(stop, "never-seen")))
    going = sched.submit(loaded, p[1], dataclasses.replace(SEEDED, seed=5))
    steps = drive(sched, [stopped])
    assert steps == i + 1 and not going.future.done()
    assert len(sched.batches[id(loaded)]) == 1
    (out,) = stopped.future.result()
    assert out["finish"] == "stop" and out["text"] == loaded.tokenizer.decode(full["ids"][:i])
    assert stop not in out["text"] and out["ids"] == full["ids"][:i + 1]
    drive(sched, [going])
    assert going.future.result() == alone(loaded, p[1], dataclasses.replace(SEEDED, seed=5))
    assert len(going.future.result()[0]["ids"]) == SEEDED.max_tokens


def test_streamed_tokens_logprobs_cancel_and_deadline(loaded):
    p = prompts_of(loaded)
    s = dataclasses.replace(GREEDY, logprobs=2)
    got: list = []
    sched = Scheduler(start=False)
    streamed = sched.submit(loaded, p[0], s, on_tokens=lambda ids, lps: got.append((ids, lps)))
    cancel = threading.Event()
    gone = sched.submit(loaded, p[1], GREEDY, cancel=cancel)
    late = sched.submit(loaded, p[2], GREEDY, deadline=time.monotonic() - 1)
    sched.step()
    with pytest.raises(Deadline):
        late.future.result()
    sched.step()
    cancel.set()
    sched.step()
    with pytest.raises(Cancelled):
        gone.future.result()
    assert len(sched.batches[id(loaded)]) == 1
    drive(sched, [streamed])
    (out,) = streamed.future.result()
    assert [t for ids, _ in got for t in ids] == out["ids"]
    assert [e for _, lps in got for e in lps] == out["logprobs"]
    (ref,) = generate(loaded, [p[0]], s)[0]
    assert out["ids"] == ref["ids"]
    for (lp, top), (rlp, rtop) in zip(out["logprobs"], ref["logprobs"]):
        assert lp == pytest.approx(rlp, abs=1e-4) and [t for t, _ in top] == [t for t, _ in rtop]


def test_domains_take_turns_and_a_broken_model_fails_only_its_requests(folder, loaded):
    other = load(str(folder))  # a second model: its own batch
    broken = load(str(folder))
    with torch.no_grad():
        broken.model.model.norm.weight.fill_(math.nan)
    sched = Scheduler(start=False)
    prompt = ids_of(loaded, "The licensee shall")
    a = sched.submit(loaded, prompt, GREEDY)
    b = sched.submit(other, prompt, GREEDY)
    c = sched.submit(broken, prompt, Sampling(max_tokens=4, temperature=1.0))
    order = [sched.step() for _ in range(6)]
    # The broken model's request fails at its first step; then the two others alternate.
    assert order == [id(loaded), id(other), id(broken), id(loaded), id(other), id(loaded)]
    assert id(broken) not in sched.batches
    with pytest.raises(ValueError, match="not finite"):
        c.future.result()
    drive(sched, [a, b])
    assert a.future.result() == b.future.result() == generate(loaded, [prompt], GREEDY)[0]


def test_the_scheduler_thread_answers_requests_submitted_from_other_threads(loaded):
    sched = Scheduler()
    p = prompts_of(loaded)
    jobs = [sched.submit(loaded, x, GREEDY) for x in p]
    for job, x in zip(jobs, p):
        assert job.future.result(timeout=120) == generate(loaded, [x], GREEDY)[0]
    with pytest.raises(ValueError, match="empty prompt"):
        sched.submit(loaded, [], GREEDY)
