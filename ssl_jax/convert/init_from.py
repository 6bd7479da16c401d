"""Weights into a freshly initialised train state: ``--config.init_from=PATH`` and the import.

``PATH`` is either a weights file (see :mod:`ssl_jax.convert.formats`) or a run directory (one
trained here, or one written by ``python -m ssl_jax.convert import``). The encoder always comes
from it (every copy the method keeps: an EMA teacher or momentum encoder starts equal to it,
:meth:`~ssl_jax.methods.base.MethodBase.with_encoder`). Heads come too where the source has
them for the same method, and otherwise start new:

- a run directory of the same method whose parameters and method state have this config's
  shapes: everything but the step and the optimizer (heads, EMA teacher, centre, queue);
- DINO's full training checkpoint into a ``dino`` run: the student's backbone and head, the
  teacher's backbone and head, the loss's centre (a head with BatchNorm is not mapped);
- MAE's checkpoint into an ``mae`` run: the decoder;
- BEiT's checkpoint into a ``beit`` run: ``lm_head`` (the visual-token classifier).

:func:`prepare` reads and checks everything against the state's layout (nothing is written, a
mismatch is a WeightsError); :meth:`Source.apply` then fills an initialised state.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from ssl_jax import restore
from ssl_jax.convert import fit, formats, keymap
from ssl_jax.convert.files import WeightsError, read_weights

IMPORTED_MARKER = "imported.json"  # in a run directory written by the import
_HINT = ("Choose a config whose model is the file's (python -m ssl_jax.convert import "
         "--model_from_file builds it), or another file")


@dataclasses.dataclass
class Source:
    """What :func:`prepare` found: encoder tensors (file) or a run, and the heads to place."""

    path: str
    encoder: dict[str, np.ndarray] | None = None
    student: dict[str, np.ndarray] | None = None  # DINO's student backbone, when not the encoder
    heads: dict[str, tuple[tuple[str, ...], dict[str, np.ndarray], keymap.Renames]] = \
        dataclasses.field(default_factory=dict)
    run_config: Any = None
    whole_state: bool = False
    notes: list[str] = dataclasses.field(default_factory=list)

    def apply(self, state: dict[str, Any], method: Any, mesh: Mesh) -> dict[str, Any]:
        """``state`` with the source's weights, each leaf placed with the sharding of the leaf it
        replaces. The step, the optimizer state and the counters are the new run's."""
        params, extra = state["params"], state["extra"]
        if self.run_config is not None:
            _, source, _ = restore.restore_state(self.path, self.run_config, mesh)
            if self.whole_state:
                params, extra = source["params"], source["extra"]
            else:
                variables = restore.create_method(self.run_config, mesh).encoder_variables(
                    source["params"], source["extra"])
                params, extra = method.with_encoder(params, extra, _numpy(variables))
        else:
            initial = _numpy(method.encoder_variables(params, extra))
            what = _model_text(method)
            variables, notes = fit.load_encoder(self.encoder, initial, method.encoder, what,
                                                _HINT)
            self.notes += notes
            params, extra = method.with_encoder(params, extra, variables)
            if self.student is not None:  # DINO: the student's own backbone (layout: dino.py)
                student, _ = fit.load_encoder(self.student, initial, method.encoder, what, _HINT)
                state_s = {k: v for k, v in student.items() if k != "params"}
                params = {**params, "encoder": student["params"]}
                extra = {**extra, "state": {**extra["state"], "encoder": state_s}}
            tree = {"params": params, "extra": extra}
            for path, tensors, renames in self.heads.values():
                _set(tree, path, _fill(tensors, _get(tree, path), renames))
            params, extra = tree["params"], tree["extra"]
        new = {**state, "params": params, "extra": extra}
        if jax.tree_util.tree_structure(new) != jax.tree_util.tree_structure(state):
            raise WeightsError(f"the weights of {self.path} change the layout of the train state")
        return jax.tree_util.tree_map(
            lambda x, old: jax.device_put(np.asarray(x, old.dtype), old.sharding), new, state)


