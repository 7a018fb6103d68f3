from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

import tskd_tune.data.chaos  # noqa: F401  (registers the adapter)
from tskd_tune.cache import Store
from tskd_tune.config import DataConfig, validate
from tskd_tune.data.prepare import make_splits, prepare
from tskd_tune.errors import ConfigError, DataError

N = 32  # slice side; prepared at the same size, so prepared pixels are the slices' own
AIR, LEVEL = -1000, 40  # HU: air is below the default window (40, 400), the level maps to 0.5

# file names deliberately sort differently from InstanceNumber (the published CT names are i0000,0000b.dcm...)
CT_FILES = {"i0000,0000b.dcm": 3, "i0001,0000b.dcm": 1, "i0002,0000b.dcm": 2}


def write_dicom(
    path: Path, pixels: np.ndarray, instance: int | None, modality: str = "CT", intercept=-1024.0
):
    """A minimal valid single-frame greyscale slice (unsigned 16-bit, explicit VR little endian)."""
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if instance is not None:
        ds.InstanceNumber = instance
    if modality == "CT":
        ds.RescaleSlope, ds.RescaleIntercept = 1, intercept
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def ct_slice(instance: int) -> np.ndarray:
    """Air, with HU = window level in column 4 * instance (to recognise the slice) and bone at [0, 0]."""
    hu = np.full((N, N), AIR, np.int32)
    hu[:, 4 * instance] = LEVEL
    hu[0, 0] = 1000
    return hu + 1024  # stored values; the intercept maps them back to HU


def liver_truth(index: int) -> Image.Image:
    """Ground truth number ``index``: liver (255) in rows 4 * index .. 4 * index + 3."""
    truth = np.zeros((N, N), np.uint8)
    truth[4 * index : 4 * index + 4] = 255
    return Image.fromarray(truth)


def write_ct_patient(root: Path, pid: str, files=CT_FILES) -> None:
    patient = root / "Train_Sets" / "CT" / pid
    for name, instance in files.items():
        write_dicom(patient / "DICOM_anon" / name, ct_slice(instance), instance)
    (patient / "Ground").mkdir(parents=True)
    for i in range(len(files)):
        liver_truth(i).save(patient / "Ground" / f"liver_GT_{i:03d}.png")


# MR ground truth: one band per organ, at the published grey value or another value in its range
MR_BANDS = [(63, 1), (58, 1), (126, 2), (111, 2), (189, 3), (199, 3), (252, 4), (240, 4)]


def mr_truth() -> np.ndarray:
    truth = np.zeros((N, N), np.uint8)
    for k, (grey, _) in enumerate(MR_BANDS):
        truth[2 + 3 * k : 4 + 3 * k, 4:28] = grey
    return truth


def write_mr_patient(root: Path, pid: str, slices: int = 2) -> None:
    patient = root / "Train_Sets" / "MR" / pid
    ramp = np.tile(np.arange(N, dtype=np.int32) * 20, (N, 1))
    for i in range(slices):
        number = f"IMG-0002-{i + 1:05d}"
        write_dicom(patient / "T2SPIR" / "DICOM_anon" / f"{number}.dcm", ramp, i + 1, "MR")
        Image.fromarray(mr_truth()).save(_mkdir(patient / "T2SPIR" / "Ground") / f"{number}.png")
        # in-phase bright on the left, opposed-phase bright on the right, so the two are told apart
        write_dicom(
            patient / "T1DUAL" / "DICOM_anon" / "InPhase" / f"IMG-0004-{2 * i + 2:05d}.dcm",
            ramp[:, ::-1],
            i + 1,
            "MR",
        )
        write_dicom(
            patient / "T1DUAL" / "DICOM_anon" / "OutPhase" / f"IMG-0004-{2 * i + 1:05d}.dcm",
            ramp,
            i + 1,
            "MR",
        )
        Image.fromarray(mr_truth()).save(
            _mkdir(patient / "T1DUAL" / "Ground") / f"IMG-0004-{2 * i + 2:05d}.png"
        )


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _prepare(root, tmp_path, **options):
    cfg = DataConfig(dataset="chaos", root=root, image_size=N, options=options)
    return prepare(cfg, Store(tmp_path / "cache"))


