"""Finding a run's saved LoRA checkpoints and reading their factors lazily.

A trajectory folder holds one PEFT adapter per saved step (``adapter_config.json`` plus
``adapter_model.safetensors`` or ``.bin``), directly or nested the way trainers lay them out (TRL
``checkpoint-120``, verl ``global_step_120/actor/lora_adapter``, OpenRLHF ``global_step120_hf``, ``step_120``,
``120``). verl's ``latest_checkpointed_iteration.txt`` marks its last complete save; later folders are partial
saves and are skipped, as is a PPO critic's ``global_step_120/critic/lora_adapter`` beside the actor's. Only
headers are read up front (safetensors' lazy ``safe_open``); factors are read on demand, straight into the
passes' stacks where stored in the stacks' dtype (``tensorfile``), else through ``safe_open`` (``.bin`` files
with ``torch.load(weights_only=True)``), in any float dtype, upcast when used.

``find_folders``, ``step_folders``, ``step_from_path`` and ``latest_iteration`` are shared with full-weight
checkpoint discovery.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors import safe_open

from nextrap.core.errors import NextrapError, NextrapWarning, first_line, one_line, os_error, os_problem
from nextrap.io.files import is_marked_output
from nextrap.io.tensorfile import FLOAT_DTYPES, ST_DTYPES, TensorFile

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
_STEP_PATTERNS = [
    re.compile(r"^checkpoint-(\d+)$"),
    re.compile(r"^global_step_?(\d+)(?:_hf)?$"),
    re.compile(r"^step[_-]?(\d+)$"),
    re.compile(r"^(\d+)$"),
]
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B)(?:\.(?P<adapter>[^.]+))?\.weight$")
_FSDP_WRAPPER = "_fsdp_wrapped_module."  # FSDP1's wrapper segment; verl strips it, older exports may keep it
_MAX_DEPTH = 4
LATEST_ITERATION = "latest_checkpointed_iteration.txt"  # verl's tracker of its last complete checkpoint


@dataclass(frozen=True)
class Checkpoint:
    """One saved step: the adapter folder and the weights file inside it."""

    step: int
    path: Path
    weights: Path


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted linear: delta = scale * B @ A, B [out_features, rank], A [rank, in_features]."""

    name: str  # PEFT module path, e.g. base_model.model.model.layers.0.self_attn.q_proj
    out_features: int
    in_features: int
    rank: int
    scale: float
    fan_in_fan_out: bool

    @property
    def base_key(self) -> str:
        """The weight's name in the base model's state dict."""
        return relative_name(self.name) + ".weight"


def relative_name(name: str) -> str:
    """A PEFT module path without PEFT's ``base_model.model.`` prefix: the name inside the base model."""
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