def _numpy(tree: Any) -> Any:
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def _model_text(method: Any) -> str:
    model = dict(method.config.model)
    rest = ", ".join(f"{k}={model[k]!r}" for k in sorted(model)
                     if k not in ("name", "dtype", "init_scheme"))
    return f"the config's model {model['name']!r} ({rest})"


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree[key] = dict(tree[key])
        tree = tree[key]
    tree[path[-1]] = value


def _fill(tensors: dict[str, np.ndarray], like: Any, renames: keymap.Renames) -> Any:
    if not isinstance(like, dict):  # one array (DINO's centre)
        return tensors["value"].reshape(like.shape)
    return keymap.from_torch(tensors, {"params": like}, renames)["params"]


def prepare(path: str, method: Any, abstract_state: dict[str, Any], mesh: Mesh,
            allow_classes: bool = False, checkpoint_key: str = "", content: Any = None
            ) -> Source:
    """Reads ``path`` (or takes its ``content``, as :func:`~ssl_jax.convert.files.read_weights`
    returns it) and checks it against the train state's layout ``abstract_state`` (shape
    structs); nothing is placed yet (:meth:`Source.apply`).

    Raises:
      WeightsError: a missing, unreadable or refused file; an encoder of another
        architecture (naming the first mismatching key and both shapes); a run whose encoder
        is not this config's.
    """
    fit.renames(method.encoder)  # a ViT or ResNet
    encoder_like = method.encoder_variables(abstract_state["params"], abstract_state["extra"])
    if content is None and os.path.isdir(path):
        return _prepare_run(path, method, abstract_state, encoder_like, mesh)
    if content is None:
        content = read_weights(path, allow_classes)
    parts = formats.parts_of(content, path, checkpoint_key)
    source = Source(path=path, encoder=parts.encoder, notes=list(parts.notes))
    table = fit.renames(method.encoder)
    expected = keymap.expected_shapes(encoder_like, table)
    adapted, _ = fit.adapt(parts.encoder, expected, method.encoder)
    fit.check_tensors(adapted, expected, _model_text(method), _HINT)
    _place_heads(source, parts, method, abstract_state)
    return source


def _prepare_run(path: str, method: Any, abstract_state: dict[str, Any], encoder_like: Any,
                 mesh: Mesh) -> Source:
    if not os.path.exists(os.path.join(path, "config.json")):
        raise WeightsError(f"{path} is a directory without config.json: pass a run directory "
                           "(of python -m ssl_jax.train or ssl_jax.convert import) or a file")
    run_config = restore.load_run_config(path)
    if not restore.checkpoint_steps(path):
        raise WeightsError(f"the run {path} has no checkpoint to take weights from")
    run_method = restore.create_method(run_config, mesh)
    run_abstract = restore.abstract_state(run_config, mesh, run_method)
    theirs = run_method.encoder_variables(run_abstract["params"], run_abstract["extra"])
    table = fit.renames(method.encoder)
    if not isinstance(run_method.encoder, type(method.encoder)):
        raise WeightsError(f"the run {path} has a {type(run_method.encoder).__name__} encoder "
                           f"({run_config.model.name}), this config a "
                           f"{type(method.encoder).__name__}")
    shapes = {k: np.zeros(v, np.bool_) for k, v in keymap.expected_shapes(theirs, table).items()}
    fit.check_tensors(shapes, keymap.expected_shapes(encoder_like, table), _model_text(method),
                      f"The run's model is {dict(run_config.model)}")
    same = (run_config.method == method.config.method and all(
        jax.tree_util.tree_structure(run_abstract[k]) == jax.tree_util.tree_structure(
            abstract_state[k]) and all(a.shape == b.shape for a, b in zip(
                jax.tree_util.tree_leaves(run_abstract[k]),
                jax.tree_util.tree_leaves(abstract_state[k]), strict=True))
        for k in ("params", "extra")))
    note = ("every parameter and the method's state (heads, teacher, centres) from the run" if
            same else "the encoder from the run (its method or heads differ: the heads start new)")
    return Source(path=path, run_config=run_config, whole_state=same, notes=[note])


