"""A CXR finding classifier in Flax: multi-label findings plus the side of lateral findings.

The evaluator trains it on the real training split, picks a decision threshold per finding on the
validation split and checks it on the test split; its verdicts on generated images give the
conditioning accuracy and its penultimate features give the domain FID and the memorization search.

Data conventions (`LabelledImages`): images uint8 or float (N, H, W, 1) (float in [0, 1]); labels int8
(N, 14) in `CHEXPERT_LABELS` order with 1 / 0 / -1 (uncertain) / -2 (not mentioned); sides int8
(N, 14) with 0 = none stated, 1 left, 2 right, 3 bilateral (`findings.SIDES`). Not mentioned counts
as absent (CheXpert's "blank = negative"); uncertain labels are masked out of the loss and of every
accuracy. Training never flips images left-right: that would swap the side the labels state.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from tqdm import tqdm

from cxr_ldm.data.chexpert import CHEXPERT_LABELS
from cxr_ldm.evaluation import metrics
from cxr_ldm.evaluation.attributes import ATTRIBUTES, MAX_VALUES, SLOT_NAMES, SLOTS
from cxr_ldm.evaluation.attributes import UNKNOWN as UNKNOWN_VALUE
from cxr_ldm.evaluation.findings import MAJOR_FINDINGS, SIDES
from cxr_ldm.imaging import as_float_images, resize
from cxr_ldm.io.weights import read_safetensors, write_json, write_safetensors
from cxr_ldm.json_config import JsonConfig

FORMAT_VERSION = 2  # 2: attribute heads (grade, location, device, route)
UNCERTAIN, NOT_MENTIONED = -1, -2


@dataclasses.dataclass
class LabelledImages:
    """Images (N, H, W, 1) uint8 or float in [0, 1], labels int8 (N, 14), sides int8 (N, 14) (module doc);
    slots int8 (N, len(attributes.SLOTS)): attribute value codes, -1 unknown (None: all unknown)."""
    images: np.ndarray
    labels: np.ndarray
    sides: np.ndarray
    slots: np.ndarray | None = None

    def __post_init__(self):
        n = len(self.images)
        if self.images.ndim != 4 or self.images.shape[-1] != 1:
            raise ValueError(f"images: expected (N, H, W, 1), got {self.images.shape}")
        for name in ("labels", "sides"):
            shape = getattr(self, name).shape
            if shape != (n, len(CHEXPERT_LABELS)):
                raise ValueError(f"{name}: expected ({n}, {len(CHEXPERT_LABELS)}), got {shape}")
        if self.slots is None:
            self.slots = np.full((n, len(SLOTS)), UNKNOWN_VALUE, np.int8)
        if self.slots.shape != (n, len(SLOTS)):
            raise ValueError(f"slots: expected ({n}, {len(SLOTS)}), got {self.slots.shape}")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index) -> "LabelledImages":
        return LabelledImages(self.images[index], self.labels[index], self.sides[index], self.slots[index])

    def signature(self) -> str:
        """sha256 of the images, labels, sides and slots: identifies the training data of a cached classifier."""
        digest = hashlib.sha256()
        for array in (self.images, self.labels, self.sides, self.slots):
            digest.update(str(array.shape).encode())
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()



@dataclasses.dataclass(frozen=True)
class TrainConfig(JsonConfig):
    """Classifier recipe. Shifts are in pixels of the classifier input; intensities in [0, 1] units.

    Stored in classifier.json; `from_dict` refuses unknown keys (a recipe this code does not know).
    """
    _source = "classifier config"
    _unknown_keys = "raise"
    _unknown_keys_message = "{source}: unknown keys {keys}; expected some of {expected}"

    input_size: int = 64
    widths: tuple[int, ...] = (16, 32, 64, 128)
    feature_dim: int = 256
    norm: str = "batch"  # "batch" (BatchNorm, running statistics at inference) or "group" (GroupNorm)
    stem_layers: int = 1  # 3x3 convs at full resolution before the first stage
    downsample: str = "stride"  # each stage halves the side by a stride-2 conv ("stride") or conv + 2x2 max pool
    min_positives: int = 20
    max_positive_weight: float = 4.0  # positives of a finding weigh min(sqrt(negatives / positives), this)
    epochs: int = 24
    batch_size: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    max_shift: int = 3
    brightness: float = 0.05
    contrast: float = 0.1
    noise_std: float = 0.02
    seed: int = 0


class ClassifierNet(nn.Module):
    """CNN: images (B, S, S, 1) in [-1, 1] -> (finding logits (B, F), side logits (B, F_side, 3), attribute
    slot logits (B, S_slots, attributes.MAX_VALUES),
    features (B, feature_dim)).

    Each stage halves the side (a stride-2 conv, or a conv then 2x2 max pooling) then refines (3x3 conv),
    norm + ReLU after each conv.
    The final S/2^len(widths) map is flattened rather than pooled, so features keep left and right apart.
    `train` selects batch statistics (and updates the running ones) for norm="batch".
    """
    num_findings: int
    num_sided: int
    num_slots: int = 0
    widths: tuple[int, ...] = (16, 32, 64, 128)
    feature_dim: int = 256
    norm: str = "batch"
    stem_layers: int = 1
    downsample: str = "stride"

    @nn.compact
    def __call__(self, images: jnp.ndarray, train: bool = False):
        def conv_norm(x, width, stride):
            x = nn.Conv(width, (3, 3), strides=(stride, stride), padding=1, use_bias=False)(x)
            if self.norm == "batch":
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            elif self.norm == "group":
                x = nn.GroupNorm(num_groups=min(8, width))(x)
            else:
                raise ValueError(f"ClassifierNet.norm = {self.norm!r}; expected 'batch' or 'group'")
            return nn.relu(x)

        x = images
        for _ in range(self.stem_layers):
            x = conv_norm(x, self.widths[0], 1)
        for width in self.widths:
            if self.downsample == "maxpool":  # keeps small bright structures (nodules, callus) sharp
                x = nn.max_pool(conv_norm(x, width, 1), (2, 2), (2, 2))
            else:
                x = conv_norm(x, width, 2)
            x = conv_norm(x, width, 1)
        features = nn.relu(nn.Dense(self.feature_dim)(x.reshape(x.shape[0], -1)))
        logits = nn.Dense(self.num_findings)(features)
        side_logits = nn.Dense(max(self.num_sided, 1) * len(SIDES))(features)
        slot_logits = nn.Dense(max(self.num_slots, 1) * MAX_VALUES)(features)
        return (logits, side_logits.reshape(-1, max(self.num_sided, 1), len(SIDES))[:, :self.num_sided],
                slot_logits.reshape(-1, max(self.num_slots, 1), MAX_VALUES)[:, :self.num_slots], features)


@dataclasses.dataclass
class Predictions:
    """probabilities (N, F) float, positive (N, F) bool (thresholded), side_probabilities (N, F_side, 3),
    side (N, F_side) int codes 1..3 (argmax, meaningful where the finding is positive), slot_values (N, S)
    the attribute value index of each of the classifier's `slots` (meaningful where its finding is
    positive), features (N, D)."""
    probabilities: np.ndarray
    positive: np.ndarray
    side_probabilities: np.ndarray
    side: np.ndarray
    features: np.ndarray
    slot_values: np.ndarray


class FindingClassifier:
    """A trained `ClassifierNet` with its observation lists, decision thresholds and provenance."""

    def __init__(self, observations, side_observations, thresholds, variables, config: TrainConfig,
                 data_signature: str = "", training_report: dict | None = None, slots: tuple[str, ...] = ()):
        """variables: the net's Flax variables ({"params": ..., "batch_stats": ...}); slots: the names
        (attributes.SLOT_NAMES) of the attribute slots it has heads for."""
        self.observations = tuple(observations)
        self.side_observations = tuple(side_observations)
        self.slots = tuple(slots)
        self.thresholds = np.asarray(thresholds, np.float32)
        self.variables = variables
        self.config = config
        self.data_signature = data_signature
        self.training_report = training_report or {}
        self.net = make_net(config, len(self.observations), len(self.side_observations), len(self.slots))
        self._apply = jax.jit(lambda v, x: self.net.apply(v, x))

    @property
    def major_findings(self) -> tuple[str, ...]:
        """The observations of this classifier that are major findings (findings.MAJOR_FINDINGS)."""
        return tuple(name for name in self.observations if name in MAJOR_FINDINGS)

    def predict(self, images: np.ndarray, batch_size: int = 256) -> Predictions:
        """images (N, H, W, 1|3) uint8 or float in [0, 1] -> Predictions (resized to config.input_size)."""
        images = as_float_images(images)
        outputs = []
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            padded = np.pad(batch, ((0, batch_size - len(batch)), (0, 0), (0, 0), (0, 0)))
            x = resize(jnp.asarray(padded), self.config.input_size) * 2.0 - 1.0
            logits, side_logits, slot_logits, features = self._apply(self.variables, x)
            outputs.append([np.asarray(a)[:len(batch)] for a in
                            (jax.nn.sigmoid(logits), jax.nn.softmax(side_logits, -1), slot_logits, features)])
        if not outputs:
            raise ValueError("predict: no images")
        probabilities, side_probabilities, slot_logits, features = (np.concatenate(parts) for parts in zip(*outputs))
        slot_logits = np.where(slot_value_mask(self.slots), slot_logits, -np.inf)
        return Predictions(probabilities, probabilities >= self.thresholds, side_probabilities,
                           side_probabilities.argmax(-1) + 1, features, slot_logits.argmax(-1))

    def save(self, folder: str | Path) -> None:
        """Writes classifier.json (observations, thresholds, config, data signature) + variables.safetensors."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        flat = traverse_util.flatten_dict(jax.device_get(self.variables), sep="/")
        write_safetensors(folder / "variables.safetensors", {k: np.asarray(v) for k, v in flat.items()})
        write_json(folder / "classifier.json", {
            "format_version": FORMAT_VERSION, "observations": list(self.observations),
            "side_observations": list(self.side_observations), "slots": list(self.slots),
            "thresholds": self.thresholds.tolist(),
            "config": self.config.to_dict(), "data_signature": self.data_signature,
            "training_report": self.training_report})

    @classmethod
    def load(cls, folder: str | Path) -> "FindingClassifier":
        folder = Path(folder)
        meta_file = folder / "classifier.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"no classifier in {folder}: {meta_file.name} is missing")
        meta = json.loads(meta_file.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_file}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
        variables = traverse_util.unflatten_dict(read_safetensors(folder / "variables.safetensors"), sep="/")
        return cls(meta["observations"], meta["side_observations"], meta["thresholds"], variables,
                   TrainConfig.from_dict(meta["config"]), meta["data_signature"], meta.get("training_report"),
                   tuple(meta["slots"]))


