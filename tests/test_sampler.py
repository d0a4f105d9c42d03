"""The sampler and stop-string detector against naive, loop-per-token reimplementations of each rule."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from dsv4.engine.sampler import Sampler, SamplingState, StopChecker
from dsv4.engine.sampling import SamplingParams

# ---------------------------------------------------------------------------------------------------------
# naive references (float64 numpy, one token at a time)


def naive_penalised(logits: np.ndarray, prompt: list[int], output: list[int], p: SamplingParams):
    x = logits.astype(np.float64).copy()
    for t in set(prompt) | set(output):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(output):
        x[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty
    return x


def naive_keep(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """Temperature, then min_p, top_k, top_p (renormalised over what survived), each tie-inclusive."""
    z = logits.astype(np.float64) / p.temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    keep = probs >= p.min_p * probs.max()
    if 0 < p.top_k < len(z):
        survivors = np.sort(z[keep])[::-1]
        if len(survivors) >= p.top_k:
            keep &= z >= survivors[p.top_k - 1]
    if p.top_p < 1:
        q = np.where(keep, probs, 0.0)
        q /= q.sum()
        mass, threshold = 0.0, None
        for t in sorted(range(len(q)), key=lambda t: -q[t]):
            if mass >= p.top_p:
                break
            threshold = q[t]
            mass += q[t]
        keep &= q >= threshold
    return keep


def naive_target(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    z = logits.astype(np.float64) / p.temperature
    probs = np.where(naive_keep(logits, p), np.exp(z - z.max()), 0.0)
    return probs / probs.sum()


def naive_stop(text: str, stops: list[str]) -> tuple[str, str | None]:
    """Generation halts at the first prefix of the text that contains a stop string."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            s = max(ending, key=len)
            return text[: end - len(s)], s
    return text, None


def states_for(params: list[SamplingParams], prompts: list[list[int]] | None = None) -> list[SamplingState]:
    prompts = prompts or [[] for _ in params]
    return [SamplingState(p, prompt) for p, prompt in zip(params, prompts, strict=True)]


# ---------------------------------------------------------------------------------------------------------
# greedy


def test_greedy_is_argmax_with_ties_to_lowest_id():
    torch.manual_seed(0)
    logits = torch.randn(16, 300)
    logits[3, [7, 11, 250]] = 10.0  # a three-way tie
    params = [SamplingParams(temperature=0.0) for _ in range(15)] + [SamplingParams(temperature=1e-6)]
    out = Sampler()(logits, states_for(params))
    expected = logits.numpy().argmax(axis=-1)  # numpy's argmax also returns the first maximum
    assert out.token_ids.tolist() == expected.tolist()
    assert out.token_ids[3].item() == 7


def test_greedy_rows_unaffected_by_sampled_rows():
    torch.manual_seed(1)
    logits = torch.randn(6, 100)
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.0) for i in range(6)]
    out = Sampler()(logits, states_for(params))
    assert out.token_ids[1::2].tolist() == logits[1::2].argmax(-1).tolist()


def test_input_logits_are_not_modified():
    torch.manual_seed(2)
    logits = torch.randn(3, 50)
    before = logits.clone()
    params = [
        SamplingParams(temperature=0.5, top_k=5, repetition_penalty=1.5, presence_penalty=1.0),
        SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[4]),
        SamplingParams(top_p=0.5, min_p=0.1),
    ]
    states = states_for(params, [[1, 2, 3], [4], [5]])
    states[0].append(9)
    Sampler()(logits, states)
    assert torch.equal(logits, before)


# ---------------------------------------------------------------------------------------------------------
# truncation: top_k, top_p, min_p


def random_params(rng: random.Random) -> SamplingParams:
    return SamplingParams(
        temperature=rng.choice([0.3, 0.7, 1.0, 1.6]),
        top_k=rng.choice([0, -1, 1, 2, 5, 20, 63, 64, 500]),
        top_p=rng.choice([1.0, 0.95, 0.9, 0.5, 0.2, 1e-6]),
        min_p=rng.choice([0.0, 0.0, 0.01, 0.1, 0.5, 1.0]),
    )


def test_truncation_masks_match_naive():
    rng = random.Random(0)
    torch.manual_seed(3)
    logits = torch.randn(400, 64) * 3
    params = [random_params(rng) for _ in range(len(logits))]
    _, keep = Sampler._truncate(logits, params)
    assert keep is not None
    for i, p in enumerate(params):
        expected = naive_keep(logits[i].numpy(), p)
        assert keep[i].numpy().tolist() == expected.tolist(), (i, p)


