import dataclasses
import json
import math

import jax
import numpy as np
import pytest

from gpt_jax import model
from gpt_jax.checkpoint import Checkpointer, load_checkpoint
from gpt_jax.errors import CheckpointError
from gpt_jax.training import train


def test_loss_falls(tiny_cfg):
    result = train(dataclasses.replace(tiny_cfg, max_iters=60, lr_decay_iters=60, eval_interval=30,
                                       eval_iters=4))
    evals = [r for r in result.history if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 30, 60]
    assert evals[0]["val_loss"] == pytest.approx(math.log(65), abs=0.15)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.6


def test_metrics_file(tiny_cfg):
    result = train(tiny_cfg)
    lines = [json.loads(line) for line in (tiny_cfg_out(tiny_cfg) / "metrics.jsonl").read_text().splitlines()]
    assert lines == result.history
    for record in lines:
        assert {"step", "lr", "elapsed_s"} <= set(record)
    evals = [r for r in lines if "val_loss" in r]
    logs = [r for r in lines if "batch_loss" in r]
    # One meaning per key: batch_loss is a step's batch, train_loss / val_loss are estimates.
    assert [r["step"] for r in evals] == [0, 10, 20] and all("train_loss" in r for r in evals)
    assert [r["step"] for r in logs] == [5, 10, 15, 20]
    assert not any("train_loss" in r for r in lines if "val_loss" not in r)
    assert all(r["tokens_per_sec"] > 0 for r in logs if r["step"] > 5)
    assert all(r["tokens_per_sec"] > 0 for r in lines if r["step"] > 5)


def tiny_cfg_out(cfg):
    from gpt_jax.config import expand

    return expand(cfg.out_dir)


def test_checkpoints_follow_validation(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, keep_checkpoints=5, always_save_checkpoint=True)
    train(cfg)
    with Checkpointer(cfg.out_dir, read_only=True) as ckpt:
        assert ckpt.steps() == [10, 20]
    meta = load_checkpoint(cfg.out_dir, step=20)[3]
    assert meta["config"]["n_layer"] == 2 and meta["config"]["vocab_size"] == 65
    assert meta["tokenizer"]["kind"] == "char" and len(meta["tokenizer"]["chars"]) == 65
    assert meta["metrics"]["step"] == 20 and "val_loss" in meta["metrics"]
    assert set(meta["versions"]) >= {"jax", "flax", "optax", "orbax-checkpoint"}


def test_only_improvements_are_saved_and_old_steps_pruned(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg, max_iters=40, keep_checkpoints=2)
    result = train(cfg)
    saved = [r["step"] for r in result.history if r.get("checkpoint")]
    vals = {r["step"]: r["val_loss"] for r in result.history if "val_loss" in r}
    best = math.inf
    for step in (10, 20, 30, 40):
        assert (step in saved) == (vals[step] < best)
        best = min(best, vals[step])
    with Checkpointer(cfg.out_dir, read_only=True) as ckpt:
        assert ckpt.steps() == saved[-2:]


def test_resume_gives_the_same_parameters(tiny_cfg, tmp_path):
    """N steps straight equal N/2 steps, a restart from the checkpoint, and N/2 more: bitwise."""
    base = dataclasses.replace(tiny_cfg, dropout=0.1, max_iters=20, lr_decay_iters=20, eval_interval=5,
                               always_save_checkpoint=True)
    straight = train(dataclasses.replace(base, out_dir=str(tmp_path / "straight")))
    half = dataclasses.replace(base, out_dir=str(tmp_path / "halves"), max_iters=10)
    train(half)
    resumed = train(dataclasses.replace(half, max_iters=20, init_from="resume"))
    assert int(resumed.state.step) == 20
    for a, b in zip(jax.tree_util.tree_leaves(straight.state), jax.tree_util.tree_leaves(resumed.state),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    assert without_timings(straight.history) == without_timings(resumed.history)


def without_timings(records):
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "tokens_per_sec")} for r in records]


def test_scratch_run_refuses_a_directory_with_checkpoints(tiny_cfg):
    train(tiny_cfg)
    with pytest.raises(CheckpointError, match="already holds checkpoints .* --init_from=resume"):
        train(tiny_cfg)


def test_resume_without_checkpoints_is_a_clear_error(tiny_cfg):
    with pytest.raises(CheckpointError, match="init_from=resume, but .* holds no checkpoint; .*=auto"):
        train(dataclasses.replace(tiny_cfg, init_from="resume"))
    assert not tiny_cfg_out(tiny_cfg).exists()  # nothing was created