def make_net(config: TrainConfig, num_findings: int, num_sided: int, num_slots: int = 0) -> ClassifierNet:
    return ClassifierNet(num_findings, num_sided, num_slots, tuple(config.widths), config.feature_dim, config.norm,
                         config.stem_layers, config.downsample)


def slot_value_mask(slots: tuple[str, ...]) -> np.ndarray:
    """bool (S, MAX_VALUES): which value indices each named slot has."""
    sizes = [len(SLOTS[SLOT_NAMES.index(name)].values) for name in slots]
    return np.arange(MAX_VALUES)[None, :] < np.asarray(sizes, int).reshape(-1, 1)


def select_slots(labels: np.ndarray, slots: np.ndarray, min_positives: int) -> tuple[str, ...]:
    """The attribute slots with >= min_positives known values, of >= 2 different values, among studies
    positive for the slot's finding."""
    chosen = []
    for j, slot in enumerate(SLOTS):
        known = slots[(labels[:, CHEXPERT_LABELS.index(slot.finding)] == 1) & (slots[:, j] >= 0), j]
        if len(known) >= min_positives and len(np.unique(known)) >= 2:
            chosen.append(slot.name)
    return tuple(chosen)



def select_observations(labels: np.ndarray, min_positives: int) -> tuple[str, ...]:
    """Observations with >= min_positives positive labels in (N, 14) `labels`; "No Finding" is left out
    (it is the absence of the others)."""
    observations = tuple(name for i, name in enumerate(CHEXPERT_LABELS)
                         if name != "No Finding" and (labels[:, i] == 1).sum() >= min_positives)
    if not observations:
        raise ValueError(f"no observation has >= {min_positives} positive training labels")
    return observations