@pytest.mark.parametrize(
    ("params", "kept"),
    [
        (SamplingParams(top_k=3), [0, 1, 2, 3, 4]),  # the 3rd largest (1.0) ties with the 4th and 5th
        (SamplingParams(top_k=1), [0, 1]),
        (SamplingParams(top_p=0.3), [0, 1]),  # token 0 alone is < 0.3 of the mass; token 1 ties with it
        (SamplingParams(min_p=1.0), [0, 1]),
    ],
)
def test_truncation_keeps_ties_at_the_boundary(params: SamplingParams, kept: list[int]):
    logits = torch.tensor([[3.0, 3.0, 1.0, 1.0, 1.0, 0.0]])
    _, keep = Sampler._truncate(logits, [params])
    assert keep is not None
    assert torch.nonzero(keep[0]).flatten().tolist() == kept
    assert naive_keep(logits[0].numpy(), params).nonzero()[0].tolist() == kept


def test_no_truncation_means_no_mask():
    _, keep = Sampler._truncate(torch.randn(2, 10), [SamplingParams(top_k=-1), SamplingParams(top_k=10)])
    assert keep is None


def assert_matches_distribution(tokens: np.ndarray, target: np.ndarray) -> None:
    """Each token's frequency within 5 binomial standard deviations (+1/N) of its probability.

    With a fixed seed this is deterministic; a correct sampler fails it with probability ~1e-6 per token.
    Tokens outside the support must never appear at all.
    """
    n = len(tokens)
    freq = np.bincount(tokens, minlength=len(target)) / n
    assert np.all(freq[target == 0] == 0)
    bound = 5 * np.sqrt(target * (1 - target) / n) + 1 / n
    assert np.all(np.abs(freq - target) <= bound), (freq, target)


DIST_LOGITS = torch.tensor([2.0, 1.5, 1.4, 1.0, 0.5, 0.2, 0.0, -0.5, -1.0, -3.0])
DIST_PARAMS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.8, top_k=7, top_p=0.9, min_p=0.03),
    SamplingParams(temperature=1.7, top_p=0.8),
    SamplingParams(temperature=0.5, min_p=0.2),
]


@pytest.mark.parametrize("params", DIST_PARAMS)
def test_unseeded_samples_follow_the_truncated_distribution(params: SamplingParams):
    n = 40_000
    logits = DIST_LOGITS.expand(n, -1)
    sampler = Sampler(torch.Generator().manual_seed(5))
    tokens = sampler(logits, states_for([params] * n)).token_ids.numpy()
    assert_matches_distribution(tokens, naive_target(DIST_LOGITS.numpy(), params))


def test_seeded_samples_follow_the_truncated_distribution():
    n = 4_000
    params = DIST_PARAMS[1]
    rows = [SamplingParams(**{**vars(params), "seed": seed}) for seed in range(n)]
    tokens = Sampler()(DIST_LOGITS.expand(n, -1), states_for(rows)).token_ids.numpy()
    assert_matches_distribution(tokens, naive_target(DIST_LOGITS.numpy(), params))


def test_small_temperature_and_masked_logits_stay_finite():
    logits = torch.tensor([[0.0, 1000.0, -1000.0, float("-inf")], [float("-inf"), 0.0, 0.0, float("-inf")]])
    params = [SamplingParams(temperature=1e-4), SamplingParams(temperature=1e-4, seed=3)]
    for _ in range(20):
        tokens = Sampler()(logits, states_for(params)).token_ids.tolist()
        assert tokens[0] == 1 and tokens[1] in (1, 2)


# ---------------------------------------------------------------------------------------------------------
# penalties and min_tokens


def test_penalties_match_hand_formulas_incrementally():
    torch.manual_seed(6)
    params = [
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(repetition_penalty=0.7),
        SamplingParams(presence_penalty=1.5, frequency_penalty=0.0),
        SamplingParams(presence_penalty=0.0, frequency_penalty=-0.75),
        SamplingParams(repetition_penalty=1.2, presence_penalty=-2.0, frequency_penalty=2.0),
        SamplingParams(),  # unpenalised rows pass through
    ]
    prompts = [[1, 2, 2, 40], [3, 4], [5], [], [1, 7, 7, 7], [1, 2, 3]]
    states = states_for(params, prompts)
    rng = random.Random(6)
    for _ in range(4):
        logits = torch.randn(len(params), 50) * 2
        adjusted = Sampler._adjust(logits, states)
        for i, (p, s) in enumerate(zip(params, states, strict=True)):
            expected = naive_penalised(logits[i].numpy(), prompts[i], s.output_ids, p)
            np.testing.assert_allclose(adjusted[i].numpy(), expected, rtol=1e-6, atol=1e-6)
        for s in states:  # some repeats, some new tokens, sometimes several before the next step
            for _ in range(rng.randint(1, 3)):
                s.append(rng.choice([1, 2, 7, 8, 9, 49]))


