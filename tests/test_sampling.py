"""Generation: the cached loop against full recomputation and against nanoGPT's crop; batches of prompts;
chunks; controls; what is refused (bad prompts, non-finite models, requests too large for memory)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax import model, sharding
from gpt_jax.config import make_config
from gpt_jax.errors import ConfigError, GenerationTooLargeError, NonFiniteModelError
from gpt_jax.model import init_params
from gpt_jax.sampling import (
    Generation,
    Generator,
    generate,
    generate_reference,
    make_settings,
    sample_logits,
)

W = 8
BASE = dict(n_layer=2, n_head=2, n_embd=32, block_size=W, vocab_size=11, dropout=0.0)
CFG = make_config(**BASE)
KEY = jax.random.PRNGKey(0)
logits_fn = jax.jit(model.logits_fn, static_argnums=1)


def sharp_params(cfg, seed=0):
    """Random weights scaled up, so that greedy paths wander instead of repeating one token."""
    return jax.tree_util.tree_map(lambda x: x * 8, init_params(cfg, jax.random.PRNGKey(seed)))


@pytest.fixture(scope="module")
def params():
    return sharp_params(CFG)


def nanogpt_greedy(params, cfg, prompt, n):
    """nanoGPT's generate at temperature 0: the whole model over the last block_size tokens."""
    tokens = list(prompt)
    for _ in range(n):
        window = jnp.asarray([tokens[-cfg.block_size:]], jnp.int32)
        tokens.append(int(jnp.argmax(logits_fn(params, cfg, window)[0, -1])))
    return tokens[len(prompt):]


def same(a, b):
    return len(a.tokens) == len(b.tokens) and all(
        np.array_equal(x, y) for x, y in zip(a.tokens, b.tokens, strict=True))


def joined(generations):
    """The rows of several Generations, one after another."""
    return Generation([t for g in generations for t in g.tokens],
                      [p for g in generations for p in g.logprobs], max(g.steps for g in generations))


def run(params, prompts, n, cached=True, **settings):
    """A Generator with explicit settings (``chunk`` included), called once."""
    generator = Generator(CFG, make_settings(CFG, max_new_tokens=n, **settings), cached=cached)
    return generator(params, prompts, KEY)


# --- exactness: the cached loop is the model -----------------------------------------------------------

@pytest.mark.parametrize("prompt_len, n", [(1, 5), (3, 12), (W, 20), (W + 5, 7)])
def test_full_window_mode_is_nanogpts_crop(params, prompt_len, n):
    prompt = [(3 * i + 1) % 11 for i in range(prompt_len)]
    out = generate(params, CFG, prompt, KEY, n, temperature=0.0, window_keep=W)
    assert out.tokens[0].tolist() == nanogpt_greedy(params, CFG, prompt, n)
    assert len(set(out.tokens[0].tolist())) > 1


VARIANTS = [
    dict(),
    dict(pos_encoding="sinusoidal"),
    dict(norm_position="post", bias=True),
    dict(tie_embeddings=False),
    dict(model="bigram"),
]


CASES = [(dict(), keep, temperature, num_samples)
         for keep in (None, W, 1) for temperature, num_samples in ((0.0, 1), (1.0, 1), (0.9, 3))]
CASES += [(variant, None, 0.9, 3) for variant in VARIANTS[1:]]


@pytest.mark.parametrize("variant, keep, temperature, num_samples", CASES, ids=str)
def test_cached_equals_recomputed(variant, keep, temperature, num_samples):
    """Within and past block_size (prompt 3 + 30 new tokens > 8), greedy and sampled, batch 1 and 3."""
    cfg = make_config(**{**BASE, **variant})
    params = sharp_params(cfg, seed=1)
    key = jax.random.PRNGKey(7)
    kwargs = dict(temperature=temperature, num_samples=num_samples, window_keep=keep)
    cached = generate(params, cfg, [1, 2, 3], key, 30, **kwargs)
    reference = generate_reference(params, cfg, [1, 2, 3], key, 30, **kwargs)
    assert same(cached, reference)
    assert cached.steps == 30 and all(len(t) == 30 for t in cached.tokens)
    np.testing.assert_allclose(np.stack(cached.logprobs), np.stack(reference.logprobs), rtol=1e-4,
                               atol=1e-4)