def _one_line(exc, *parts):
    message = str(exc.value)
    assert "\n" not in message
    for part in parts:
        assert str(part) in message, message


def test_ct_slices_follow_instance_number_and_window(tmp_path):
    write_ct_patient(tmp_path, "1")
    prepared = _prepare(tmp_path, tmp_path)
    assert prepared.ids == ["CT_1_000", "CT_1_001", "CT_1_002"]
    assert prepared.classes == ["background", "liver"]
    for i in range(3):
        image, mask = prepared.images[i, 0].astype(np.float32), prepared.masks[i]
        # slice i is the one with InstanceNumber i + 1 (not the i-th file name), paired with liver_GT_00i
        assert image[5, 4 * (i + 1)] == pytest.approx(0.5, abs=1e-3)  # HU = window level
        assert image[5, 2] == 0 and image[0, 0] == 1  # air and bone clip to the window's ends
        assert mask[4 * i : 4 * i + 4].min() == 1 and mask.sum() == 4 * N


def test_ct_window_option(tmp_path):
    write_ct_patient(tmp_path, "1")
    prepared = _prepare(tmp_path, tmp_path, window=(LEVEL + 100, 200))  # the level is now 100 HU below centre
    assert float(prepared.images[0, 0, 5, 4]) == pytest.approx(0.0, abs=1e-3)
    prepared = _prepare(tmp_path, tmp_path, window=(0, 2000))  # -1000..1000 HU: 40 HU -> 0.52
    assert float(prepared.images[0, 0, 5, 4]) == pytest.approx(0.52, abs=1e-3)
    assert float(prepared.images[0, 0, 5, 2]) == 0 and float(prepared.images[0, 0, 0, 0]) == 1


def test_patients_are_groups_and_never_split(tmp_path):
    for pid in ("10", "2", "5"):
        write_ct_patient(tmp_path, pid)
    prepared = _prepare(tmp_path, tmp_path)
    assert prepared.groups == ["CT/2"] * 3 + ["CT/5"] * 3 + ["CT/10"] * 3  # natural order of patient ids
    assert prepared.ids[:2] == ["CT_2_000", "CT_2_001"] and prepared.ids[-1] == "CT_10_002"
    cfg = DataConfig(dataset="chaos", root=tmp_path, image_size=N, labeled=1)
    splits = make_splits(prepared, cfg)
    groups = np.array(prepared.groups)
    parts = [
        set(groups[idx])
        for idx in (np.concatenate([splits.labeled, splits.unlabeled]), splits.val, splits.test)
    ]
    assert all(parts) and not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])


def test_mr_grey_values_map_to_organs(tmp_path):
    write_mr_patient(tmp_path, "3")
    prepared = _prepare(tmp_path, tmp_path, modality="MR")
    assert prepared.classes == ["background", "liver", "right_kidney", "left_kidney", "spleen"]
    assert prepared.ids == ["MR_3_T2SPIR_000", "MR_3_T2SPIR_001"] and prepared.groups == ["MR/3", "MR/3"]
    mask = prepared.masks[0]
    for k, (_, cls) in enumerate(MR_BANDS):
        assert (mask[2 + 3 * k : 4 + 3 * k, 4:28] == cls).all()
    assert mask[0].max() == 0 and mask[:, :4].max() == 0
    image = prepared.images[0, 0].astype(np.float32)
    assert image.min() == 0 and image.max() == 1 and image[0, 0] < image[0, -1]  # robust-scaled ramp


def test_mr_t1dual_phases_read_their_own_folder(tmp_path):
    write_mr_patient(tmp_path, "3")
    inphase = _prepare(tmp_path, tmp_path, modality="MR", sequence="T1DUAL_in")
    outphase = _prepare(tmp_path, tmp_path, modality="MR", sequence="T1DUAL_out")
    assert inphase.ids == ["MR_3_T1DUAL_in_000", "MR_3_T1DUAL_in_001"]
    assert inphase.images[0, 0, 0, 0] > inphase.images[0, 0, 0, -1]
    assert outphase.images[0, 0, 0, 0] < outphase.images[0, 0, 0, -1]
    assert np.array_equal(np.asarray(inphase.masks), np.asarray(outphase.masks))  # one shared Ground folder