def select_side_observations(labels: np.ndarray, sides: np.ndarray, observations, min_positives: int
                             ) -> tuple[str, ...]:
    """Those of `observations` with >= min_positives positives that state a side, of >= 2 different sides."""
    sided = []
    for name in observations:
        i = CHEXPERT_LABELS.index(name)
        stated = sides[labels[:, i] == 1, i]
        stated = stated[stated > 0]
        if len(stated) >= min_positives and len(np.unique(stated)) >= 2:
            sided.append(name)
    return tuple(sided)


def targets(data: LabelledImages, observations, side_observations, slots=()) -> dict[str, np.ndarray]:
    """Training targets: label (N, F) {0,1} with mask (uncertain -> 0); side (N, F_side) in 0..2 with mask
    (only positives with a stated side); slot (N, S) value indices with mask (only positives of the slot's
    finding whose value is known)."""
    columns = [CHEXPERT_LABELS.index(n) for n in observations]
    side_columns = [CHEXPERT_LABELS.index(n) for n in side_observations]
    labels = data.labels[:, columns]
    side_labels, side_codes = data.labels[:, side_columns], data.sides[:, side_columns]
    slot_columns = [SLOT_NAMES.index(name) for name in slots]
    slot_codes = data.slots[:, slot_columns].astype(np.int32)
    slot_positive = data.labels[:, [CHEXPERT_LABELS.index(SLOTS[j].finding) for j in slot_columns]] == 1
    return {"label": (labels == 1).astype(np.float32), "label_mask": (labels != UNCERTAIN).astype(np.float32),
            "side": np.maximum(side_codes.astype(np.int32) - 1, 0),
            "side_mask": ((side_labels == 1) & (side_codes > 0)).astype(np.float32),
            "slot": np.maximum(slot_codes, 0).reshape(len(data), len(slots)),
            "slot_mask": (slot_positive & (slot_codes >= 0)).astype(np.float32).reshape(len(data), len(slots))}


