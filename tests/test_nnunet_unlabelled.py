"""dycon.nnunet without training: the unlabelled folder's checks, and nnU-Net finding the trainers."""
import subprocess
import sys

import pytest

from dycon.nnunet import TRAINER_NAMES, trainer_folder
from dycon.nnunet.unlabelled import preprocessed_folder, unlabelled_cases

DATASET_JSON = {"file_ending": ".nii.gz", "channel_names": {"0": "T1", "1": "T2"}}


def _touch(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")


def test_cases_grouped_by_channel(tmp_path):
    _touch(tmp_path / "imagesUnlabelled", "b_0001.nii.gz", "b_0000.nii.gz", "a_0000.nii.gz", "a_0001.nii.gz")
    cases = unlabelled_cases(str(tmp_path), DATASET_JSON)
    assert list(cases) == ["a", "b"]
    assert [p.rsplit("/", 1)[1] for p in cases["b"]] == ["b_0000.nii.gz", "b_0001.nii.gz"]


def test_no_folder_means_no_cases(tmp_path):
    assert unlabelled_cases(str(tmp_path), DATASET_JSON) == {}


@pytest.mark.parametrize("names, message", [
    (["a_0000.nii.gz", "a_0001.nii.gz", "notes.txt"], r"notes\.txt: not named <case>_<XXXX>\.nii\.gz"),
    (["a_0000.nii.gz", "a_0001.nii.gz", "a_0002.nii.gz"], r"a_0002\.nii\.gz: channel 0002, but dataset\.json has 2"),
    (["a_0000.nii.gz"], r"case 'a' lacks channel file\(s\) \['a_0001\.nii\.gz'\]"),
])
def test_bad_files_are_named(tmp_path, names, message):
    _touch(tmp_path / "imagesUnlabelled", *names)
    with pytest.raises(ValueError, match=message):
        unlabelled_cases(str(tmp_path), DATASET_JSON)


def test_preprocessed_folder_sits_beside_the_labelled_one():
    assert preprocessed_folder("/p/Dataset001_X/nnUNetPlans_3d_fullres/") == "/p/Dataset001_X/nnUNetPlans_3d_fullres_unlabelled"


def test_command_prints_the_trainer_folder():
    out = subprocess.run([sys.executable, "-m", "dycon.nnunet"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == trainer_folder()


def test_nnunet_finds_every_trainer_through_the_environment(monkeypatch):
    pytest.importorskip("nnunetv2", reason="nnunetv2 is not installed (pip install -e '.[nnunet]')")
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    monkeypatch.setenv("nnUNet_extTrainer", trainer_folder())
    for name in TRAINER_NAMES:
        found = recursive_find_trainer_class_by_name(name)
        assert found.__name__ == name and issubclass(found, nnUNetTrainer)