def test_long_prompt_keeps_its_last_block(params):
    long = [i % 11 for i in range(3 * W)]
    a = generate(params, CFG, long, jax.random.PRNGKey(1), 10)
    b = generate(params, CFG, long[-W:], jax.random.PRNGKey(1), 10)
    assert same(a, b)


def test_logprobs_are_the_models(params):
    out = generate(params, CFG, [4], jax.random.PRNGKey(2), 1, temperature=0.0)
    expected = jax.nn.log_softmax(logits_fn(params, CFG, jnp.asarray([[4]])))[0, -1]
    assert out.tokens[0][0] == int(jnp.argmax(expected))
    np.testing.assert_allclose(out.logprobs[0][0], float(jnp.max(expected)), rtol=1e-5)


def test_samples_are_reproducible_and_differ_across_rows(params):
    a = generate(params, CFG, [1, 2], jax.random.PRNGKey(5), 20, num_samples=4)
    b = generate(params, CFG, [1, 2], jax.random.PRNGKey(5), 20, num_samples=4)
    c = generate(params, CFG, [1, 2], jax.random.PRNGKey(6), 20, num_samples=4)
    assert same(a, b) and not same(a, c)
    assert len({tuple(t.tolist()) for t in a.tokens}) > 1


# --- batches of prompts ----------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_batch_gives_each_prompt_what_it_gives_alone_prompt_major(params, temperature):
    """[B, P] prompts x n samples -> B * n rows: all samples of prompt 0, then of prompt 1 (never the
    prompts run as one); sample s of a prompt does not depend on the other prompts."""
    prompts = np.array([[1, 2, 3], [4, 5, 6]])
    batch = generate(params, CFG, prompts, KEY, 20, temperature=temperature, num_samples=2)
    alone = [generate(params, CFG, p, KEY, 20, temperature=temperature, num_samples=2) for p in prompts]
    assert len(batch.tokens) == 4 and same(batch, joined(alone))


def test_prompts_of_different_lengths_come_back_in_input_order(params):
    """A list of prompts of any lengths: grouped by length to run, returned in the order given."""
    prompts = [[1, 2, 3, 4, 5], [6], [7, 8, 9, 10, 0], [2, 3]]
    batch = generate(params, CFG, prompts, KEY, 12, temperature=0.0, num_samples=2)
    alone = [generate(params, CFG, p, KEY, 12, temperature=0.0, num_samples=2) for p in prompts]
    assert same(batch, joined(alone))


def test_a_prompt_prefilled_in_several_chunks_gives_the_reference(params, monkeypatch):
    """Prompts go through the cache PREFILL_CHUNK tokens at a time; with chunks of 3 in a window of 8,
    prompts take one, two or three chunks, the last one moved back to end inside the window."""
    from gpt_jax import sampling

    monkeypatch.setattr(sampling, "PREFILL_CHUNK", 3)
    cfg = make_config(**BASE, seed=3)  # a config of its own: compiled afresh, with the patched chunk
    prompts = [[1], [1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 0, 1, 2, 3], [2, 3, 4, 5, 6, 7, 8, 9],
               [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0]]
    kwargs = dict(temperature=0.9, num_samples=2)
    assert same(generate(params, cfg, prompts, KEY, 12, **kwargs),
                generate_reference(params, cfg, prompts, KEY, 12, **kwargs))


def test_batches_cached_equal_recomputed(params):
    prompts = [[1, 2, 3], [4], [5, 6, 7], [8, 9, 10, 0, 1, 2, 3, 4, 5, 6]]  # the last one longer than W
    kwargs = dict(temperature=0.9, num_samples=2)
    cached = generate(params, CFG, prompts, KEY, 30, **kwargs)
    assert same(cached, generate_reference(params, CFG, prompts, KEY, 30, **kwargs))
    assert len(cached.tokens) == 8


