import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax import model
from gpt_jax.config import make_config
from gpt_jax.errors import ConfigError
from gpt_jax.model import init_params
from gpt_jax.sampling import generate, sample_logits

CFG = make_config(n_layer=2, n_head=2, n_embd=32, block_size=8, vocab_size=11, dropout=0.0)
logits_fn = jax.jit(model.logits_fn, static_argnums=1)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.PRNGKey(0))


def greedy_reference(params, prompt, n):
    """Python loop over the full model, cropping to block_size, as in nanoGPT."""
    tokens = list(prompt)
    for _ in range(n):
        window = jnp.asarray([tokens[-CFG.block_size:]], jnp.int32)
        tokens.append(int(jnp.argmax(logits_fn(params, CFG, window)[0, -1])))
    return tokens[len(prompt):]


@pytest.mark.parametrize("prompt_len, n", [(1, 5), (3, 12), (10, 4)])
def test_greedy_matches_a_python_reference(params, prompt_len, n):
    prompt = list(range(1, prompt_len + 1))
    out = generate(params, CFG, prompt, jax.random.PRNGKey(0), n, temperature=0.0)
    assert out.shape == (1, n)
    assert out[0].tolist() == greedy_reference(params, prompt, n)


def test_samples_are_reproducible_and_differ_across_rows(params):
    a = generate(params, CFG, [1, 2], jax.random.PRNGKey(5), 20, num_samples=4)
    b = generate(params, CFG, [1, 2], jax.random.PRNGKey(5), 20, num_samples=4)
    c = generate(params, CFG, [1, 2], jax.random.PRNGKey(6), 20, num_samples=4)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (4, 20) and a.min() >= 0 and a.max() < 11
    assert not np.array_equal(a, c)
    assert len({tuple(r) for r in a.tolist()}) > 1


def test_top_k_one_is_greedy(params):
    greedy = generate(params, CFG, [3], jax.random.PRNGKey(0), 10, temperature=0.0)
    top1 = generate(params, CFG, [3], jax.random.PRNGKey(1), 10, temperature=1.0, top_k=1)
    np.testing.assert_array_equal(greedy, top1)


def test_filters_keep_only_allowed_tokens():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    top2 = {int(sample_logits(logits, k, 1.0, top_k=2)[0]) for k in keys}
    assert top2 == {0, 1}
    nucleus = {int(sample_logits(logits, k, 1.0, top_p=0.7)[0]) for k in keys}
    assert nucleus == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    tiny_p = {int(sample_logits(logits, k, 1.0, top_p=0.1)[0]) for k in keys}
    assert tiny_p == {0}


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -1.0}, "temperature must be >= 0"),
    ({"top_k": 0}, r"top_k must be in \[1, 11\]"),
    ({"top_k": 12}, r"top_k must be in \[1, 11\]"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
])
def test_invalid_settings(params, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        generate(params, CFG, [1], jax.random.PRNGKey(0), 5, **kwargs)


def test_empty_prompt(params):
    with pytest.raises(ConfigError, match="prompt is empty"):
        generate(params, CFG, [], jax.random.PRNGKey(0), 5)