def positive_weights(target: dict[str, np.ndarray], max_weight: float) -> np.ndarray:
    """(F,) loss weight of each finding's positives: sqrt(negatives / positives) clipped to [1, max_weight],
    so rare findings are learned early rather than predicted absent."""
    known = target["label_mask"]
    positives = (target["label"] * known).sum(0)
    negatives = ((1 - target["label"]) * known).sum(0)
    return np.clip(np.sqrt(negatives / np.maximum(positives, 1)), 1.0, max_weight).astype(np.float32)


def augment(rng: jax.Array, images: jnp.ndarray, config: TrainConfig) -> jnp.ndarray:
    """Random shift (edge padding), contrast, brightness and Gaussian noise; never a left-right flip.

    images (B, S, S, 1) in [0, 1] -> same shape."""
    b, s = images.shape[0], images.shape[1]
    k_shift, k_contrast, k_bright, k_level, k_noise = jax.random.split(rng, 5)
    m = config.max_shift
    if m:
        padded = jnp.pad(images, ((0, 0), (m, m), (m, m), (0, 0)), mode="edge")
        offsets = jax.random.randint(k_shift, (b, 2), 0, 2 * m + 1)
        images = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (s, s, 1)))(padded, offsets)
    mean = images.mean(axis=(1, 2, 3), keepdims=True)
    contrast = jax.random.uniform(k_contrast, (b, 1, 1, 1), minval=1 - config.contrast, maxval=1 + config.contrast)
    brightness = jax.random.uniform(k_bright, (b, 1, 1, 1), minval=-config.brightness, maxval=config.brightness)
    noise = config.noise_std * jax.random.uniform(k_level, (b, 1, 1, 1)) * jax.random.normal(k_noise, images.shape)
    return (images - mean) * contrast + mean + brightness + noise


def loss_fn(params, state: dict, net: ClassifierNet, images: jnp.ndarray, batch: dict):
    """Masked binary cross-entropy over findings + masked cross-entropy over sides and over attribute slots
    (each a masked mean). state: the non-trainable variables (batch_stats); returns (loss, updated state)."""
    (logits, side_logits, slot_logits, _), state = net.apply({"params": params, **state}, images * 2.0 - 1.0,
                                                             train=True, mutable=list(state))
    y = batch["label"]
    bce = batch["positive_weight"] * y * jax.nn.softplus(-logits) + (1.0 - y) * jax.nn.softplus(logits)
    loss = (bce * batch["label_mask"]).sum() / jnp.maximum(batch["label_mask"].sum(), 1.0)
    if net.num_sided:
        ce = optax.softmax_cross_entropy_with_integer_labels(side_logits, batch["side"])
        loss += (ce * batch["side_mask"]).sum() / jnp.maximum(batch["side_mask"].sum(), 1.0)
    if net.num_slots:
        slot_logits = jnp.where(batch["slot_values"], slot_logits, -1e9)
        ce = optax.softmax_cross_entropy_with_integer_labels(slot_logits, batch["slot"])
        loss += (ce * batch["slot_mask"]).sum() / jnp.maximum(batch["slot_mask"].sum(), 1.0)
    return loss, state