def test_streaming_a_batch_reports_each_row_in_its_place(params):
    seen: dict[int, list[int]] = {}

    def on_token(step, tokens_B, done_B):
        for row in np.flatnonzero(~done_B):
            seen.setdefault(int(row), []).append(int(tokens_B[row]))

    out = generate(params, CFG, [[1, 2], [3], [4, 5]], KEY, 6, num_samples=2, on_token=on_token)
    assert [seen[r] for r in range(6)] == [t.tolist() for t in out.tokens]


# --- chunks: memory does not grow with max_new_tokens, and nothing changes --------------------------------

def cut_at_first_stop(tokens, stops):
    """The tokens before the first stop sequence to be completed."""
    tokens = tokens.tolist()
    for end in range(len(tokens) + 1):
        for stop in stops:
            if end >= len(stop) and tokens[end - len(stop):end] == stop:
                return tokens[:end - len(stop)]
    return tokens


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_chunking_changes_nothing(params, chunk):
    """In chunks of a few steps, past the window (2 + 30 > 8) and with stops that span chunk boundaries,
    one of them longer than the window: the same rows as the reference in one chunk."""
    kwargs = dict(temperature=1.0, num_samples=3)
    free = run(params, [4, 7], 30, **kwargs)
    stops = [free.tokens[0][5:7].tolist(), free.tokens[1][12:23].tolist()]  # 2 and 11 tokens
    expected = [cut_at_first_stop(t, stops) for t in free.tokens]
    assert len(expected[0]) == 5 and len(expected[1]) == 12  # each stop is the first one of its row
    chunked = run(params, [4, 7], 30, chunk=chunk, stops=stops, **kwargs)
    assert [t.tolist() for t in chunked.tokens] == expected
    assert same(chunked, run(params, [4, 7], 30, cached=False, stops=stops, **kwargs))


def test_many_default_chunks_equal_the_reference(params):
    """More tokens than one default chunk (256 steps) holds."""
    kwargs = dict(temperature=0.9, num_samples=3, window_keep=None)
    cached = generate(params, CFG, [1, 2, 3], KEY, 600, **kwargs)
    assert same(cached, generate_reference(params, CFG, [1, 2, 3], KEY, 600, **kwargs))
    assert cached.steps == 600


def test_one_compile_serves_any_prompt_length_and_any_max_new_tokens(params):
    gen = Generator(CFG, make_settings(CFG, max_new_tokens=6, temperature=0.0, window_keep=W, chunk=5))
    gen.compile(params)
    compiled = dict(gen._compiled)
    for prompt, n in (([1], 6), ([1, 2, 3, 4, 5], 40), (list(range(11)) * 2, 3)):
        settings = make_settings(CFG, max_new_tokens=n, temperature=0.0, window_keep=W, chunk=5)
        out = Generator(CFG, settings)(params, prompt, KEY)
        assert out.tokens[0].tolist() == nanogpt_greedy(params, CFG, prompt[-W:], n)
        assert gen._compiled == compiled


# --- controls ---------------------------------------------------------------------------------------------

def test_stop_sequences_cut_each_sample(params):
    key = jax.random.PRNGKey(3)
    free = generate(params, CFG, [1], key, 40, num_samples=4)
    stop = free.tokens[0][5:7].tolist()  # a pair that sample 0 produces
    stopped = generate(params, CFG, [1], key, 40, num_samples=4, stops=[stop])
    for full, cut in zip(free.tokens, stopped.tokens, strict=True):
        text = full.tolist()
        hits = [i for i in range(len(text) - 1) if text[i:i + 2] == stop]
        assert cut.tolist() == (text[:hits[0]] if hits else text)
    assert len(stopped.tokens[0]) <= 5


def test_all_stopped_ends_the_loop(params):
    out = generate(params, CFG, [1], KEY, 50, temperature=0.0,
                   stops=[[int(generate(params, CFG, [1], KEY, 1, temperature=0.0).tokens[0][0])]])
    assert out.steps == 1 and out.tokens[0].size == 0


def test_streaming_reports_every_token_in_order(params):
    seen = []
    out = generate(params, CFG, [2], jax.random.PRNGKey(4), 12, num_samples=2,
                   on_token=lambda step, tokens, done: seen.append((step, tokens.tolist())))
    assert [s for s, _ in seen] == list(range(12))
    assert [t[0] for _, t in seen] == out.tokens[0].tolist()
    assert [t[1] for _, t in seen] == out.tokens[1].tolist()