@pytest.mark.parametrize("change", [
    {"gradient_accumulation_steps": 4, "batch_size": 1},  # 4 micro-batches of 1 = one batch of 4
    {"scan_layers": True, "remat": True},
])
def test_accumulation_scan_and_remat_train_like_the_plain_step(tiny_cfg, shakespeare, tmp_path, change):
    """Same data, same updates: the final parameters agree to float32 rounding."""
    steps = dict(max_iters=6, eval_interval=6, log_interval=2)
    plain = train(dataclasses.replace(tiny_cfg, **steps, out_dir=str(tmp_path / "plain")), shakespeare)
    other_cfg = dataclasses.replace(tiny_cfg, **steps, **change, out_dir=str(tmp_path / "other"))
    other = train(other_cfg, shakespeare)
    other_params = model.unstack_layers(other.state.params, other.config)
    for a, b in zip(jax.tree_util.tree_leaves(plain.state.params), jax.tree_util.tree_leaves(other_params),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    assert [r["step"] for r in other.history] == [r["step"] for r in plain.history]
    same_eval = other_cfg.batch_size == tiny_cfg.batch_size  # evaluation batches are batch_size rows
    for r, s in zip(plain.history, other.history, strict=True):
        if "batch_loss" in r:
            assert abs(r["batch_loss"] - s["batch_loss"]) < 1e-5
        if "val_loss" in r and same_eval:
            assert abs(r["val_loss"] - s["val_loss"]) < 1e-5



def test_auto_starts_fresh_without_a_checkpoint_and_resumes_with_one(tiny_cfg):
    """A run killed before its first checkpoint left only metrics: auto starts it again, resume says
    what to do; once a checkpoint exists, auto continues it."""
    out = tiny_cfg_out(tiny_cfg)
    out.mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 0, "val_loss": 4.2}\n')
    with pytest.raises(CheckpointError, match="holds no checkpoint; train first, or pass --init_from=auto"):
        train(dataclasses.replace(tiny_cfg, init_from="resume"))
    logged = []
    first = train(dataclasses.replace(tiny_cfg, init_from="auto"), log=logged.append)
    assert logged[0].startswith("no checkpoint in ") and int(first.state.step) == 20
    again = train(dataclasses.replace(tiny_cfg, init_from="auto", max_iters=30), log=logged.append)
    assert "resuming from step 20" in " ".join(logged) and int(again.state.step) == 30


def test_elapsed_time_continues_across_a_resume_and_max_iters_reached_is_said(tiny_cfg):
    first = train(dataclasses.replace(tiny_cfg, always_save_checkpoint=True))
    logged = []
    second = train(dataclasses.replace(tiny_cfg, init_from="resume", max_iters=30), log=logged.append)
    before = first.history[-1]["elapsed_s"]
    assert all(r["elapsed_s"] > before for r in second.history if r["step"] > 20)
    done = []
    third = train(dataclasses.replace(tiny_cfg, init_from="resume", max_iters=30), log=done.append)
    assert int(third.state.step) == 30
    assert any("step 30 already reached max_iters=30: nothing to train; pass a larger --max_iters" in m
               for m in done)


def test_a_torn_last_metrics_line_does_not_block_a_resume(tiny_cfg):
    train(dataclasses.replace(tiny_cfg, always_save_checkpoint=True))
    path = tiny_cfg_out(tiny_cfg) / "metrics.jsonl"
    with path.open("ab") as f:
        f.write(b'{"step": 21, "batch_lo' + b"\0" * 40)  # a crash in the middle of a write
    with pytest.warns(UserWarning, match=r"metrics.jsonl line \d+ is damaged"):
        result = train(dataclasses.replace(tiny_cfg, init_from="resume", max_iters=30))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in lines if "val_loss" in r] == [0, 10, 20, 30] and lines == result.history


def test_an_unwritable_metrics_file_is_a_one_line_error(tiny_cfg):
    (tiny_cfg_out(tiny_cfg) / "metrics.jsonl").mkdir(parents=True)  # stands in for a read-only file
    with pytest.raises(CheckpointError, match=r"cannot write .*metrics.jsonl \(Is a directory\); make it "
                                              "writable or choose another --out_dir"):
        train(tiny_cfg)


def test_a_stop_signal_during_the_last_evaluation_leaves_a_checkpoint(tiny_cfg):
    """The validation loss never improves (learning rate 0), so no evaluation saves; SIGTERM arriving
    while the final evaluation runs must still leave a checkpoint of that step."""
    import os
    import signal

    cfg = dataclasses.replace(tiny_cfg, learning_rate=0.0, min_lr=0.0)

    def log(message):
        if message.startswith(f"step {cfg.max_iters}:"):
            os.kill(os.getpid(), signal.SIGTERM)

    result = train(cfg, log=log)
    assert result.stopped == "SIGTERM" and result.checkpoint_step == cfg.max_iters
    assert load_checkpoint(cfg.out_dir)[3]["metrics"]["stopped"] == "SIGTERM"


def test_a_run_that_never_improves_reports_no_checkpoint(tiny_cfg):
    result = train(dataclasses.replace(tiny_cfg, learning_rate=0.0, min_lr=0.0))
    assert result.checkpoint_step is None and not (tiny_cfg_out(tiny_cfg) / "checkpoints" / "10").exists()


def test_nan_before_any_checkpoint_says_there_is_nothing_to_resume(tiny_cfg):
    from gpt_jax.errors import NonFiniteLossError

    cfg = dataclasses.replace(tiny_cfg, learning_rate=1e30, min_lr=1e30, warmup_iters=0, grad_clip=0.0)
    with pytest.raises(NonFiniteLossError, match="before any checkpoint was saved, so there is nothing to "
                                                 "resume. Lower --learning_rate .* and train again"):
        train(cfg)


def test_signals_keep_their_default_action_while_the_state_is_built(tiny_cfg, monkeypatch):
    """On the command line nothing is worth saving before the first step, and a Python handler cannot
    run while the process waits in a compiler or an allocator: SIGTERM and Ctrl-C must kill."""
    import signal

    from gpt_jax import training

    seen = []
    real = training.init_state

    def spy(cfg, mesh=None):
        seen.append((signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)))
        return real(cfg, mesh)

    monkeypatch.setattr(training, "init_state", spy)
    train(tiny_cfg, exit_on_second_interrupt=True)
    assert seen == [(signal.SIG_DFL, signal.SIG_DFL)]