def test_mr_unknown_grey_value_names_the_png(tmp_path):
    write_mr_patient(tmp_path, "3")
    bad = tmp_path / "Train_Sets" / "MR" / "3" / "T2SPIR" / "Ground" / "IMG-0002-00002.png"
    truth = mr_truth()
    truth[30, 30] = 90
    Image.fromarray(truth).save(bad)
    with pytest.raises(DataError) as exc:
        _prepare(tmp_path, tmp_path, modality="MR")
    _one_line(exc, bad, "90")


def test_count_mismatch_names_the_folder(tmp_path):
    write_ct_patient(tmp_path, "1")
    (tmp_path / "Train_Sets" / "CT" / "1" / "Ground" / "liver_GT_002.png").unlink()
    with pytest.raises(DataError) as exc:
        _prepare(tmp_path, tmp_path)
    _one_line(exc, tmp_path / "Train_Sets" / "CT" / "1" / "DICOM_anon", "3 DICOM slices but 2")


def test_corrupt_dicom_names_the_file(tmp_path):
    write_ct_patient(tmp_path, "1")
    bad = tmp_path / "Train_Sets" / "CT" / "1" / "DICOM_anon" / "i0001,0000b.dcm"
    bad.write_bytes(b"this is not a DICOM file" * 10)
    with pytest.raises(DataError) as exc:
        _prepare(tmp_path, tmp_path)
    _one_line(exc, bad)


def test_truncated_pixel_data_names_the_file(tmp_path):
    write_ct_patient(tmp_path, "1")
    bad = tmp_path / "Train_Sets" / "CT" / "1" / "DICOM_anon" / "i0001,0000b.dcm"
    bad.write_bytes(bad.read_bytes()[:-100])  # the header (and InstanceNumber) survive, the pixels do not
    with pytest.raises(DataError) as exc:
        _prepare(tmp_path, tmp_path)
    _one_line(exc, bad)


def test_missing_instance_number_names_the_file(tmp_path):
    write_ct_patient(tmp_path, "1")
    bad = tmp_path / "Train_Sets" / "CT" / "1" / "DICOM_anon" / "i0001,0000b.dcm"
    write_dicom(bad, ct_slice(1), None)
    with pytest.raises(DataError) as exc:
        _prepare(tmp_path, tmp_path)
    _one_line(exc, bad, "InstanceNumber")


def test_missing_folders_explain_the_layout(tmp_path):
    with pytest.raises(DataError) as exc:
        _prepare(tmp_path, tmp_path)
    _one_line(exc, tmp_path / "Train_Sets" / "CT", "zenodo.org/records/3431873", "DICOM_anon")
    write_ct_patient(tmp_path, "1")
    with pytest.raises(DataError) as exc:
        _prepare(tmp_path, tmp_path, modality="MR")
    _one_line(exc, tmp_path / "Train_Sets" / "MR")
    (tmp_path / "Train_Sets" / "MR" / "4").mkdir(parents=True)
    with pytest.raises(DataError) as exc:
        _prepare(tmp_path, tmp_path, modality="MR")
    _one_line(exc, tmp_path / "Train_Sets" / "MR" / "4" / "T2SPIR" / "DICOM_anon")


def test_bad_options_are_config_errors(tmp_path):
    with pytest.raises(ConfigError) as exc:
        validate({"data": {"dataset": "chaos", "root": str(tmp_path), "options": {"modalty": "MR"}}})
    assert exc.value.problems == ["data.options.modalty: unknown key"]
    with pytest.raises(ConfigError) as exc:
        validate({"data": {"dataset": "chaos", "root": str(tmp_path), "options": {"window": [40, 0]}}})
    assert exc.value.problems[0].startswith("data.options.window[1]: must be > 0")
    cfg = validate({"data": {"dataset": "chaos", "root": str(tmp_path), "options": {"modality": "MR"}}})
    assert cfg.data.options == {"modality": "MR"}
    with pytest.raises(ConfigError) as exc:  # MR has five classes
        validate(
            {
                "data": {
                    "dataset": "chaos",
                    "root": str(tmp_path),
                    "classes": ["bg", "liver"],
                    "options": {"modality": "MR"},
                }
            }
        )
    assert exc.value.problems[0].startswith("data.classes:")
