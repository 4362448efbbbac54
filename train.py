"""Train a model: ``python train.py [configs/NAME.py] [--key=value ...]`` (nanoGPT's names).

With no config file, the preset is ``shakespeare_char`` on an accelerator and
``shakespeare_char_cpu`` without one; with pretrained weights (``--init_from=gpt2``, another GPT-2 name
or a Hugging Face model folder) it is ``finetune_shakespeare``. ``--help`` lists every key with its default.

Exit codes: 0 done, or stopped by SIGTERM after saving a checkpoint; 130 stopped by Ctrl-C (the first
saves a checkpoint, a second exits at once); 2 a problem with the input, said in one line.
"""

from __future__ import annotations

import logging

from gpt_jax import cli
from gpt_jax.config import default_preset, is_pretrained, make_config

_DESCRIPTION = "Train a bigram or GPT language model, or fine-tune GPT-2."
FINETUNE_PRESET = "finetune_shakespeare"  # the default preset of --init_from=gpt2 (or a model folder)


def main(argv: list[str]) -> int:
    # A failed checkpoint write is reported as this program's error line; orbax's background threads
    # would also log it, with tracebacks, on the way out.
    for name in ("absl", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    preset, args = cli.parse_config_args("train.py", _DESCRIPTION, argv, default_preset)
    cfg = make_config(preset, **args) if preset else None
    # The multi-process runtime must start before anything touches a JAX backend.
    from gpt_jax.sharding import initialize_distributed, is_primary

    initialize_distributed(cfg.distributed if cfg else args.get("distributed", False))
    say = print if is_primary() else (lambda *a: None)
    if cfg is None:
        import jax

        if is_pretrained(args.get("init_from", "scratch")):
            preset, why = FINETUNE_PRESET, "default with pretrained weights"
        else:
            preset, why = default_preset(), f"default on {jax.default_backend()}"
        say(f"config: {preset} ({why}; pass a config file to choose)")
        cfg = make_config(preset, **args)
    else:
        say(f"config: {preset}")

    from gpt_jax.training import train

    result = train(cfg, exit_on_second_interrupt=True)
    if result.stopped:  # SIGTERM or a first Ctrl-C: a checkpoint of this step was saved
        return cli.EXIT_INTERRUPTED if result.stopped == "interrupt" else 0
    done = f"done: step {int(result.state.step)}, best val loss {result.best_val_loss:.4f}"
    if result.checkpoint_step is not None:
        say(f"{done}, newest checkpoint step {result.checkpoint_step} in {result.config.out_dir}")
    else:
        say(f"{done}; no checkpoint was saved (the validation loss never improved on step 0's; pass "
            "--always_save_checkpoint=True to save at every evaluation)")
    return 0


if __name__ == "__main__":
    cli.run(main, "train.py")
