"""Config helpers shared by every config file and entry point.

Config files follow big_vision: ``get_config(arg)`` where ``arg`` is a comma-separated preset
string such as ``"data=cifar10,model=resnet18,runlocal"``. This module parses that string, applies
``KEY=VALUE`` overrides to a loaded config with type checking, and turns config mistakes into a
:class:`ConfigError` that names the key and the fix before anything compiles.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections


class ConfigError(ValueError):
    """A config key is unknown, ill-typed or out of range."""


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses a preset string ``"k1=v1,k2,..."`` against typed defaults.

    A bare word ``k`` means ``k=True``. Values take the type of their default; a key without a
    default is an error listing the known presets.

    Example: ``parse_arg("data=cifar10,runlocal", data="digits", model="", runlocal=False)``.
    """
    result = ml_collections.ConfigDict(dict(defaults))
    for item in filter(None, (part.strip() for part in (arg or "").split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ConfigError(
                f"unknown preset {key!r} in config argument {arg!r}; "
                f"known presets: {', '.join(sorted(defaults))}"
            )
        default = defaults[key]
        if not sep:
            if not isinstance(default, bool):
                raise ConfigError(f"preset {key!r} needs a value: write {key}=VALUE")
            result[key] = True
        else:
            result[key] = _coerce(value.strip(), default, key)
    return result


def _coerce(text: str, default: Any, key: str) -> Any:
    """Converts the string ``text`` to the type of ``default``."""
    if isinstance(default, str):
        return text
    if isinstance(default, bool):
        lowered = text.lower()
        if lowered in ("1", "true", "yes"):
            return True
        if lowered in ("0", "false", "no"):
            return False
        raise ConfigError(f"{key}={text!r}: expected true or false")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if default is None:
        return value
    if isinstance(default, float) and isinstance(value, int):
        value = float(value)
    if isinstance(default, tuple) and isinstance(value, list):
        value = tuple(value)
    if not isinstance(value, type(default)):
        raise ConfigError(
            f"{key}={text!r}: expected a value of type {type(default).__name__} "
            f"(like {default!r})"
        )
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> None:
    """Applies ``"a.b.c=value"`` overrides in place, refusing unknown keys and wrong types."""
    for item in overrides:
        path, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} must look like --config.KEY=VALUE")
        *parents, leaf = path.split(".")
        node = config
        for i, part in enumerate(parents):
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise ConfigError(f"unknown config key {'.'.join(parents[: i + 1])!r} in {item!r}")
            node = node[part]
        if leaf not in node:
            raise ConfigError(
                f"unknown config key {path!r}; known keys here: {', '.join(sorted(node.keys()))}"
            )
        with node.unlocked():
            node[leaf] = _coerce(text, node[leaf], path)


def split_config_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separates ``--config.KEY=VALUE`` arguments from the others (for jobs whose config is loaded
    from a workdir after flag parsing). Returns ``(other_argv, ["KEY=VALUE", ...])``."""
    others, overrides = [], []
    args = iter(argv)
    for arg in args:
        if arg.startswith("--config."):
            body = arg[len("--config.") :]
            if "=" not in body:
                body = f"{body}={next(args, '')}"
            overrides.append(body)
        else:
            others.append(arg)
    return others, overrides


def to_json(config: ml_collections.ConfigDict) -> str:
    """Serialises a config so that :func:`from_json` gives it back (tuples included)."""
    return json.dumps(_encode(config.to_dict()), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
    """Inverse of :func:`to_json`; the result is locked (new keys are errors)."""
    config = ml_collections.ConfigDict(_decode(json.loads(text)))
    config.lock()
    return config


def _encode(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, Mapping):
        if set(value) == {"__tuple__"}:
            return tuple(_decode(v) for v in value["__tuple__"])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def require(condition: bool, key: str, message: str) -> None:
    """Raises :class:`ConfigError` naming ``key`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"config.{key}: {message}")


# --- Runs saved before a key existed ------------------------------------------------------------

# (key path, the value a run saved before the key existed behaves as, the commit that added the
# key). ``upgrade_run_config`` adds each missing key whose parent block exists; readers of a run's
# config then need no ``.get(key, default)`` fallback. Add a row with every new key that a saved
# config.json may lack.
RUN_CONFIG_UPGRADES: tuple[tuple[str, Any, str], ...] = (
    ("data.prefetch", 2, "ff88ddf 2026-11-23 (first trainer)"),
    ("eval.attention_images", 4, "2533e86 2026-11-23"),
    ("optim.weight_decay_end", 0.0, "48be9e5 2026-11-23"),
    ("optim.grad_clip_kind", "global", "48be9e5 2026-11-23"),
    ("optim.freeze", (), "48be9e5 2026-11-23"),
    ("data.read_threads", 16, "7f7e570 2026-11-24"),
    ("model.dtype", "float32", "7155b76 2026-11-24"),  # encoders only: see _applies
    ("model.init_scheme", "mae", "issue 19 2026-12-04"),  # ViTs only: see _applies
    ("model.init_scheme", "goyal", "issue 21 2026-12-04"),  # ResNets only: see _applies
    ("aug.view1.blur_kernel", "simclr", "issue 19 2026-12-04"),
    ("aug.view2.blur_kernel", "simclr", "issue 19 2026-12-04"),
    ("aug.local.blur_kernel", "simclr", "issue 19 2026-12-04"),
    ("data.train_region", "square", "issue 19 2026-12-04"),
    ("data.max_aspect", 4 / 3, "issue 19 2026-12-04"),
    ("eval.protocol", "fast", "issue 19 2026-12-04"),
    ("eval.protocol_epochs", 0, "issue 19 2026-12-04"),
    ("eval.protocol_batch_size", 0, "issue 19 2026-12-04"),
    ("eval.protocol_base_lr", 0.0, "issue 19 2026-12-04"),
    ("eval.n_last_blocks", 0, "issue 19 2026-12-04"),
    ("eval.avgpool_patchtokens", False, "issue 19 2026-12-04"),
    ("eval.kmeans", True, "issue 24 2026-12-04"),
    ("eval.kmeans_k", 0, "issue 24 2026-12-04"),
    ("eval.kmeans_n_init", 10, "issue 24 2026-12-04"),
    ("eval.tsne_points", 1000, "issue 24 2026-12-04"),
    ("eval.tsne_perplexity", 30.0, "issue 24 2026-12-04"),
    ("eval.data", "", "issue 24 2026-12-04"),
    ("eval.data_root", "", "issue 24 2026-12-04"),
    ("eval.export_features", "", "issue 24 2026-12-04"),
    ("eval.export_overwrite", False, "issue 24 2026-12-04"),
    ("online_probe", {"enabled": False, "base_lr": 0.1, "num_classes": 0},
     "issue 24 2026-12-04"),
    ("init_from", "", "issue 24 2026-12-04"),
    ("optim.decay_all", False, "issue 21 2026-12-05"),
)


# model.init_scheme's old-run default by encoder family: every ViT run before the key was
# xavier ('mae'), every ResNet run had the zero-initialised residual BatchNorm ('goyal').
_INIT_SCHEME_FAMILY = {"mae": "vit_", "goyal": "resnet"}


def _applies(path: str, parent: ml_collections.ConfigDict, default: Any = None) -> bool:
    """``model.dtype`` belongs to the encoders (``resnet*``, ``vit_*``); the dVAE's model block is
    its name only (its compute dtype is ``dvae.dtype``). ``model.init_scheme`` has one entry per
    encoder family, told apart by its ``default`` (:data:`_INIT_SCHEME_FAMILY`)."""
    name = str(parent.get("name", ""))
    if path == "model.dtype":
        return name.startswith(("resnet", "vit_"))
    if path == "model.init_scheme":
        return name.startswith(_INIT_SCHEME_FAMILY[default])
    return True


def upgrade_run_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A run's saved config with the keys of :data:`RUN_CONFIG_UPGRADES` it lacks set to their
    defaults (in place; returned). A current run's config comes back unchanged."""
    with config.unlocked():
        for path, default, _ in RUN_CONFIG_UPGRADES:
            *parents, leaf = path.split(".")
            node = config
            for part in parents:
                node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
            if (isinstance(node, ml_collections.ConfigDict) and leaf not in node
                    and _applies(path, node, default)):
                node[leaf] = default
    return config
