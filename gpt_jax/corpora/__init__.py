"""Corpora shipped with gpt_jax, so that a first run and the tests need no network.

- ``tinyshakespeare.txt``: Tiny Shakespeare, the char-rnn ``input.txt`` (public-domain text by William
  Shakespeare, collected by Andrej Karpathy for char-rnn); 1,115,394 bytes, sha256 86c4e6aa9db7....
"""