@dataclass
class LoraTrajectory:
    """A run's LoRA checkpoints sorted by step, all with the same modules, shapes, ranks and scales."""

    root: Path
    checkpoints: list[Checkpoint]
    modules: list[LoraModule]
    config: dict[str, Any]
    extra_keys: list[str] = field(default_factory=list)  # non-LoRA tensors (modules_to_save), copied as they are
    _keys: dict[str, tuple[str, str]] = field(default_factory=dict, repr=False)  # module -> (A key, B key)
    budget: int | None = None  # --max-memory in bytes, for the streamed passes started from inside methods (relex, next)
    device: str = "cpu"
    peak: int = 0  # the highest memory a streamed pass over it accounted (``lorastream``), for the manifest

    @property
    def steps(self) -> list[int]:
        return [c.step for c in self.checkpoints]

    def module(self, name: str) -> LoraModule:
        if not hasattr(self, "_by_name"):
            self._by_name = {m.name: m for m in self.modules}
        return self._by_name[name]

    def lora_keys(self, name: str) -> tuple[str, str]:
        """The (lora_A, lora_B) tensor names of module ``name`` in the weights files."""
        return self._keys[name]

    def scales(self, names: Sequence[str]) -> torch.Tensor:
        """Each module's LoRA scaling s (delta = s * B @ A), float64 [len(names)]."""
        return torch.tensor([self.module(n).scale for n in names], dtype=torch.float64)

    def factors(self, index: int, names: Sequence[str], dtype: torch.dtype = torch.float64,
                pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """B [n, out, r] and A [n, r, in] of checkpoint ``index`` for modules ``names`` (all of one shape), read
        tensor by tensor into the two stacks (in pinned memory when ``pin``): only those modules' bytes are read."""
        ckpt = self.checkpoints[index]
        first = self.module(names[0])
        b = torch.empty(len(names), first.out_features, first.rank, dtype=dtype, pin_memory=pin)
        a = torch.empty(len(names), first.rank, first.in_features, dtype=dtype, pin_memory=pin)
        keys = [key for name in names for key in self._keys[name]]
        # stored as the stacks are: read into them (``tensorfile``; safetensors' bytes are little-endian)
        direct = ckpt.weights.suffix == ".safetensors" and sys.byteorder == "little"
        with TensorFile(ckpt.weights) if direct else contextlib.nullcontext() as tf:
            if tf is not None and all(tf.stored(k) == dtype for k in keys):
                for j, name in enumerate(names):
                    a_key, b_key = self._keys[name]
                    tf.read_into(b_key, b[j])
                    tf.read_into(a_key, a[j])
            else:
                with open_weights(ckpt.weights) as f:
                    for j, name in enumerate(names):
                        a_key, b_key = self._keys[name]
                        b[j].copy_(read_tensor(f, ckpt.weights, b_key))
                        a[j].copy_(read_tensor(f, ckpt.weights, a_key))
        if not (all_finite(a) and all_finite(b)):
            raise NextrapError(f"{ckpt.weights}: LoRA factors contain NaN or Inf")
        return b, a

    def tensor_info(self, index: int, keys: Sequence[str]) -> dict[str, tuple[list[int], str]]:
        """(shape, safetensors dtype name) of tensors ``keys`` of checkpoint ``index``, from the header alone."""
        ckpt = self.checkpoints[index]
        with open_weights(ckpt.weights) as f:
            out = {}
            for k in keys:
                sl = f.get_slice(k)
                out[k] = (tensor_shape(f, k), sl.get_dtype() if hasattr(sl, "get_dtype") else ST_DTYPES[sl.dtype])
            return out

    def read_extra(self, index: int, keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """The non-LoRA tensors of checkpoint ``index`` (e.g. modules_to_save; all, or ``keys``), unchanged."""
        ckpt = self.checkpoints[index]
        with open_weights(ckpt.weights) as f:
            return {k: read_tensor(f, ckpt.weights, k) for k in (self.extra_keys if keys is None else keys)}


class _TorchFile:
    """The part of safe_open's interface nextrap uses, over a .bin state dict read with weights_only=True."""

    def __init__(self, path: Path):
        # weights_only refuses any pickled object but tensors and plain containers: a .bin is never executed.
        # mmap needs the zip format torch.save writes since 1.6; older (legacy) files are read whole.
        try:
            self._sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except OSError as e:
            if e.filename is not None:  # the file itself could not be opened: permission, missing
                raise os_error(e) from None
            # a read inside the file failed (a truncated legacy-format file gives EINVAL): name the file
            raise NextrapError(f"{path}: not a readable torch file, truncated or corrupt? ({os_problem(e.errno, e.strerror or '')})") from None
        except Exception as e:  # noqa: BLE001 - any failure to unpickle safely is the same user-facing problem
            raise NextrapError(f"{path}: {_unpickling_problem(e)}") from None
        if not isinstance(self._sd, dict):
            raise NextrapError(f"{path}: holds a {type(self._sd).__name__}, not a state dict of tensors")
        bad = next((k for k, v in self._sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
        if bad is not None:
            raise NextrapError(f"{path}: entry {bad!r} is a {type(self._sd[bad]).__name__}, not a tensor")

    def keys(self) -> list[str]:
        return list(self._sd)

    def get_tensor(self, key: str) -> torch.Tensor:
        return self._sd[key]

    def get_slice(self, key: str):  # shape access only
        return self._sd[key]

    def metadata(self) -> dict[str, str] | None:
        return None

    def __enter__(self) -> "_TorchFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self._sd = {}


def _unpickling_problem(e: Exception) -> str:
    """torch.load's refusal in one line: which pickled object was refused (its message spans lines, with ANSI
    codes and advice to load unsafely, which nextrap never does)."""
    text = one_line(e)
    refused = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
    if refused:
        return (f"refused: it pickles {refused.group(1)}, which a weights-only load never runs or builds "
                "(nothing was executed); save the adapter as safetensors")
    return f"cannot read as a weights-only torch file ({text})"


def open_weights(path: Path):
    """Open a safetensors (lazily) or .bin (weights_only) file; corrupt files become a one-line NextrapError."""
    if path.suffix == ".bin":
        return _TorchFile(path)
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for corrupt files
        try:  # safetensors words every failure to open as its own error: ask the OS what it was
            with open(path, "rb"):
                pass
        except OSError as os_e:
            raise os_error(os_e) from None
        raise NextrapError(f"{path}: not a readable safetensors file ({first_line(e)})") from None


def tensor_shape(f: Any, key: str) -> list[int]:
    sl = f.get_slice(key)
    return list(sl.get_shape()) if hasattr(sl, "get_shape") else list(sl.shape)


def is_float(f: Any, key: str) -> bool:
    """Whether tensor ``key`` is stored as floats (from the header alone for safetensors)."""
    sl = f.get_slice(key)
    return sl.get_dtype() in FLOAT_DTYPES if hasattr(sl, "get_dtype") else sl.is_floating_point()


def read_tensor(f: Any, path: Path, key: str) -> torch.Tensor:
    """``f.get_tensor(key)`` with a one-line error naming the file."""
    try:
        return f.get_tensor(key)
    except Exception as e:  # noqa: BLE001
        raise NextrapError(f"{path}: cannot read tensor {key} ({first_line(e)})") from None


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN or Inf: its min and max in one pass (both propagate NaN), with no temporary as
    large as ``t`` (a float64 sum converts a float32 or bf16 ``t`` to a float64 copy first: measured 2x its bytes)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


def step_from_path(path: Path, root: Path) -> int | None:
    """The step encoded in the folder names between ``root`` and ``path`` (innermost first), else the nearest
    trainer_state.json strictly below ``root``: the one at the run root (HF Trainer's ``save_state``) holds the
    run's last step, not that of a folder beside the checkpoints (a ``final/`` save)."""
    rel = path.relative_to(root)
    for part in reversed(rel.parts):
        for pattern in _STEP_PATTERNS:
            m = pattern.match(part)
            if m:
                return int(m.group(1))
    for folder in [path, *path.parents]:
        if folder == root:
            break
        state = folder / "trainer_state.json"
        if state.is_file():
            try:
                return int(json.loads(state.read_text())["global_step"])
            except (ValueError, KeyError, TypeError, json.JSONDecodeError):
                raise NextrapError(f"{state}: no integer global_step") from None
    return None


def latest_iteration(root: Path | str) -> int | None:
    """The step in verl's ``root/latest_checkpointed_iteration.txt``; None when there is no such file.

    verl writes the file only once every part of a checkpoint is saved, so a ``global_step_N`` past it is a
    partial save (a crash or a save still running) and must not be read.
    """
    path = Path(root) / LATEST_ITERATION
    if not path.is_file():
        return None
    try:
        text = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise NextrapError(f"{path}: cannot read ({first_line(e)})") from None
    if not re.fullmatch(r"\d+", text, re.ASCII):
        raise NextrapError(f"{path}: {text[:40]!r} is not a step number (verl writes the last saved global step)")
    return int(text)


def find_folders(root: Path, is_checkpoint: Callable[[Path], bool]) -> list[Path]:
    """Folders below ``root`` (up to 4 levels, not hidden ones, not inside a match) for which ``is_checkpoint``.

    ``root`` itself is never returned: a trainer's final save in its output folder (TRL's ``save_model``
    beside ``checkpoint-N``) has no step of its own.
    """
    out: list[Path] = []
    for child in _subfolders(root):
        out.extend(_find(child, is_checkpoint, 1))
    return out


def _subfolders(folder: Path) -> list[Path]:
    """The folders in ``folder`` (not hidden ones), sorted; an unreadable folder is named as such."""
    if not os.access(folder, os.R_OK | os.X_OK):
        raise NextrapError(f"{folder}: permission denied (cannot list it)")
    return [child for child in sorted(folder.iterdir()) if child.is_dir() and not child.name.startswith(".")]


def _find(folder: Path, is_checkpoint: Callable[[Path], bool], depth: int) -> list[Path]:
    if not os.access(folder, os.R_OK | os.X_OK):
        raise NextrapError(f"{folder}: permission denied (cannot list it)")
    if is_marked_output(folder):
        return []  # nextrap's own output (a fit, a jumped adapter) is never one of the run's checkpoints
    if is_checkpoint(folder):
        return [folder]
    if depth >= _MAX_DEPTH:
        return []
    return [f for child in _subfolders(folder) for f in _find(child, is_checkpoint, depth + 1)]


def step_folders(root: Path, folders: Sequence[Path]) -> list[tuple[int, Path]]:
    """(step, folder) of each checkpoint folder under ``root``, sorted by step, without verl's partial saves nor
    the critic's saves beside the actor's (PPO).

    A folder whose step cannot be told beside folders whose steps can (a ``final/`` or ``best/`` save) is skipped
    with a warning. Errors name the folder: no step told at all, a step saved twice, uneven spacing, and a
    ``latest_checkpointed_iteration.txt`` whose step is not among the folders.
    """
    found: list[tuple[int, Path]] = []
    unknown: list[Path] = []
    for folder in folders:
        step = step_from_path(folder, root)
        if step is None:
            unknown.append(folder)
        else:
            found.append((step, folder))
    if unknown:
        how = "name it checkpoint-N, global_step_N, step_N or N, or add trainer_state.json"
        if not found:
            raise NextrapError(f"{unknown[0]}: cannot tell its step ({how})")
        warnings.warn(f"{unknown[0]}{f' and {len(unknown) - 1} more' if len(unknown) > 1 else ''}: cannot tell "
                      f"the step; skipped ({how} to include it)", NextrapWarning, stacklevel=2)
    found = _without_critics(root, found)
    latest = latest_iteration(root)
    if latest is not None:
        found = [(step, folder) for step, folder in found if step <= latest]
        if latest not in {step for step, _ in found}:
            raise NextrapError(f"{root / LATEST_ITERATION}: names step {latest}, but {root} has no checkpoint of step {latest}")
    found.sort(key=lambda sf: sf[0])
    for (prev, prev_folder), (cur, folder) in zip(found, found[1:]):
        if prev == cur:
            raise NextrapError(f"{folder}: step {cur} also found at {prev_folder}")
    gaps = [b - a for (a, _), (b, _) in zip(found, found[1:])]
    if len(gaps) >= 2 and set(gaps[:-1]) == {gaps[0]} and gaps[-1] < gaps[0]:
        # a trainer's final save at max_steps, which is not a multiple of its save interval (TRL's save_steps)
        step, folder = found.pop()
        gaps.pop()
        warnings.warn(f"{folder}: step {step} is off the {gaps[0]}-step grid (a final save at the last step); "
                      "skipped", NextrapWarning, stacklevel=2)
    for i, gap in enumerate(gaps):
        # horizons count checkpoints and methods extrapolate per checkpoint: the spacing must be even
        if gap != gaps[0]:
            step, folder = found[i + 1]
            raise NextrapError(f"{folder}: step {step} breaks the even spacing of {gaps[0]} steps "
                               f"(after step {found[i][0]}); move it out of {root}")
    return found


def _without_critics(root: Path, found: list[tuple[int, Path]]) -> list[tuple[int, Path]]:
    """``found`` without the critic's checkpoints that sit beside the actor's of the same step (verl's PPO with a
    LoRA critic saves ``global_step_N/critic/lora_adapter`` beside ``actor/lora_adapter``): the policy is the actor."""
    actors = {(step, twin) for step, folder in found if (twin := _role_free(folder, root, "actor")) is not None}
    critics = {folder for step, folder in found if (step, _role_free(folder, root, "critic")) in actors}
    if not critics:
        return found
    warnings.warn(f"{min(critics)}: the critic's checkpoints ({len(critics)}, each beside the actor's of its step) "
                  "are ignored; reading the actor's", NextrapWarning, stacklevel=3)
    return [(step, folder) for step, folder in found if folder not in critics]


def _role_free(folder: Path, root: Path, role: str) -> tuple[str, ...] | None:
    """``folder``'s path below ``root`` with its one ``role`` component (actor or critic) blanked; None without one."""
    parts = folder.relative_to(root).parts
    if parts.count(role) != 1:
        return None
    return tuple("" if p == role else p for p in parts)


def require_checkpoints(root: Path, folders: Sequence[Path], horizon: int) -> None:
    """Refuse a trajectory too short for ``horizon`` (one training pair needs horizon + 1 checkpoints)."""
    if len(folders) <= horizon:
        raise NextrapError(f"{root}: {len(folders)} checkpoints, but horizon {horizon} needs at least {horizon + 1} "
                           f"(one training pair){save_limit_hint(folders)}")


def save_limit_hint(folders: Sequence[Path]) -> str:
    """Why a Hugging Face Trainer's (TRL's) run may have too few checkpoints: it deletes all but the last
    ``save_total_limit`` of its ``checkpoint-N`` folders."""
    if any(re.match(r"^checkpoint-\d+$", Path(f).name) for f in folders):
        return ("; the Trainer keeps only its last save_total_limit checkpoints: set save_total_limit=None (or at "
                "least the checkpoints you need) in its arguments")
    return ""


def is_adapter(folder: Path) -> bool:
    """Whether ``folder`` holds a PEFT adapter (its config; the weights are checked once the step is known)."""
    return (folder / ADAPTER_CONFIG).is_file()


def _has_adapter_files(folder: Path) -> bool:
    """A PEFT adapter's config or weights: a folder with only one of them is a broken save, not a non-checkpoint."""
    return is_adapter(folder) or any((folder / w).is_file() for w in ADAPTER_WEIGHTS)


def discover(root: Path | str) -> list[Checkpoint]:
    """All adapter folders under ``root`` with their steps, sorted by step."""
    root = Path(root)
    if not root.is_dir():
        raise NextrapError(f"{root}: not a folder")
    folders = find_folders(root, _has_adapter_files)
    for folder in folders:
        if not is_adapter(folder):
            weights = next(w for w in ADAPTER_WEIGHTS if (folder / w).is_file())
            raise NextrapError(f"{folder}: has {weights} but no {ADAPTER_CONFIG} (an incomplete save?); "
                               "restore the config or move the folder out")
    if not folders:
        if is_adapter(root):
            raise NextrapError(f"{root}: is a single adapter; pass the folder that holds one adapter per saved step")
        raise NextrapError(f"{root}: no PEFT adapters found (folders with adapter_config.json)")
    checkpoints = []
    for step, folder in step_folders(root, folders):  # partial saves are dropped before their files are checked
        weights = next((folder / w for w in ADAPTER_WEIGHTS if (folder / w).is_file()), None)
        if weights is None:
            raise NextrapError(f"{folder}: has adapter_config.json but no adapter_model.safetensors")
        checkpoints.append(Checkpoint(step=step, path=folder, weights=weights))
    return checkpoints


# PEFT LoRA variants whose model is not W_0 + s * B @ A: config key -> the variant's name
_VARIANTS = {"use_dora": "DoRA", "lora_bias": "LoRA bias", "alora_invocation_tokens": "aLoRA (activated LoRA)",
             "use_qalora": "QALoRA", "use_bdlora": "BD-LoRA (block-diagonal)", "kasa_config": "KaSA",
             "velora_config": "VeLoRA", "monteclora_config": "MonteCLoRA", "arrow_config": "Arrow",
             "target_parameters": "parameter-targeting", "layer_replication": "layer-replicating"}
# init_lora_weights values that leave the base weight W_0 as it is: PEFT's default (B = 0), random A and B,
# Gaussian, EVA (data-driven A, B = 0), orthogonal (B @ A = 0 by construction) and MiCA (B from W_0's minor
# singular vectors, A = 0): training moves only s * B @ A
_PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica")
# inits that rewrite W_0 to W_0 - s * B_0 @ A_0 (PEFT's conversion to plain LoRA handles these), by prefix
_REWRITING_INITS = {"pissa": "PiSSA", "olora": "OLoRA", "corda": "CorDA", "lora_ga": "LoRA-GA"}


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except OSError as e:
        raise os_error(e) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise NextrapError(f"{path / ADAPTER_CONFIG}: not valid JSON ({first_line(e)})") from None
    if not isinstance(config, dict):
        raise NextrapError(f"{path / ADAPTER_CONFIG}: not a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise NextrapError(f"{path / ADAPTER_CONFIG}: adapter type {peft_type} is not supported (only LoRA)")
    for flag, what in _VARIANTS.items():
        if _enables(config.get(flag)):  # JSON keys only: older PEFT versions write none of the newer ones
            raise NextrapError(f"{path / ADAPTER_CONFIG}: {what} adapters are not supported ({flag} is set; "
                               "their update is not W_0 + s * B @ A)")
    _check_init(path / ADAPTER_CONFIG, config.get("init_lora_weights", True))
    return config


def _enables(value: Any) -> bool:
    """Whether a variant's config value turns it on: PEFT makes any sub-config dict, even ``{}``, into the
    variant's config, so only null, false and ``[]`` leave it off."""
    return value is not None and value is not False and value != []


def _check_init(config_path: Path, init: Any) -> None:
    """Refuse an init_lora_weights that changes the base weight: the checkpoints then hold the update relative to
    a base the user does not have, and every output would silently miss -s * B_0 @ A_0."""
    if init is None or isinstance(init, bool) or (isinstance(init, str) and init.lower() in _PLAIN_INITS):
        return
    name = str(init).lower()
    what = next((v for k, v in _REWRITING_INITS.items() if name.startswith(k)), None)
    if what is not None:
        raise NextrapError(f"{config_path}: init_lora_weights = {init!r} ({what}) rewrites the base weight, so the "
                           "model is not W_0 + s * B @ A; convert each checkpoint to plain LoRA first with PEFT's "
                           "save_pretrained(..., path_initial_model_for_weight_conversion=<the adapter saved at init>)")
    if name.startswith("loftq"):
        raise NextrapError(f"{config_path}: init_lora_weights = {init!r} (LoftQ) replaces the base weight with a "
                           "quantized one, so the model is not W_0 + s * B @ A; LoftQ adapters are not supported")
    raise NextrapError(f"{config_path}: init_lora_weights = {init!r} is not an initialization nextrap knows leaves "
                       f"the base weight unchanged (true, false, {', '.join(_PLAIN_INITS)}); refusing to guess")


def _pattern_value(patterns: dict[str, Any] | None, relative_name: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a dotted suffix of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", relative_name):
            return value
    return default


def module_scale(config: dict[str, Any], name: str, rank: int) -> float:
    """PEFT's scaling for module ``name``: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
    alpha = float(_pattern_value(config.get("alpha_pattern"), relative_name(name), config.get("lora_alpha", 8)))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _read_modules(ckpt: Checkpoint, config: dict[str, Any]) -> tuple[list[LoraModule], list[str], dict[str, tuple[str, str]]]:
    with open_weights(ckpt.weights) as f:
        keys = list(f.keys())
        shapes = {k: tensor_shape(f, k) for k in keys}
        floats = {k: is_float(f, k) for k in keys}
    parts: dict[str, dict[str, str]] = {}
    extra: list[str] = []
    for key in keys:
        if ".lora_embedding_" in key or ".lora_magnitude_vector" in key:
            raise NextrapError(f"{ckpt.weights}: {key}: embedding LoRA and DoRA tensors are not supported")
        m = _LORA_KEY.match(key)
        if m:
            parts.setdefault(m["module"].replace(_FSDP_WRAPPER, ""), {})[m["part"]] = key
        else:
            extra.append(key)
    modules: list[LoraModule] = []
    keymap: dict[str, tuple[str, str]] = {}
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    for name in sorted(parts):
        if set(parts[name]) != {"A", "B"}:
            raise NextrapError(f"{ckpt.weights}: module {name} has lora_{next(iter(parts[name]))} but not its pair")
        for part in ("A", "B"):
            if not floats[parts[name][part]]:
                raise NextrapError(f"{ckpt.weights}: {parts[name][part]} is not stored as floats; LoRA factors must be float")
        a_shape, b_shape = shapes[parts[name]["A"]], shapes[parts[name]["B"]]
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
            raise NextrapError(f"{ckpt.weights}: module {name} has LoRA shapes A {a_shape}, B {b_shape}; only linear LoRA is supported")
        rank = a_shape[0]
        modules.append(LoraModule(name, b_shape[0], a_shape[1], rank, module_scale(config, name, rank), fan_in_fan_out))
        keymap[name] = (parts[name]["A"], parts[name]["B"])
    if not modules:
        raise NextrapError(f"{ckpt.weights}: no LoRA tensors (keys like ...lora_A.weight)")
    return modules, sorted(extra), keymap


_CONFIG_FIELDS = ("r", "lora_alpha", "use_rslora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "base_model_name_or_path")


def load_trajectory(root: Path | str) -> LoraTrajectory:
    """Discover and validate a LoRA trajectory; raises NextrapError naming the first file that disagrees."""
    checkpoints = discover(root)
    first = checkpoints[0]
    config = _read_config(first.path)
    modules, extra, keymap = _read_modules(first, config)
    for ckpt in checkpoints[1:]:
        cfg = _read_config(ckpt.path)
        for key in _CONFIG_FIELDS:
            if key == "base_model_name_or_path":
                continue  # trainers write local paths that differ between machines; not a math property
            if cfg.get(key) != config.get(key):
                raise NextrapError(f"{ckpt.path / ADAPTER_CONFIG}: {key} = {cfg.get(key)!r}, but {first.path} has {config.get(key)!r}")
        mods, ext, keys = _read_modules(ckpt, cfg)
        if [m.name for m in mods] != [m.name for m in modules]:
            missing = sorted({m.name for m in modules} ^ {m.name for m in mods})
            raise NextrapError(f"{ckpt.weights}: LoRA modules differ from {first.weights} (e.g. {missing[0]})")
        for m, ref in zip(mods, modules):
            if m != ref:
                raise NextrapError(
                    f"{ckpt.weights}: module {m.name} has shape {m.out_features}x{m.in_features}, rank {m.rank}, "
                    f"scale {m.scale:g}, but {first.weights} has {ref.out_features}x{ref.in_features}, rank {ref.rank}, scale {ref.scale:g}"
                )
        if ext != extra:
            raise NextrapError(f"{ckpt.weights}: non-LoRA tensors differ from {first.weights}")
        if keys != keymap:
            raise NextrapError(f"{ckpt.weights}: names its LoRA tensors differently from {first.weights}")
    return LoraTrajectory(Path(root), checkpoints, modules, config, extra, keymap)


def shape_groups(modules: Sequence[LoraModule]) -> dict[tuple[int, int, int], list[str]]:
    """Modules grouped by (out, in, rank), the unit of batched math."""
    groups: dict[tuple[int, int, int], list[str]] = {}
    for m in modules:
        groups.setdefault((m.out_features, m.in_features, m.rank), []).append(m.name)
    return groups