def test_penalties_steer_greedy_choice():
    logits = torch.tensor([[5.0, 4.0, 3.0, -1.0]])
    state = SamplingState(SamplingParams(temperature=0.0, frequency_penalty=1.0), prompt_ids=[0])
    for token in (0, 0):
        state.append(token)
    # 5 - 2*1 = 3 < 4: token 1 now wins; the prompt occurrence does not count for OpenAI penalties
    assert Sampler()(logits, [state]).token_ids.item() == 1


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_min_tokens_masks_stop_tokens(ignore_eos: bool):
    eos = 0
    logits = torch.tensor([[9.0, 1.0, 8.0, 7.0]])
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[2, 10**9], ignore_eos=ignore_eos)
    state = SamplingState(params, prompt_ids=[], eos_token_ids=[eos])
    assert state.stop_token_ids == ({2, 10**9} if ignore_eos else {0, 2, 10**9})
    chosen = []
    for _ in range(3):
        chosen.append(Sampler()(logits, [state]).token_ids.item())
        state.append(chosen[-1])
    assert chosen == ([0, 0, 0] if ignore_eos else [3, 3, 0])


# ---------------------------------------------------------------------------------------------------------
# seeds


def run_seeded(
    target_logits: list[torch.Tensor], target: SamplingParams, position: int, others: list[SamplingParams]
) -> list[int]:
    """Sample the target row over several steps inside a batch of other rows; return its tokens."""
    states = states_for(others)
    target_state = SamplingState(target, prompt_ids=[1, 2, 3])
    states.insert(position, target_state)
    sampler = Sampler()
    tokens = []
    for step_logits in target_logits:
        torch.manual_seed(len(tokens) * 1000 + len(others))  # the global stream must not matter either
        logits = torch.randn(len(states), step_logits.shape[0]) * 2
        logits[position] = step_logits
        token = sampler(logits, states).token_ids[position].item()
        target_state.append(token)
        tokens.append(token)
    return tokens


def test_seeded_rows_are_independent_of_batch_composition_and_order():
    gen = torch.Generator().manual_seed(7)
    target_logits = [torch.randn(1000, generator=gen) for _ in range(8)]  # flat enough to differ by seed
    target = SamplingParams(temperature=1.0, top_p=0.95, repetition_penalty=1.1, seed=1234)
    alone = run_seeded(target_logits, target, 0, [])
    batches = [
        (1, [SamplingParams(seed=1234), SamplingParams(temperature=0.0)]),  # another row with the same seed
        (2, [SamplingParams(), SamplingParams(seed=7, top_k=3), SamplingParams(temperature=0.0)]),
        (0, [SamplingParams(min_p=0.2)] * 5),
    ]
    for position, others in batches:
        assert run_seeded(target_logits, target, position, others) == alone
    other_seed = SamplingParams(**{**vars(target), "seed": 4321})
    assert run_seeded(target_logits, other_seed, 0, []) != alone


# ---------------------------------------------------------------------------------------------------------
# logprobs


def test_logprobs_are_the_raw_model_distribution():
    torch.manual_seed(8)
    logits = torch.randn(4, 200) * 3
    params = [
        SamplingParams(temperature=0.5, top_k=3, repetition_penalty=1.5, logprobs=5),
        SamplingParams(temperature=0.0, presence_penalty=2.0, logprobs=0),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.2, top_p=0.5, logprobs=20),
    ]
    states = states_for(params, [[int(logits[0].argmax())], [], [], []])
    states[1].append(int(logits[1].argmax()))
    out = Sampler()(logits, states)
    raw = torch.log_softmax(logits.double(), dim=-1)
    rows = out.rows()
    for i, (p, row) in enumerate(zip(params, rows, strict=True)):
        assert row.token_id == out.token_ids[i].item()
        if p.logprobs is None:
            assert row.logprob is None and row.top == []
            continue
        assert math.isclose(row.logprob, raw[i, row.token_id].item(), abs_tol=1e-5)
        assert len(row.top) == p.logprobs
        top_values, top_ids = raw[i].topk(p.logprobs)
        assert [t for t, _ in row.top] == top_ids.tolist()
        np.testing.assert_allclose([v for _, v in row.top], top_values.numpy(), atol=1e-5)
    # the penalties moved row 1's greedy choice away from the raw argmax; its logprob is still the raw one
    assert rows[1].token_id != int(logits[1].argmax())


def test_no_logprobs_requested_returns_none():
    out = Sampler()(torch.randn(2, 10), states_for([SamplingParams(), SamplingParams(temperature=0.0)]))
    assert out.logprobs is None and out.top_ids is None
    assert all(r.logprob is None for r in out.rows())


# ---------------------------------------------------------------------------------------------------------
# stop strings


def feed(checker: StopChecker, deltas: list[str]) -> list[str]:
    emitted = []
    for delta in deltas:
        emitted.append(checker.push(delta).text)
        if checker.matched is not None:
            break
    return emitted


def test_stop_string_in_one_delta():
    checker = StopChecker(["STOP"])
    update = checker.push("Hello STOP world")
    assert (update.text, update.stop, checker.matched) == ("Hello ", "STOP", "STOP")


def test_stop_string_spanning_deltas_is_held_back():
    checker = StopChecker(["STOP"])
    assert feed(checker, ["Hel", "lo ST", "O", "P more"]) == ["Hel", "lo ", "", ""]
    assert checker.matched == "STOP"


def test_held_back_text_released_when_ruled_out():
    checker = StopChecker(["abc"])
    assert feed(checker, ["xab", "x", "a"]) == ["x", "abx", ""]
    assert checker.flush() == "a"
    assert checker.flush() == ""


def test_partial_match_followed_by_real_one():
    checker = StopChecker(["aab"])
    assert feed(checker, ["a", "a", "a", "b"]) == ["", "", "a", ""]
    assert checker.matched == "aab"


@pytest.mark.parametrize(
    ("stops", "text", "emitted", "matched"),
    [
        (["abcd", "bc"], "xabcd", "xa", "bc"),  # "bc" ends first, so it wins over the earlier-starting one
        (["bc", "abc"], "xabc", "x", "abc"),  # both end together: the longer one is cut
        (["b", "ab"], "aab", "a", "ab"),
        (["<|end|>", "<|"], "x<|end|>", "x", "<|"),
    ],
)
def test_overlapping_candidates(stops: list[str], text: str, emitted: str, matched: str):
    for deltas in ([text], list(text)):
        checker = StopChecker(stops)
        assert "".join(feed(checker, deltas)) == emitted
        assert checker.matched == matched


def test_no_stop_strings_emits_everything_immediately():
    checker = StopChecker([])
    assert feed(checker, ["a", "bc"]) == ["a", "bc"]
    assert checker.flush() == ""


def test_push_after_stop_raises():
    checker = StopChecker(["x"])
    checker.push("ax")
    with pytest.raises(RuntimeError, match="already matched"):
        checker.push("more")


def test_stop_strings_are_ignored_until_can_stop():
    checker = StopChecker(["XY"])
    assert checker.push("aXY", can_stop=False).text == "aXY"
    assert checker.push("bX", can_stop=False).text == "b"  # "X" held: it may still start a stop
    update = checker.push("Yz")
    assert (update.text, update.stop) == ("", "XY")
    checker = StopChecker(["XY"])
    checker.push("XY", can_stop=False)
    assert checker.push("z").stop is None  # a match wholly inside the quiet text never fires later


def test_stop_detection_is_independent_of_chunking():
    rng = random.Random(9)
    for _ in range(400):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 20)))
        cuts = sorted(rng.sample(range(1, len(text)), k=min(rng.randint(0, 6), max(len(text) - 1, 0))))
        deltas = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        checker = StopChecker(stops)
        emitted = "".join(feed(checker, deltas))
        if checker.matched is None:
            emitted += checker.flush()
        assert (emitted, checker.matched) == naive_stop(text, stops), (stops, deltas)


# ---------------------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", "1"),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_k", -2),
        ("top_k", 1.5),
        ("top_k", True),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", float("inf")),
        ("presence_penalty", 2.5),
        ("presence_penalty", -2.1),
        ("frequency_penalty", 3),
        ("seed", 2**64),
        ("seed", 1.5),
        ("max_tokens", 0),
        ("max_tokens", 1.0),
        ("min_tokens", -1),
        ("min_tokens", 257),  # above the default max_tokens
        ("stop", "abc"),  # a bare string is the server's to wrap, not ours to iterate
        ("stop", [1]),
        ("stop", [""]),
        ("stop_token_ids", [-1]),
        ("stop_token_ids", ["a"]),
        ("stop_token_ids", 5),
        ("ignore_eos", "yes"),
        ("logprobs", 21),
        ("logprobs", -1),
    ],
)
def test_validation_names_the_field(field: str, value: object):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value}).validate()


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"temperature": 0, "top_p": 1, "top_k": -1, "min_p": 1},
        {"top_k": 0, "min_p": 0, "presence_penalty": -2, "frequency_penalty": 2, "repetition_penalty": 0.01},
        {"seed": -(2**63), "logprobs": 0, "max_tokens": 1, "min_tokens": 1},
        {"seed": 2**64 - 1, "logprobs": 20, "stop": ("a", "b"), "stop_token_ids": (0, 5), "ignore_eos": True},
    ],
)
def test_validation_accepts_boundaries(kwargs: dict):
    SamplingParams(**kwargs).validate()
    if "seed" in kwargs:  # the accepted range is the one torch.Generator takes
        torch.Generator().manual_seed(kwargs["seed"])
