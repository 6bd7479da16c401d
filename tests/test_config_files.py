"""The config files as data: every preset gives exactly the numbers it gave before the configs
were written out in full (a snapshot taken from the code before that change), and no config file
imports JAX or Flax.

Regenerate the snapshot (only when a preset's numbers are meant to change):

    PYTHONPATH=$PWD python tests/test_config_files.py
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNAPSHOT = os.path.join(ROOT, "tests", "fixtures", "config_snapshots.json")
_DATA = ("digits", "cifar10", "imagenet2012")
_BASIC = tuple(f"data={d}{r}" for d in _DATA for r in ("", ",runlocal"))
PRESETS = {  # config file -> the preset strings whose configs the snapshot holds
    "simclr": _BASIC + ("data=digits,model=vit_ti4", "data=cifar10,model=resnet50"),
    "dino": _BASIC + ("data=digits,model=vit_ti4", "data=digits,local_crops=2",
                      "data=cifar10,model=vit_ti4", "data=cifar10,local_crops=0",
                      "data=imagenet2012,model=resnet50", "data=digits,model=vit_ti4,runlocal"),
    "mae": _BASIC + ("data=digits,mask=block", "data=cifar10,model=vit_ti4",
                     "data=imagenet2012,mask=grid"),
    "beit": _BASIC + ("data=cifar10,model=vit_ti4", "data=imagenet2012,model=vit_s16"),
    "dvae": _BASIC,
    "byol": _BASIC + ("data=digits,model=vit_ti4", "data=imagenet2012,model=resnet18"),
    "moco_v2": _BASIC + ("data=digits,model=vit_ti4",),
    "moco_v3": _BASIC + ("data=imagenet2012,model=resnet50", "data=digits,model=vit_ti4",
                         "data=cifar10,model=vit_ti4", "data=digits,model=vit_ti4,runlocal"),
    "simmim": _BASIC + ("data=cifar10,model=vit_ti4",),
    "ibot": _BASIC + ("data=digits,local_crops=2", "data=cifar10,local_crops=0",
                      "data=imagenet2012,model=vit_b16"),
    "finetune": _BASIC + ("data=imagenet2012,vit=l", "data=imagenet2012,vit=h"),
    "rotation": _BASIC + ("data=digits,model=vit_ti4",),
    "context": _BASIC + ("data=cifar10,colour=project", "data=digits,model=vit_ti4,runlocal"),
    "jigsaw": _BASIC + ("data=digits,model=vit_ti4,runlocal",),
    "colorization": _BASIC + ("data=cifar10,model=vit_ti4", "data=imagenet2012,loss=regression"),
    "inpainting": _BASIC + ("data=digits,mask=blocks", "data=cifar10,model=vit_ti4",
                            "data=imagenet2012,mask=blocks"),
}
# Keys added after the snapshot was last taken (prefixes, per config file); none at present.
ADDED_SINCE_SNAPSHOT: dict[str, tuple[str, ...]] = {}


def _load(name: str):
    path = os.path.join(ROOT, "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"_config_file_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def flat_config(config) -> dict[str, str]:
    """``{"a.b.c": json of the value}``: tuples, ints and floats stay distinguishable."""
    from ssl_jax.config import to_json

    out: dict[str, str] = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict) and set(node) != {"__tuple__"}:
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            out[prefix] = json.dumps(node, sort_keys=True)

    walk("", json.loads(to_json(config)))
    return out


def snapshot() -> dict[str, dict[str, dict[str, str]]]:
    return {name: {arg: flat_config(_load(name).get_config(arg)) for arg in args}
            for name, args in PRESETS.items()}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_match_snapshot(name):
    with open(SNAPSHOT) as f:
        expected = json.load(f)[name]
    module = _load(name)
    for arg in PRESETS[name]:
        got = flat_config(module.get_config(arg))
        want = expected[arg]
        added = ADDED_SINCE_SNAPSHOT.get(name, ())
        missing = sorted(set(want) - set(got))
        extra = sorted(k for k in set(got) - set(want) if not k.startswith(added))
        assert not missing and not extra, f"{name}:{arg}: missing {missing}, extra {extra}"
        changed = {k: (want[k], got[k]) for k in want if want[k] != got[k]}
        assert not changed, f"{name}:{arg}: (snapshot, now) {changed}"


_HEAVY = ("jax", "flax", "optax", "tensorflow", "tensorflow_datasets", "grain", "orbax")
_IMPORT_CHECK = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("config_file", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.get_config("data=digits,runlocal")
print(sorted(name for name in sys.modules if name.split(".")[0] in sys.argv[2].split(",")))
"""
_CONFIG_FILES = sorted(
    f[:-3] for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py"))


@pytest.mark.parametrize("name", _CONFIG_FILES)
def test_config_file_imports_no_jax(name):
    """A config file (and the ssl_jax modules it imports: ssl_jax/__init__.py, presets, config)
    builds without importing JAX, Flax, optax, TFDS or Grain."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_CHECK, os.path.join(ROOT, "configs", f"{name}.py"),
         ",".join(_HEAVY)], capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"configs/{name}.py imports {result.stdout.strip()}"


# --- Runs saved before a key existed ------------------------------------------------------------


def _drop(tree: dict, path: str) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        tree = tree[part]
    del tree[leaf]


@pytest.mark.parametrize("name,arg", [("simclr", "data=digits"), ("dino", "data=cifar10"),
                                      ("dvae", "data=digits")])
def test_old_run_config_loads_with_the_defaults(tmp_path, name, arg):
    """A config.json written before the keys of RUN_CONFIG_UPGRADES existed loads, through
    checkpoint.load_run_config, as the current config with those keys at their defaults."""
    from ssl_jax import checkpoint
    from ssl_jax.config import RUN_CONFIG_UPGRADES, _applies, to_json

    config = _load(name).get_config(arg)
    applying = []  # the upgrades whose block this config has (e.g. aug.local: DINO's only)
    with config.unlocked():  # the current config holding every key at its old-run default
        for path, default, _ in RUN_CONFIG_UPGRADES:
            *parents, leaf = path.split(".")
            node = config
            for part in parents:
                node = node.get(part) if node is not None else None
            if node is not None and _applies(path, node, default):
                node[leaf] = default
                applying.append(path)
    old = json.loads(to_json(config))
    for path in applying:
        _drop(old, path)
    (tmp_path / "config.json").write_text(json.dumps(old))
    loaded = checkpoint.load_run_config(tmp_path)
    assert to_json(loaded) == to_json(config)
    assert loaded.data.read_threads == 16 and loaded.data.prefetch == 2
    assert loaded.model.get("dtype") == (None if name == "dvae" else "float32")
    with pytest.raises(AttributeError):  # still locked: a typo is an error
        loaded.data.read_thread = 1


@pytest.mark.parametrize("name", sorted(set(PRESETS) - {"finetune"}))
def test_current_run_config_is_unchanged_by_the_upgrade(tmp_path, name):
    from ssl_jax import checkpoint
    from ssl_jax.config import to_json

    for arg in PRESETS[name]:
        text = to_json(_load(name).get_config(arg))
        (tmp_path / "config.json").write_text(text)
        assert to_json(checkpoint.load_run_config(tmp_path)) == text, arg


if __name__ == "__main__":
    with open(SNAPSHOT, "w") as f:
        json.dump(snapshot(), f, indent=0, sort_keys=True)
        f.write("\n")
    print(SNAPSHOT, os.path.getsize(SNAPSHOT), "bytes")
