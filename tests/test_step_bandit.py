"""auto's controller on simulated drafters of known acceptance and cost: it settles on
the best one, switches when the best one changes mid-request, and keeps exploration
small; and `AutoDrafter` on a scripted clock charges each step to the drafter that ran."""

from __future__ import annotations

import random

import pytest

from specdec.speculation.step_bandit import ALL, StepBandit


class SimulatedArm:
    """Commits 1 + Binomial-like accepted tokens per step, at a fixed cost per step."""

    def __init__(self, tau: float, ms: float, rng: random.Random) -> None:
        self.tau, self.ms, self.rng = tau, ms, rng

    def step(self) -> tuple[int, float]:
        # tokens: 1 + a geometric-ish count with mean tau - 1, capped at 8
        extra, p = 0, (self.tau - 1) / self.tau
        while extra < 8 and self.rng.random() < p:
            extra += 1
        noise = self.rng.uniform(0.95, 1.05)
        return 1 + extra, self.ms * noise / 1e3

    @property
    def rate(self) -> float:
        return self.tau / self.ms


def play(bandit: StepBandit, arms: dict[str, SimulatedArm], steps: int) -> list[str]:
    chosen = []
    for _ in range(steps):
        arm = bandit.choose({a: ALL for a in arms})
        tokens, seconds = arms[arm].step()
        bandit.update(arm, ALL, tokens, seconds)
        chosen.append(arm)
    return chosen


def arms_of(rng, **spec):
    return {name: SimulatedArm(tau, ms, rng) for name, (tau, ms) in spec.items()}


@pytest.mark.parametrize("seed", range(5))
def test_settles_on_the_fastest_arm(seed):
    rng = random.Random(seed)
    # tokens per ms: ar 1/40 = 0.025, pld 1.4/42 = 0.033, draft 3.5/70 = 0.050
    arms = arms_of(rng, ar=(1.0, 40), pld=(1.4, 42), draft=(3.5, 70))
    chosen = play(StepBandit(), arms, 600)
    late = chosen[200:]
    assert late.count("draft") / len(late) > 0.85
    # what the choices earned: within 10 % of always running the best arm
    earned = sum(arms[a].rate for a in late) / len(late)
    assert earned > 0.9 * arms["draft"].rate


@pytest.mark.parametrize("seed", range(5))
def test_switches_when_the_best_arm_changes(seed):
    rng = random.Random(seed)
    arms = arms_of(rng, ar=(1.0, 40), pld=(3.0, 42), draft=(2.0, 70))
    bandit = StepBandit()
    first = play(bandit, arms, 300)
    assert first[100:].count("pld") / 200 > 0.85
    arms["pld"].tau = 1.1  # the text stops repeating: prompt lookup stops paying
    arms["draft"].tau = 3.5
    second = play(bandit, arms, 300)
    assert second[150:].count("draft") / 150 > 0.85


def test_explores_every_arm_and_never_again_a_bad_one_often():
    rng = random.Random(0)
    arms = arms_of(rng, ar=(1.0, 40), bad=(1.0, 400), good=(2.0, 40))
    chosen = play(StepBandit(), arms, 1000)
    assert set(chosen) == {"ar", "bad", "good"}
    assert chosen.count("bad") < 40  # tried, then revisited rarely: the record fades slowly


def test_no_exploration_is_greedy_on_the_estimates():
    bandit = StepBandit(explore=0.0)
    bandit.update("a", ALL, 1, 0.04)
    bandit.update("b", ALL, 3, 0.06)
    assert bandit.choose({"a": ALL, "b": ALL}) == "b"
    assert bandit.choose({"a": ALL}) == "a"  # only what is available this step
    assert bandit.choose({"a": ALL, "c": ALL}) == "c"  # never tried: tried first


def test_a_one_off_cost_is_spread_over_the_tokens_left():
    bandit = StepBandit(explore=0.0)
    bandit.update("ar", ALL, 1, 0.04)  # 25 tokens/s
    bandit.update("draft", ALL, 4, 0.10)  # 40 tokens/s, once it has read the prompt
    assert bandit.choose({"ar": ALL, "draft": ALL}) == "draft"
    # 2 s to read a long prompt: worth it for 500 tokens (500 / (12.5 + 2) = 34/s), not
    # for 50 (50 / (1.25 + 2) = 15/s)
    assert bandit.choose({"ar": ALL, "draft": ALL}, {"draft": (500, 2.0)}) == "draft"
    assert bandit.choose({"ar": ALL, "draft": ALL}, {"draft": (50, 2.0)}) == "ar"
    # and never for exploration's sake: little known of it, it still waits for its estimate
    explorer = StepBandit(explore=5.0)
    explorer.load_json(bandit.to_json())
    explorer.update("ar", ALL, 1, 0.04)
    assert explorer.choose({"ar": ALL, "draft": ALL}) == "draft"  # the bonus alone
    assert explorer.choose({"ar": ALL, "draft": ALL}, {"draft": (50, 2.0)}) == "ar"


def test_situations_are_learnt_apart_and_borrow_the_arm_rate():
    bandit = StepBandit(explore=0.0, memory=1.0)
    for _ in range(20):  # pld pays with a long match, not with a short one
        bandit.update("pld", "8+", 6, 0.05)
        bandit.update("pld", "1", 1, 0.05)
        bandit.update("draft", ALL, 3, 0.07)
    assert bandit.choose({"pld": "8+", "draft": ALL}) == "pld"
    assert bandit.choose({"pld": "1", "draft": ALL}) == "draft"
    rate, steps = bandit.estimate("pld", "2-3")  # never met: one step of the pooled rate
    assert steps == pytest.approx(1.0) and rate == pytest.approx(140 / 2.0)


def test_record_round_trips_and_skips_damage():
    bandit = StepBandit()
    bandit.update("pld", "4-7", 5, 0.05)
    bandit.update("draft:x:int4", ALL, 3, 0.07)
    again = StepBandit()
    again.load_json({**bandit.to_json(), "broken\tx": "nope", "neg\t*": [-1, 1, 1]})
    assert again.tallies == bandit.tallies


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        StepBandit(explore=-1)
    with pytest.raises(ValueError):
        StepBandit(memory=0.0)
