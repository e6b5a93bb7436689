"""The memory-mode policy against a small simulated pool, driven by hypothesis (issue 20).

A pure simulator (below) holds a pool's models and what each really holds on each GPU.
Every step: the clock moves (a second, or now and then an idle jump of minutes);
transitions under way progress (starting, waking, draining, falling asleep, stopping
each take a few steps); ready models serve what they hold; random requests arrive, a
starting engine fails now and then (its held requests are answered with an error), and
a stopped model's footprint changes (a reload). Then `decide` runs on the views and its
decision is applied: starts take their memory at once on the placement decided; stops
and sleeps go through their transit states and give memory back steps later.

After every step:
- no GPU holds more than its memory, and host memory holds no more than its bound;
- no request waits more than BOUND_STEPS steps past its model's max_wait (then every
  ready model may be evicted, and every footprint fits an empty GPU).
Once arrivals stop, every request is answered (served or failed) within DRAIN_STEPS.

Reproducible: derandomized (the same examples every run); a failure prints its example.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from activator.placement.policy import ModelView, decide

CAP = 100  # units per GPU
MAX_WAIT = 120.0
STEPS = 300
DRAIN_STEPS = 400
# Past max_wait a request's model is served within: one swap for each model ahead of it
# (drain, stop or sleep, start: at most 3 + 3 + 4 steps) and its own.
BOUND_STEPS = 6 * 12


@dataclass(frozen=True)
class Spec:
    gpus: int
    memory: int | None
    residue: int
    sleep_level: int | None
    sleep_host: int
    bring_back: float


@dataclass
class Sim:
    name: str
    spec: Spec
    state: str = "stopped"
    placement: tuple[int, ...] = ()
    queue: list[tuple[int, float]] = field(default_factory=list)  # (request id, arrival)
    in_flight: int = 0
    ready_since: float | None = None
    last_activity: float = 0.0
    host_held: int = 0
    left: int = 0  # steps until the transition under way ends
    then: str = ""  # where draining leads: "stop" or "sleep"
    from_sleep: bool = False  # stopping from sleep holds only the residue
    fails: bool = False  # the start under way will fail

    def awake(self) -> int:
        return CAP if self.spec.memory is None else self.spec.memory

    def asleep(self) -> int:
        return 0 if self.spec.memory is None else self.spec.residue

    def holds(self) -> int:
        """What the engine really holds on each GPU of its placement now."""
        if self.state in ("starting", "waking", "ready", "draining", "falling_asleep"):
            return self.awake()
        if self.state == "stopping":
            return self.asleep() if self.from_sleep else self.awake()
        return self.asleep() if self.state == "sleeping" else 0

    def view(self, now: float) -> ModelView:
        return ModelView(
            name=self.name,
            state=self.state,
            gpus=self.spec.gpus,
            in_flight=self.in_flight,
            queued=len(self.queue),
            oldest_wait=min((t for _, t in self.queue), default=None),
            last_activity=self.last_activity,
            ready_since=self.ready_since,
            idle_timeout=300.0,
            min_residency=30.0,
            max_wait=MAX_WAIT,
            sleep_level=self.spec.sleep_level,
            sleep_host=self.spec.sleep_host,
            host_held=self.host_held,
            memory=self.spec.memory,
            residue=self.spec.residue,
            placement=self.placement if self.holds() > 0 or self.state == "sleeping" else (),
            bring_back=self.spec.bring_back,
        )


@dataclass
class Pool:
    gpu_count: int
    host_memory: int | None
    models: list[Sim]
    rng: random.Random
    now: float = 1000.0
    step_no: int = 0
    next_id: int = 0
    pending: dict[int, str] = field(default_factory=dict)  # request id -> model
    overdue: dict[int, int] = field(default_factory=dict)  # request id -> step it passed max_wait
    answered: int = 0

    def step(self, *, arrivals: bool) -> None:
        rng = self.rng
        self.step_no += 1
        self.now += rng.uniform(60, 700) if rng.random() < 0.04 else 1.0
        for m in self.models:
            self._progress(m)
        if arrivals:
            for _ in range(rng.choice([0, 0, 1, 2])):
                m = rng.choice(self.models)
                m.queue.append((self.next_id, self.now))
                self.pending[self.next_id] = m.name
                self.next_id += 1
            starting = [m for m in self.models if m.state == "starting" and not m.fails]
            if starting and rng.random() < 0.05:
                rng.choice(starting).fails = True
            stopped = [m for m in self.models if m.state in ("stopped", "failed")]
            if stopped and rng.random() < 0.05:
                m = rng.choice(stopped)
                m.spec = reload(m.spec, rng)
        for m in self.models:
            if m.state == "ready":
                if m.queue:
                    m.in_flight += len(m.queue)
                    self._answer(m)
                if m.in_flight:
                    m.last_activity = self.now
                    m.in_flight = max(0, m.in_flight - rng.randint(0, 2))
        self._apply(rng)
        self._check()

    def _answer(self, m: Sim) -> None:
        for rid, _ in m.queue:
            del self.pending[rid]
            self.overdue.pop(rid, None)
            self.answered += 1
        m.queue.clear()

    def _progress(self, m: Sim) -> None:
        if m.left <= 0:
            return
        m.left -= 1
        if m.left:
            return
        rng = self.rng
        if m.state == "starting" and m.fails:
            m.state, m.left, m.fails, m.from_sleep = "stopping", 1, False, False
            self._answer(m)  # the held requests get an error
            m.then = "failed"
        elif m.state in ("starting", "waking"):
            m.state, m.ready_since, m.last_activity = "ready", self.now, self.now
        elif m.state == "draining":
            if m.then == "sleep":
                m.state, m.left = "falling_asleep", rng.randint(1, 3)
            else:
                m.state, m.left, m.from_sleep = "stopping", rng.randint(1, 3), False
        elif m.state == "falling_asleep":
            m.state, m.ready_since = "sleeping", None
        elif m.state == "stopping":
            m.state = "failed" if m.then == "failed" else "stopped"
            m.placement, m.host_held, m.ready_since, m.then = (), 0, None, ""

    def _apply(self, rng: random.Random) -> None:
        views = [m.view(self.now) for m in self.models]
        d = decide(
            self.gpu_count,
            views,
            now=self.now,
            host_memory=self.host_memory,
            gpu_memory=CAP,
        )
        by_name = {m.name: m for m in self.models}
        for s in d.stop:
            m = by_name[s.model]
            if m.state == "ready":
                m.state, m.left, m.then = (
                    "draining",
                    rng.randint(1, 3),
                    "sleep" if s.sleep else "stop",
                )
                if s.sleep:
                    m.host_held = m.spec.sleep_host
            else:
                assert m.state == "sleeping", (s, m)
                m.state, m.left, m.from_sleep, m.then = "stopping", rng.randint(1, 3), True, ""
        for name in d.start:
            m = by_name[name]
            spot = d.placements[name]
            if m.state == "sleeping":
                assert not m.placement or spot == m.placement, (name, spot, m.placement)
                m.state, m.left = "waking", rng.randint(1, 2)
            else:
                assert m.state in ("stopped", "failed"), (name, m.state)
                assert len(spot) == m.spec.gpus and len(set(spot)) == len(spot), (name, spot)
                m.state, m.left, m.placement = "starting", rng.randint(1, 4), spot
            m.from_sleep = False

    def _check(self) -> None:
        used = [0] * self.gpu_count
        for m in self.models:
            for i in m.placement:
                used[i] += m.holds()
        assert all(u <= CAP for u in used), (self.step_no, used, self.models)
        if self.host_memory is not None:
            assert sum(m.host_held for m in self.models) <= self.host_memory
        for m in self.models:
            for rid, arrived in m.queue:
                if self.now - arrived >= MAX_WAIT:
                    since = self.overdue.setdefault(rid, self.step_no)
                    assert self.step_no - since <= BOUND_STEPS, (m.name, rid, self.models)


def reload(spec: Spec, rng: random.Random) -> Spec:
    memory = rng.choice([None, rng.randint(10, CAP)])
    residue = min(rng.randint(0, 15), memory or 0)
    return Spec(spec.gpus, memory, residue, spec.sleep_level, spec.sleep_host, spec.bring_back)


def specs(gpu_count: int) -> st.SearchStrategy[Spec]:
    return st.builds(
        lambda gpus, memory, residue, level, host, back: Spec(
            gpus, memory, min(residue, memory or 0), level, host if level == 1 else 0, back
        ),
        st.integers(1, gpu_count),
        st.one_of(st.integers(10, CAP), st.integers(10, 60), st.none()),
        st.integers(0, 15),
        st.sampled_from([None, 1, 2]),
        st.sampled_from([4, 8]),
        st.floats(0.1, 40.0),
    )


@st.composite
def pools(draw: st.DrawFn) -> Pool:
    gpu_count = draw(st.sampled_from([1, 2]))
    models = draw(st.lists(specs(gpu_count), min_size=2, max_size=5))
    return Pool(
        gpu_count=gpu_count,
        host_memory=draw(st.sampled_from([None, 8, 16])),
        models=[Sim(name=f"m{i}", spec=s) for i, s in enumerate(models)],
        rng=random.Random(draw(st.integers(0, 2**32 - 1))),
    )


@settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(pool=pools())
def test_random_interleavings_never_over_commit_a_gpu_and_answer_every_request(
    pool: Pool,
) -> None:
    for _ in range(STEPS):
        pool.step(arrivals=True)
    for _ in range(DRAIN_STEPS):
        if not pool.pending:
            break
        pool.step(arrivals=False)
    assert not pool.pending, (pool.pending, pool.models)
    assert pool.answered == pool.next_id