def train_classifier(train: LabelledImages, validation: LabelledImages, config: TrainConfig = TrainConfig(),
                     observations: tuple[str, ...] | None = None) -> FindingClassifier:
    """Trains on `train`, sets per-finding thresholds on `validation`; logs throughput.

    observations: the findings to learn (default: `select_observations` with config.min_positives).
    """
    observations = observations or select_observations(train.labels, config.min_positives)
    side_observations = select_side_observations(train.labels, train.sides, observations, config.min_positives)
    slots = tuple(name for name in select_slots(train.labels, train.slots, config.min_positives)
                  if SLOTS[SLOT_NAMES.index(name)].finding in observations)
    if len(train) < config.batch_size:
        raise ValueError(f"train: {len(train)} images, fewer than one batch of {config.batch_size}")
    net = make_net(config, len(observations), len(side_observations), len(slots))
    images = np.asarray(resize(jnp.asarray(as_float_images(train.images)), config.input_size))
    train_targets = targets(train, observations, side_observations, slots)
    values = jnp.asarray(slot_value_mask(slots))
    positive_weight = positive_weights(train_targets, config.max_positive_weight)
    steps_per_epoch = len(train) // config.batch_size
    total_steps = steps_per_epoch * config.epochs
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.learning_rate, min(config.warmup_steps, total_steps // 2),
                                                  total_steps)
    optimizer = optax.adamw(schedule, weight_decay=config.weight_decay)
    rng = jax.random.key(config.seed)
    variables = jax.jit(net.init)(rng, jnp.zeros((1, config.input_size, config.input_size, 1)))
    params, state = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, state, opt_state, batch_images, batch, step_rng):
        batch = {**batch, "positive_weight": positive_weight, "slot_values": values}
        augmented = augment(step_rng, batch_images, config)
        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, net, augmented, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state, loss

    order_rng = np.random.default_rng(config.seed)
    start, losses = time.perf_counter(), []
    progress = tqdm(total=total_steps, desc="classifier", unit="step", leave=False)
    for epoch in range(config.epochs):
        order = order_rng.permutation(len(train))
        for step in range(steps_per_epoch):
            index = np.sort(order[step * config.batch_size:(step + 1) * config.batch_size])
            batch = {k: v[index] for k, v in train_targets.items()}
            step_rng = jax.random.fold_in(rng, epoch * steps_per_epoch + step)
            params, state, opt_state, loss = train_step(params, state, opt_state, images[index], batch, step_rng)
            losses.append(loss)
            progress.update()
        progress.set_postfix(loss=f"{float(losses[-1]):.4f}")
    progress.close()
    seconds = time.perf_counter() - start
    logging.info("classifier: %d steps in %.1f s (%.0f images/s)", total_steps, seconds,
                 total_steps * config.batch_size / seconds)
    classifier = FindingClassifier(observations, side_observations, np.full(len(observations), 0.5),
                                   {"params": params, **state}, config,
                                   train.signature(), {"train_seconds": seconds, "steps": total_steps,
                                                       "final_loss": float(np.mean(losses[-steps_per_epoch:]))},
                                   slots)
    classifier.thresholds = select_thresholds(classifier.predict(validation.images).probabilities,
                                              targets(validation, observations, ()))
    return classifier


def select_thresholds(probabilities: np.ndarray, target: dict[str, np.ndarray],
                      grid: np.ndarray = np.linspace(0.02, 0.98, 49)) -> np.ndarray:
    """Per finding, the grid threshold of highest validation accuracy (ties: the one nearest 0.5).

    probabilities (N, F); target["label"], target["label_mask"] (N, F) -> thresholds (F,)."""
    label, mask = target["label"].astype(bool), target["label_mask"]
    correct = ((probabilities[None] >= grid[:, None, None]) == label[None]) * mask[None]  # (G, N, F)
    accuracy = correct.sum(1) / np.maximum(mask.sum(0), 1)  # (G, F)
    tie_break = -np.abs(grid - 0.5)[:, None] * 1e-6
    return grid[np.argmax(accuracy + tie_break, axis=0)].astype(np.float32)


