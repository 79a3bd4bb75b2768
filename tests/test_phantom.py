"""The synthetic cohort's model in memory: options, determinism, anatomy, physics, labels."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from pipeline.labels import CSF_LABEL, LABEL_OF, LUMBAR_LEVELS, VERTEBRAE
from train.phantom import CohortOptions, simulate_patient
from train.phantom.latent import dxa_class, prevalence_offset, sample_bone
from train.phantom.simulate import prepare_patient
from train.phantom.tissue import TISSUES, SequenceParams, tissue_signal

# Prepared patients are cheap (no rendering): used for the range checks below.
N_PREPARED = 60


@pytest.fixture(scope="module")
def prepared() -> list:
    options = CohortOptions(seed=11)
    return [prepare_patient(11, index, options) for index in range(N_PREPARED)]


@pytest.fixture(scope="module")
def patient():
    return simulate_patient(7, 3, CohortOptions(seed=7))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_patients", 0),
        ("prevalence", 0.99),
        ("vendors", ()),
        ("vendors", ("agfa",)),
        ("field_strengths", (7.0,)),
        ("matrix", (256,)),
        ("transfer_syntax", "jpeg-lossy"),
        ("series", ("dwi",)),
        ("unknown_option", 1),
    ],
)
def test_options_reject_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        CohortOptions(**{field: value})
    assert field in str(info.value)


def test_options_normalise_order_and_duplicates() -> None:
    options = CohortOptions(series=("t2", "localizer", "t2"), matrix=(512, 320, 512))
    assert options.series == ("localizer", "t2")
    assert options.matrix == (320, 512)


def test_simulate_patient_is_deterministic(patient) -> None:
    again = simulate_patient(7, 3, CohortOptions(seed=7))
    assert [s.series_uid for s in again.series] == [s.series_uid for s in patient.series]
    assert again.study.study_uid == patient.study.study_uid
    for a, b in zip(patient.series, again.series, strict=True):
        assert a.sop_instance_uids == b.sop_instance_uids
        assert np.array_equal(a.pixels, b.pixels)
        if a.labelmap is not None:
            assert np.array_equal(a.labelmap, b.labelmap)


def test_patient_does_not_depend_on_cohort_size_or_series_selection(patient) -> None:
    alone = simulate_patient(7, 3, CohortOptions(seed=7, n_patients=5000, series=("t1",)))
    t1 = patient.get("t1")
    assert [s.kind for s in alone.series] == ["t1"]
    assert np.array_equal(alone.get("t1").pixels, t1.pixels)
    assert alone.get("t1").sop_instance_uids == t1.sop_instance_uids


def test_other_seed_or_patient_differs(patient) -> None:
    other_seed = simulate_patient(8, 3, CohortOptions(seed=8, series=("t1",)))
    other_index = simulate_patient(7, 4, CohortOptions(seed=7, series=("t1",)))
    for other in (other_seed, other_index):
        assert other.study.study_uid != patient.study.study_uid
        assert other.get("t1").series_uid != patient.get("t1").series_uid


def test_uids_are_valid_and_unique(patient) -> None:
    uids = [patient.study.study_uid, patient.study.frame_of_reference_uid]
    for series in patient.series:
        uids += [series.series_uid, *series.sop_instance_uids]
    assert len(set(uids)) == len(uids)
    for uid in uids:
        assert uid.startswith("2.25.") and len(uid) <= 64
        assert all(part.isdigit() and (part == "0" or part[0] != "0") for part in uid.split("."))


def test_series_shapes_dtypes_and_labels(patient) -> None:
    kinds = [s.kind for s in patient.series]
    assert kinds[0] == "localizer" and kinds[-1] == "axial_t2"
    assert sorted(kinds[1:4]) == ["stir", "t1", "t2"]
    for series in patient.series:
        assert series.pixels.dtype == np.uint16
        assert series.pixels.max() <= 4095 and series.pixels.max() > 200
        assert series.pixels.shape[0] == len(series.planes)
        assert not series.pixels.flags.writeable
        if series.kind in ("t1", "t2", "stir"):
            assert series.labelmap is not None and series.geometry is not None
            assert series.labelmap.shape == series.pixels.shape
            present = set(np.unique(series.labelmap).tolist())
            assert present == set(range(0, CSF_LABEL + 1))
        else:
            assert series.labelmap is None
    assert patient.get("localizer").geometry is None
    assert patient.get("axial_t2").geometry is not None


def test_stacks_are_sorted_along_the_normal_and_numbered_monotonically(patient) -> None:
    for series in patient.series:
        if series.kind == "localizer":
            assert series.instance_numbers == tuple(range(1, len(series.planes) + 1))
            continue
        normal = series.planes[0].normal
        along = np.array([p.origin @ normal for p in series.planes])
        assert np.all(np.diff(along) > 0)
        steps = set(np.diff(series.instance_numbers).tolist())
        assert steps in ({1}, {-1})
        assert sorted(series.instance_numbers) == list(range(1, len(series.planes) + 1))


def test_both_instance_number_directions_occur(prepared) -> None:
    from train.phantom.simulate import _numbering

    directions = set()
    for p in prepared[:20]:
        numbering = _numbering(p, p.protocol("t1"))
        directions.add(int(numbering[1] - numbering[0]))
    assert directions == {1, -1}


def test_geometry_matches_the_planes(patient) -> None:
    t1 = patient.get("t1")
    g = t1.geometry
    first = t1.planes[0]
    assert np.allclose(g.origin, first.origin)
    assert np.allclose(g.row_cosines, first.row_cosines)
    assert np.allclose(g.col_cosines, first.col_cosines)
    assert g.shape == t1.pixels.shape
    assert g.spacing[1:] == first.spacing
    # Index (k, j, i) -> LPS through the geometry lands on the plane's own pixel position.
    k, j, i = len(t1.planes) - 1, 17, 230
    assert np.allclose(g.index_to_lps(np.array([k, j, i])), t1.planes[k].pixel_to_lps(j, i))


def test_masks_sit_on_the_anatomy(patient) -> None:
    """The centroid of every vertebral-body label lies at that vertebra's centre."""
    from train.phantom.simulate import prepare_patient as prepare

    anatomy = prepare(7, 3, CohortOptions(seed=7)).anatomy
    t1 = patient.get("t1")
    for name in VERTEBRAE:
        kji = np.argwhere(t1.labelmap == LABEL_OF[name]).mean(axis=0)
        centroid = t1.geometry.index_to_lps(kji)
        centre = anatomy.centre_of(name)
        normal = t1.geometry.normal
        offset = centroid - centre
        in_plane = offset - (offset @ normal) * np.asarray(normal)
        assert np.linalg.norm(in_plane) < 3.0, name
        # Through the plane only the sampled slices count: within a slice spacing.
        assert abs(offset @ normal) < t1.geometry.spacing[0] + 1.0, name