def _place_heads(source: Source, parts: formats.Parts, method: Any,
                 abstract_state: dict[str, Any]) -> None:
    """The heads of ``parts`` that fit this method's state go to ``source.heads``; the others
    are named in ``source.notes`` (those heads start new)."""
    name, cfg = method.config.method, method.cfg
    targets: dict[str, list[tuple[tuple[str, ...], keymap.Renames]]] = {}
    if name == "dino":
        head = keymap.dino_head_renames(cfg.head_layers, cfg.head_bn)
        teacher = "teacher_head" in parts.heads
        targets = {"head": [(("params", "head"), head)]
                   + ([] if teacher else [(("extra", "teacher", "head"), head)]),
                   "teacher_head": [(("extra", "teacher", "head"), head)],
                   "center": [(("extra", "center"), ())]}
        if "student_encoder" in parts.heads:
            student = parts.heads["student_encoder"]
            expected = keymap.expected_shapes(
                method.encoder_variables(abstract_state["params"], abstract_state["extra"]),
                fit.renames(method.encoder))
            fit.check_tensors(fit.adapt(student, expected, method.encoder)[0], expected,
                              _model_text(method), _HINT)
            source.student = student
            source.notes.append("the file's student backbone -> params.encoder (the teacher's "
                                "-> extra.teacher.encoder)")
    elif name == "mae":
        targets = {"decoder": [(("params", "decoder"), keymap.MAE_DECODER_RENAMES)]}
    elif name == "beit":
        targets = {"lm_head": [(("params", "head"), ())]}
    for part, tensors in parts.heads.items():
        if part == "student_encoder" and name == "dino":
            continue
        if part not in targets:
            source.notes.append(f"the file's {part} is not used by a {name} run")
            continue
        for path, renames in targets[part]:
            like = _get(abstract_state, path)
            tensors = _head_tensors(tensors, like, renames, part, path, source.notes)
            if tensors is not None:
                key = ".".join(path)
                source.heads[key] = (path, tensors, renames)
                source.notes.append(f"the file's {part} -> {key}")


def _head_tensors(tensors, like, renames, part, path, notes) -> dict[str, np.ndarray] | None:
    """The part's tensors if they fit the head at ``path`` (else None, with a note)."""
    if not isinstance(like, dict):
        value = tensors["center"].reshape(-1)
        if value.shape != tuple(like.shape):
            notes.append(f"the file's {part} {value.shape} does not fit {'.'.join(path)} "
                         f"{tuple(like.shape)}: it starts new")
            return None
        return {"value": value}
    expected = keymap.expected_shapes({"params": like}, renames)
    tensors = dict(tensors)
    for key in [k for k in tensors if k.endswith("parametrizations.weight.original0")]:
        tensors[key.replace("parametrizations.weight.original0", "weight_g")] = tensors.pop(key)
    for key in [k for k in tensors if k.endswith("parametrizations.weight.original1")]:
        tensors[key.replace("parametrizations.weight.original1", "weight_v")] = tensors.pop(key)
    gain = "last_layer.weight_g"
    if gain in tensors and gain not in expected and np.allclose(tensors[gain], 1.0):
        del tensors[gain]  # DINO's norm_last_layer: the gain is fixed at 1
    if "decoder_pos_embed" in tensors and "decoder_pos_embed" not in expected:
        del tensors["decoder_pos_embed"]  # MAE's fixed sin-cos table (computed here)
    try:
        fit.check_tensors(tensors, expected, f"the {'.'.join(path)} of this config", "")
    except WeightsError as e:
        notes.append(f"the file's {part} is not imported, it starts new ({e})")
        return None
    return tensors
