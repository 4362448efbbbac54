"""analysis.py: attention weights, per-token log-probabilities and text scores, each against a
reference written out here from the parameters alone."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax import CharTokenizer, attention_weights, logits_fn, loss_fn, score_text, token_logprobs
from gpt_jax.config import make_config
from gpt_jax.errors import ConfigError, DataError, TokenizerError
from gpt_jax.model import init_params, stack_layers

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"


def small(**overrides):
    tok = CharTokenizer.from_text(TEXT)
    return make_config(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=16, block_size=8,
                       dropout=0.0, **overrides), tok


def reference_forward(params, cfg, tokens_BxT):
    """GPT-2's forward pass written out from the parameters: (logits [B, T, V], weights [L, B, H, T, T])."""
    B, T = tokens_BxT.shape
    H, D = cfg.n_head, cfg.n_embd
    K = D // H

    def layer_norm(x, p):
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-5) * p["scale"] + p.get("bias", 0.0)

    def dense(x, p):
        return x @ p["kernel"] + p.get("bias", 0.0)

    p = jax.tree_util.tree_map(np.asarray, params)
    x = p["wte"][tokens_BxT] + p["wpe"][:T]
    all_weights = []
    for i in range(cfg.n_layer):
        layer = p[f"h_{i}"]
        q, k, v = np.split(dense(layer_norm(x, layer["ln_1"]), layer["attn"]["c_attn"]), 3, axis=-1)
        q, k, v = (a.reshape(B, T, H, K).transpose(0, 2, 1, 3) for a in (q, k, v))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(K)
        scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        all_weights.append(weights)
        y = (weights @ v).transpose(0, 2, 1, 3).reshape(B, T, D)
        x = x + dense(y, layer["attn"]["c_proj"])
        h = dense(layer_norm(x, layer["ln_2"]), layer["mlp"]["c_fc"])
        h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))
        x = x + dense(h, layer["mlp"]["c_proj"])
    x = layer_norm(x, p["ln_f"])
    return x @ p["wte"].T, np.stack(all_weights)


def sharpened(bias: bool):
    cfg, tok = small(bias=bias)
    params = init_params(cfg, jax.random.PRNGKey(0))
    # Untrained weights attend almost uniformly: sharpen them so the check has something to see.
    params = jax.tree_util.tree_map(lambda x: x * 8 if x.ndim == 2 else x, params)
    return params, cfg, tok


@pytest.fixture(scope="module")
def model():
    return sharpened(bias=True)  # the written-out reference reads biases too


