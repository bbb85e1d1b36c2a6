"""Bags of a slide cohort, the cohort cross-validation's bag source (:mod:`.cohort_cv`).

The slides' feature files are read once (:func:`histomil.data.cohort.load_slide_features`); each fold
takes the bags of its patients at the chosen level: one bag per patient (the tiles of all its slides),
or one bag per slide. Predictions are always per patient: a slide-level model's slide probabilities
are averaged over each patient's slides (the mean probability), so metrics, thresholds and the
out-of-fold table count patients, whatever the bag level.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from histomil.data.cohort import BagLevel, Cohort, patient_bag
from histomil.features.lazy import bag_digest
from histomil.features.store import FeatureBag
from histomil.files import natural_key


class CohortSource:
    """The bags of a cohort's patients at one level, and patient-level aggregation of their predictions."""

    def __init__(self, cohort: Cohort, level: BagLevel, slide_bags: dict[str, FeatureBag]) -> None:
        self.cohort, self.level, self.slide_bags = cohort, level, slide_bags
        self._patient_bags: dict[str, FeatureBag] = {}

    def patient_slides(self, patient: str) -> list[str]:
        return self.cohort.slides_of(patient)

    def bags(self, patients: Sequence[str]) -> list[FeatureBag]:
        """The bags of ``patients`` (natural order): one per patient, or each patient's slides in turn."""
        out: list[FeatureBag] = []
        for p in sorted(patients, key=natural_key):
            slides = [self.slide_bags[s] for s in self.patient_slides(p)]
            if self.level == "slide":
                out += slides
                continue
            if p not in self._patient_bags:
                self._patient_bags[p] = patient_bag(p, slides, self.cohort.patient_label[p])
            out.append(self._patient_bags[p])
        return out

    def per_patient(self, bags: Sequence[FeatureBag], probs: np.ndarray) -> tuple[list[str], np.ndarray]:
        """(patients in order of first appearance, their probabilities (patients, classes)): a patient's
        bags' probabilities averaged (one bag per patient: unchanged; slide bags: the mean over its slides)."""
        probs = np.asarray(probs, dtype=np.float64)
        order: list[str] = []
        rows: dict[str, list[int]] = {}
        for i, b in enumerate(bags):
            p = str(b.attrs.get("patient", b.bag_id))
            if p not in rows:
                order.append(p)
                rows[p] = []
            rows[p].append(i)
        return order, np.stack([probs[rows[p]].mean(axis=0) for p in order])

    def labels(self, patients: Sequence[str]) -> np.ndarray:
        return self.cohort.labels_of(patients)

    def features_digest(self) -> str:
        """Identifies every slide's features (ids, shapes and values): a resumed cross-validation refuses
        feature files that changed since its folder was made."""
        h = hashlib.sha256()
        for s in self.cohort.slides:
            bag = self.slide_bags[s]
            h.update(f"{s}|{tuple(bag.shape)}\n".encode())
            h.update(bag_digest(bag).encode())  # streamed or in memory: the same value
        return h.hexdigest()


__all__ = ["CohortSource"]
