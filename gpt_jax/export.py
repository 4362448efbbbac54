"""Export a trained model: ``python -m gpt_jax.export --out_dir=DIR --to=DEST [--format=hf|npz]``.

``hf`` (the default) writes a Hugging Face GPT-2 model folder that ``transformers`` loads with
``GPT2LMHeadModel.from_pretrained(DEST)`` (and ``--init_from=DEST`` reads back); a model with no GPT-2
form (post-norm, sinusoidal positions, the bigram) is refused with the reasons. ``npz`` writes the params
as one ``.npz`` of arrays keyed by their path. Exit codes: 0 written, 2 a problem said in one line.
"""

from __future__ import annotations

import sys

from gpt_jax import cli

_PROG = "python -m gpt_jax.export"


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(prog=_PROG, allow_abbrev=False,
                           description="Write a checkpoint of train.py as a Hugging Face GPT-2 model "
                                       "folder or an .npz of its arrays.")
    p.add_argument("--out_dir", required=True, help="the training run's out_dir (required)")
    p.add_argument("--to", required=True, help="the folder (hf) or file (npz) to write; must not exist")
    p.add_argument("--format", choices=("hf", "npz"), default=None,
                   help="hf: config.json, model.safetensors and tokenizer files; npz: the params "
                        "(default: npz when --to ends in .npz, else hf)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest good one)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from gpt_jax.checkpoint import load_checkpoint
    from gpt_jax.hf import save_pretrained

    params, cfg, tokenizer, meta = load_checkpoint(args.out_dir, args.step)
    dest = save_pretrained(params, cfg, tokenizer, args.to, args.format)
    step = meta["metrics"].get("step", "?")
    folder = dest.is_dir()
    what = "a Hugging Face GPT-2 model folder" if folder else "an .npz of the params"
    print(f"wrote {what} of {args.out_dir} (step {step}, {tokenizer.kind} tokenizer) to {dest}",
          file=sys.stderr)
    if folder and tokenizer.kind in ("char", "byte"):
        print(f"note: transformers has no tokenizer for a {tokenizer.kind} vocabulary; encode text with "
              f"gpt_jax (gpt_jax.load_pretrained('{dest}') returns it)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli.run(main, _PROG)