@pytest.mark.parametrize("bias", [False, True])
def test_attention_weights_are_the_layers_own_softmax(bias):
    params, cfg, tok = sharpened(bias)
    tokens_BxT = np.stack([tok.encode(TEXT[:8]), tok.encode(TEXT[8:16])])
    weights = np.asarray(attention_weights(params, cfg, tokens_BxT))
    ref_logits, ref_weights = reference_forward(params, cfg, tokens_BxT)
    assert weights.shape == (2, 2, 2, 8, 8) and weights.dtype == np.float32
    np.testing.assert_allclose(weights, ref_weights, atol=2e-5)
    np.testing.assert_allclose(logits_fn(params, cfg, tokens_BxT), ref_logits, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
    assert np.all(weights[..., np.triu_indices(8, 1)[0], np.triu_indices(8, 1)[1]] == 0)  # causal
    assert weights.std() > 0.05  # not uniform: the reference was compared on real structure


@pytest.mark.parametrize("how", [{"scan_layers": True}, {"dtype": "bfloat16"}, {"remat": True}])
def test_attention_weights_whatever_the_layout_or_dtype(model, how):
    params, cfg, tok = model
    other = make_config(**{**cfg.__dict__, **how})
    other_params = stack_layers(params, other) if other.scan_layers else params
    tokens = tok.encode(TEXT[:8])
    np.testing.assert_allclose(attention_weights(other_params, other, tokens),
                               attention_weights(params, cfg, tokens), atol=1e-6)


def test_attention_weights_refuses_what_has_no_attention_or_too_many_tokens(model):
    params, cfg, tok = model
    with pytest.raises(ConfigError, match=r"shape \[T\] or \[B, T\] with 1 <= T <= 8, got shape \(9,\)"):
        attention_weights(params, cfg, tok.encode(TEXT[:9]))
    bigram = make_config(model="bigram", vocab_size=cfg.vocab_size, block_size=8)
    with pytest.raises(ConfigError, match="bigram model has no attention"):
        attention_weights(init_params(bigram, jax.random.PRNGKey(0)), bigram, tok.encode("To"))


def test_token_logprobs_are_each_next_tokens_log_probability(model):
    params, cfg, tok = model
    tokens_BxT = np.stack([tok.encode(TEXT[:9]), tok.encode(TEXT[9:18])])  # T = block_size + 1
    out = np.asarray(token_logprobs(params, cfg, tokens_BxT))
    ref_logits, _ = reference_forward(params, cfg, tokens_BxT[:, :-1])
    ref_logp = ref_logits - np.log(np.exp(ref_logits - ref_logits.max(-1, keepdims=True)).sum(-1,
                                   keepdims=True)) - ref_logits.max(-1, keepdims=True)
    expected = np.take_along_axis(ref_logp, tokens_BxT[:, 1:, None], -1)[..., 0]
    assert out.shape == (2, 8)
    np.testing.assert_allclose(out, expected, atol=1e-4)
    loss = loss_fn(params, cfg, jnp.asarray(tokens_BxT[:, :-1]), jnp.asarray(tokens_BxT[:, 1:]))
    np.testing.assert_allclose(-out.mean(), loss, rtol=1e-5)
    with pytest.raises(ConfigError, match="with 2 <= T <= 9, got shape"):
        token_logprobs(params, cfg, tok.encode("T"))


@pytest.mark.parametrize("tokens, problem", [
    ([1, 2, 99], r"token ids must be in \[0, \d+\), got 1..99"),
    ([1, 2, -1], r"token ids must be in \[0, \d+\), got -1..2"),
    ([1.5, 2.0, 3.0], "must hold integer token ids"),
    ([[1, 2], [3]], "takes token ids"),
])
def test_ids_outside_the_vocabulary_are_refused_not_read_as_garbage(model, tokens, problem):
    params, cfg, _ = model
    for look in (attention_weights, token_logprobs):
        with pytest.raises(ConfigError, match=problem):
            look(params, cfg, tokens)


@pytest.mark.parametrize("length", [2, 9, 10, 30, 8 * 70 + 3])  # one window, exactly full, one more, ...
def test_score_text_predicts_every_token_but_the_first_once(model, length):
    params, cfg, tok = model
    text = (TEXT * 8)[:length]  # windows of 9 tokens overlapping by one; the last may be short
    tokens = tok.encode(text)
    total = 0.0
    for i in range(1, len(tokens)):  # brute force: token i from the start of its window
        start = (i - 1) // cfg.block_size * cfg.block_size
        logits = reference_forward(params, cfg, tokens[None, start:i])[0][0, -1].astype(np.float64)
        total -= logits[tokens[i]] - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    score = score_text(params, cfg, tok, text)
    n = length - 1
    assert (score.tokens, score.chars) == (n, n)
    assert score.loss == pytest.approx(total / n, rel=1e-5)
    assert score.bits_per_char == pytest.approx(total / n / math.log(2), rel=1e-5)
    assert score.perplexity == pytest.approx(math.exp(total / n), rel=1e-5)


def test_a_model_that_rules_the_text_out_has_infinite_perplexity(model):
    params, cfg, tok = model
    blown_up = {**params, "wte": params["wte"] * 1000}  # logits in the thousands: exp(loss) overflows
    score = score_text(blown_up, cfg, tok, TEXT[:20])
    assert score.loss > 709 and score.perplexity == math.inf


def test_score_text_of_many_windows_and_bad_texts(model):
    params, cfg, tok = model
    long_text = TEXT * 12  # more windows than one padded batch holds
    per_copy = score_text(params, cfg, tok, long_text)
    assert per_copy.tokens == len(long_text) - 1
    assert 0 < per_copy.bits_per_char < math.log2(cfg.vocab_size) * 3
    with pytest.raises(DataError, match="at least 2 tokens"):
        score_text(params, cfg, tok, "T")
    with pytest.raises(TokenizerError):
        score_text(params, cfg, tok, "Zebra ξ")
    with pytest.raises(DataError, match="as a str, got bytes"):
        score_text(params, cfg, tok, TEXT.encode())
    bigger = CharTokenizer.from_text(TEXT + "~")  # another model's vocabulary: "~" is past this one's
    with pytest.raises(ConfigError, match="token ids must be in"):
        score_text(params, cfg, bigger, "to be ~")