def test_image_contrast_follows_the_labels(patient) -> None:
    """On each sequence the labelled structures have the expected relative signal."""
    medians = {}
    for kind in ("t1", "t2", "stir"):
        s = patient.get(kind)
        body = np.isin(s.labelmap, [LABEL_OF[level] for level in LUMBAR_LEVELS])
        csf = s.labelmap == CSF_LABEL
        medians[kind] = (float(np.median(s.pixels[body])), float(np.median(s.pixels[csf])))
    assert medians["t1"][0] > 1.5 * medians["t1"][1]  # fatty marrow bright, CSF dark on T1
    assert medians["t2"][1] > 1.5 * medians["t2"][0]  # CSF bright on T2
    assert medians["stir"][1] > 2.0 * medians["stir"][0]  # marrow fat suppressed on STIR


def test_spin_echo_physics() -> None:
    t1w = SequenceParams("se", 550.0, 10.0)
    t2w = SequenceParams("se", 3500.0, 100.0)
    stir = SequenceParams("ir", 4000.0, 50.0, 150.0)
    fat, csf, water = TISSUES["fat"], TISSUES["csf"], TISSUES["marrow_water"]
    for field in (1.5, 3.0):
        assert tissue_signal(fat, t1w, field) > 4 * tissue_signal(csf, t1w, field)
        assert tissue_signal(csf, t2w, field) > tissue_signal(fat, t2w, field)
        assert tissue_signal(fat, t1w, field) > tissue_signal(water, t1w, field)
    # STIR suppresses fat (TI 150 ms is a little short of the null at ln 2 * T1 of fat).
    assert tissue_signal(fat, stir, 1.5) < 0.2 * tissue_signal(csf, stir, 1.5)
    assert tissue_signal(fat, stir, 1.5) < 0.2 * tissue_signal(fat, t1w, 1.5)
    expected = 0.9 * (1 - np.exp(-550 / 270)) * np.exp(-10 / 110)
    assert tissue_signal(fat, t1w, 1.5) == pytest.approx(expected)


def test_marrow_texture_coarsens_as_density_falls() -> None:
    from train.phantom.latent import texture_parameters

    rng = np.random.default_rng(0)
    dense = texture_parameters(np.full(200, 0.16), rng)
    porous = texture_parameters(np.full(200, 0.05), rng)
    assert porous[0].mean() > 2 * dense[0].mean()  # correlation length
    assert porous[1].mean() > 2 * dense[1].mean()  # amplitude
    assert porous[2].mean() > dense[2].mean() + 0.4  # vertical striation


