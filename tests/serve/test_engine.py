"""The scheduler: rows that join at different steps with different adapters (and the base)
produce, token for token, what each request produces decoded alone; limits, cancel, timeout."""
from __future__ import annotations

import pytest

from deltakit.serve.engine import Engine, Event, Limits, QueueFull, Request
from deltakit.train.generate import generate_ids
from tests.serve.helpers import attach_adapters, tiny_lm

PAD, EOS = 0, 4
# (prompt, adapter, max_tokens, step at which it is submitted)
PLAN = [([5, 9, 13, 40], "a", 12, 0), ([7, 8], "b", 9, 0), ([30, 31, 32, 33, 34, 35], None, 7, 2),
        ([11], "c", 10, 3), ([50, 51, 52], "a", 5, 3), ([20, 21, 22, 23, 24, 25, 26, 27], "b", 8, 6),
        ([41, 42], "c", 6, 11)]


@pytest.fixture(scope="module")
def model():
    m, _ = tiny_lm()
    attach_adapters(m)
    return m


def _alone(model, prompt, adapter, n, **kw):
    return generate_ids(model, [prompt], adapters=[adapter], max_new_tokens=n, pad_token_id=PAD,
                        eos_token_id=[EOS], **kw)[0]


def _run(engine: Engine, plan, **kw) -> list[list[Event]]:
    """Submit each request at its step, stepping the engine by hand until all are done."""
    events: list[list[Event]] = [[] for _ in plan]
    reqs = [Request(prompt=p, adapter=a, max_tokens=n, sink=events[i].append, **kw)
            for i, (p, a, n, _) in enumerate(plan)]
    step = 0
    while step < 200 and not all(r.finished for r in reqs):
        for r, (*_, at) in zip(reqs, plan):
            if at == step:
                engine.submit(r)
        engine.step()
        step += 1
    assert all(r.finished for r in reqs)
    return events


def test_rows_joining_at_different_steps_equal_each_request_alone_greedy(model):
    engine = Engine(model, eos_token_ids=[EOS], pad_token_id=PAD, limits=Limits(max_batch=4))
    events = _run(engine, PLAN)
    for (p, a, n, _), evs in zip(PLAN, events):
        toks = [e.token for e in evs if e.kind == "token"]
        assert toks == _alone(model, p, a, n), (p, a)
        assert evs[-1].kind == "done" and evs[-1].reason in ("stop", "length")
    alone = {a: _alone(model, PLAN[0][0], a, 12) for a in ("a", "b", "c", None)}
    assert len({tuple(v) for v in alone.values()}) == 4      # the adapters really differ


def test_seeded_sampling_equals_the_request_alone(model):
    engine = Engine(model, eos_token_ids=[EOS], pad_token_id=PAD, limits=Limits(max_batch=3))
    events = _run(engine, PLAN, temperature=1.3, top_p=0.9, seed=7)
    for (p, a, n, _), evs in zip(PLAN, events):
        want = _alone(model, p, a, n, do_sample=True, seed=7, temperature=1.3, top_p=0.9)
        assert [e.token for e in evs if e.kind == "token"] == want, (p, a)


def test_limits_queue_cancel_and_timeout(model):
    engine = Engine(model, eos_token_ids=[EOS], pad_token_id=PAD, context_length=128,
                    limits=Limits(max_batch=2, max_queue=2, max_tokens=20, max_prompt=8, timeout=30))
    sink = [].append
    with pytest.raises(ValueError, match="prompt of 1 to 8 tokens, found 9"):
        engine.submit(Request(prompt=[5] * 9, max_tokens=4, sink=sink))
    with pytest.raises(ValueError, match="max_tokens between 1 and 20, found 21"):
        engine.submit(Request(prompt=[5], max_tokens=21, sink=sink))
    got: list[list[Event]] = [[], [], []]
    reqs = [Request(prompt=[5, 6], max_tokens=20, sink=got[i].append) for i in range(2)]
    for r in reqs:
        engine.submit(r)
    with pytest.raises(QueueFull):
        engine.submit(Request(prompt=[5], max_tokens=2, sink=sink))
    engine.step()
    engine.cancel(reqs[0])
    reqs[1].deadline = 0.0                                        # as if its time ran out
    engine.step()
    assert [reqs[0].finished, reqs[1].finished] == ["cancelled", "timeout"]
    assert engine.running == 0 and got[0][-1] == Event("done", reason="cancelled")
    assert 1 <= sum(e.kind == "token" for e in got[0]) <= 2     # stopped at the step boundary


def test_close_drains_running_and_queued_requests_then_refuses(model):
    from deltakit.serve.engine import EngineClosed
    engine = Engine(model, eos_token_ids=[], pad_token_id=PAD, limits=Limits(max_batch=1)).start()
    got: list[list[Event]] = [[], []]
    reqs = [Request(prompt=[5, 6], adapter=a, max_tokens=6, sink=got[i].append) for i, a in enumerate("ab")]
    for r in reqs:
        engine.submit(r)
    engine.close(drain=True, timeout=30)                        # one runs, one still waits: both finish
    assert not engine.alive and [r.finished for r in reqs] == ["length", "length"]
    assert [[e.token for e in g if e.kind == "token"] for g in got] == [
        _alone(model, [5, 6], a, 6) for a in "ab"]
    with pytest.raises(EngineClosed):
        engine.submit(Request(prompt=[5], max_tokens=1, sink=print))


def test_a_failing_forward_answers_every_held_request_with_the_error_and_serving_goes_on(model):
    engine = Engine(model, eos_token_ids=[EOS], pad_token_id=PAD, limits=Limits(max_batch=2))
    got: list[list[Event]] = [[], [], []]
    reqs = [Request(prompt=[5, 6 + i], adapter="a", max_tokens=6, sink=got[i].append) for i in range(3)]
    engine.submit(reqs[0])
    engine.step()                                                # reqs[0] runs
    engine.submit(reqs[1]); engine.submit(reqs[2])               # reqs[1] is admitted, reqs[2] waits

    def broken(*_):
        raise RuntimeError("device lost")
    hook = model.register_forward_pre_hook(broken)
    try:
        with pytest.raises(RuntimeError):
            engine.step()
        engine._fail_all(RuntimeError("device lost"))            # what the scheduler loop does
    finally:
        hook.remove()
    assert [g[-1].kind for g in got] == ["error"] * 3 and all(r.finished == "error" for r in reqs)
    assert engine.running == 0 and engine.queue_depth == 0
    again: list[Event] = []
    engine.submit(Request(prompt=[5, 9, 13, 40], adapter="b", max_tokens=5, sink=again.append))
    while engine.step():
        pass
    assert [e.token for e in again if e.kind == "token"] == _alone(model, [5, 9, 13, 40], "b", 5)