def test_top_k_one_is_greedy(params):
    greedy = generate(params, CFG, [3], KEY, 10, temperature=0.0)
    top1 = generate(params, CFG, [3], jax.random.PRNGKey(1), 10, temperature=1.0, top_k=1)
    assert same(greedy, top1)


def test_filters_keep_only_allowed_tokens():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    assert {int(sample_logits(logits, k, 1.0, top_k=2)[0]) for k in keys} == {0, 1}
    assert {int(sample_logits(logits, k, 1.0, top_p=0.7)[0]) for k in keys} == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert {int(sample_logits(logits, k, 1.0, top_p=0.1)[0]) for k in keys} == {0}
    assert {int(sample_logits(logits, k, 1.0)[0]) for k in keys} == {0, 1, 2, 3}


# --- what is refused -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1.0}, "temperature must be >= 0"),
    ({"top_k": 0}, r"top_k must be in \[1, 11\]"),
    ({"top_k": 12}, r"top_k must be in \[1, 11\]"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"window_keep": 9}, r"window_keep must be in \[1, block_size=8\]"),
    ({"num_samples": 0}, "num_samples must be >= 1"),
    ({"max_new_tokens": 2**31}, "max_new_tokens must be at most 1,073,741,824"),
    ({"stops": [[]]}, "a stop sequence is empty"),
])
def test_invalid_settings(params, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        generate(params, CFG, [1], KEY, **{"max_new_tokens": 5, **kwargs})


@pytest.mark.parametrize("prompt, message", [
    ([], "the prompt is empty"),
    ([[1, 2], []], r"prompt 1 \(of 2\) is empty"),
    (np.ones((2, 2, 2), np.int32), r"one prompt \[P\], a batch of prompts \[B, P\] or a list of prompts.*"
                                   "got an array of 3 dimensions"),
    ([[1], [[2]]], r"one prompt \[P\], a batch of prompts \[B, P\] or a list of prompts"),
    ([1, 11], r"token ids must be in \[0, 11\), got 1..11 in the prompt"),
    ([[1, 2], [3, -1]], r"token ids must be in \[0, 11\), got -1..3 in prompt 1 \(of 2\)"),
    ([1.0, 2.0], "the prompt must hold integer token ids"),
    ("ROMEO:", r"prompts are token ids, not text: encode them first, e.g. tok.encode\('ROMEO:'\)"),
    (["ROMEO:", "JULIET:"], "prompts are token ids, not text"),
])
def test_bad_prompts_are_refused_in_one_line(params, prompt, message):
    with pytest.raises(ConfigError, match=message) as error:
        generate(params, CFG, prompt, KEY, 5)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nonfinite_parameters_raise_instead_of_sampling(params, value):
    """One damaged weight makes logits NaN: the loop stops and says so (it used to return token 0 for
    ever)."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(value)
    damaged = jax.tree_util.tree_unflatten(tree, leaves)
    for sampler in (generate, generate_reference):
        with pytest.raises(NonFiniteModelError, match="logits are NaN or infinite.*may be damaged"):
            sampler(damaged, CFG, [1, 2], KEY, 20)


def test_a_request_too_large_for_memory_is_refused_up_front(params, monkeypatch):
    with pytest.raises(GenerationTooLargeError, match="lower max_new_tokens or num_samples"):
        generate(params, CFG, [1], KEY, 10**9, num_samples=10_000)  # 80 TB of output on any machine
    monkeypatch.setattr(sharding, "available_memory", lambda device=None: 2**20)  # 1 MiB free everywhere
    with pytest.raises(GenerationTooLargeError, match=r"^10,000,000 new tokens for 1 sample need about "
                       r"76.\d MiB of (host )?memory.* but 1.0 MiB is free"):
        generate(params, CFG, [1], KEY, 10**7)
    with pytest.raises(GenerationTooLargeError, match="for 2 prompts x 1,000 samples"):
        generate(params, CFG, [[1], [2]], KEY, 5, num_samples=1000)  # the loop state of 2,000 rows
    assert len(generate(params, CFG, [1], KEY, 1000, temperature=0.0).tokens[0]) == 1000