def evaluate_classifier(classifier: FindingClassifier, data: LabelledImages) -> dict:
    """Accuracy of the classifier on labelled images.

    Returns a dict with
      major_accuracy: mean over the major findings (`classifier.major_findings`) of each one's accuracy
        (uncertain labels skipped; not mentioned = absent) -- `classifier_accuracy_real`;
      exact_match: fraction of images whose every major finding is predicted right (the stricter number);
      mean_accuracy: mean over all observations of the per-observation accuracy;
      per_observation: {name: {accuracy, auroc, sensitivity, specificity, positives}};
      side_accuracy: fraction of positive, side-stated findings whose predicted side is right
        (per observation under per_observation[name]["side_accuracy"]);
      attribute_accuracy: {attribute: fraction of positive findings with a known value whose predicted
        value is right} over the classifier's slots, and per slot under "slot_accuracy".
    """
    predictions = classifier.predict(data.images)
    target = targets(data, classifier.observations, classifier.side_observations, classifier.slots)
    label, mask = target["label"].astype(bool), target["label_mask"].astype(bool)
    correct = (predictions.positive == label) | ~mask
    major = [classifier.observations.index(n) for n in classifier.major_findings]
    per_observation = {}
    for j, name in enumerate(classifier.observations):
        m = mask[:, j]
        y, p = label[m, j], predictions.positive[m, j]
        per_observation[name] = {
            "accuracy": float((y == p).mean()), "positives": int(y.sum()),
            "sensitivity": float(p[y].mean()) if y.any() else None,
            "specificity": float((~p[~y]).mean()) if (~y).any() else None,
            "auroc": metrics.auroc(predictions.probabilities[m, j], y) if 0 < y.sum() < len(y) else None}
    side_hits = predictions.side == target["side"] + 1
    side_mask = target["side_mask"].astype(bool)
    for k, name in enumerate(classifier.side_observations):
        if side_mask[:, k].any():
            per_observation[name]["side_accuracy"] = float(side_hits[side_mask[:, k], k].mean())
    slot_hits, slot_mask = predictions.slot_values == target["slot"], target["slot_mask"].astype(bool)
    slot_accuracy = {name: float(slot_hits[slot_mask[:, k], k].mean()) if slot_mask[:, k].any() else None
                     for k, name in enumerate(classifier.slots)}
    attribute_accuracy = {}
    for attribute in ATTRIBUTES:
        columns = [k for k, name in enumerate(classifier.slots) if SLOTS[SLOT_NAMES.index(name)].attribute == attribute]
        hits = slot_hits[:, columns][slot_mask[:, columns]]
        attribute_accuracy[attribute] = float(hits.mean()) if hits.size else None
    return {"major_accuracy": float(np.mean([per_observation[n]["accuracy"] for n in classifier.major_findings])),
            "exact_match": float(correct[:, major].all(axis=1).mean()),
            "mean_accuracy": float(np.mean([v["accuracy"] for v in per_observation.values()])),
            "side_accuracy": float(side_hits[side_mask].mean()) if side_mask.any() else None,
            "attribute_accuracy": attribute_accuracy, "slot_accuracy": slot_accuracy,
            "major_findings": list(classifier.major_findings), "num_images": len(data),
            "per_observation": per_observation}


def load_or_train(folder: str | Path, train: LabelledImages | Callable[[], LabelledImages],
                  validation: LabelledImages, config: TrainConfig = TrainConfig(),
                  signature: str | None = None) -> tuple[FindingClassifier, bool]:
    """The classifier cached in `folder` when it was trained with `config` on the data `signature` identifies;
    else trains one and caches it there. Returns (classifier, was_cached).

    train: the training images, or a function that returns them (called only when training);
    signature: what identifies them (default: `train.signature()`; required when `train` is a function).
    """
    if signature is None:
        if callable(train):
            raise ValueError("load_or_train: a function for `train` needs the `signature` of what it returns")
        signature = train.signature()
    folder = Path(folder)
    if (folder / "classifier.json").is_file():
        cached = FindingClassifier.load(folder)
        if cached.config == config and cached.data_signature == signature:
            return cached, True
        logging.info("classifier cache %s was trained on other data or with another recipe; retraining", folder)
    classifier = train_classifier(train() if callable(train) else train, validation, config)
    classifier.data_signature = signature
    classifier.save(folder)
    return classifier, False
