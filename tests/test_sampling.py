"""Generation: the cached loop against full recomputation and against nanoGPT's crop; controls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax import model
from gpt_jax.config import make_config
from gpt_jax.errors import ConfigError
from gpt_jax.model import init_params
from gpt_jax.sampling import Generator, generate, generate_reference, make_settings, sample_logits

W = 8
BASE = dict(n_layer=2, n_head=2, n_embd=32, block_size=W, vocab_size=11, dropout=0.0)
CFG = make_config(**BASE)
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


@pytest.mark.parametrize("prompt_len, n", [(1, 5), (3, 12), (W, 20), (W + 5, 7)])
def test_full_window_mode_is_nanogpts_crop(params, prompt_len, n):
    prompt = [(3 * i + 1) % 11 for i in range(prompt_len)]
    out = generate(params, CFG, prompt, jax.random.PRNGKey(0), n, temperature=0.0, window_keep=W)
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
    out = generate(params, CFG, [1], jax.random.PRNGKey(0), 50, temperature=0.0,
                   stops=[[int(generate(params, CFG, [1], jax.random.PRNGKey(0), 1,
                                        temperature=0.0).tokens[0][0])]])
    assert out.steps == 1 and out.tokens[0].size == 0


def test_streaming_reports_every_token_in_order(params):
    seen = []
    out = generate(params, CFG, [2], jax.random.PRNGKey(4), 12, num_samples=2,
                   on_token=lambda step, tokens, done: seen.append((step, tokens.tolist())))
    assert [s for s, _ in seen] == list(range(12))
    assert [t[0] for _, t in seen] == out.tokens[0].tolist()
    assert [t[1] for _, t in seen] == out.tokens[1].tolist()


def test_one_compile_serves_prompts_of_any_length(params):
    gen = Generator(CFG, make_settings(CFG, max_new_tokens=6, temperature=0.0, window_keep=W))
    gen.prepare(params)
    compiled = gen._compiled
    for prompt in ([1], [1, 2, 3, 4, 5], list(range(11)) * 2):
        out = gen(params, prompt, jax.random.PRNGKey(0))
        assert out.tokens[0].tolist() == nanogpt_greedy(params, CFG, prompt[-W:], 6)
        assert gen._compiled is compiled


def test_top_k_one_is_greedy(params):
    greedy = generate(params, CFG, [3], jax.random.PRNGKey(0), 10, temperature=0.0)
    top1 = generate(params, CFG, [3], jax.random.PRNGKey(1), 10, temperature=1.0, top_k=1)
    assert same(greedy, top1)


def test_filters_keep_only_allowed_tokens():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    assert {int(sample_logits(logits, k, 1.0, top_k=2)[0]) for k in keys} == {0, 1}
    assert {int(sample_logits(logits, k, 1.0, top_p=0.7)[0]) for k in keys} == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert {int(sample_logits(logits, k, 1.0, top_p=0.1)[0]) for k in keys} == {0}
    assert {int(sample_logits(logits, k, 1.0)[0]) for k in keys} == {0, 1, 2, 3}


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1.0}, "temperature must be >= 0"),
    ({"top_k": 0}, r"top_k must be in \[1, 11\]"),
    ({"top_k": 12}, r"top_k must be in \[1, 11\]"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"window_keep": 9}, r"window_keep must be in \[1, block_size=8\]"),
    ({"num_samples": 0}, "num_samples must be >= 1"),
    ({"stops": [[]]}, "a stop sequence is empty"),
])
def test_invalid_settings(params, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        generate(params, CFG, [1], jax.random.PRNGKey(0), 5, **kwargs)


def test_empty_prompt(params):
    with pytest.raises(ConfigError, match="prompt is empty"):
        generate(params, CFG, [], jax.random.PRNGKey(0), 5)