def test_latent_model_matches_the_literature() -> None:
    offset = prevalence_offset(0.35, 0.75)
    bone = sample_bone(np.random.default_rng(3), 6000, offset=offset, female_fraction=0.75)
    scored = [VERTEBRAE.index(level) for level in ("L1", "L2", "L3", "L4")]
    ff = bone.fat_fraction[:, scored].mean(axis=1)
    classes = np.array([dxa_class(t) for t in bone.t_score])
    osteoporosis, normal = ff[classes == "osteoporosis"], ff[classes == "normal"]
    assert 0.31 <= bone.osteoporosis.mean() <= 0.39
    assert 0.60 <= osteoporosis.mean() <= 0.72 and 0.50 <= normal.mean() <= 0.60
    assert osteoporosis.mean() - normal.mean() == pytest.approx(0.11, abs=0.04)
    assert -0.75 <= np.corrcoef(ff, bone.t_score)[0, 1] <= -0.55
    assert np.mean(bone.age >= 50) > 0.85
    # DXA is not the latent density: it is noisy and overestimates with degeneration.
    scored_latent = bone.t_level[:, scored].min(axis=1)
    assert 0.1 < np.std(bone.t_score - scored_latent) < 0.8
    # Low density brings fractures; they are occasional.
    fractured = (bone.fracture_loss > 0).any(axis=1)
    assert 0.02 < fractured.mean() < 0.25
    assert fractured[bone.osteoporosis].mean() > 3 * fractured[~bone.osteoporosis].mean()


def test_prevalence_option_moves_the_prevalence() -> None:
    for target in (0.15, 0.5):
        offset = prevalence_offset(target, 0.75)
        bone = sample_bone(np.random.default_rng(9), 8000, offset=offset, female_fraction=0.75)
        assert bone.osteoporosis.mean() == pytest.approx(target, abs=0.02)


def test_anatomy_and_protocol_ranges(prepared) -> None:
    vendors, fields, t2_grids = set(), set(), 0
    for p in prepared:
        vendors.add(p.study.vendor)
        fields.add(p.study.field_strength)
        for vert in p.anatomy.vertebrae:
            if vert.name in LUMBAR_LEVELS and not vert.spec.fracture_loss:
                assert 25.0 <= vert.body.height <= 30.0
                assert 30.0 <= 2 * vert.body.half_depth <= 38.0
        for protocol in p.protocols:
            seq, planes = protocol.sequence, protocol.planes
            if protocol.kind in ("t1", "t2", "stir"):
                assert 11 <= len(planes) <= 17
                assert 3.0 <= planes[0].thickness <= 4.0
                assert planes[0].shape in ((320, 320), (512, 512))
                assert 0.5 <= planes[0].spacing[0] <= 1.0
                assert abs(planes[0].normal[0]) > 0.97  # sagittal
            if protocol.kind == "t1":
                assert 400 <= seq.tr <= 700 and 8 <= seq.te <= 15
            elif protocol.kind == "t2":
                assert 2500 <= seq.tr <= 4000 and 80 <= seq.te <= 120
                t2_grids += protocol.grid != p.protocol("t1").grid
            elif protocol.kind == "stir":
                assert seq.kind == "ir" and 140 <= seq.ti <= 190
            elif protocol.kind == "axial_t2":
                assert 20 <= len(planes) <= 30
                assert abs(planes[0].normal[2]) > 0.85  # axial
            elif protocol.kind == "localizer":
                normals = {tuple(np.round(np.abs(pl.normal))) for pl in planes}
                assert normals == {(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)}
        assert p.study.patient_name.startswith("SYNTH^")
    assert vendors == {"siemens", "ge", "philips", "canon"}
    assert fields == {1.5, 3.0}
    assert 0 < t2_grids < len(prepared)


def test_confounders_are_present(prepared) -> None:
    specs = [v for p in prepared for v in p.anatomy.spec.vertebrae]
    assert any(v.haemangioma_mm > 0 for v in specs)
    assert any(v.modic_top or v.modic_bottom for v in specs)
    gains = {round(p.gain, 3) for p in prepared}
    assert len(gains) > 10


def test_matrix_512(prepared) -> None:
    p = simulate_patient(2, 0, CohortOptions(seed=2, matrix=(512,), series=("t1",)))
    t1 = p.get("t1")
    assert t1.pixels.shape[1:] == (512, 512)
    assert 0.5 <= t1.geometry.spacing[1] <= 0.65
    assert set(np.unique(t1.labelmap).tolist()) == set(range(0, CSF_LABEL + 1))
