"""The cohort table: one or two CSVs, every mistake one line naming the file and rows, class order, bags."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from cohort_data import DIM, write_cohort

from histomil.data.cohort import (
    CohortColumns,
    cohort_bags,
    load_slide_features,
    match_feature_files,
    read_cohort,
    tiles_by_slide,
)
from histomil.errors import HistomilError
from histomil.features.store import FeatureBag, write_feature_bag


def csv_file(path: Path, text: str) -> Path:
    path.write_text(text.strip() + "\n")
    return path


@pytest.fixture(scope="module")
def cohort_files(tmp_path_factory):
    return write_cohort(tmp_path_factory.mktemp("cohort"))


def test_reads_multi_slide_patients_and_builds_patient_bags(cohort_files):
    table, feats, slides_of = cohort_files
    cohort = match_feature_files(read_cohort(table, "label"), feats)
    assert cohort.classes == ["normal", "tumor"] and cohort.positive_class == "tumor"
    assert cohort.patients == sorted(slides_of) and len(cohort.slides) == sum(map(len, slides_of.values()))
    assert cohort.class_counts() == {"normal": 6, "tumor": 6}
    assert "positive class 'tumor'" in cohort.describe()
    slide_bags = load_slide_features(cohort)
    bags = cohort_bags(cohort, "patient", slide_bags)
    assert [b.bag_id for b in bags] == cohort.patients
    for bag in bags:
        slides = slides_of[bag.bag_id]
        assert bag.attrs["slides"] == slides  # the patient's bag holds all its slides, in order
        assert len(bag) == sum(len(slide_bags[s]) for s in slides)
        np.testing.assert_array_equal(bag.features, np.concatenate([slide_bags[s].features for s in slides]))
        assert bag.label == (1 if int(bag.bag_id[1:]) % 2 else 0)
        # each tile keeps its slide: attention splits back into per-slide maps with the slide's coordinates
        att = np.arange(len(bag), dtype=np.float64)
        parts = tiles_by_slide(bag, att)
        assert list(parts) == slides
        for s in slides:
            coords, values = parts[s]
            np.testing.assert_array_equal(coords, slide_bags[s].coords)
            assert values.shape == (len(slide_bags[s]),)
    per_slide = cohort_bags(cohort, "slide", slide_bags)
    assert [b.bag_id for b in per_slide] == [s for p in cohort.patients for s in slides_of[p]]
    assert all(b.attrs["patient"] == cohort.slide_patient[b.bag_id] for b in per_slide)
    assert all(b.features.shape[1] == DIM for b in per_slide)


def test_two_tables_as_stamp_has_them(tmp_path):
    slides = csv_file(tmp_path / "slides.csv", "slide,PATIENT\na,p1\nb,p1\nc,p2\nd,p3")
    clinical = csv_file(tmp_path / "clini.csv", "patient,isMSIH,split\np1,MSIH,train\np2,nonMSIH,train\np3,MSIH,test\np9,MSIH,train")
    cohort = read_cohort(slides, "isMSIH", clinical_table=clinical)
    assert cohort.slide_patient == {"a": "p1", "b": "p1", "c": "p2", "d": "p3"}
    assert cohort.classes == ["MSIH", "nonMSIH"] and cohort.patient_label == {"p1": 0, "p2": 1, "p3": 0}
    assert cohort.patient_split == {"p1": "train", "p2": "train", "p3": "test"}
    # explicit class order: the positive class is the second
    flipped = read_cohort(slides, "isMSIH", clinical_table=clinical, classes=["nonMSIH", "MSIH"])
    assert flipped.positive_class == "MSIH" and flipped.patient_label == {"p1": 1, "p2": 0, "p3": 1}
    # a slide whose patient has no clinical row
    extra = csv_file(tmp_path / "slides2.csv", "slide,patient\na,p1\nc,p2\nx,p7")
    with pytest.raises(HistomilError, match=r"slides2.csv: 1 slide\(s\) belong to patients missing from .*clini.csv: p7"):
        read_cohort(extra, "isMSIH", clinical_table=clinical)
    with pytest.warns(UserWarning, match="dropped"):
        assert "x" not in read_cohort(extra, "isMSIH", clinical_table=clinical, on_missing="skip").slide_patient


def test_numeric_labels_sort_numerically_and_columns_are_configurable(tmp_path):
    t = csv_file(tmp_path / "t.csv", "Slide_ID,Case,grade\ns1,c1,10\ns2,c2,9\ns3,c3,2")
    cohort = read_cohort(t, "GRADE", columns=CohortColumns(slide="slide_id", patient="case"))
    assert cohort.classes == ["2", "9", "10"] and cohort.positive_class is None
    assert cohort.patient_label == {"c1": 2, "c2": 1, "c3": 0}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("slide,patient,label\na,p1,0\na,p2,1", r"t.csv: slide 'a' is listed twice \(lines 2 and 3\)"),
        ("slide,patient,label\na,,0\nb,p2,1", r"t.csv: line\(s\) 2 have no patient id in column 'patient'"),
        ("slide,patient,label\na,p1,0\nb,p1,1\nc,p2,1", r"t.csv: patient 'p1' has conflicting label \(label\): '0' on line 2, '1' on line 3"),
        ("slide,patient,label\na,p1,1\nb,p2,1", r"every patient has the label '1' in column 'label'; a target needs two classes"),
        ("slide,patient,label\na,p1,Tumor\nb,p2,tumor\nc,p3,normal", r"the label 'Tumor' \(line 2\) and 'tumor' \(line 3\) look like one class"),
        ("slide,patient,label\na,p1,1\nb,p2,1.0\nc,p3,0", r"the label '1' \(line 2\) and '1.0' \(line 3\) look like one class"),
        ("slide,patient,label\na,p1,1\nb,p2,\nc,p3,0", r"line\(s\) 3 have no value in the target column 'label'"),
        ("slide,patient,y\na,p1,1\nb,p2,0", r"t.csv: the table has no 'label' column \(--target\); columns: slide, patient, y"),
        ("slide,case,label\na,p1,1", r"t.csv: the table has no 'patient' column \(--patient-column\)"),
        ("slide,patient,label,split\na,p1,1,train\nb,p2,0,validation", r"line 3: 'split' is 'validation'; expected train or test"),
        ("slide,patient,label,fold\na,p1,1,0\nb,p2,0,x", r"line 3: 'fold' is 'x'; expected a fold number"),
        ("slide,patient,label", r"t.csv: cohort table has a header but no rows"),
    ],
)
def test_table_errors_name_the_file_and_rows(tmp_path, text, message):
    t = csv_file(tmp_path / "t.csv", text)
    with pytest.raises(HistomilError, match=message):
        read_cohort(t, "label")


def test_missing_labels_can_be_skipped(tmp_path):
    t = csv_file(tmp_path / "t.csv", "slide,patient,label\na,p1,1\nb,p2,NA\nc,p3,0")
    with pytest.warns(UserWarning, match=r"line\(s\) 3 have no value .* dropped"):
        cohort = read_cohort(t, "label", on_missing="skip")
    assert cohort.patients == ["p1", "p3"]


def test_classes_option_refuses_unknown_labels(tmp_path):
    t = csv_file(tmp_path / "t.csv", "slide,patient,label\na,p1,tumour\nb,p2,normal")
    with pytest.raises(HistomilError, match=r"label\(s\) tumour are not among the classes given \(normal, tumor\)"):
        read_cohort(t, "label", classes=["normal", "tumor"])


def test_feature_files_and_rows_must_match(tmp_path, cohort_files):
    table, feats, slides_of = cohort_files
    rows = table.read_text().splitlines()
    t = csv_file(tmp_path / "t.csv", "\n".join(rows[:-1] + ["ghost-slide,P99,tumor"]))  # last slide swapped for a ghost
    last = rows[-1].split(",")[0]
    with pytest.raises(HistomilError) as err:
        match_feature_files(read_cohort(t, "label"), feats)
    msg = str(err.value)
    assert "1 slide(s) of" in msg and "ghost-slide (line" in msg and "have no feature file" in msg
    assert f"1 feature file(s) in {feats} have no row" in msg and last in msg and "--on-missing skip" in msg
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cohort = match_feature_files(read_cohort(t, "label"), feats, on_missing="skip")
    assert len(caught) == 2 and "ghost-slide" in str(caught[0].message) and last in str(caught[1].message)
    assert "ghost-slide" not in cohort.slide_patient and "P99" not in cohort.patients
    assert set(cohort.feature_files) == set(cohort.slide_patient)


def test_feature_files_are_checked(tmp_path):
    t = csv_file(tmp_path / "t.csv", "slide,patient,label\na,p1,1\nb,p2,0\nc,p3,0")
    folder = tmp_path / "f"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for s, d, enc in (("a", 8, "uni_v1"), ("b", 8, "uni_v1"), ("c", 6, "uni_v1")):
        write_feature_bag(folder / f"{s}.h5", FeatureBag(s, rng.normal(size=(5, d)).astype(np.float32),
                                                         [str(i) for i in range(5)], attrs={"encoder": enc}))
    cohort = match_feature_files(read_cohort(t, "label"), folder)
    with pytest.raises(HistomilError, match=r"c.h5: 6-d features, but .*a.h5 has 8-d"):
        load_slide_features(cohort)
    write_feature_bag(folder / "c.h5", FeatureBag("c", rng.normal(size=(5, 8)).astype(np.float32),
                                                  [str(i) for i in range(5)], attrs={"encoder": "conch_v1"}))
    with pytest.raises(HistomilError, match=r"c.h5: features of encoder 'conch_v1', but .*a.h5 has 'uni_v1'"):
        load_slide_features(cohort)
    bad = rng.normal(size=(5, 8)).astype(np.float32)
    bad[2, 3] = np.nan
    write_feature_bag(folder / "c.h5", FeatureBag("c", bad, [str(i) for i in range(5)], attrs={"encoder": "uni_v1"}))
    with pytest.raises(HistomilError, match=r"c.h5: .*NaN or infinite values in 1 of 5 tiles"):
        load_slide_features(cohort)
