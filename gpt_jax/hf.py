"""GPT-2 / Hugging Face weights in and out: ``load_pretrained``, ``pretrained_config``, ``save_pretrained``.

GPT-2 is the model our GPT already is with these options: learned positions, layer norm before each
sublayer (pre-norm), biases, the token embedding tied to the output layer, GELU with the tanh
approximation and layer-norm epsilon 1e-5 (Radford et al. 2019; Hugging Face ``GPT2LMHeadModel``). Its
weights map one to one onto our params pytree, names included: Hugging Face stores each linear layer
as a ``Conv1D`` whose weight is [in, out], which is the layout of a Flax ``Dense`` kernel, so nothing is
transposed::

    transformer.wte.weight            [V, D]      wte (padded to a multiple of 64 rows, model.py)
    transformer.wpe.weight            [P, D]      wpe (its first block_size rows)
    transformer.h.{i}.ln_1.weight     [D]         h_{i}/ln_1/scale   (.bias -> bias; ln_2, ln_f alike)
    transformer.h.{i}.attn.c_attn.*   [D, 3D]     h_{i}/attn/c_attn/kernel, bias  (q, k, v side by side)
    transformer.h.{i}.attn.c_proj.*   [D, D]      h_{i}/attn/c_proj
    transformer.h.{i}.mlp.c_fc.*      [D, 4D]     h_{i}/mlp/c_fc
    transformer.h.{i}.mlp.c_proj.*    [4D, D]     h_{i}/mlp/c_proj
    lm_head.weight                    [V, D]      lm_head/kernel, transposed (only when not tied)

A model folder is what ``save_pretrained`` writes: ``config.json`` and ``model.safetensors`` (or its
shards, or a ``pytorch_model.bin``, read here without PyTorch), with the tokenizer's ``vocab.json`` and
``merges.txt`` beside them. The GPT-2 names (``gpt2`` .. ``gpt2-xl``) are found in the Hugging Face cache,
or downloaded into it when there is a network.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import glob
import itertools
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from gpt_jax.config import FIELDS, INIT_FROM_RUNS, PRETRAINED_FIELDS, Config, expand, is_pretrained, validate
from gpt_jax.errors import ConfigError, TokenizerError
from gpt_jax.tokenizer import (
    EOT,
    GPT2_N_VOCAB,
    Gpt2Tokenizer,
    Tokenizer,
    byte_level_alphabet,
    tokenizer_from_json,
)

# The GPT-2 models by name, and their repositories on the Hugging Face hub.
GPT2_MODELS = {name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")}
_HUB_FILES = ["config.json", "model.safetensors", "vocab.json", "merges.txt"]
CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
# Our tokenizer's description, for vocabularies that GPT-2's tokenizer files cannot hold.
TOKENIZER_FILE = "gpt_jax_tokenizer.json"
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # GPT-2's GELU under its Hugging Face names
_LAYER_NORM_EPS = 1e-5  # model.py's layer norm
_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal masks some GPT-2 files carry; not weights


# ---------------------------------------------------------------------------------------------- folders


def model_dir(name_or_path: str) -> Path:
    """The local folder of ``name_or_path``: a folder holding ``config.json`` as given, or a GPT-2 name
    (``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``) from the Hugging Face cache
    (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``), downloaded there first
    when it is missing and there is a network (not with ``HF_HUB_OFFLINE=1``).

    Raises ConfigError, one line, for a path that is no model folder, or a name that is neither on disk
    nor downloadable (saying how to get it).
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise ConfigError(f"init_from must be a GPT-2 name or a folder, got {name_or_path!r}")
    name_or_path = os.fspath(name_or_path)
    path = expand(name_or_path)
    if path.is_dir():
        if not (path / CONFIG_FILE).is_file():
            raise ConfigError(f"{path} has no {CONFIG_FILE}: give a Hugging Face model folder (what "
                              "save_pretrained writes: config.json and model.safetensors)")
        return path.resolve()
    if name_or_path in GPT2_MODELS:
        return _hub_snapshot(name_or_path)
    if path.exists():
        raise ConfigError(f"init_from={name_or_path} is a file; give the folder that holds {CONFIG_FILE} and "
                          "the weights")
    close = difflib.get_close_matches(name_or_path, [*INIT_FROM_RUNS, *GPT2_MODELS], n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise ConfigError(f"init_from={name_or_path!r} is no folder and no GPT-2 name; {hint}give scratch, "
                      f"resume, auto, {', '.join(GPT2_MODELS)} or a Hugging Face model folder")


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, by Hugging Face's own rule (read at each call)."""
    if os.environ.get("HF_HUB_CACHE"):
        return expand(os.environ["HF_HUB_CACHE"])
    return expand(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _hub_snapshot(name: str) -> Path:
    """GPT-2 ``name``'s files from the hub cache (under its repository's name, or its old short one),
    else downloaded into it."""
    from huggingface_hub import snapshot_download

    cache = hub_cache_dir()
    for repo in (GPT2_MODELS[name], name):
        try:
            folder = Path(snapshot_download(repo, cache_dir=cache, allow_patterns=_HUB_FILES,
                                            local_files_only=True))
        except Exception:  # not in the cache (huggingface_hub raises several types for that)
            continue
        if (folder / CONFIG_FILE).is_file() and _weights_files(folder):
            return folder
    how = (f"on a machine with a network run `python -c \"from huggingface_hub import snapshot_download; "
           f"print(snapshot_download('{GPT2_MODELS[name]}', allow_patterns={_HUB_FILES}))\"`, copy the "
           f"folder it prints here and pass --init_from=FOLDER (or copy the cache into {cache})")
    if _offline():
        raise ConfigError(f"{name} is not in the Hugging Face cache {cache} and HF_HUB_OFFLINE is set; {how}")
    try:
        return Path(snapshot_download(GPT2_MODELS[name], cache_dir=cache, allow_patterns=_HUB_FILES))
    except Exception as e:  # no network, a proxy, a full disk ...
        raise ConfigError(f"{name} is not in the Hugging Face cache {cache} and cannot be downloaded "
                          f"({type(e).__name__}); {how}") from None


# --------------------------------------------------------------------------------------- configuration


def read_hf_config(directory: str | os.PathLike) -> dict[str, Any]:
    """Our architecture fields of the GPT-2 model in ``directory`` (from its ``config.json``), plus
    ``n_positions`` (the length of its position table).

    Raises ConfigError listing every option our GPT cannot reproduce (another ``model_type``, another
    activation or layer-norm epsilon, an MLP width other than 4 n_embd, other attention scaling).
    """
    path = Path(directory) / CONFIG_FILE
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{path} is not a JSON object")
    get = hf.get  # absent keys take GPT2Config's defaults, as transformers does
    sizes = {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024, "vocab_size": GPT2_N_VOCAB}
    sizes = {name: get(name, default) for name, default in sizes.items()}
    for name, value in sizes.items():
        if type(value) is not int or value <= 0:
            raise ConfigError(f"{path}: {name} must be a positive integer, got {value!r}")
    if type(get("tie_word_embeddings", True)) is not bool:
        raise ConfigError(f"{path}: tie_word_embeddings must be true or false, got "
                          f"{get('tie_word_embeddings')!r}")
    n_layer, n_head, n_embd, n_positions, vocab_size = sizes.values()
    problems = []
    if get("model_type") != "gpt2":
        problems.append(f"model_type is {get('model_type')!r}, not 'gpt2'")
    if get("activation_function", "gelu_new") not in _TANH_GELUS:
        problems.append(f"activation_function is {get('activation_function')!r}, not gelu_new (tanh GELU)")
    if get("layer_norm_epsilon", _LAYER_NORM_EPS) != _LAYER_NORM_EPS:
        problems.append(f"layer_norm_epsilon is {get('layer_norm_epsilon')}, not {_LAYER_NORM_EPS}")
    if get("n_inner") not in (None, 4 * n_embd):
        problems.append(f"n_inner is {get('n_inner')}, not 4 * n_embd")
    if not get("scale_attn_weights", True) or get("scale_attn_by_inverse_layer_idx", False):
        problems.append("attention is not scaled by 1/sqrt(head size) alone")
    if get("add_cross_attention", False):
        problems.append("it has cross-attention (an encoder-decoder model)")
    if problems:
        raise ConfigError(f"{directory} cannot be loaded as our GPT: {'; '.join(problems)}")
    return {"model": "gpt", "n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, "bias": True,
            "vocab_size": vocab_size, "pos_encoding": "learned", "norm_position": "pre",
            "tie_embeddings": bool(get("tie_word_embeddings", True)), "n_positions": n_positions}


def pretrained_config(cfg: Config) -> Config:
    """``cfg`` with the architecture of the weights ``cfg.init_from`` names (a GPT-2 name or a model
    folder): n_layer, n_head, n_embd, bias, vocab_size, tokenizer and the rest of ``PRETRAINED_FIELDS`` come
    from the weights; ``block_size`` (up to the weights' positions), ``dropout`` and everything else
    stay the run's. A config whose init_from is not pretrained is returned as it is.

    Raises ConfigError when ``cfg`` sets an architecture field to something other than the weights'
    (a value other than Config's default), or a block_size longer than the weights' position table.
    """
    if not is_pretrained(cfg.init_from):
        return cfg
    directory = model_dir(cfg.init_from)
    arch = read_hf_config(directory)
    n_positions = arch.pop("n_positions")
    tokenizer_fields = _tokenizer_fields(directory, arch["vocab_size"], cfg.encoding_file)
    arch.update(tokenizer_fields)
    conflicts = [f"{name}={getattr(cfg, name)!r} (its weights: {value!r})" for name, value in arch.items()
                 if name in PRETRAINED_FIELDS and getattr(cfg, name) not in (value, FIELDS[name].default)]
    if conflicts:
        raise ConfigError(f"init_from={cfg.init_from} fixes the model, but the config sets "
                          f"{', '.join(conflicts)}; drop those settings")
    if cfg.block_size > n_positions:
        raise ConfigError(f"block_size={cfg.block_size} is longer than the {n_positions} positions of "
                          f"init_from={cfg.init_from}; give --block_size={n_positions} or less")
    return validate(dataclasses.replace(cfg, **arch))


def _tokenizer_fields(directory: Path, vocab_size: int, encoding_file: str) -> dict[str, str]:
    """tokenizer (and encoding_file) of the weights in ``directory``: ours when the folder carries its
    description, else GPT-2's encoding from its ``vocab.json`` (or, with GPT-2's vocabulary size and no
    such file, tiktoken's or ``encoding_file``)."""
    if (directory / TOKENIZER_FILE).is_file():
        return {"tokenizer": _our_tokenizer(directory).kind}
    for name in ("vocab.json", "tokenizer.json"):  # the second is what transformers 5 saves alone
        if (directory / name).is_file():
            return {"tokenizer": "gpt2", "encoding_file": str(directory / name)}
    if vocab_size == GPT2_N_VOCAB:
        return {"tokenizer": "gpt2", "encoding_file": encoding_file}
    raise ConfigError(f"{directory} has no tokenizer files (vocab.json and merges.txt, or tokenizer.json) "
                      f"and its vocabulary ({vocab_size} ids) is not GPT-2's; save the tokenizer beside the "
                      "model (tokenizer.save_pretrained(FOLDER))")


def pretrained_tokenizer(cfg: Config) -> Tokenizer:
    """The tokenizer of a ``pretrained_config``: ours from the folder's description, else GPT-2's
    encoding. Raises TokenizerError when its size is not the model's vocab_size."""
    directory = model_dir(cfg.init_from)
    if (directory / TOKENIZER_FILE).is_file():
        tokenizer = _our_tokenizer(directory)
    else:
        tokenizer = Gpt2Tokenizer.load(cfg.encoding_file or None)
    if tokenizer.vocab_size != cfg.vocab_size:
        raise TokenizerError(f"the tokenizer of {directory} has {tokenizer.vocab_size} ids but the model has "
                             f"vocab_size {cfg.vocab_size}")
    return tokenizer


def check_data_tokenizer(cfg: Config, tokenizer: Tokenizer) -> None:
    """Raise ConfigError unless the data of a fine-tuning run is tokenised as the weights expect."""
    if tokenizer.to_json() != pretrained_tokenizer(cfg).to_json():
        raise ConfigError(f"the data is tokenised with {tokenizer!r}, not with the tokenizer of the weights "
                          f"of init_from={cfg.init_from}; fine-tune models with a GPT-2 vocabulary "
                          "(vocab.json and merges.txt), or continue a gpt_jax run with --init_from=resume")


def pretrained_params(cfg: Config) -> dict:
    """The params of ``cfg.init_from``'s weights for ``cfg`` (a ``pretrained_config``), in its layout
    (stacked when ``scan_layers``)."""
    from gpt_jax.model import stack_layers

    directory = model_dir(cfg.init_from)
    params = params_from_weights(read_weights(directory), cfg, read_hf_config(directory)["n_positions"])
    return stack_layers(params, cfg) if cfg.scan_layers else params


def _our_tokenizer(directory: Path) -> Tokenizer:
    """The tokenizer described by the folder's gpt_jax_tokenizer.json; ConfigError if it is broken."""
    try:
        return tokenizer_from_json(_read_json(directory / TOKENIZER_FILE))
    except TokenizerError as e:
        raise ConfigError(f"{directory / TOKENIZER_FILE}: {e}") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None


# --------------------------------------------------------------------------------------------- weights


def _weights_files(directory: Path) -> list[Path]:
    """The weight files of a model folder, in the order they are preferred."""
    if (directory / SAFETENSORS_FILE).is_file():
        return [directory / SAFETENSORS_FILE]
    if (directory / SAFETENSORS_INDEX).is_file():
        index = _read_json(directory / SAFETENSORS_INDEX)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise ConfigError(f"{directory / SAFETENSORS_INDEX} has no weight_map of array names to files")
        return [directory / shard for shard in sorted(set(weight_map.values()))]
    if (directory / TORCH_FILE).is_file():
        return [directory / TORCH_FILE]
    return []


def read_weights(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of the model folder ``directory`` by its Hugging Face name, as numpy arrays in their
    stored dtype: ``model.safetensors`` (or the shards its index names), else ``pytorch_model.bin``
    (PyTorch's zip format, read without PyTorch: only tensors, nothing is executed).

    Raises ConfigError for a folder without weights or a file that cannot be read.
    """
    directory = Path(directory)
    files = _weights_files(directory)
    if not files:
        raise ConfigError(f"{directory} has no weights ({SAFETENSORS_FILE}, {SAFETENSORS_INDEX} or "
                          f"{TORCH_FILE})")
    weights: dict[str, np.ndarray] = {}
    for path in files:
        try:
            if path.suffix == ".bin":
                weights.update(read_torch_file(path))
            else:
                from safetensors.numpy import load_file

                weights.update(load_file(path))
        except ConfigError:
            raise
        except Exception as e:  # safetensors and zipfile raise many types for damaged files
            raise ConfigError(f"cannot read the weights {path} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160] if str(e) else 'damaged'})") from None
    return weights


_TORCH_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
                 "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
                 "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_}


class _TorchUnpickler(pickle.Unpickler):
    """Reads the ``data.pkl`` of a ``torch.save`` zip into numpy arrays. Only the few names a saved
    state dict uses are allowed (PyTorch's serialisation format: tensors rebuilt from storages kept as
    separate files of the zip); anything else is refused, so no code in the file is ever run."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self.archive, self.prefix, self.storages = archive, prefix, {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            import collections

            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return self._rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, *args: data
        if module == "torch" and name in _TORCH_DTYPES:
            return _TORCH_DTYPES[name]
        if module == "torch" and name == "BFloat16Storage":
            import ml_dtypes

            return ml_dtypes.bfloat16
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a saved state dict")

    def persistent_load(self, saved_id: Any) -> np.ndarray:
        kind, dtype, key, _location, _numel = saved_id
        if kind != "storage":
            raise pickle.UnpicklingError(f"unknown storage reference {kind!r}")
        if key not in self.storages:
            data = self.archive.read(f"{self.prefix}/data/{key}")
            self.storages[key] = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<"))
        return self.storages[key]

    @staticmethod
    def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple, *args) -> np.ndarray:
        numbers = [offset, *size, *stride]
        if (not all(type(n) is int and n >= 0 for n in numbers) or len(size) != len(stride)
                or (all(size) and offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
                    >= storage.size)):
            raise pickle.UnpicklingError(f"a tensor of size {size} lies outside its storage")
        view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                               strides=tuple(s * storage.itemsize for s in stride))
        return np.array(view)


def read_torch_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a ``pytorch_model.bin`` (a state dict saved by ``torch.save`` in its zip format,
    PyTorch 1.6 and later) as numpy arrays, without PyTorch. Raises ConfigError for the older format."""
    if not zipfile.is_zipfile(path):
        raise ConfigError(f"{path} is in PyTorch's pre-1.6 format; convert it to safetensors (load it with "
                          "transformers and save_pretrained it again)")
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ConfigError(f"{path} is not a saved PyTorch state dict (no single data.pkl)")
        prefix = pickles[0].rsplit("/", 1)[0]
        with archive.open(pickles[0]) as f:
            state = _TorchUnpickler(f, archive, prefix).load()
    if not isinstance(state, dict):
        raise ConfigError(f"{path} holds a {type(state).__name__}, not a state dict")
    return dict(state)


def params_from_weights(weights: dict[str, np.ndarray], cfg: Config, n_positions: int) -> dict:
    """Our params pytree (float32 numpy, unrolled layers) from GPT-2 ``weights`` (``read_weights``) for
    ``cfg`` (a ``pretrained_config``) and the ``n_positions`` of its config.json: the embedding padded
    with zero rows to ``padded_vocab_size``, the position table cut to ``block_size``. Raises ConfigError
    naming a missing, unexpected or misshapen array."""
    from gpt_jax.model import padded_vocab_size

    named = {name.removeprefix("transformer."): w for name, w in weights.items()
             if not name.endswith(_BUFFERS)}
    D, V = cfg.n_embd, cfg.vocab_size

    def take(name: str, *shape: int) -> np.ndarray:
        if name not in named:
            raise ConfigError(f"the weights have no {name!r}: not a GPT-2 model of this config")
        array = named.pop(name)
        if tuple(array.shape) != shape:
            raise ConfigError(f"the weights' {name} has shape {tuple(array.shape)}, but config.json's sizes "
                              f"make it {shape}")
        return np.asarray(array, dtype=np.float32)

    def rows(table: np.ndarray) -> np.ndarray:  # the padded vocabulary
        return np.concatenate([table, np.zeros((padded_vocab_size(cfg) - V, D), np.float32)])

    def norm(name: str) -> dict:
        return {"scale": take(f"{name}.weight", D), "bias": take(f"{name}.bias", D)}

    def dense(name: str, n_in: int, n_out: int) -> dict:
        return {"kernel": take(f"{name}.weight", n_in, n_out), "bias": take(f"{name}.bias", n_out)}

    wte = take("wte.weight", V, D)
    params = {"wte": rows(wte), "wpe": take("wpe.weight", n_positions, D)[:cfg.block_size]}
    for i in range(cfg.n_layer):
        h = f"h.{i}"
        params[f"h_{i}"] = {
            "ln_1": norm(f"{h}.ln_1"), "ln_2": norm(f"{h}.ln_2"),
            "attn": {"c_attn": dense(f"{h}.attn.c_attn", D, 3 * D),
                     "c_proj": dense(f"{h}.attn.c_proj", D, D)},
            "mlp": {"c_fc": dense(f"{h}.mlp.c_fc", D, 4 * D), "c_proj": dense(f"{h}.mlp.c_proj", 4 * D, D)}}
    params["ln_f"] = norm("ln_f")
    if not cfg.tie_embeddings:
        if "lm_head.weight" not in named:
            raise ConfigError("the weights have no 'lm_head.weight', but config.json unties it "
                              "(tie_word_embeddings is false)")
        params["lm_head"] = {"kernel": rows(take("lm_head.weight", V, D)).T.copy()}
    elif "lm_head.weight" in named and not np.array_equal(take("lm_head.weight", V, D), wte):
        raise ConfigError("the weights' lm_head.weight differs from wte, but config.json ties them "
                          "(tie_word_embeddings is true); set it to false")
    if named:
        raise ConfigError(f"the weights hold arrays a GPT-2 of {cfg.n_layer} layers has not: "
                          f"{', '.join(sorted(named)[:5])}")
    return params


def _check_params(params: dict, cfg: Config) -> None:
    """ConfigError unless ``params`` (either layout) has the arrays and shapes ``cfg``'s model has."""
    import jax

    from gpt_jax.model import init_params

    expected = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    got = jax.tree_util.tree_map(np.shape, params)
    want = jax.tree_util.tree_map(lambda x: x.shape, expected)
    if got != want:
        raise ConfigError(f"the params do not fit the config ({cfg.n_layer} layers, n_embd {cfg.n_embd}, "
                          f"vocab_size {cfg.vocab_size}, scan_layers {cfg.scan_layers}): give the config "
                          "they were made with")


def weights_from_params(params: dict, cfg: Config) -> dict[str, np.ndarray]:
    """GPT-2 weights by Hugging Face name (float32 numpy) from our params for ``cfg`` — the inverse of
    ``params_from_weights``. Without biases (``bias=False``) the biases are zeros, which computes the same
    function. The tied output layer is left out, as ``save_pretrained`` does."""
    from gpt_jax.model import unstack_layers

    params = unstack_layers(params, cfg)
    D, V = cfg.n_embd, cfg.vocab_size

    def array(x: Any) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(x, dtype=np.float32))

    def norm(p: dict) -> tuple[np.ndarray, np.ndarray]:
        return array(p["scale"]), array(p["bias"]) if "bias" in p else np.zeros(D, np.float32)

    def dense(p: dict) -> tuple[np.ndarray, np.ndarray]:
        kernel = array(p["kernel"])
        return kernel, array(p["bias"]) if "bias" in p else np.zeros(kernel.shape[1], np.float32)

    weights = {"transformer.wte.weight": array(params["wte"])[:V],
               "transformer.wpe.weight": array(params["wpe"])}
    for i in range(cfg.n_layer):
        layer, h = params[f"h_{i}"], f"transformer.h.{i}"
        pairs = {"ln_1": norm(layer["ln_1"]), "ln_2": norm(layer["ln_2"]),
                 "attn.c_attn": dense(layer["attn"]["c_attn"]), "attn.c_proj": dense(layer["attn"]["c_proj"]),
                 "mlp.c_fc": dense(layer["mlp"]["c_fc"]), "mlp.c_proj": dense(layer["mlp"]["c_proj"])}
        for name, (weight, bias) in pairs.items():
            weights[f"{h}.{name}.weight"], weights[f"{h}.{name}.bias"] = weight, bias
    weights["transformer.ln_f.weight"], weights["transformer.ln_f.bias"] = norm(params["ln_f"])
    if not cfg.tie_embeddings:
        weights["lm_head.weight"] = array(params["lm_head"]["kernel"])[:, :V].T.copy()
    return weights


# ------------------------------------------------------------------------------------------ public API


def load_pretrained(name_or_path: str, *, block_size: int | None = None, dropout: float = 0.0,
                    encoding_file: str = "") -> tuple[dict, Config, Tokenizer]:
    """(params, config, tokenizer) of GPT-2 weights — the notebook entry point, like the first three
    results of ``load_checkpoint``.

    ``name_or_path``: ``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl`` (from the Hugging Face
    cache, downloaded when missing and online) or a Hugging Face model folder (``model_dir``).
    ``block_size``: the context length (default: all the weights' positions, 1024 for GPT-2);
    ``encoding_file``: GPT-2's ranks for a folder without ``vocab.json`` on a machine without tiktoken's
    copy. Params are float32 arrays on the default device, unrolled layers.

    Raises ConfigError (a missing model, options our GPT cannot reproduce, damaged weights) or
    TokenizerError, one line each.
    """
    import jax

    if block_size is not None and (type(block_size) is not int or block_size <= 0):
        raise ConfigError(f"block_size must be a positive integer, got {block_size!r}")
    directory = model_dir(name_or_path)
    n_positions = read_hf_config(directory)["n_positions"]
    cfg = pretrained_config(Config(init_from=str(name_or_path), block_size=block_size or n_positions,
                                   dropout=dropout, encoding_file=encoding_file))
    tokenizer = pretrained_tokenizer(cfg)
    params = params_from_weights(read_weights(directory), cfg, n_positions)
    return jax.device_put(params), cfg, tokenizer


def export_problems(cfg: Config) -> list[str]:
    """Why ``cfg``'s model has no GPT-2 form (empty when it has one)."""
    problems = []
    if cfg.model != "gpt":
        problems.append(f"model={cfg.model} (GPT-2 is a transformer)")
    if cfg.pos_encoding != "learned":
        problems.append(f"pos_encoding={cfg.pos_encoding} (GPT-2 learns its positions)")
    if cfg.norm_position != "pre":
        problems.append(f"norm_position={cfg.norm_position} (GPT-2 normalises before each sublayer)")
    return problems


def hf_config(cfg: Config, tokenizer: Tokenizer) -> dict[str, Any]:
    """The ``config.json`` of ``cfg``'s model as a Hugging Face ``GPT2Config``."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": _LAYER_NORM_EPS,
            "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
            "initializer_range": 0.02, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "tie_word_embeddings": cfg.tie_embeddings,
            "bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id, "use_cache": True,
            "dtype": "float32"}


def save_pretrained(params: dict, cfg: Config, tokenizer: Tokenizer, dest: str | os.PathLike,
                    format: str | None = None) -> Path:
    """Write the model to ``dest`` and return its path.

    ``format="hf"``: a Hugging Face GPT-2 model folder (``config.json``, ``model.safetensors``, and the
    tokenizer: ``vocab.json``/``merges.txt`` for GPT-2's, ``tokenizer.json`` for a trained BPE, and always
    our own description), which ``transformers.GPT2LMHeadModel.from_pretrained(dest)`` loads and
    ``load_pretrained(dest)`` reads back. ``format="npz"``: our params (unrolled, the embedding with its
    padding rows) in one ``.npz``, keyed by their path (``h_0/attn/c_attn/kernel``). ``None``: npz when
    ``dest`` ends in ``.npz``, else hf. Written beside ``dest`` and renamed into place, so a failure
    leaves nothing half-written (and the leftovers of a killed export are removed by the next one).

    Raises ConfigError when ``dest`` exists or cannot be written, when the params do not fit ``cfg``,
    or (``hf``) listing why the model has no GPT-2 form.
    """
    from gpt_jax.model import unstack_layers

    if not isinstance(dest, (str, os.PathLike)):
        raise ConfigError(f"the destination must be a path, got {dest!r}")
    dest = expand(os.fspath(dest))
    format = format or ("npz" if dest.suffix == ".npz" else "hf")
    if format not in ("hf", "npz"):
        raise ConfigError(f"format must be hf or npz, got {format!r}")
    if format == "hf" and dest.suffix == ".npz":
        raise ConfigError(f"{dest} names an .npz file, but the format is hf (a folder); use format npz")
    if dest.exists() or dest.is_symlink():
        raise ConfigError(f"{dest} already exists; choose another destination or remove it first")
    problems = export_problems(cfg) if format == "hf" else []
    if problems:
        raise ConfigError(f"this model has no GPT-2 form: {'; '.join(problems)}; export it with --format=npz")
    _check_params(params, cfg)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, no permission, a name too long
        raise ConfigError(f"cannot write {dest}: {e.strerror or e}; choose another destination") from None
    try:
        _remove_stale_temporaries(dest)
        tmp = dest.with_name(f".{dest.name}{_TMP_MARK}{os.getpid()}")
        try:
            if format == "npz":
                import jax

                flat = jax.tree_util.tree_leaves_with_path(unstack_layers(params, cfg))
                arrays = {"/".join(k.key for k in path): np.asarray(x, np.float32) for path, x in flat}
                with open(tmp, "wb") as f:
                    np.savez(f, **arrays)
                os.link(tmp, dest)  # fails, rather than replaces, when dest appeared meanwhile
            else:
                _write_hf_folder(tmp, params, cfg, tokenizer)
                os.rename(tmp, dest)
        finally:
            _remove(tmp)
    except FileExistsError:
        raise ConfigError(f"{dest} already exists; choose another destination or remove it first") from None
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise ConfigError(f"{dest} already exists; choose another destination or remove it first") \
                from None
        raise ConfigError(f"cannot write {dest}: {e.strerror or e}; choose another destination") from None
    return dest


_TMP_MARK = ".tmp-"  # an export in progress: .<dest name>.tmp-<pid> beside its destination


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _remove_stale_temporaries(dest: Path) -> None:
    """Remove what exports to ``dest`` killed before they finished left beside it (their process is gone)."""
    for leftover in dest.parent.glob(f".{glob.escape(dest.name)}{_TMP_MARK}*"):
        pid = leftover.name.rsplit(_TMP_MARK, 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            _remove(leftover)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_hf_folder(folder: Path, params: dict, cfg: Config, tokenizer: Tokenizer) -> None:
    from safetensors.numpy import save_file

    folder.mkdir()
    _write_json(folder / CONFIG_FILE, hf_config(cfg, tokenizer))
    save_file(weights_from_params(params, cfg), folder / SAFETENSORS_FILE, metadata={"format": "pt"})
    shutil.copymode(folder / CONFIG_FILE, folder / SAFETENSORS_FILE)  # safetensors writes it owner-only
    _write_json(folder / TOKENIZER_FILE, tokenizer.to_json())
    if tokenizer.kind == "gpt2":
        _write_gpt2_tokenizer(folder, tokenizer, cfg.block_size)
    elif tokenizer.kind == "bpe":
        (folder / "tokenizer.json").write_text(tokenizer.to_json()["tokenizer"], encoding="utf-8")
        _write_json(folder / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.block_size,
            "bos_token": EOT, "eos_token": EOT, "unk_token": EOT})


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_gpt2_tokenizer(folder: Path, tokenizer: Gpt2Tokenizer, block_size: int) -> None:
    """``vocab.json`` and ``merges.txt`` (GPT-2's byte-level files) of a tiktoken encoding, and the
    ``tokenizer_config.json`` that makes transformers' ``AutoTokenizer`` a GPT-2 tokenizer."""
    ranks = tokenizer.ranks()
    to_char = {b: c for c, b in byte_level_alphabet().items()}
    spell = lambda token: "".join(to_char[b] for b in token)  # noqa: E731
    vocab = {spell(token): rank for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])}
    vocab[EOT] = tokenizer.eot_id
    _write_json(folder / "vocab.json", vocab)
    merges = [f"{spell(a)} {spell(b)}" for a, b in recover_merges(ranks)]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": block_size, "add_prefix_space": False,
        "bos_token": EOT, "eos_token": EOT, "unk_token": EOT})


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merges, in order, of ranks where each token's rank is its merge's: a token splits into
    the two parts that byte-pair encoding with only the lower ranks leaves (how GPT-2's ``merges.txt``
    and tiktoken's ranks describe the same encoding)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            found = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(itertools.pairwise(parts))]
            best, i = min(found)
            if best >= rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise TokenizerError(f"token {token!r} (rank {rank}) is no merge of two lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges
