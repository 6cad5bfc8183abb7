"""``servery models compile``: a stored scikit-learn or XGBoost classifier to ONNX, checked, saved
as a new version of the same name (so it is shadowed and promoted like any version).

The source (saved by :func:`models.store.save_model`, ``bentoml.sklearn`` or ``bentoml.xgboost``)
is converted (skl2onnx for estimators and pipelines, onnxmltools for XGBoost) and both run on
held-out rows (given, else the ``holdout.npy`` stored with the model): the source in the dtype
it is served in, the ONNX model in float32 on onnxruntime (one thread), as each will be served.
Every label must agree and every class probability be within :data:`TOLERANCE`; otherwise
:class:`CompileRefused` says where they differ and nothing is saved. Classifiers only.

The contract the ONNX runtime serving the result relies on: ``bentoml.onnx`` (``saved_model.onnx``),
one input :data:`INPUT_NAME` float32 ``[None, n_features]``; outputs ``label`` and
``probabilities`` (``[None, n_classes]``, columns in ``class_names`` order), named in
``metadata["onnx_outputs"]``; labels ``compiled_from`` (source version), ``compiled: onnx``,
``task: classification`` and the source's others but ``framework`` and ``servery``; metadata
``task``, ``class_names``, ``feature_names``, ``input_schema``, ``onnx_outputs``,
``source_version``, ``source_tag``, ``agreement`` (``rows``, ``labels_agree``,
``max_abs_proba_diff``), ``converter`` and the source's ``metrics``, ``params``, ``data_sha256``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

INPUT_NAME = "input-0"
"""The ONNX input name: the same as the first (only) input of servery's OIP requests."""
TOLERANCE = 1e-5
"""Largest absolute difference in any class probability the compiled model may show."""
MIN_ROWS = 20
"""Fewer held-out rows than this prove too little; such a check is refused."""
HOLDOUT_FILE = "holdout.npy"
"""Held-out rows stored with a model by :func:`models.store.save_model` (``holdout=``)."""
SKLEARN_OPSET = 18
"""skl2onnx target opset (its newest tested is 22; onnxruntime 1.32 runs both)."""
XGBOOST_OPSET = 15
"""onnxmltools 1.16's xgboost converter supports opsets up to 15."""
XGBOOST_OBJECTIVES = ("binary:logistic", "multi:softprob")
"""XGBoost objectives whose predictions are class probabilities (what servery serves)."""
SHOW = 5
"""How many row indices a refusal names."""


class CompileRefused(Exception):
    """The model cannot be compiled, or its ONNX form disagrees with it; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Source:
    """The version being compiled: its object and what the compiled version must record."""

    tag: str
    version: str
    kind: str
    """``sklearn`` or ``xgboost``: which converter."""
    obj: Any
    n_features: int
    feature_names: list[str]
    feature_names_known: bool
    class_names: list[str]
    classes: list[str]
    """The class labels as the ONNX ``label`` output gives them (``str``), in column order."""
    dtype: np.dtype
    """The dtype the source is served in (what it is fed in the check)."""
    labels: dict[str, str]
    metadata: dict[str, Any]

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=self.dtype)
        if self.kind == "sklearn" or hasattr(self.obj, "predict_proba"):
            proba = self.obj.predict_proba(x)
        else:  # a Booster: P(class 1) for binary:logistic
            proba = self.obj.inplace_predict(x)
        proba = np.asarray(proba, dtype=np.float64)
        return np.stack([1.0 - proba, proba], axis=1) if proba.ndim == 1 else proba


@dataclass
class Agreement:
    """How the compiled model's answers compare with the source's on the same rows."""

    rows: int
    label_mismatches: list[int]
    """Row indices where the labels differ."""
    max_abs_proba_diff: float
    worst: tuple[int, int]
    """(row, class column) of the largest probability difference."""
    over_tolerance: list[int]
    """Row indices with a probability difference above the tolerance."""


@dataclass
class CompileResult:
    """A compiled version saved to the store and the check it passed."""

    tag: str
    version: str
    source_tag: str
    rows: int
    labels_agree: float
    max_abs_proba_diff: float
    outputs: dict[str, str]
    converter: dict[str, Any]
    seconds: float
    pinned_production: str | None = None
    """The source version, when compile pointed the (absent) ``production`` alias at it."""


def compile_model(
    name: str,
    version: str | None = None,
    rows: str | Path | np.ndarray | None = None,
    *,
    tolerance: float = TOLERANCE,
) -> CompileResult:
    """Compile version ``version`` of ``name`` (an alias, ``latest``, a version or a unique
    prefix; default the ``production`` alias, else ``latest``) to ONNX and save it as a new
    version once it agrees with the source on ``rows`` (a ``.npy`` or ``.csv`` file, or an array;
    default the model's stored hold-out rows).

    Raises :class:`CompileRefused` when it cannot or does not agree (nothing is saved), and
    ``models.aliases.AliasError`` (``models.store.StoreError``) when ``name`` or ``version`` is
    not in the store (cannot be read from it).
    """
    start = time.perf_counter()
    source = load_source(name, version)
    x = held_out_rows(source, rows)
    onnx_model, converter = convert(source)
    labels, proba, outputs = run_onnx(onnx_model, x)
    agreement = compare(source, x, labels, proba, tolerance)
    refusal = explain(agreement, source, tolerance)
    if refusal:
        raise CompileRefused(f"{source.tag}: the ONNX model disagrees with the source: {refusal}")
    pinned = _keep_serving(name, source.version)
    saved = save_compiled(source, onnx_model, outputs, agreement, converter)
    return CompileResult(
        tag=str(saved.tag),
        version=saved.tag.version,
        source_tag=source.tag,
        rows=agreement.rows,
        labels_agree=1.0,
        max_abs_proba_diff=agreement.max_abs_proba_diff,
        outputs=outputs,
        converter=converter,
        seconds=time.perf_counter() - start,
        pinned_production=pinned,
    )


def _keep_serving(name: str, source_version: str) -> str | None:
    """A model without a ``production`` alias serves its newest version, which the compiled one
    is about to become: point ``production`` at the source first, so the compiled version is a
    candidate to shadow and promote, not a silent switch. Returns the version pinned, if any."""
    from models.aliases import DEFAULT_ALIAS, AliasStore

    store = AliasStore()
    if DEFAULT_ALIAS in store.read(name).aliases:
        return None
    store.promote(name, source_version, DEFAULT_ALIAS)
    return source_version


def load_source(name: str, ref: str | None) -> Source:
    """The stored version to compile, loaded; refused when its kind cannot be compiled."""
    from models.aliases import AliasStore
    from models.store import get_model

    version, _ = AliasStore().resolve(name, ref)
    bento_model = get_model(f"{name}:{version}")
    info = bento_model.info
    tag = f"{name}:{version}"
    labels, meta = dict(info.labels), dict(info.metadata)
    if info.module == "bentoml.onnx" or "compiled" in labels:
        source = labels.get("compiled_from", "?")
        raise CompileRefused(f"{tag} is already a compiled (ONNX) version, of version {source}")
    # loaded as the servers load it (models/formats), whichever API saved it
    from models.config import Framework
    from models.formats import format_of, framework_of
    from models.formats.sklearn_models import sklearn_object
    from models.formats.xgboost_models import xgboost_object
    from models.store import StoreError

    try:
        fmt, framework = format_of(bento_model), framework_of(bento_model)
    except StoreError as e:
        raise CompileRefused(
            f"{e}; compile takes models saved by models.store.save_model, bentoml.sklearn or "
            "bentoml.xgboost"
        ) from None
    if framework is Framework.SKLEARN:
        obj = sklearn_object(bento_model, fmt)
    elif framework is Framework.XGBOOST:
        obj = xgboost_object(bento_model, fmt)
    else:
        raise CompileRefused(
            f"{tag} is a {framework} model ({fmt.value}): compile converts scikit-learn and "
            "XGBoost models only"
        )
    kind = framework.value
    n_features, classes = _inspect(tag, kind, obj)
    names = [str(f) for f in meta.get("feature_names") or []]
    if not names:
        found = getattr(obj, "feature_names_in_", None)
        if found is None and kind == "xgboost":
            found = _booster(obj).feature_names
        names = [str(f) for f in found] if found is not None else []
    known = len(names) == n_features
    schema = meta.get("input_schema") or {}
    return Source(
        tag=tag,
        version=version,
        kind=kind,
        obj=obj,
        n_features=n_features,
        feature_names=names if known else [f"f{i}" for i in range(n_features)],
        feature_names_known=known,
        class_names=[str(c) for c in meta.get("class_names") or classes],
        classes=classes,
        # servery's models record their serving dtype; a BentoML model gets what JSON decodes to
        dtype=np.dtype(schema.get("dtype", "float64")),
        labels=labels,
        metadata=meta,
    )


def _booster(obj: Any) -> Any:
    return obj.get_booster() if hasattr(obj, "get_booster") else obj


def _inspect(tag: str, kind: str, obj: Any) -> tuple[int, list[str]]:
    """``(n_features, class labels)`` of a classifier; refused for anything else."""
    if kind == "sklearn":
        from sklearn.base import is_classifier

        if not (is_classifier(obj) and hasattr(obj, "predict_proba")):
            raise CompileRefused(
                f"{tag} ({type(obj).__name__}) is not a classifier with predict_proba; compile "
                "supports classifiers only (regression is not supported)"
            )
        n = getattr(obj, "n_features_in_", None)
        if n is None:
            raise CompileRefused(f"{tag} ({type(obj).__name__}) does not say its n_features_in_")
        return int(n), [str(c) for c in obj.classes_]
    import json

    booster = _booster(obj)
    learner = json.loads(booster.save_config())["learner"]
    objective = learner["objective"]["name"]
    if objective not in XGBOOST_OBJECTIVES:
        raise CompileRefused(
            f"{tag} has XGBoost objective {objective!r}; compile supports classifiers with class "
            f"probabilities ({', '.join(XGBOOST_OBJECTIVES)}) only"
        )
    n_classes = max(2, int(learner["learner_model_param"].get("num_class") or 0))
    classes = getattr(obj, "classes_", None)
    return booster.num_features(), [
        str(c) for c in (classes if classes is not None else range(n_classes))
    ]


def held_out_rows(source: Source, rows: str | Path | np.ndarray | None) -> np.ndarray:
    """The rows to check on, as float64 ``(n, n_features)``; refused when unusable."""
    if rows is None:
        from models.store import get_model

        path = Path(get_model(source.tag).path_of(HOLDOUT_FILE))
        if not path.is_file():
            raise CompileRefused(
                f"{source.tag} has no stored hold-out rows ({HOLDOUT_FILE}); pass --rows FILE "
                "(.npy or .csv) with rows it was not trained on"
            )
        x, where = np.load(path, allow_pickle=False), f"its {HOLDOUT_FILE}"
    elif isinstance(rows, np.ndarray):
        x, where = rows, "the rows given"
    else:
        x, where = _read_rows_file(Path(rows), source), str(rows)
    if x.ndim != 2 or x.shape[1] != source.n_features:
        raise CompileRefused(
            f"{where}: rows of shape {x.shape}, but {source.tag} takes "
            f"{source.n_features} features per row"
        )
    if x.shape[0] < MIN_ROWS:
        raise CompileRefused(
            f"{where}: {x.shape[0]} rows are too few to check on; give at least {MIN_ROWS}"
        )
    try:
        x = x.astype(np.float64)
    except (TypeError, ValueError) as e:
        raise CompileRefused(f"{where}: rows are not numbers ({e})") from None
    if not np.isfinite(x).all():
        raise CompileRefused(f"{where}: rows hold NaN or infinite values")
    return x


def _read_rows_file(path: Path, source: Source) -> np.ndarray:
    """A ``.npy`` array, or a ``.csv`` with a header of feature names or numbers only."""
    if not path.is_file():
        raise CompileRefused(f"{path}: no such file")
    if path.suffix == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as e:
            raise CompileRefused(f"{path}: not a plain numeric .npy array ({e})") from None
    if path.suffix != ".csv":
        raise CompileRefused(f"{path}: --rows takes a .npy or .csv file")
    import csv

    with path.open(newline="") as f:
        table = [r for r in csv.reader(f) if r]
    header = None
    if table and not all(_is_number(v) for v in table[0]):
        header, table = [h.strip() for h in table[0]], table[1:]
    try:
        x = np.array([[float(v) for v in r] for r in table], dtype=np.float64, ndmin=2)
    except ValueError as e:
        raise CompileRefused(f"{path}: a cell is not a number, or rows differ in length") from e
    if header is not None and x.size and source.feature_names_known:
        if sorted(header) != sorted(source.feature_names) or len(header) != x.shape[1]:
            raise CompileRefused(
                f"{path}: header {header} is not {source.tag}'s features {source.feature_names}"
            )
        x = x[:, [header.index(f) for f in source.feature_names]]  # columns in model order
    return x


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def convert(source: Source) -> tuple[Any, dict[str, Any]]:
    """The source as an ONNX model with one float32 input named :data:`INPUT_NAME`."""
    import warnings

    import onnx

    try:
        with warnings.catch_warnings():
            # Both warn that "input-0" breaks their naming rule; _rename_input puts it back.
            warnings.filterwarnings("ignore", message="Some input names are not compliant")
            if source.kind == "sklearn":
                import skl2onnx as converter
                from skl2onnx.common.data_types import FloatTensorType

                opset = SKLEARN_OPSET
                model = converter.convert_sklearn(
                    source.obj,
                    initial_types=[(INPUT_NAME, FloatTensorType([None, source.n_features]))],
                    options={id(source.obj): {"zipmap": False}},  # a probability tensor
                    target_opset=opset,
                )
            else:
                import onnxmltools as converter
                from onnxmltools.convert.common.data_types import FloatTensorType

                opset = XGBOOST_OPSET
                model = converter.convert_xgboost(
                    source.obj,
                    initial_types=[(INPUT_NAME, FloatTensorType([None, source.n_features]))],
                    target_opset=opset,
                )
    except Exception as e:  # the converters raise many types; all mean "cannot convert this"
        raise CompileRefused(
            f"{source.tag}: {type(source.obj).__name__} cannot be converted to ONNX: {e}"
        ) from e
    _rename_input(model)
    _dedupe_opsets(model)
    onnx.checker.check_model(model)
    info = {"name": converter.__name__, "version": converter.__version__, "target_opset": opset}
    return model, info


def _rename_input(model: Any) -> None:
    # Both converters turn "input-0" into "input_0"; the contract is servery's OIP name.
    (graph_input,) = model.graph.input
    old = graph_input.name
    if old == INPUT_NAME:
        return
    graph_input.name = INPUT_NAME
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = INPUT_NAME


def _dedupe_opsets(model: Any) -> None:
    # skl2onnx lists the default domain twice; keep one entry (the highest) per domain.
    best: dict[str, int] = {}
    for entry in model.opset_import:
        best[entry.domain] = max(best.get(entry.domain, 0), entry.version)
    if len(best) != len(model.opset_import):
        del model.opset_import[:]
        for domain, version in best.items():
            model.opset_import.add(domain=domain, version=version)


def run_onnx(model: Any, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """``(labels, probabilities, output names)`` of ``model`` on ``x`` (as float32)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    outs = session.get_outputs()
    proba_names = [o.name for o in outs if o.type == "tensor(float)" and len(o.shape) == 2]
    label_names = [o.name for o in outs if o.name not in proba_names]
    if len(proba_names) != 1 or len(label_names) != 1:
        found = [(o.name, o.type, o.shape) for o in outs]
        raise CompileRefused(f"the ONNX model has no label and probability tensors: {found}")
    names = {"label": label_names[0], "probabilities": proba_names[0]}
    labels, proba = session.run(
        [names["label"], names["probabilities"]], {INPUT_NAME: x.astype(np.float32)}
    )
    return np.asarray(labels), np.asarray(proba, dtype=np.float64), names


def compare(
    source: Source, x: np.ndarray, labels: np.ndarray, proba: np.ndarray, tolerance: float
) -> Agreement:
    """Compare the ONNX answers with the source's on ``x``: the source's label is its most
    probable class (what servery serves); the ONNX model must give it in its ``label`` output
    and as its most probable class."""
    expected = source.predict_proba(x)
    if proba.shape != expected.shape:
        raise CompileRefused(
            f"{source.tag}: the ONNX probabilities have shape {proba.shape}, the source's "
            f"{expected.shape}"
        )
    want = expected.argmax(axis=1)
    column = {c: i for i, c in enumerate(source.classes)}
    got = np.array([column.get(str(v), -1) for v in labels.reshape(-1)])
    wrong = (got != want) | (proba.argmax(axis=1) != want)
    diff = np.abs(proba - expected)
    worst = np.unravel_index(int(diff.argmax()), diff.shape)
    return Agreement(
        rows=x.shape[0],
        label_mismatches=[int(i) for i in np.flatnonzero(wrong)],
        max_abs_proba_diff=float(diff.max()),
        worst=(int(worst[0]), int(worst[1])),
        over_tolerance=[int(i) for i in np.flatnonzero(diff.max(axis=1) > tolerance)],
    )


def explain(agreement: Agreement, source: Source, tolerance: float) -> str:
    """Why ``agreement`` is not good enough, or ``""`` when it is."""
    parts = []
    bad = agreement.label_mismatches
    if bad:
        parts.append(
            f"labels differ on {len(bad)} of {agreement.rows} rows (first rows: {bad[:SHOW]})"
        )
    if agreement.max_abs_proba_diff > tolerance:
        row, col = agreement.worst
        over = agreement.over_tolerance
        parts.append(
            f"probabilities differ by more than {tolerance:g} on {len(over)} of "
            f"{agreement.rows} rows (first rows: {over[:SHOW]}); max |difference| "
            f"{agreement.max_abs_proba_diff:.3g} at row {row}, class "
            f"{source.class_names[col] if col < len(source.class_names) else col!r}"
        )
    return "; ".join(parts)


def save_compiled(
    source: Source,
    onnx_model: Any,
    outputs: dict[str, str],
    agreement: Agreement,
    converter: dict[str, Any],
) -> Any:
    """Save ``onnx_model`` as a new version of the source's name; return the stored model."""
    import warnings

    import bentoml

    labels = {k: v for k, v in source.labels.items() if k not in ("framework", "servery")}
    labels.update(compiled_from=source.version, compiled="onnx", task="classification")
    metadata: dict[str, Any] = {
        "task": "classification",
        "class_names": source.class_names,
        "feature_names": source.feature_names,
        "input_schema": {"n_features": source.n_features, "dtype": "float32"},
        "onnx_outputs": outputs,
        "source_version": source.version,
        "source_tag": source.tag,
        "agreement": {
            "rows": agreement.rows,
            "labels_agree": 1.0,
            "max_abs_proba_diff": agreement.max_abs_proba_diff,
        },
        "converter": converter,
    }
    for key in ("metrics", "params", "data_sha256"):
        if key in source.metadata:
            metadata[key] = source.metadata[key]
    with warnings.catch_warnings():
        # bentoml.onnx is deprecated since BentoML 1.4 but still the module the runtime loads.
        warnings.filterwarnings("ignore", message=".*bentoml.onnx.* is deprecated")
        saved = bentoml.onnx.save_model(
            source.tag.split(":")[0], onnx_model, labels=labels, metadata=metadata
        )
    # save_model returns the object of BentoML's temporary build folder; return the stored copy.
    return bentoml.models.get(saved.tag)
