"""The user errors of gpt_jax: one base class, so a command line can catch them all.

Each message says what is wrong and how to fix it, on one line. Anything else is a bug.
"""


class GptJaxError(Exception):
    """A problem with the user's input: a config value, a dataset, a checkpoint, a prompt."""


class ConfigError(GptJaxError):
    """An unknown config key or an impossible value."""


class DataError(GptJaxError):
    """A dataset that is missing, empty, too short or not UTF-8 text."""


class TokenizerError(GptJaxError):
    """Text that the vocabulary cannot encode."""


class CheckpointError(GptJaxError):
    """A checkpoint directory that is missing or holds no usable step."""


class NoCheckpointError(CheckpointError):
    """An output directory with no checkpoint step at all (as opposed to damaged ones)."""


class IncompatibleCheckpointError(CheckpointError):
    """A readable checkpoint that a new run cannot continue (the model or the vocabulary differs)."""


class RunLockedError(CheckpointError):
    """An output directory in use by another training run."""


class NonFiniteLossError(GptJaxError):
    """A training or evaluation loss that became NaN or infinite (a learning rate too high, say)."""


class NonFiniteModelError(GptJaxError):
    """A model whose parameters or outputs are NaN or infinite (a damaged checkpoint, a diverged run)."""


class GenerationTooLargeError(ConfigError):
    """A generation request (max_new_tokens x samples) that cannot fit in memory."""


class MissingDependencyError(GptJaxError):
    """An optional extra (e.g. ``notebooks`` for plots) is not installed; the message names it."""
